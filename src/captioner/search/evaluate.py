"""`captioner evaluate-search`: how well the search embedding finds photos, on the standard protocol.

The protocol of the image-text retrieval papers (Karpathy and Fei-Fei 2015; Faghri et al. 2018): the
gallery is every photo of a split (Flickr8k test: 1,000), every reference caption is a query (5,000),
and a query is answered when its own photo ranks in the top k. Reported: recall@1/5/10 and the median
rank, text to image (search) and image to text (a photo's best-ranked own caption among all captions).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from captioner.data import load_dataset
from captioner.features import FeatureStore, image_key
from captioner.images import Preprocess, load_batches
from captioner.search.embedder import embed
from captioner.search.joint import JointEmbedding, recall_at


def photo_features(model: JointEmbedding, paths: list[Path], keys: list[str], features: str | None):
    """Pooled and grid features of the photos the embedding's encoder can read: (indices, pooled, grid,
    errors). From a feature cache of that encoder when given, else by running it."""
    preprocess = Preprocess.from_dict(model.config.preprocess)
    if features is not None:
        store = FeatureStore.open(features)
        store.check_fits(model.config.encoder, preprocess)
        row_of = store.row_of()
        ok = [i for i, k in enumerate(keys) if k in row_of]
        rows = [row_of[keys[i]] for i in ok]
        errors = {
            i: f"{paths[i]}: not in the feature cache {features}"
            for i, k in enumerate(keys)
            if k not in row_of
        }
        return ok, np.asarray(store.pooled[rows]), np.asarray(store.grid[rows]), errors
    import torch

    from captioner.encoders import create_encoder

    encoder = create_encoder(model.config.encoder, preprocess=preprocess)
    ok, pooled, grid, errors = [], [], [], {}
    with torch.inference_mode():
        for batch in load_batches(paths, preprocess, batch_size=32):
            errors.update(batch.errors)
            if batch.images is not None:
                p, g = encoder(batch.images)
                ok.extend(batch.good)
                pooled.append(p.numpy())
                grid.append(g.numpy())
    if not ok:
        return ok, np.zeros((0, 1)), np.zeros((0, 1, 1)), errors
    return ok, np.concatenate(pooled), np.concatenate(grid), errors


def retrieval_scores(similarity: np.ndarray, photo_of: np.ndarray) -> dict[str, dict[str, float]]:
    """Both directions from one [queries, photos] similarity matrix (`photo_of[q]`: query q's photo)."""
    to_image = recall_at(similarity, photo_of)
    # image to text: a photo is answered at the rank of its best-ranked own caption
    by_photo = similarity.T  # [photos, captions]
    own_best = np.full(by_photo.shape[0], -np.inf)
    np.maximum.at(own_best, photo_of, similarity[np.arange(len(photo_of)), photo_of])
    ranks = 1 + (by_photo > own_best[:, None]).sum(1)
    to_text = {f"R@{k}": float(100 * (ranks <= k).mean()) for k in (1, 5, 10)}
    to_text |= {"median rank": float(np.median(ranks)), "mean rank": float(ranks.mean())}
    return {"text to image": to_image, "image to text": to_text}


def evaluate_search(
    root: str | Path,
    embedding: str | Path,
    split: str = "test",
    *,
    features: str | None = None,
    queries: int | None = None,
    limit: int | None = None,
    output: Path | None = None,
    skip_missing: bool = False,
) -> dict:
    data = load_dataset(root, skip_missing=skip_missing)
    examples = data.split(split)[:limit]
    model = JointEmbedding.from_pretrained(embedding)
    paths = [ex.image for ex in examples]
    ok, pooled, grid, errors = photo_features(
        model, paths, [image_key(p, data.root) for p in paths], features
    )
    for message in errors.values():
        print(f"error: {message}", file=sys.stderr)
    photos = model.images(pooled, grid if model.config.grid else None)
    texts, photo_of = [], []
    for column, i in enumerate(ok):
        for caption in examples[i].captions[:queries]:
            texts.append(caption)
            photo_of.append(column)
    similarity = model.texts(embed(texts), texts) @ photos.T
    scores = retrieval_scores(similarity, np.array(photo_of))
    result = {
        "data": str(root),
        "split": split,
        "embedding": str(embedding),
        "photos": len(ok),
        "queries": len(texts),
        "failed": len(errors),
        **scores,
    }
    print(
        f"{len(texts):,} queries over a gallery of {len(ok):,} photos ({root}, {split}), "
        f"embedding {embedding}"
    )
    print("| direction | R@1 | R@5 | R@10 | median rank |\n|---|---:|---:|---:|---:|")
    for direction, s in scores.items():
        print(f"| {direction} | {s['R@1']:.1f} | {s['R@5']:.1f} | {s['R@10']:.1f} | {s['median rank']:.0f} |")
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
    return result
