"""Train the "person" label probe: ImageNet has no class for a person, so the label head gets one
logistic regression on the encoder's pooled features, learned from Flickr8k's training captions (a photo
shows a person when at least 3 of its 5 references name one; words from `captioner.hallucination`).

    python scripts/train_label_probe.py ../shared/flickr8k --encoder efficientnet_lite2

writes src/captioner/probes/<encoder>.safetensors (one weight row and a bias, with the feature
standardisation folded in), which `captioner.labels` loads for every model on that encoder and
preprocessing. Full-batch AdamW, seeded: the same data gives the same probe. Settings (weight decay 0.1,
300 steps) were chosen by how many coco-mini and Flickr8k dev photos it gets right (docs/experiments.md).
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from captioner.data import load_dataset
from captioner.encoders import create_encoder
from captioner.hallucination import objects
from captioner.images import load_batches
from captioner.labels import PROBES


def pooled_features(encoder, paths) -> tuple[list[int], torch.Tensor]:
    good, pooled = [], []
    with torch.inference_mode():
        for batch in load_batches(paths, encoder.preprocess, batch_size=32):
            if batch.images is not None:
                good += batch.good
                pooled.append(encoder(batch.images)[0])
    return good, torch.cat(pooled)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="Flickr8k (or any captioned data set with a train split)")
    p.add_argument("--encoder", default="efficientnet_lite2")
    p.add_argument("--min-refs", type=int, default=3, help="references that must name a person")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()

    torch.manual_seed(0)
    encoder = create_encoder(args.encoder, pretrained=True).eval()
    examples = load_dataset(args.root).split("train")
    good, x = pooled_features(encoder, [e.image for e in examples])
    y = torch.tensor(
        [sum("person" in objects(c) for c in examples[i].captions) >= args.min_refs for i in good]
    )
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    linear = torch.nn.Linear(x.shape[1], 1)
    optimiser = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=args.weight_decay)
    for _ in range(args.steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(z).squeeze(1), y.float())
        loss.backward()
        optimiser.step()
    weight = linear.weight.detach() / sd  # fold the standardisation in: the probe reads raw features
    bias = linear.bias.detach() - (linear.weight.detach() * mu / sd).sum(1)
    out = PROBES / f"{args.encoder}.safetensors"
    out.parent.mkdir(exist_ok=True)
    metadata = {"words": "person", "resize": encoder.preprocess.resize, "size": str(encoder.preprocess.size)}
    save_file({"person.weight": weight.contiguous(), "person.bias": bias.contiguous()}, out, metadata)
    accuracy = float(((linear(z).squeeze(1) > 0) == y).float().mean())
    print(
        f"{out}: {len(good)} photos, {float(y.float().mean()):.1%} with a person, "
        f"train accuracy {accuracy:.1%}"
    )


if __name__ == "__main__":
    main()
