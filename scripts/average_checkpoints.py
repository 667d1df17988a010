"""Average the weights of checkpoints of one training run into a new checkpoint directory.

    python scripts/average_checkpoints.py runs/a/best runs/b/best --out runs/averaged

The checkpoints must share the architecture and vocabulary (e.g. epochs of one run); the first one's
config, vocabulary and generation defaults are kept. Averaging nearby checkpoints often smooths out the
noise of the last steps.
"""

from __future__ import annotations

import argparse
import sys

import torch

from captioner.model import Captioner


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    models = [Captioner.from_pretrained(path) for path in args.checkpoints]
    if any(m.vocab.words != models[0].vocab.words for m in models):
        raise SystemExit("the checkpoints have different vocabularies: they are not one run's")
    states = [m.decoder.state_dict() for m in models]
    averaged = {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}
    models[0].decoder.load_state_dict(averaged)
    models[0].save_pretrained(args.out, dtype=torch.float16)
    print(f"{args.out}: the mean of {len(models)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
