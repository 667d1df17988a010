"""Recall of `captioner search`: how often a photo's own reference captions, used as queries, find it.

    python benchmarks/search_recall.py --data ../shared/coco-mini --split train --db /tmp/coco.sqlite
    python benchmarks/search_recall.py --data ../shared/flickr8k --split val --limit 200 --db /tmp/dev.sqlite

Copies the split's photos (the first --limit) into a folder beside the database, indexes them (incrementally:
a re-run with the same model reuses the database), then searches with every reference caption of every photo
(the standard text-to-image protocol; --every N takes one query in N) and prints recall@1/5/10 and the median
rank of each ranking in RANKINGS (the default search, the --rerank second stage, the embedding alone, the
search before the embedding, the captions alone) as a Markdown table; --only "a|b" runs the rankings whose
names contain a or b, --sweep also tries other fusion weights, --output writes the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioner.generation import GenerationOptions
from captioner.search import SEARCH_EMBEDDING, SEARCH_MODEL, PhotoIndex
from captioner.search.index import joint_id

RANKINGS = {  # name -> options of PhotoIndex._rank
    "default: embedding + captions (blend)": {},
    "two stages (--rerank): the best 100 re-ranked with P(query | photo), fused": {"rerank": True},
    "two stages, P(query | photo) alone orders the 100": {"rerank": True, "first_stage": 0.0},
    "embedding alone": {"semantic": 0.0, "keyword": 0.0},
    "before the embedding: captions pick 100, P(query | photo) orders them": {
        "joint": 0.0,
        "rerank": True,
        "first_stage": 0.0,
    },
    "captions only: semantic + keyword": {"joint": 0.0},
}
SWEEP = {  # --sweep: the weights to choose the defaults from, on a dev split
    **{
        f"embedding + {c} x captions' cosine + {k} x keyword, no second stage": {"semantic": c, "keyword": k}
        for c in (0.1, 0.15, 0.2)
        for k in (0.05, 0.08, 0.12)
    },
    **{
        f"the same, captioner and first stage fused {f}": {"rerank": True, "first_stage": f}
        for f in (1.0, 3.0)
    },
}
TOP = 10


def memoise_likelihoods(index: PhotoIndex) -> None:
    """P(query | photo) is the slow part and the rankings share most candidates: compute each pair once."""
    real, memo = index._likelihoods, {}

    def likelihoods(query: str, photo_ids: list[int]) -> dict[int, float]:
        known = memo.setdefault(query, {})
        missing = [p for p in photo_ids if p not in known]
        if missing:
            known.update(real(query, missing))
        return {p: known[p] for p in photo_ids if p in known}

    index._likelihoods = likelihoods  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a data set any reader understands (captioner data inspect)")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=None, help="only the first N photos of the split")
    p.add_argument("--queries", type=int, default=None, help="only each photo's first N captions as queries")
    p.add_argument(
        "--every", type=int, default=1, help="queries of every Nth photo only (all in the gallery)"
    )
    p.add_argument("--only", default=None, help="only the rankings whose name contains one of these (a|b)")
    p.add_argument("--model", default=None, help="checkpoint directory or bundled model name")
    p.add_argument("--db", required=True, help="the photo index to build or update")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--n-best", type=int, default=3)
    p.add_argument("--embedding", default=SEARCH_EMBEDDING, help="search embedding, or none")
    p.add_argument("--sweep", action="store_true", help="also the weights the defaults are chosen from")
    p.add_argument("--output", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)

    from captioner.data import load_dataset
    from captioner.model import Captioner
    from captioner.search.joint import JointEmbedding

    examples = load_dataset(args.data).split(args.split)[: args.limit]
    images = Path(f"{args.db}.photos").resolve()
    images.mkdir(parents=True, exist_ok=True)
    references: dict[str, list[str]] = {}
    for number, example in enumerate(examples):
        copy = images / f"{number:05d}{example.image.suffix.lower()}"
        if not copy.exists():
            shutil.copyfile(example.image, copy)
        references[str(copy)] = list(example.captions)

    start = time.perf_counter()
    captioner = Captioner.from_pretrained(args.model or SEARCH_MODEL)
    joint = None if args.embedding == "none" else JointEmbedding.from_pretrained(args.embedding)
    rankings = {**RANKINGS, **(SWEEP if args.sweep else {})}
    if args.only:
        rankings = {k: v for k, v in rankings.items() if any(w in k for w in args.only.split("|"))}
    if joint is None:
        rankings = {k: v for k, v in rankings.items() if v.get("joint") == 0.0}
    with PhotoIndex(args.db, create=True) as index:
        options = GenerationOptions(beam_size=args.beam_size, n_best=args.n_best)
        if not index.is_new() and index.embedding_id() != (joint_id(joint) if joint else None):
            index.reembed(captioner, joint, args.embedding)  # another embedding: no re-captioning
        # keep_grid: re-ranking 100 candidates of each of 5,000 queries reads stored grids, not the files
        # (the same features up to float16 rounding, so the same recall)
        counts = index.update(
            images, captioner, options, joint=joint, joint_name=args.embedding, keep_grid=True
        )
        indexed = time.perf_counter() - start
        if not index.attach(captioner) or (joint is not None and not index.attach_embedding(joint)):
            raise SystemExit(f"{args.db}: indexed by another model or embedding; pass a new --db")
        memoise_likelihoods(index)
        ranks: dict[str, list[int]] = {name: [] for name in rankings}  # TOP + 1: not in the top TOP
        queries = 0
        asked = list(references.items())[:: args.every]
        for path, captions in tqdm(asked, desc="searching"):
            for caption in captions[: args.queries]:
                queries += 1
                for name, signals in rankings.items():
                    ranked = [hit.path for hit in index._rank(caption, TOP, **signals)]
                    ranks[name].append(ranked.index(path) + 1 if path in ranked else TOP + 1)
        photos = len(index)
    searched = time.perf_counter() - start - indexed

    print(
        f"{queries:,} queries (reference captions) over a gallery of {photos:,} photos of {args.data} "
        f"({args.split}), model {args.model or SEARCH_MODEL}, embedding {args.embedding}, beam "
        f"{args.beam_size}; indexing {indexed:.0f} s ({counts['added'] + counts['updated']} captioned, "
        f"{counts['failed']} failed), searching {searched:.0f} s\n"
    )
    print("| ranking | R@1 | R@5 | R@10 | median rank |\n|---|---:|---:|---:|---:|")
    table = {}
    for name, found in ranks.items():
        r = np.array(found)
        median = float(np.median(r))
        table[name] = {f"R@{k}": float(100 * (r <= k).mean()) for k in (1, 5, 10)} | {
            "median rank": median if median <= TOP else None
        }
        shown = f"{median:.0f}" if median <= TOP else f"> {TOP}"
        row = table[name]
        print(f"| {name} | {row['R@1']:.1f} | {row['R@5']:.1f} | {row['R@10']:.1f} | {shown} |")
    if args.output:
        meta = {"data": args.data, "split": args.split, "photos": photos, "queries": queries}
        Path(args.output).write_text(json.dumps({**meta, "rankings": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
