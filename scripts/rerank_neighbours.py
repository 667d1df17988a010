"""Re-rank a captioner's n best by agreement with the captions of the nearest training photos.

Devlin et al. 2015 ("Exploring nearest neighbor approaches for image captioning"): a caption that the
captions of similar training photos also say is more likely right. For each photo of a split, its `k`
nearest training photos by cosine similarity of the encoder's pooled features; each of the beam's n best
gets a consensus score, its mean CIDEr-D against each neighbour's references (document frequencies from
all training captions); the caption kept maximises beam score + weight * consensus. Weight 0 is the plain
beam search. Prints the coco-caption scores and CHAIR (`captioner.hallucination`) for every (k, weight):

    python scripts/rerank_neighbours.py ../shared/flickr8k --features features/flickr8k-lite2 \\
        --split val --k 10 25 --weight 0 0.5 1 2 4
    python scripts/rerank_neighbours.py ../shared/coco-mini --split train --train-root ../shared/flickr8k \\
        --grounding --beam-size 3 --k 10 --weight 0 2 --dim 0 128

Uses the feature cache (`captioner extract-features`) for both the split and the training photos where
`--features` names one, else encodes the photos with the model's encoder. `--train-root`: the data set
whose train split gives the neighbours (default: the one scored). `--dim D`: neighbours by cosine of the
pooled features projected on the training features' top D principal components (0: all 1,280 numbers),
what a captioner that carries its neighbours would store (6,000 x 128 float16 is 1.5 MB).
"""

from __future__ import annotations

import argparse

import torch

from captioner.data import load_dataset
from captioner.evaluate import encode_images
from captioner.features import FeatureStore, image_key
from captioner.generation import GenerationOptions
from captioner.hallucination import chair
from captioner.metrics import CaptionScorer, tokenize
from captioner.model import Captioner
from captioner.neighbours import principal_components
from captioner.training.scst import CiderD


def encode(
    model: Captioner, examples: list, keep_grid: bool = True
) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The examples whose photos load, and their pooled (and grid) features from the model's encoder."""
    ok, pooled, grid, _ = encode_images(model, [ex.image for ex in examples], keep_grid=keep_grid)
    return [examples[i] for i in ok], pooled.cpu(), grid.cpu()


def project(train: torch.Tensor, dim: int):
    """Unit vectors for cosine similarity: on the top `dim` principal components of `train` (0: none),
    as `captioner.neighbours.Neighbours.build` finds them."""
    if not dim:
        return lambda x: torch.nn.functional.normalize(x.float(), dim=1)
    mean, basis = principal_components(train.float(), dim)
    return lambda x: torch.nn.functional.normalize((x.float() - mean) @ basis, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root")
    parser.add_argument("--features", help="feature cache of the model's encoder (default: encode)")
    parser.add_argument("--train-root", help="data set whose train split gives the neighbours")
    parser.add_argument("--dim", type=int, nargs="+", default=[0], help="principal components (0: all)")
    parser.add_argument("--model", action="append", help="give it twice or more for an ensemble")
    parser.add_argument("--split", default="val")
    parser.add_argument("--beam-size", type=int, default=5, help="also the number of candidates")
    parser.add_argument("--k", type=int, nargs="+", default=[25])
    parser.add_argument("--weight", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--grounding", action="store_true", help="decode with grounding (default: off)")
    args = parser.parse_args()

    data = load_dataset(args.root)
    train_data = load_dataset(args.train_root) if args.train_root else data
    train, split = train_data.split("train"), data.split(args.split)
    model = Captioner.from_pretrained(args.model)
    if args.features:
        if args.train_root:
            parser.error("--features reads one data set's cache: leave out --train-root")
        store = FeatureStore.open(args.features)
        store.check_fits(model.encoder.name, model.encoder.preprocess)
        rows = store.row_of()
        train = [ex for ex in train if image_key(ex.image, data.root) in rows]
        split = [ex for ex in split if image_key(ex.image, data.root) in rows]
        train_pooled = store.pooled_features([rows[image_key(ex.image, data.root)] for ex in train])
        pooled, grid = store.features([rows[image_key(ex.image, data.root)] for ex in split])
    else:
        train, train_pooled, _ = encode(model, train, keep_grid=False)
        split, pooled, grid = encode(model, split)
    keys = [str(ex.image) for ex in split]

    options = GenerationOptions(
        beam_size=args.beam_size, n_best=args.beam_size, grounding=args.grounding
    ).over(model.generation)
    candidates: list[list[tuple[str, float]]] = []
    with torch.inference_mode():
        for s in range(0, len(keys), 32):
            for hyps in model.generate(pooled[s : s + 32], grid[s : s + 32], options):
                candidates.append([(model.decode(h.tokens), h.score) for h in hyps])

    tokens = tokenize({str(i): list(ex.captions) for i, ex in enumerate(train)})  # one Java call
    cider = CiderD([[c.split() for c in tokens[str(i)]] for i in range(len(train))])
    references = {k: list(ex.captions) for k, ex in zip(keys, split, strict=True)}
    scorer = CaptionScorer(references)
    print(f"{args.split}: {len(keys)} photos, {len(train)} training photos, beam {args.beam_size}")
    for dim in args.dim:
        to_unit = project(train_pooled, dim)
        ranked = (to_unit(pooled) @ to_unit(train_pooled).T).topk(max(args.k), dim=1).indices  # [N, max k]
        for k in args.k:
            nearest = ranked[:, :k]
            consensus = [
                [sum(cider.score(int(j), text.split()) for j in nearest[i]) / k for text, _ in cands]
                for i, cands in enumerate(candidates)
            ]
            for weight in args.weight:
                chosen = {}
                for key, cands, agree in zip(keys, candidates, consensus, strict=True):
                    best = max(range(len(cands)), key=lambda c: cands[c][1] + weight * agree[c])
                    chosen[key] = cands[best][0] or "<unk>"
                scores = scorer.score(chosen, metrics=("BLEU-4", "METEOR", "CIDEr"))
                scores |= chair(chosen, references)
                line = "  ".join(f"{m} {float(v):6.2f}" for m, v in scores.items())
                print(f"dim {dim or 'all':>4}  k {k:3d}  weight {weight:4.1f}  {line}", flush=True)


if __name__ == "__main__":
    main()
