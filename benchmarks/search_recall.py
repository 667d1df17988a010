"""Recall of `captioner search`: how often a photo's own reference captions, used as queries, find it.

    python benchmarks/search_recall.py --images ../shared/coco-mini/train2017 \\
        --annotations ../shared/coco-mini/annotations/captions_train2017.json \\
        --model MODEL --db /tmp/coco.sqlite

Indexes the photos (incrementally: a re-run with the same model reuses the database), then searches with
every reference caption of every photo and prints recall@1 and recall@5 (the fraction of queries whose photo
comes first / in the top 5) for the fused ranking, other weights and each signal alone, as a Markdown table,
and the share of photos found in the top 5 when searched with their first reference caption. Keyword alone
ranks only the photos that match a word, so its recall counts a photo that matches nothing as a miss.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from captioner.search import KEYWORD_WEIGHT, LIKELIHOOD_WEIGHT, PhotoIndex

KW, LL = KEYWORD_WEIGHT, LIKELIHOOD_WEIGHT
RANKINGS = {  # name -> the weights PhotoIndex._rank gives the three signals (0 = off)
    "default: all three fused (weighted reciprocal rank fusion)": {"keyword": KW, "likelihood": LL},
    "captions only: semantic + keyword": {"keyword": KW, "likelihood": 0.0},
    "semantic + keyword + likelihood x0.5": {"keyword": KW, "likelihood": 0.5},
    "semantic + keyword + likelihood x2": {"keyword": KW, "likelihood": 2.0},
    "semantic + keyword, equal weights": {"keyword": 1.0, "likelihood": 0.0},
    "semantic only": {"keyword": 0.0, "likelihood": 0.0},
    "keyword only (FTS5 bm25)": {"semantic": 0.0, "keyword": 1.0, "likelihood": 0.0},
    "likelihood only, P(query | photo)": {"semantic": 0.0, "keyword": 0.0, "likelihood": 1.0},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, help="folder of the photos")
    p.add_argument("--annotations", required=True, help="COCO captions JSON (images, annotations)")
    p.add_argument("--model", default=None, help="checkpoint directory or bundled model name")
    p.add_argument("--db", required=True, help="the photo index to build or update")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--n-best", type=int, default=3)
    args = p.parse_args(argv)

    from captioner.model import Captioner

    coco = json.loads(Path(args.annotations).read_text())
    images = Path(args.images).resolve()
    files = {image["id"]: str(images / image["file_name"]) for image in coco["images"]}
    references = defaultdict(list)
    for annotation in coco["annotations"]:
        references[files[annotation["image_id"]]].append(annotation["caption"].strip())

    start = time.perf_counter()
    captioner = Captioner.from_pretrained(args.model)
    with PhotoIndex(args.db, create=True) as index:
        counts = index.update(images, captioner, beam_size=args.beam_size, n_best=args.n_best)
        indexed = time.perf_counter() - start
        if not index.attach(captioner):
            raise SystemExit(f"{args.db}: indexed by another model; pass a new --db")
        found = {name: [0, 0, 0] for name in RANKINGS}  # [first, in the top 5, photo's first query in top 5]
        queries = 0
        for path, captions in references.items():
            for number, caption in enumerate(captions):
                queries += 1
                for name, signals in RANKINGS.items():
                    ranked = [hit.path for hit in index._rank(caption, 5, **signals)]
                    found[name][0] += ranked[:1] == [path]
                    found[name][1] += path in ranked
                    found[name][2] += number == 0 and path in ranked
        photos = len(index)
    searched = time.perf_counter() - start - indexed

    print(
        f"{queries} queries (reference captions) over {photos} photos, {args.model}; "
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
