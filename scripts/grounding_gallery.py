"""Render photos with their caption before and after grounded decoding, and the encoder's labels.

    python scripts/grounding_gallery.py ../shared/coco-mini --split train --count 8 \\
        --out docs/images/grounding.jpg

The photos are a seeded random sample of the split (not picked by hand): each panel shows the photo, the
decoder's caption alone (`--no-grounding`), the grounded caption (the default) and the top labels.
"""

from __future__ import annotations

import argparse
import random
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from captioner.data import load_dataset  # noqa: E402
from captioner.model import Captioner  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--split", default="train")
    p.add_argument("--model", default=None)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/images/grounding.jpg")
    args = p.parse_args()

    examples = load_dataset(args.data).split(args.split)
    chosen = random.Random(args.seed).sample(examples, min(args.count, len(examples)))
    model = Captioner.from_pretrained(args.model)
    paths = [e.image for e in chosen]
    before = model.caption(paths, grounding=False)
    after = model.caption(paths)

    cols = 4
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 5.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, b, a in zip(axes.flat, paths, before, after, strict=False):
        with Image.open(path) as im:
            ax.imshow(ImageOps.exif_transpose(im).convert("RGB"))
        labels = ", ".join(f"{x.label} {x.p:.2f}" for x in a.labels[:3]) or "(none)"
        text = "\n".join(
            [
                *textwrap.wrap(f"alone: {b.caption}", 44),
                *textwrap.wrap(f"grounded: {a.caption}", 44),
                *textwrap.wrap(f"labels: {labels}", 44),
            ]
        )
        ax.set_title(text, fontsize=8.5, loc="left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
