"""Feature cache: run the encoder once over a data set and keep its outputs on disk.

Training a decoder on frozen encoder features is the fast path on a CPU: the encoder costs far more than
the LSTM. The cache is a directory of memory-mappable NumPy arrays (float16):

    meta.json     encoder name, its preprocessing, shapes, and the image keys in row order
    pooled.npy    [N, D]       pooled feature vector per image
    grid.npy      [N, H*W, D]  spatial grid per image (for attention)
    done.npy      [N] uint8    0 = to do, 1 = done, 2 = failed (see errors.jsonl)
    errors.jsonl  one line per image that could not be read

Rows are written batch by batch and marked done only after their features are written, so an interrupted
run resumes where it stopped. A cache made by one encoder (or preprocessing) refuses rows from another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from captioner.encoders import Encoder
from captioner.errors import FeatureCacheError
from captioner.images import Preprocess, load_batches

PENDING, DONE, FAILED = 0, 1, 2


@dataclass
class FeatureStore:
    """Read side of a cache: row lookup by image key, features as tensors."""

    root: Path
    meta: dict
    pooled: np.ndarray
    grid: np.ndarray
    done: np.ndarray

    @classmethod
    def open(cls, root: str | Path, in_memory: bool = False) -> FeatureStore:
        root = Path(root)
        if not (root / "meta.json").exists():
            raise FeatureCacheError(
                f"{root}: not a feature cache (no meta.json); make one with `captioner extract-features`"
            )
        meta = json.loads((root / "meta.json").read_text())
        check_arrays(root, meta)
        mode: Literal["r"] | None = None if in_memory else "r"
        return cls(
            root,
            meta,
            np.load(root / "pooled.npy", mmap_mode=mode),
            np.load(root / "grid.npy", mmap_mode=mode),
            np.load(root / "done.npy"),
        )

    @property
    def encoder(self) -> str:
        return self.meta["encoder"]

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.meta["preprocess"])

    def check_fits(self, encoder: str, preprocess: Preprocess) -> None:
        """Refuse features that are not what `encoder` with `preprocess` computes: the one rule for
        training, evaluation and extraction alike."""
        check_fits(self.root, self.meta, encoder, preprocess)

    def row_of(self) -> dict[str, int]:
        """Image key -> row, for images whose features were computed."""
        return {k: i for i, k in enumerate(self.meta["keys"]) if self.done[i] == DONE}

    def features(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(rows)
        return self.pooled_features(rows), torch.from_numpy(np.asarray(self.grid[rows], dtype=np.float32))

    def pooled_features(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The pooled vectors alone [len(rows), F]: without the grids, 80 times their size."""
        return torch.from_numpy(np.asarray(self.pooled[np.asarray(rows)], dtype=np.float32))


def image_key(path: Path, root: Path) -> str:
    """Stable name of an image inside a data set: its path relative to the data root."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def extract_features(
    paths: Sequence[Path],
    keys: Sequence[str],
    encoder: Encoder,
    out: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Encode `paths` into the cache at `out`, resuming if it exists. Returns counts and any errors.

    With world_size > 1 every rank encodes its own share of rows (row % world_size == rank) into the same
    memory-mapped files; rank 0 creates them first (the caller synchronises ranks between the two).
    """
    from tqdm import tqdm

    out = Path(out)
    meta = open_cache(out, keys, encoder, create=rank == 0)
    pooled = np.load(out / "pooled.npy", mmap_mode="r+")
    grid = np.load(out / "grid.npy", mmap_mode="r+")
    done = np.load(out / "done.npy", mmap_mode="r+")
    todo = [r for r in range(len(keys)) if done[r] == PENDING and r % world_size == rank]
    errors = []
    encoder.eval()
    bar = tqdm(total=len(todo), unit="img", desc=f"encoding with {encoder.name}", disable=not progress)
    with (
        torch.inference_mode(),
        open(out / ("errors.jsonl" if world_size == 1 else f"errors.rank{rank}.jsonl"), "a") as err_file,
    ):
        batches = load_batches(
            paths, encoder.preprocess, rows=todo, batch_size=batch_size, num_workers=num_workers
        )
        for batch in batches:
            for r, message in batch.errors.items():
                errors.append(message)
                err_file.write(json.dumps({"key": keys[r], "error": message}) + "\n")
                done[r] = FAILED
            if batch.images is not None:
                rows = batch.good
                p, g = encoder(batch.images)
                # The arrays are shared file mappings: what is written here is in the page cache at once
                # and survives the process being killed, so no per-batch msync (which scans the whole
                # multi-GB mapping, and once cost more time than the encoder) is needed. Rows are marked
                # done only after their features are written.
                pooled[rows] = p.cpu().numpy().astype(np.float16)
                grid[rows] = g.cpu().numpy().astype(np.float16)
                done[rows] = DONE
            err_file.flush()
            bar.update(len(batch.rows))
    for array in (pooled, grid, done):
        array.flush()
    bar.close()
    return {
        "encoded": int((done == DONE).sum()),
        "failed": int((done == FAILED).sum()),
        "total": len(keys),
        "errors": errors,
        "grid_shape": meta["grid_shape"],
    }


