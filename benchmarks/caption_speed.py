"""One end-to-end captioning measurement in a fresh process: JPEG files on disk -> captions.

    python benchmarks/caption_speed.py --images DIR --count 32 --batch-size 16 --beam 3 --threads 2

Prints one JSON object: images/s (best of --repeat timed runs, after one untimed warm-up batch) and the
captions. It uses only the API that every version of the package has (`Captioner.from_pretrained`,
`caption_files`), so benchmarks/run.py can run it against an older checkout of the code (PYTHONPATH
pointing at that checkout's src/) and compare the two in one run, on the same files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from captioner.generation import GenerationOptions
from captioner.inference import caption_files
from captioner.model import Captioner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True)
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: the package's)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-rerank", action="store_true", help="decode without consensus re-ranking")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = sorted(Path(args.images).glob("*.jpg"))[: args.count]
    model = Captioner.from_pretrained(None)
    # only passed when asked: code from before re-ranking has no such option
    options = GenerationOptions(beam_size=args.beam, **({"rerank": False} if args.no_rerank else {}))

    def run() -> list:
        workers = {} if args.workers is None else {"num_workers": args.workers}
        results = caption_files(model, paths, options, batch_size=args.batch_size, **workers)
        return [r.get("caption", r.get("error")) for _, r in results]

    for _ in caption_files(model, paths[: args.batch_size], options, batch_size=args.batch_size):
        pass  # warm-up: first-call costs (allocations, the encoder's inference copy) are not throughput
    best, captions = float("inf"), []
    for _ in range(args.repeat):
        start = time.perf_counter()
        captions = run()
        best = min(best, time.perf_counter() - start)
    print(
        json.dumps({"img_s": len(paths) / best, "seconds": best, "images": len(paths), "captions": captions})
    )


if __name__ == "__main__":
    main()
