"""Recall of `captioner search`: how often a photo's own reference captions, used as queries, find it.

    python benchmarks/search_recall.py --data ../shared/coco-mini --split train --db /tmp/coco.sqlite
    python benchmarks/search_recall.py --data ../shared/flickr8k --split val --limit 200 --db /tmp/dev.sqlite

Copies the split's photos (the first --limit) into a folder beside the database, indexes them (incrementally:
a re-run with the same model reuses the database), then searches with
every reference caption of every photo and prints recall@1 and recall@5 (the fraction of queries whose photo
comes first / in the top 5) for the fused ranking, other weights and each signal alone, as a Markdown table,
and the share of photos found in the top 5 when searched with their first reference caption. Keyword alone
ranks only the photos that match a word, so its recall counts a photo that matches nothing as a miss.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from captioner.generation import GenerationOptions
from captioner.search import RERANK, SEARCH_MODEL, PhotoIndex

RANKINGS = {  # name -> options of PhotoIndex._rank
    f"default: captions pick {RERANK}, the captioner orders them by P(query | photo)": {},
    "default without the labels' keywords": {"labels": False},
    "captions only: semantic + keyword (reciprocal rank fusion)": {"rerank": False},
    "semantic only": {"keyword": 0.0, "rerank": False},
    "keyword only (FTS5 bm25)": {"semantic": 0.0, "keyword": 1.0, "rerank": False},
    "keyword only, captions without labels": {
        "semantic": 0.0,
        "keyword": 1.0,
        "rerank": False,
        "labels": False,
    },
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a data set any reader understands (captioner data inspect)")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=None, help="only the first N photos of the split")
    p.add_argument("--queries", type=int, default=None, help="only each photo's first N captions as queries")
    p.add_argument("--model", default=None, help="checkpoint directory or bundled model name")
    p.add_argument("--db", required=True, help="the photo index to build or update")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--n-best", type=int, default=3)
    args = p.parse_args(argv)

    from captioner.data import load_dataset
    from captioner.model import Captioner

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
    with PhotoIndex(args.db, create=True) as index:
        options = GenerationOptions(beam_size=args.beam_size, n_best=args.n_best)
        counts = index.update(images, captioner, options)
        indexed = time.perf_counter() - start
        if not index.attach(captioner):
            raise SystemExit(f"{args.db}: indexed by another model; pass a new --db")
        found = {name: [0, 0, 0] for name in RANKINGS}  # [first, in the top 5, photo's first query in top 5]
        queries = 0
        for path, captions in references.items():
            for number, caption in enumerate(captions[: args.queries]):
                queries += 1
                for name, signals in RANKINGS.items():
                    ranked = [hit.path for hit in index._rank(caption, 5, **signals)]
                    found[name][0] += ranked[:1] == [path]
                    found[name][1] += path in ranked
                    found[name][2] += number == 0 and path in ranked
        photos = len(index)
    searched = time.perf_counter() - start - indexed

    print(
        f"{queries} queries (reference captions) over {photos} photos of {args.data} ({args.split}), "
        f"model {args.model or SEARCH_MODEL}; "
        f"indexing {indexed:.0f} s ({counts['added'] + counts['updated']} captioned, "
        f"{counts['failed']} failed), "
        f"searching {searched:.0f} s\n"
    )
    print("| ranking | recall@1 | recall@5 | photos found in the top 5 by their first caption |")
    print("|---|---:|---:|---:|")
    for name, (first, top5, photos_top5) in found.items():
        q = max(queries, 1)
        print(f"| {name} | {first / q:.3f} | {top5 / q:.3f} | {photos_top5 / max(len(references), 1):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