def check_arrays(root: Path, meta: dict) -> None:
    """Refuse a cache whose arrays are not whole: each file as long as its header says, with the shape
    meta.json says. (Opening a short file for writing would extend it with zeros that read as features.)"""
    n, (cells, dim) = len(meta["keys"]), meta["grid_shape"]
    for name, shape in (("pooled.npy", (n, dim)), ("grid.npy", (n, cells, dim)), ("done.npy", (n,))):
        file = root / name
        try:
            with open(file, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                header = read(f)  # (shape, fortran order, dtype)
                offset = f.tell()
            have = file.stat().st_size - offset
        except (OSError, ValueError) as e:
            raise FeatureCacheError(f"{file}: not a readable array ({e}); the cache is damaged") from None
        want = int(np.prod(header[0])) * np.dtype(header[2]).itemsize
        if tuple(header[0]) != shape or have != want:
            raise FeatureCacheError(
                f"{file}: {have:,} bytes of {header[0]} {np.dtype(header[2])} data where {want:,} bytes of "
                f"{shape} belong: the cache is damaged (cut short?); extract into a new --out directory"
            )


def check_fits(where: Path, meta: dict, encoder: str, preprocess: Preprocess) -> None:
    have = (meta["encoder"], Preprocess.from_dict(meta["preprocess"]))
    if have != (encoder, preprocess):
        raise FeatureCacheError(
            f"{where}: this cache holds features of {have[0]} ({have[1]}), not of {encoder} ({preprocess}); "
            "refusing to mix them: extract this encoder's features into another directory"
        )


def open_cache(out: Path, keys: Sequence[str], encoder: Encoder, create: bool) -> dict:
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        check_fits(out, meta, encoder.name, encoder.preprocess)
        check_arrays(out, meta)
        if meta["keys"] != list(keys):
            raise FeatureCacheError(
                f"{out}: this cache was made for a different list of images "
                f"({len(meta['keys'])} images, now {len(keys)}). Use another --out directory."
            )
        return meta
    if not create:
        raise FeatureCacheError(f"{out}: no cache yet (rank 0 creates it)")
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        size = encoder.preprocess.size
        _, g = encoder(torch.zeros(1, 3, size, size, device=next(encoder.parameters()).device))
    n, cells, dim = len(keys), g.shape[1], g.shape[2]
    np.lib.format.open_memmap(out / "pooled.npy", "w+", np.float16, (n, dim)).flush()
    np.lib.format.open_memmap(out / "grid.npy", "w+", np.float16, (n, cells, dim)).flush()
    np.lib.format.open_memmap(out / "done.npy", "w+", np.uint8, (n,)).flush()
    wanted = {"encoder": encoder.name, "preprocess": encoder.preprocess.to_dict()}
    meta = {**wanted, "feature_dim": dim, "grid_shape": [cells, dim], "keys": list(keys)}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta) + "\n")
    os.replace(tmp, out / "meta.json")  # meta.json last: its presence means the arrays exist
    return meta
