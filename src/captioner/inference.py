"""Captioning files in bulk: what `captioner caption` and `captioner evaluate` run.

Images are read and preprocessed by a DataLoader (the same pipeline as training) while the model works on
the previous batch. A file that cannot be read becomes one error record and the rest carry on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from captioner.generation import GenerationOptions
from captioner.images import LOADER_WORKERS, Preprocess, load_batches
from captioner.model import Caption, Captioner

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class _Encoder(Protocol):
    """A torch `Encoder` or an `onnx.OnnxEncoder`."""

    @property
    def preprocess(self) -> Preprocess: ...


class CaptionModel(Protocol):
    """What `caption_files` needs of a model: a torch `Captioner` or an `onnx.OnnxCaptioner`."""

    @property
    def encoder(self) -> _Encoder: ...

    def caption_tensors(
        self, images: torch.Tensor, options: GenerationOptions | None = None, **kwargs: Any
    ) -> list[Caption]: ...


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and image files found recursively under folders (sorted, for a stable order)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(
                sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            )
        else:
            found.append(p)  # a named file is always tried: a missing or bad one gets its error line
    return found


def caption_files(
    model: CaptionModel,
    paths: Sequence[Path],
    options: GenerationOptions | None = None,
    *,
    batch_size: int = 16,
    num_workers: int = LOADER_WORKERS,
    keep_features: bool = False,
) -> Iterator[tuple[Path, dict]]:
    """Yield (path, result) in input order; result is `Caption.to_json()` (and, with keep_features, the
    encoder's "features" (pooled, grid)), or {"error": message}."""
    batches = load_batches(paths, model.encoder.preprocess, batch_size=batch_size, num_workers=num_workers)
    for batch in batches:
        captions = iter(model.caption_tensors(batch.images, options) if batch.images is not None else [])
        for row in batch.rows:
            if row in batch.errors:
                yield paths[row], {"error": batch.errors[row]}
                continue
            c = next(captions)
            result = c.to_json()
            if keep_features and c.features is not None:
                result["features"] = c.features
            yield paths[row], result


def caption_paths(
    inputs: Sequence[str],
    *,
    model: str | Sequence[str] | None,
    options: GenerationOptions | None = None,
    batch_size: int = 16,
    fmt: str = "text",
    runtime: str = "torch",
    device: str = "cpu",
) -> int:
    """The `captioner caption` command: returns the exit status (1 if any file failed)."""
    paths = find_images(inputs)
    if not paths:
        print("captioner: error: no images found in " + ", ".join(inputs), file=sys.stderr)
        return 1
    if runtime == "onnx":
        from captioner.onnx import OnnxCaptioner

        captioner: CaptionModel = OnnxCaptioner.from_pretrained(model)
    else:
        captioner = Captioner.from_pretrained(model, device=device)
    options = options or GenerationOptions()
    failed = 0
    for path, result in caption_files(captioner, paths, options, batch_size=batch_size):
        if "error" in result:
            failed += 1
        if fmt == "jsonl":
            record = {"image": str(path), **result}
            if "error" not in result and options.value("n_best") <= 1:
                record.pop("captions")
            print(json.dumps(record), flush=True)
        elif "error" in result:
            print(f"captioner: error: {result['error']}", file=sys.stderr, flush=True)
        else:
            print(f"{path}\t{result['caption']}", flush=True)
    return 1 if failed else 0
