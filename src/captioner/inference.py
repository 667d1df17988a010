"""Captioning files in bulk: what `captioner caption` and `captioner evaluate` run.

Images are read and preprocessed by a DataLoader (the same pipeline as training) while the model works on
the previous batch. A file that cannot be read becomes one error record and the rest carry on.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from captioner.errors import CaptionerError
from captioner.generation import GenerationOptions
from captioner.images import Preprocess, load_batches
from captioner.model import Caption, Captioner, is_onnx_export

if TYPE_CHECKING:
    from captioner.distributed import Dist

IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
    ".avif",
}


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
    num_workers: int | None = None,
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
    runtime: str = "auto",
    device: str = "cpu",
    out: str | Path | None = None,
) -> int:
    """The `captioner caption` command: returns the exit status (1 if any file failed). With `out`, the
    records go to that JSON Lines file instead, resumably, and shared among torchrun's processes."""
    from captioner import distributed

    d = distributed.setup()
    if d.world > 1 and out is None:
        raise CaptionerError(
            "under torchrun, caption needs --out FILE: each process writes its own part, merged into FILE"
        )
    paths = find_images(inputs)
    if not paths:
        print("captioner: error: no images found in " + ", ".join(inputs), file=sys.stderr)
        return 1
    if runtime == "onnx" or (runtime == "auto" and is_onnx_export(model)):
        from captioner.onnx import OnnxCaptioner

        captioner: CaptionModel = OnnxCaptioner.from_pretrained(model)
    else:
        device = str(distributed.device(device, d))
        captioner = Captioner.from_pretrained(model, device=device, runtime="torch")
    options = options or GenerationOptions()
    if out is not None:
        try:
            return caption_into(Path(out), paths, captioner, options, batch_size=batch_size, d=d)
        finally:
            distributed.cleanup(d)
    failed = 0
    for path, result in caption_files(captioner, paths, options, batch_size=batch_size):
        if "error" in result:
            failed += 1
        if fmt == "jsonl":
            print(json.dumps(_record(path, result, options)), flush=True)
        elif "error" in result:
            print(f"captioner: error: {result['error']}", file=sys.stderr, flush=True)
        else:
            print(f"{path}\t{result['caption']}", flush=True)
    return 1 if failed else 0


def _record(path: Path, result: dict, options: GenerationOptions) -> dict:
    """One JSON Lines record: the image, then its caption (and n best, when asked for) or its error."""
    record = {"image": str(path), **result}
    if "error" not in result and options.value("n_best") <= 1:
        record.pop("captions")
    return record


# --- one output file, written in parts: resumable, and shared among processes ---


def caption_into(
    out: Path,
    paths: Sequence[Path],
    model: CaptionModel,
    options: GenerationOptions,
    *,
    batch_size: int = 16,
    d: Dist | None = None,
) -> int:
    """Caption `paths` into the JSON Lines file `out`, one record per image in input order.

    Each process (rank r of a torchrun world) captions every world-th image not yet done into its own part
    file, `out.part<r>`, a line at a time; when all are through, rank 0 merges the parts, and an `out`
    from an earlier run, into `out` (written whole, then renamed into place) and deletes the parts. A
    killed run leaves parts whose complete lines count as done: re-running the command captions only the
    rest, with any number of processes, and no image is lost or written twice. Returns the exit status.
    """
    from captioner import distributed

    d = d or distributed.Dist()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _read_records([out, *_parts(out)])  # every rank reads them all: who did an image does not matter
    todo = [p for i, p in enumerate(paths) if i % d.world == d.rank and str(p) not in done]
    part = out.with_name(f"{out.name}.part{d.rank}")
    _drop_partial_line(part)
    failed = 0
    with open(part, "a", encoding="utf-8") as f:
        for path, result in caption_files(model, todo, options, batch_size=batch_size):
            if "error" in result:
                failed += 1
                print(f"captioner: error: {result['error']}", file=sys.stderr, flush=True)
            f.write(json.dumps(_record(path, result, options)) + "\n")
            f.flush()  # a killed process keeps every line it wrote
    distributed.barrier(d)
    if d.main:
        records = _read_records([out, *_parts(out)])
        merged = [records[str(p)] for p in paths if str(p) in records]
        tmp = out.with_name(f".{out.name}.merging")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in merged), encoding="utf-8")
        os.replace(tmp, out)
        for p in _parts(out):
            p.unlink()
        errors = sum("error" in r for r in merged)
        print(
            f"{out}: {len(merged)} of {len(paths)} images ({len(done)} done before this run), "
            f"{errors} failed",
            file=sys.stderr,
        )
        failed = errors
    distributed.barrier(d)  # the parts are gone before any process leaves
    return 1 if failed else 0


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part*"))


def _read_records(files: Sequence[Path]) -> dict[str, dict]:
    """image -> record of every complete line of the files that exist (the first record of an image wins)."""
    records: dict[str, dict] = {}
    for file in files:
        if not file.is_file():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the unfinished last line of a killed process
                continue
            if isinstance(record, dict) and isinstance(record.get("image"), str):
                records.setdefault(record["image"], record)
    return records


def _drop_partial_line(part: Path) -> None:
    """Cut an unfinished last line off a part file, so that the next line appended is a line of its own."""
    if not part.is_file():
        return
    data = part.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(part, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
