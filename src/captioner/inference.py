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
from torch.utils.data import DataLoader

from captioner.features import ImageFiles, as_list
from captioner.images import Preprocess
from captioner.model import Caption, Captioner

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class _Encoder(Protocol):
    """A torch `Encoder` or a `runtime.OnnxEncoder`."""

    @property
    def preprocess(self) -> Preprocess: ...


class CaptionModel(Protocol):
    """What `caption_files` needs of a model: a torch `Captioner` or a `runtime.OnnxCaptioner`."""

    @property
    def encoder(self) -> _Encoder: ...

    def caption_tensors(self, images: torch.Tensor, **options: Any) -> list[Caption]: ...


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
    *,
    batch_size: int = 16,
    num_workers: int = 1,
    keep_features: bool = False,
    **options,
) -> Iterator[tuple[Path, dict]]:
    """Yield (path, result) in input order; result has caption/score/captions (and, with keep_features,
    the encoder's "features" (pooled, grid)), or error."""
    files = ImageFiles(paths, range(len(paths)), model.encoder.preprocess)
    loader = DataLoader(
        files,
        batch_size=batch_size,
        num_workers=num_workers if len(paths) > batch_size else 0,
        collate_fn=as_list,
    )
    for batch in loader:
        good = [(i, x) for i, x in batch if isinstance(x, torch.Tensor)]
        captions = iter(model.caption_tensors(torch.stack([x for _, x in good]), **options) if good else [])
        for i, x in batch:
            if isinstance(x, str):
                yield paths[i], {"error": x}
            else:
                c = next(captions)
                result = {
                    "caption": c.caption,
                    "score": round(c.score, 4),
                    "captions": [{"caption": t, "score": round(s, 4)} for t, s in c.captions],
                }
                if keep_features and c.features is not None:
                    result["features"] = c.features
                yield paths[i], result


def caption_paths(
    inputs: Sequence[str],
    *,
    model: str | None,
    beam_size: int = 3,
    n_best: int = 1,
    length_penalty: float | None = None,
    no_repeat_ngram: int | None = None,
    temperature: float | None = None,
    top_p: float = 1.0,
    batch_size: int = 16,
    fmt: str = "text",
    runtime: str = "torch",
) -> int:
    """The `captioner caption` command: returns the exit status (1 if any file failed)."""
    paths = find_images(inputs)
    if not paths:
        print("captioner: error: no images found in " + ", ".join(inputs), file=sys.stderr)
        return 1
    if runtime == "onnx":
        from captioner.runtime import OnnxCaptioner

        captioner: CaptionModel = OnnxCaptioner.from_pretrained(model)
    else:
        captioner = Captioner.from_pretrained(model)
    failed = 0
    for path, result in caption_files(
        captioner,
        paths,
        batch_size=batch_size,
        beam_size=beam_size,
        n_best=n_best,
        length_penalty=length_penalty,
        no_repeat_ngram=no_repeat_ngram,
        temperature=temperature,
        top_p=top_p,
    ):
        if "error" in result:
            failed += 1
        if fmt == "jsonl":
            record = {"image": str(path), **result}
            if "error" not in result and n_best <= 1:
                record.pop("captions")
            print(json.dumps(record), flush=True)
        elif "error" in result:
            print(f"captioner: error: {result['error']}", file=sys.stderr, flush=True)
        else:
            print(f"{path}\t{result['caption']}", flush=True)
    return 1 if failed else 0
