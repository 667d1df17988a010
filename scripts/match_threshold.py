"""Choose the score below which a search says "no good match", from queries with a match and without.

A search always returns its top k, even for a query that no indexed photo answers; the page should say
so. The signal is the best hit's match score (fusion.match_score): the mean of its cosine similarity to
the query in the search embedding and the sentence model's similarity of query and captions, or the
latter alone for an index made without a search embedding. Unlike the fused rank score, it means the
same for every query. Each signal is also printed alone. For each gallery (an index made by
`captioner index` of a split's photos):

- queries with a good match: the gallery's own reference captions (each photo's are in the index);
- queries without one: the other data set's reference captions that name a COCO object category that no
  reference caption of the gallery names (a pizza, a laptop, a giraffe in Flickr8k's 1,000 dev photos).

The threshold kept maximises balanced accuracy (the mean of the two rates of correct answers) over both
galleries pooled, so the two data sets weigh alike; the rates at it are printed per gallery:

    captioner index dev8k/ --db dev8k.sqlite && captioner index coco-mini/ --db coco.sqlite
    python scripts/match_threshold.py --gallery ../shared/flickr8k:dev:dev8k.sqlite \\
        --gallery ../shared/coco-mini:train:coco.sqlite
"""

from __future__ import annotations

import argparse

import numpy as np

from captioner.data import load_dataset
from captioner.hallucination import objects
from captioner.search import PhotoIndex, attach_embedding
from captioner.search.fusion import match_score


def best_scores(index: PhotoIndex, queries: list[str]) -> dict[str, np.ndarray]:
    """The best hit's joint and semantic similarity for each query, ranked as search ranks."""
    joint, semantic = [], []
    for q in queries:
        hit = index.search(q, 1)[0]
        joint.append(np.nan if hit.joint is None else hit.joint)  # nan: made without a search embedding
        semantic.append(hit.semantic)
    return {"joint": np.array(joint), "semantic": np.array(semantic)}


def balanced_accuracy(good: np.ndarray, none: np.ndarray, t: float) -> float:
    return 0.5 * ((good >= t).mean() + (none < t).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gallery", action="append", required=True, help="DATA:SPLIT:INDEX, two or more")
    parser.add_argument("--queries", type=int, default=5, help="reference captions a photo as queries")
    args = parser.parse_args()
    galleries = []
    for spec in args.gallery:
        root, split, db = spec.rsplit(":", 2)
        captions = [c for ex in load_dataset(root).split(split) for c in ex.captions[: args.queries]]
        galleries.append((root, db, captions))
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for root, db, captions in galleries:
        present = set().union(*(objects(c) for c in captions))
        others = [c for r, _, cs in galleries if r != root for c in cs]
        absent = [c for c in others if objects(c) - present]
        with PhotoIndex(db) as index:
            attach_embedding(index)
            scores[db] = {"good": best_scores(index, captions), "none": best_scores(index, absent)}
        print(f"{db}: {len(captions)} queries with a match, {len(absent)} naming an absent object")
    signals = {
        "match score (embedding and captions)": lambda b: match_score(b["semantic"], b["joint"]),
        "match score (captions alone)": lambda b: match_score(b["semantic"], None),
        "embedding alone": lambda b: b["joint"],
    }
    for name, signal in signals.items():
        per = {db: (signal(s["good"]), signal(s["none"])) for db, s in scores.items()}
        if any(np.isnan(g).any() or np.isnan(n).any() for g, n in per.values()):
            print(f"{name}: an index without a search embedding; skipped")
            continue
        candidates = np.unique(np.round(np.concatenate([x for pair in per.values() for x in pair]), 3))
        pooled = {
            t: float(np.mean([balanced_accuracy(g, n, t) for g, n in per.values()])) for t in candidates
        }
        best = max(candidates, key=lambda t: pooled[t])
        print(f"\n{name}: threshold {best:.3f}, balanced accuracy {100 * pooled[best]:.1f}% (pooled)")
        print("| gallery | matched queries said to match | unmatched queries said not to |\n|---|---:|---:|")
        for db, (g, n) in per.items():
            said, unsaid = 100 * (g >= best).mean(), 100 * (n < best).mean()
            print(f"| {db} | {said:.1f}% of {len(g)} | {unsaid:.1f}% of {len(n)} |")


if __name__ == "__main__":
    main()
