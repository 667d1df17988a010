"""Train a label probe for a word ImageNet has no class for ("person") or covers too thinly to rule out
("bird"): one logistic regression on the encoder's pooled features, learned from Flickr8k's training
captions (a photo shows the word when at least `--min-refs` of its 5 references name it; words from
`captioner.hallucination`), which grounded decoding reads to veto the word where the probe is low.

    python scripts/train_label_probe.py ../shared/flickr8k --encoder efficientnet_lite2 --word person
    python scripts/train_label_probe.py ../shared/flickr8k --features features/flickr8k-lite2 \\
        --word bird --min-refs 2 --balance --lr 0.05

adds (or replaces) the word's probe in src/captioner/probes/<encoder>.safetensors (one weight row and a
bias each, the feature standardisation folded in), which `captioner.labels` loads for every model on that
encoder and preprocessing, and prints the probe's value below which 3% of the dev split's photos of the
word fall: the veto threshold that misses 3% (`grounding.GroundingSettings.probe_absent`). Full-batch
AdamW, seeded: the same data gives the same probe. `--balance` weighs the positives as much as the
negatives (a rare word). The settings were chosen on coco-mini and Flickr8k dev (docs/experiments.md).
"""

from __future__ import annotations

import argparse

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from captioner.data import load_dataset
from captioner.encoders import create_encoder
from captioner.features import FeatureStore, image_key
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


def cached_features(store: FeatureStore, examples, root) -> tuple[list[int], torch.Tensor]:
    rows = store.row_of()
    good = [i for i, e in enumerate(examples) if image_key(e.image, root) in rows]
    return good, store.pooled_features([rows[image_key(examples[i].image, root)] for i in good])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="Flickr8k (or any captioned data set with train and val splits)")
    p.add_argument("--encoder", default="efficientnet_lite2")
    p.add_argument("--features", help="feature cache of the encoder (default: encode the photos)")
    p.add_argument("--word", default="person", help="a COCO category of captioner.hallucination")
    p.add_argument("--min-refs", type=int, default=3, help="references that must name the word")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--balance", action="store_true", help="weigh the positives as much as the negatives")
    args = p.parse_args()

    torch.manual_seed(0)
    encoder = create_encoder(args.encoder, pretrained=True).eval()
    data = load_dataset(args.root)
    if args.features:
        store = FeatureStore.open(args.features)
        store.check_fits(encoder.name, encoder.preprocess)
        features = lambda examples: cached_features(store, examples, data.root)  # noqa: E731
    else:
        features = lambda examples: pooled_features(encoder, [e.image for e in examples])  # noqa: E731

    def shows(example) -> bool:
        return sum(args.word in objects(c) for c in example.captions) >= args.min_refs

    examples = data.split("train")
    good, x = features(examples)
    y = torch.tensor([shows(examples[i]) for i in good])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    linear = torch.nn.Linear(x.shape[1], 1)
    optimiser = torch.optim.AdamW(linear.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    share = y.float().mean()
    pos_weight = (1 - share) / share if args.balance else None
    for _ in range(args.steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            linear(z).squeeze(1), y.float(), pos_weight=pos_weight
        )
        loss.backward()
        optimiser.step()
    weight = linear.weight.detach() / sd  # fold the standardisation in: the probe reads raw features
    bias = linear.bias.detach() - (linear.weight.detach() * mu / sd).sum(1)

    out = PROBES / f"{args.encoder}.safetensors"
    out.parent.mkdir(exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    if out.exists():  # keep the other words' probes
        with safe_open(str(out), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("resize") == encoder.preprocess.resize and meta.get("size") == str(
                encoder.preprocess.size
            ):
                tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(f"{args.word}.")}
    tensors |= {f"{args.word}.weight": weight.contiguous(), f"{args.word}.bias": bias.contiguous()}
    words = sorted({k.rsplit(".", 1)[0] for k in tensors})  # the order the label head's columns take
    metadata = {
        "words": ",".join(words),
        "resize": encoder.preprocess.resize,
        "size": str(encoder.preprocess.size),
    }
    save_file(tensors, out, metadata)

    accuracy = float(((linear(z).squeeze(1) > 0) == y).float().mean())
    print(
        f"{out}: {args.word}: {len(good)} photos, {float(share):.1%} with one, train accuracy {accuracy:.1%}"
    )
    dev = data.split("val")
    dev_good, dev_x = features(dev)
    dev_y = torch.tensor([shows(dev[i]) for i in dev_good])
    with torch.no_grad():
        p_dev = torch.sigmoid(dev_x @ weight.T + bias).squeeze(1)
    if dev_y.any():
        threshold = float(torch.quantile(p_dev[dev_y], 0.03))
        vetoed = float((p_dev[~dev_y] < threshold).float().mean())
        print(
            f"dev: {int(dev_y.sum())} photos with one; 3% of them are below {threshold:.4f}, "
            f"as are {vetoed:.0%} of the photos without"
        )


if __name__ == "__main__":
    main()
