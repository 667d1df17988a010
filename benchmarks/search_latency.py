"""Query latency of `captioner search` at library size, in two parts that together make one search.

    python benchmarks/search_latency.py --captions ../shared/flickr8k --photos 100000 --db /tmp/big.sqlite \
        --rerank-db /tmp/dev.sqlite

1. The first stage (captions + keywords + search embedding, fused) over a gallery of --photos photos: an
   index built here row by row like `captioner index` stores them, with real caption texts (drawn from the
   data set, so keyword matches are as frequent as on real captions) and random unit vectors for the caption
   embedding and the photo's search-embedding vector. Its photos carry no encoder features (100,000 grids
   would be 21 GB), so this part leaves out the second stage.
2. The second stage on a real index (--rerank-db, from benchmarks/search_recall.py): P(query | photo) of the
   100 candidates from their stored features. Its cost does not depend on the gallery's size.

Prints the median and 95th percentile of each part over the queries, and their sum.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from captioner.search import RERANK, SEARCH_EMBEDDING, SEARCH_MODEL, PhotoIndex

QUERIES = [
    "a dog runs through the grass",
    "two children play on the beach",
    "a man rides a bike down a street",
    "a woman in a red dress",
    "people sitting at a table eating",
    "a cat on a sofa",
    "a skier jumps off a ramp",
    "a boy in a blue shirt kicks a ball",
    "a crowd at a concert",
    "a kitchen with a stove",
    "a black and white dog jumps over a fence",
    "a girl in a pink jacket climbs a rock",
    "a surfer rides a wave",
    "a group of people walk down a city street",
    "a man with a guitar on a stage",
    "a brown dog swims in a lake",
    "children on a playground slide",
    "a person in a kayak on a river",
    "a plate of food on a table",
    "a snowboarder in the air",
]


def build(db: Path, photos: int, texts: list[str], joint_dim: int) -> None:
    rng = np.random.default_rng(0)
    with PhotoIndex(db, create=True) as index, index._conn:
        conn = index._conn
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('model', 'synthetic'), ('joint', 'synthetic')")
        for start in range(0, photos, 5000):
            rows = []
            for n in range(start, min(photos, start + 5000)):
                e = rng.standard_normal(384).astype("<f4")
                j = rng.standard_normal(joint_dim).astype("<f4")
                captions = [texts[int(i)] for i in rng.integers(0, len(texts), 3)]
                rows.append((n, captions, e / np.linalg.norm(e), j / np.linalg.norm(j)))
            for n, captions, e, j in rows:
                rowid = conn.execute(
                    "INSERT INTO photos (path, root, size, mtime, caption, captions, labels, embedding, "
                    "joint) VALUES (?, '/photos', 1, 0, ?, ?, '[]', ?, ?)",
                    (
                        f"/photos/{n:06d}.jpg",
                        captions[0],
                        json.dumps([{"caption": c} for c in captions]),
                        e.tobytes(),
                        j.astype("<f2").tobytes(),
                    ),
                ).lastrowid
                conn.execute(
                    "INSERT INTO captions_fts (rowid, captions, labels) VALUES (?, ?, '')",
                    (rowid, " ".join(captions)),
                )


def timed(fn, repeats: int = 3) -> list[float]:
    fn(QUERIES[0])  # warm: the sentence model, the matrix cache
    times = []
    for _ in range(repeats):
        for q in QUERIES:
            t = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t)
    return times


def summary(times: list[float]) -> str:
    return f"median {1000 * statistics.median(times):.0f} ms, p95 {1000 * np.percentile(times, 95):.0f} ms"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captions", required=True, help="a data set whose captions fill the index")
    p.add_argument("--photos", type=int, default=100_000)
    p.add_argument("--db", required=True, help="the synthetic index (built if missing)")
    p.add_argument("--rerank-db", required=True, help="a real index with features and an embedding")
    args = p.parse_args(argv)

    from captioner.data import load_dataset
    from captioner.model import Captioner
    from captioner.search.joint import JointEmbedding

    joint = JointEmbedding.from_pretrained(SEARCH_EMBEDDING)
    db = Path(args.db)
    if not db.exists():
        texts = [c for ex in load_dataset(args.captions).examples for c in ex.captions]
        t = time.perf_counter()
        build(db, args.photos, texts, joint.config.embed_dim)
        print(f"built {db}: {args.photos:,} photos in {time.perf_counter() - t:.0f} s")
    with PhotoIndex(db) as big:
        big._joint = joint  # the synthetic vectors are in no model's space: only the arithmetic counts
        first = timed(lambda q: big._rank(q, 10, rerank=False))
        n = len(big)
    with PhotoIndex(args.rerank_db) as real:
        captioner = Captioner.from_pretrained(real.model_name() or SEARCH_MODEL)
        assert real.attach(captioner)
        ids = real._photos()[0][:RERANK]
        second = timed(lambda q: real._likelihoods(q, ids))
    print(f"first stage over {n:,} photos: {summary(first)}")
    print(f"second stage, P(query | photo) of {len(ids)} candidates: {summary(second)}")
    total = [a + b for a, b in zip(first, second, strict=True)]
    print(f"one search (the two summed per query): {summary(total)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
