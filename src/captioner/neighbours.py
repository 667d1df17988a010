"""Consensus re-ranking: of the beam's captions, keep the one that similar training photos' captions say.

Devlin et al. 2015 ("Exploring nearest neighbor approaches for image captioning"): the captions people
wrote for the training photos most like this one are evidence of what this one shows. A model that carries
`Neighbours` re-ranks its beam: each candidate gets a consensus score, its mean CIDEr-D against the
references of each of the `k` nearest training photos (cosine similarity of the encoder's pooled features),
and the caption kept maximises beam score + weight * consensus. docs/experiments.md section 13 measures it
(k 10 and weight 4 chosen on Flickr8k dev and coco-mini).

The neighbours are the training photos' pooled features on their top principal components (128 of 1,280
numbers, float16: 1.5 MB for Flickr8k's 6,000 photos) and their PTB-tokenized captions, in one file
beside the checkpoint's weights, written atomically:

    neighbours.safetensors   mean [F], basis [F, D], keys [N, D] (unit vectors, float16);
                             metadata: k, weight, source, captions (JSON: N lists of captions)

`captioner neighbours DATA --model DIR` builds it from a data set's training split (`build`, `save`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from captioner.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from captioner.decoding import Hypothesis
    from captioner.model import Captioner

NEIGHBOURS_FILE = "neighbours.safetensors"


def principal_components(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean [F] of the rows of `x` [N, F] and their top `dim` principal directions [F, dim], by exact
    SVD (the same every time)."""
    if not 1 <= dim <= min(x.shape):
        raise ConfigError(f"neighbours: dim must be from 1 to {min(x.shape)}, got {dim}")
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, vh[:dim].T.contiguous()


class Neighbours:
    """Training photos' keys and captions, and the consensus re-ranking they allow."""

    def __init__(
        self,
        mean: torch.Tensor,
        basis: torch.Tensor,
        keys: torch.Tensor,
        captions: Sequence[Sequence[str]],
        *,
        k: int = 10,
        weight: float = 4.0,
        source: str = "",
    ):
        features, dim = basis.shape
        if mean.shape != (features,) or keys.ndim != 2 or keys.shape[1] != dim:
            raise ValueError(
                f"mean {tuple(mean.shape)}, basis {tuple(basis.shape)}, keys {tuple(keys.shape)}"
            )
        if len(captions) != keys.shape[0] or not all(captions):
            raise ValueError(f"{keys.shape[0]} keys but {len(captions)} caption lists (none may be empty)")
        if not 1 <= k <= keys.shape[0]:
            raise ConfigError(f"neighbours: k must be from 1 to {keys.shape[0]} (the photos), got {k}")
        if not weight >= 0:
            raise ConfigError(f"neighbours: weight must be 0 or more, got {weight}")
        self.mean, self.basis, self.keys = mean.float(), basis.float(), keys.float()
        self.captions = [list(c) for c in captions]
        self.k, self.weight, self.source = k, float(weight), source

    @classmethod
    def build(
        cls,
        pooled: torch.Tensor,
        captions: Sequence[Sequence[str]],
        *,
        dim: int = 128,
        k: int = 10,
        weight: float = 4.0,
        source: str = "",
    ) -> Neighbours:
        """From the training photos' pooled features [N, F] and tokenized captions; `dim` principal
        components (exact SVD: the same keys every time), at most min(N, F)."""
        x = pooled.float()
        mean, basis = principal_components(x, dim)
        keys = torch.nn.functional.normalize((x - mean) @ basis, dim=1)
        return cls(mean, basis, keys, captions, k=k, weight=weight, source=source)

    # --- files ---

    def save(self, folder: str | os.PathLike) -> Path:
        """Write NEIGHBOURS_FILE into `folder` atomically (a temp file renamed over the old one)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {
            "mean": self.mean,
            "basis": self.basis.half(),
            "keys": self.keys.half(),
        }
        metadata = {
            "k": str(self.k),
            "weight": str(self.weight),
            "source": self.source,
            "captions": json.dumps(self.captions, separators=(",", ":")),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{NEIGHBOURS_FILE}.", dir=folder)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.chmod(tmp, 0o644)
            os.replace(tmp, folder / NEIGHBOURS_FILE)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return folder / NEIGHBOURS_FILE

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Neighbours | None:
        """The neighbours a checkpoint (or export) directory carries; None when it carries none."""
        from safetensors import safe_open

        file = Path(folder) / NEIGHBOURS_FILE
        if not file.exists():
            return None
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in ("mean", "basis", "keys")}
            return cls(
                tensors["mean"],
                tensors["basis"],
                tensors["keys"],
                json.loads(meta["captions"]),
                k=int(meta["k"]),
                weight=float(meta["weight"]),
                source=meta.get("source", ""),
            )
        except Exception as e:  # truncated, not safetensors, a field missing or of the wrong shape
            raise CheckpointError(
                f"{file}: not a readable neighbours file ({type(e).__name__}: {e}); rebuild it with "
                "`captioner neighbours`, or delete it to caption without consensus re-ranking"
            ) from None

    # --- re-ranking ---

    def nearest(self, pooled: torch.Tensor) -> torch.Tensor:
        """The k nearest training photos of each pooled feature vector [B, F]: indices [B, k]."""
        query = torch.nn.functional.normalize((pooled.float().cpu() - self.mean) @ self.basis, dim=1)
        return (query @ self.keys.T).topk(self.k, dim=1).indices

    @cached_property
    def cider(self):
        """CIDEr-D against each training photo's captions, document frequencies from all of them (built
        on first use: a second or so for 30,000 captions)."""
        from captioner.training.scst import CiderD

        return CiderD([[c.split() for c in caps] for caps in self.captions])

    def consensus(self, nearest: Sequence[int], words: Sequence[str]) -> float:
        """A caption's mean CIDEr-D against the captions of each of the given training photos."""
        return self.cider.mean_score([int(j) for j in nearest], words)

    def rerank(
        self,
        pooled: torch.Tensor,
        candidates: list[list[Hypothesis]],
        words: Callable[[Sequence[int]], list[str]],
    ) -> list[list[Hypothesis]]:
        """Each image's candidate hypotheses (`decoding.Hypothesis`), best first by beam score +
        weight * consensus; `words(tokens)` spells a hypothesis (a borrowed label may be two words)."""
        out = []
        for row, hyps in zip(self.nearest(pooled).tolist(), candidates, strict=True):
            agree = {id(h): self.consensus(row, " ".join(words(h.tokens)).split()) for h in hyps}
            out.append(sorted(hyps, key=lambda h: h.score + self.weight * agree[id(h)], reverse=True))
        return out


