"""How a model copes with photos of other shapes: squash or centre-crop at inference, by aspect ratio.

    python scripts/aspect_ratio.py --data ../shared/coco-mini --split train [--model DIR]

Captions the split twice (beam 3), once squashing each photo to a square and once cropping its centre, and
prints CIDEr-D (coco-caption, per photo, averaged) for landscape, near-square and portrait photos and for
all of them, as a Markdown table. The shared Flickr8k photos were squashed to 224 x 224 before training, so
a model trained on them has only ever seen squashed photos; users' photos keep their shape.
"""

from __future__ import annotations

import argparse
import sys

from PIL import Image

from captioner.evaluate import evaluate_model
from captioner.features import image_key
from captioner.metrics import tokenize


def shape(width: int, height: int) -> str:
    ratio = width / height
    return (
        "landscape (w/h > 1.2)" if ratio > 1.2 else "portrait (w/h < 0.83)" if ratio < 0.83 else "near-square"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--model", default=None)
    p.add_argument("--beam-size", type=int, default=3)
    args = p.parse_args(argv)

    from pycocoevalcap.cider.cider import Cider

    per_mode: dict[str, dict[str, float]] = {}
    shapes: dict[str, str] = {}
    for mode in ("squash", "crop"):
        [report] = evaluate_model(
            args.data,
            split=args.split,
            model=args.model,
            beam_sizes=[args.beam_size],
            resize=mode,
            quiet=True,
        )
        done = [c for c in report["captions"] if c.get("caption") is not None]
        refs = tokenize({c["image"]: c["references"] for c in done})
        cands = tokenize({c["image"]: [c["caption"] or "<unk>"] for c in done})
        keys = list(refs)
        _, scores = Cider().compute_score({k: refs[k] for k in keys}, {k: cands[k] for k in keys})
        per_mode[mode] = {k: 100 * float(s) for k, s in zip(keys, scores, strict=True)}
        if not shapes:
            from captioner.data import load_dataset

            data = load_dataset(args.data)
            for ex in data.split(args.split):
                with Image.open(ex.image) as img:
                    shapes[image_key(ex.image, data.root)] = shape(*img.size)
    groups = sorted(set(shapes.values())) + ["all"]
    model = args.model or "bundled"
    print(f"CIDEr-D by photo shape, {args.data} ({args.split}), model {model}, beam {args.beam_size}")
    print("\n| photos | count | squash | centre crop |\n|---|---:|---:|---:|")
    for group in groups:
        keys = [k for k in per_mode["squash"] if group == "all" or shapes.get(k) == group]
        if not keys:
            continue
        mean = {m: sum(per_mode[m][k] for k in keys) / len(keys) for m in per_mode}
        print(f"| {group} | {len(keys)} | {mean['squash']:.1f} | {mean['crop']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
