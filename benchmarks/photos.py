"""Phone-sized test photos for the benchmarks: 12-megapixel JPEGs made from real photos.

    python benchmarks/photos.py ../shared/coco-mini /tmp/photos-12mp --count 32

No 12-megapixel photos can be downloaded on the machines the benchmarks run on, so each one is a real
photo enlarged to 4000 x 3000 (3000 x 4000 for portrait ones) with sensor-like grain added, so that the
JPEG holds as much detail to decode as a phone photo's (a smooth enlargement would decode faster), saved
at quality 90, the way phones save them. Every other photo is stored sideways with an EXIF orientation
tag, as phones store photos taken upright, so the cost of turning it the right way up is measured too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SIDES = (4000, 3000)


def make_photos(source: Path, out: Path, count: int, seed: int = 0) -> list[Path]:
    """Write `count` 12-megapixel JPEGs made from the JPEGs under `source`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    made = []
    for i, src in enumerate(sorted(source.rglob("*.jpg"))[:count]):
        with Image.open(src) as img:
            small = img.convert("RGB")
        size = SIDES if small.width >= small.height else SIDES[::-1]
        big = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
        big += rng.normal(0.0, 6.0, big.shape[:2] + (1,)).astype(np.float32)  # luminance grain
        photo = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))
        exif = Image.Exif()
        if i % 2:
            photo = photo.transpose(Image.Transpose.ROTATE_90)  # stored sideways ...
            exif[0x0112] = 6  # ... with the tag that says "turn 90 degrees clockwise to view"
        path = out / f"photo{i:04d}.jpg"
        photo.save(path, quality=90, exif=exif)
        made.append(path)
    return made


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="a folder of JPEGs")
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=32)
    args = p.parse_args()
    made = make_photos(args.source, args.out, args.count)
    print(f"{len(made)} photos of 12 megapixels in {args.out}")


if __name__ == "__main__":
    main()
