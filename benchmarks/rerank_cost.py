"""What consensus re-ranking (captioner.neighbours) costs: decoding with and without it, in one run.

    python benchmarks/rerank_cost.py --images ../shared/flickr8k/Images --count 256 --repeat 3

Encodes `--count` photos once, then decodes their features at beam 3 (default decoding: grounded, whole
phrases) with re-ranking and without it, alternating the two `--repeat` times and keeping each one's best
time, so that the ratio compares like with like on a noisy machine. The one-time cost, building CIDEr-D's
document frequencies of the training captions at the first re-ranked caption, is timed on its own. Prints
a Markdown table for docs/benchmarks.md, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import machine  # noqa: E402

from captioner.evaluate import encode_images  # noqa: E402
from captioner.model import Captioner  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="a folder of JPEGs")
    p.add_argument("--model", default=None, help="a checkpoint that carries neighbours (default: bundled)")
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    model = Captioner.from_pretrained(args.model)
    if model.neighbours is None:
        sys.exit(f"{model.path}: carries no neighbours (`captioner neighbours`)")
    paths = sorted(Path(args.images).glob("*.jpg"))[: args.count]
    _, pooled, grid, _ = encode_images(model, paths, args.batch_size)

    start = time.perf_counter()
    model.neighbours.cider  # noqa: B018 (built on first use: time it alone)
    build = time.perf_counter() - start

    def decode(rerank: bool) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(pooled), args.batch_size):
                model.generate(pooled[s : s + args.batch_size], grid[s : s + args.batch_size], rerank=rerank)
        return time.perf_counter() - start

    decode(True)  # warm-up: the neighbours' reference vectors, the decoder's first passes
    best = {True: float("inf"), False: float("inf")}
    for _ in range(args.repeat):
        for rerank in (False, True):
            best[rerank] = min(best[rerank], decode(rerank))
    n = len(pooled)
    print(
        f"Machine: {machine()}. {n} photos of {args.images}, beam 3, batch {args.batch_size}, "
        f"best of {args.repeat}.\n"
    )
    print("| decoding | ms a photo | ratio |\n|---|---:|---:|")
    print(f"| beam 3, `--no-rerank` | {1000 * best[False] / n:.1f} | 1.00 |")
    print(f"| beam 3, re-ranked (k 10) | {1000 * best[True] / n:.1f} | {best[True] / best[False]:.2f} |")
    print(f"\nBuilding the CIDEr-D document frequencies (once per process): {build:.2f} s.")


if __name__ == "__main__":
    main()
