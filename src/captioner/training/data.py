"""What training reads: (image or its cached features, target) items, batched and moved to the device.

A target is a caption's word ids (cross-entropy: the model learns to predict each next word) or, for
self-critical training, the index of the image in the training split (the model writes its own captions,
scored against that image's references). Items come from a feature cache (the fast path: the encoder ran
once) or from the image files through the shared pipeline, with augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from captioner.data import Example
from captioner.errors import DataError, FeatureCacheError
from captioner.features import FeatureStore, image_key
from captioner.images import ImageError, build_transform, decode_side, image_tensor, load_image
from captioner.model import Captioner
from captioner.vocab import Vocabulary

Target = list[int] | int  # caption ids, or an image index


@dataclass
class Batch:
    """`inputs` are images [B, 3, S, S], or pooled features [B, D] when `grid` [B, L, D] comes from a cache.
    Exactly one of `tokens` (padded caption ids [B, T]) and `images` (indices [B]) is set."""

    inputs: torch.Tensor
    grid: torch.Tensor | None
    tokens: torch.Tensor | None = None
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def target(self) -> torch.Tensor:
        target = self.tokens if self.tokens is not None else self.images
        assert target is not None
        return target

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            self.inputs.to(device, non_blocking=True), move(self.grid), move(self.tokens), move(self.images)
        )


class FeatureItems:
    """Items from a feature cache: (pooled, grid, target)."""

    def __init__(self, store: FeatureStore, rows: Sequence[int], targets: Sequence[Target]):
        self.store, self.rows, self.targets = store, rows, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        pooled, grid = self.store.features([self.rows[i]])
        return pooled[0], grid[0], self.targets[i]


class ImageItems:
    """Items read from image files through the shared pipeline; a bad image is skipped with a warning."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[Target], transform, min_side: int | None):
        self.paths, self.targets, self.transform, self.min_side = paths, targets, transform, min_side

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_image(self.paths[i], min_side=self.min_side)), None, self.targets[i]
        except ImageError as e:
            tqdm.write(f"warning: skipping {e}")
            return None


def collate(items: list) -> Batch:
    items = [it for it in items if it is not None]
    if not items:
        raise DataError("every image in a batch failed to load")
    inputs = torch.stack([x for x, _, _ in items])
    grid = torch.stack([g for _, g, _ in items]) if items[0][1] is not None else None
    targets = [t for _, _, t in items]
    if isinstance(targets[0], int):
        return Batch(inputs, grid, images=torch.tensor(targets, dtype=torch.long))
    tokens = torch.zeros(len(items), max(len(t) for t in targets), dtype=torch.long)  # 0 is <pad>
    for i, t in enumerate(targets):
        tokens[i, : len(t)] = torch.tensor(t)
    return Batch(inputs, grid, tokens=tokens)


def target_length(target: Target) -> int:
    """What `epoch_batches` groups by: a caption's length (an image index counts as 1)."""
    return 1 if isinstance(target, int) else len(target)


class Source:
    """Where features come from: a cache (rows) or the images themselves (through the encoder)."""

    def __init__(self, root: Path, model: Captioner, store: FeatureStore | None, augment: bool):
        self.root, self.model, self.store, self.augment = root, model, store, augment
        self.rows = store.row_of() if store else {}

    def row(self, example: Example) -> int:
        key = image_key(example.image, self.root)
        if key not in self.rows:
            raise FeatureCacheError(
                f"{self.store.root if self.store else ''}: no features for {key}; "
                "re-run `captioner extract-features` on this data set"
            )
        return self.rows[key]

    def captions(self, examples: Sequence[Example], vocab: Vocabulary) -> FeatureItems | ImageItems:
        """Every (image, caption) pair of `examples`: what cross-entropy training reads."""
        index = [(ex, vocab.encode(c)) for ex in examples for c in ex.captions]
        return self._items([ex for ex, _ in index], [c for _, c in index], self.augment)

    def images(self, examples: Sequence[Example]) -> FeatureItems | ImageItems:
        """Each image once, with its index in `examples`: what self-critical training samples from."""
        return self._items(examples, list(range(len(examples))), self.augment)

    def _items(self, examples: Sequence[Example], targets: Sequence[Target], augment: bool):
        if self.store is not None:
            return FeatureItems(self.store, [self.row(ex) for ex in examples], targets)
        transform = build_transform(self.model.encoder.preprocess, train=augment)
        pre = self.model.encoder.preprocess
        return ImageItems([ex.image for ex in examples], targets, transform, decode_side(pre))

    def encode_tensors(
        self, inputs: torch.Tensor, grid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, grid) of a batch's inputs: from the cache as they are, or through the encoder."""
        if grid is not None:
            return inputs, grid
        with torch.set_grad_enabled(self.model.encoder_finetuned and self.model.training):
            return self.model.encoder(inputs)

    def features(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of whole images (no augmentation), for validation; on the CPU when cached."""
        if self.store is not None:
            return self.store.features([self.row(ex) for ex in examples])
        images = torch.stack([image_tensor(ex.image, self.model.encoder.preprocess) for ex in examples])
        with torch.no_grad():
            return self.model.encoder(images.to(self.model.device))


def epoch_batches(
    lengths: Sequence[int], batch_size: int, rng: torch.Generator, bucket: int = 50
) -> list[list[int]]:
    """Shuffled batches of items of similar lengths.

    The decoders run as many LSTM steps as the longest caption in a batch; grouping similar lengths
    (sorting within random chunks of `bucket` batches, then shuffling the batches) cuts the padding steps
    by about a third without making the order predictable.
    """
    order = torch.randperm(len(lengths), generator=rng).tolist()
    chunk = batch_size * bucket
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=rng).tolist()]


def load_glove(embedding: nn.Embedding, vocab: Vocabulary, path: str | Path) -> int:
    """Copy GloVe vectors (text format: `word v1 v2 ...`) into `embedding` for the words it knows."""
    found = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            word, *values = line.rstrip().split(" ")
            if word not in vocab.index:
                continue
            if len(values) != embedding.embedding_dim:
                raise DataError(
                    f"{path}, line {number}: {len(values)} numbers, but decoder.embed_dim is "
                    f"{embedding.embedding_dim}"
                )
            with torch.no_grad():
                embedding.weight[vocab.index[word]] = torch.tensor([float(v) for v in values])
            found += 1
    return found