def from_dataset(
    model: Captioner,
    root: str | os.PathLike,
    *,
    split: str = "train",
    dim: int = 128,
    k: int = 10,
    weight: float = 4.0,
    features: str | None = None,
    batch_size: int = 32,
    skip_missing: bool = False,
    progress: bool = True,
) -> Neighbours:
    """Neighbours from a data set split's photos, encoded by `model`'s encoder (or read from a feature
    cache of the same encoder), and their captions, PTB-tokenized as the metrics tokenize them."""
    import sys

    from captioner.data import load_dataset
    from captioner.errors import DataError
    from captioner.evaluate import encode_images
    from captioner.features import FeatureStore, image_key
    from captioner.metrics import tokenize

    data = load_dataset(Path(root), skip_missing=skip_missing)
    examples = data.split(split)
    if not examples:
        raise DataError(f"{data.root}: the {split} split has no photos")
    if features:
        store = FeatureStore.open(features)
        store.check_fits(model.encoder.name, model.encoder.preprocess)
        rows = store.row_of()
        keys = [image_key(ex.image, data.root) for ex in examples]
        missing = [key for key in keys if key not in rows]
        if missing:
            raise DataError(
                f"{features}: {len(missing)} {split} photos are not in the cache, e.g. {missing[0]}"
            )
        ok = list(range(len(examples)))
        pooled = store.pooled_features([rows[key] for key in keys])
    else:
        paths = [ex.image for ex in examples]
        ok, pooled, _, errors = encode_images(model, paths, batch_size, progress, keep_grid=False)
        for message in errors.values():
            print(f"error: {message}", file=sys.stderr)
        if not ok:
            raise DataError(f"{data.root}: none of the {split} photos could be read")
        pooled = pooled.cpu()
    tokens = tokenize({str(i): list(examples[i].captions) for i in ok})
    source = f"{data.root.name} {split} split, {len(ok)} photos"
    return Neighbours.build(pooled, [tokens[str(i)] for i in ok], dim=dim, k=k, weight=weight, source=source)
