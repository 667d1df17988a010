"""Render a gallery of held-out photos with the model's caption, the references and per-word attention.

    python scripts/gallery.py ../shared/flickr8k --split test --count 6 --out docs/images/gallery.png

Each row: the photo, then one small copy of it per generated word with that word's attention over the
encoder's grid (attention decoders only), and under it the caption and the human references.
"""

from __future__ import annotations

import argparse
import random
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from captioner.data import load_dataset  # noqa: E402
from captioner.images import build_transform, load_image  # noqa: E402
from captioner.model import Captioner  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--split", default="test")
    p.add_argument("--model", default=None)
    p.add_argument("--count", type=int, default=6)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-words", type=int, default=10)
    p.add_argument("--out", default="docs/images/gallery.png")
    args = p.parse_args()

    model = Captioner.from_pretrained(args.model)
    examples = load_dataset(args.data).split(args.split)
    chosen = random.Random(args.seed).sample(examples, args.count)
    transform = build_transform(model.encoder.preprocess)
    images = [load_image(ex.image) for ex in chosen]
    results = model.caption_tensors(torch.stack([transform(im) for im in images]), beam_size=args.beam_size)

    cols = 1 + args.max_words
    fig = plt.figure(figsize=(cols * 1.6, args.count * 3.4))
    grid = fig.add_gridspec(
        args.count * 2, cols, height_ratios=[1.6, 1.8] * args.count, hspace=0.1, wspace=0.05
    )
    for row, (ex, image, result) in enumerate(zip(chosen, images, results, strict=True)):
        photo = np.asarray(image.resize((224, 224)))
        ax = fig.add_subplot(grid[2 * row, 0])
        ax.imshow(photo)
        ax.axis("off")
        for j, word in enumerate(result.words[: args.max_words]):
            ax = fig.add_subplot(grid[2 * row, 1 + j])
            ax.imshow(photo)
            if result.attention is not None and result.grid_shape is not None:
                heat = result.attention[j].reshape(result.grid_shape).numpy()
                heat = np.asarray(Image.fromarray(heat / heat.max()).resize((224, 224), Image.BICUBIC))
                ax.imshow(heat, cmap="inferno", alpha=0.55)
            ax.set_title(word, fontsize=10)
            ax.axis("off")
        text = fig.add_subplot(grid[2 * row + 1, :])
        text.axis("off")
        refs = "\n".join(textwrap.shorten(c, 110) for c in ex.captions)
        text.text(0, 0.95, f"model: {result.caption}", fontsize=11, weight="bold", va="top")
        text.text(0, 0.72, f"references ({ex.image.name}):\n{refs}", fontsize=8.5, va="top", color="#333")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
