"""A checkpoint's config.json, typed: the one reader and writer every part of captioner uses.

    {"captioner_version", "format_version",
     "encoder": {"name", "preprocess": {...}, "finetuned"},
     "decoder": {"name", ...its constructor's options},
     "generation": {...decoding defaults, only those set},      optional
     "onnx": {...what the exported graphs hold}}                 ONNX exports only

`CheckpointConfig.read(folder)` checks the format version first, then every field, and a problem is a
`CheckpointError` naming the file and the field. Also here: the atomic directory write that checkpoints
and exports share, and the weights digest that tells two models apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner import __version__
from captioner.config import DecoderConfig, coerce
from captioner.errors import CaptionerError, CheckpointError
from captioner.generation import GenerationOptions
from captioner.images import Preprocess

if TYPE_CHECKING:
    from torch import nn

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE = "config.json", "model.safetensors", "vocab.json"


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder, how it wants its images, and whether its weights are in the checkpoint."""

    name: str
    preprocess: Preprocess
    finetuned: bool = False  # True: model.safetensors holds the encoder's weights too


@dataclass(frozen=True)
class OnnxSection:
    """What `captioner export` records about its graphs (see `captioner.onnx.export`)."""

    state: list[str]  # the decoder's state tensors, in the graphs' order
    updates: list[str]  # those the step graph returns (the others never change)
    attention: bool  # whether the step graph also returns attention weights
    opset: int = 17
    exporter: str = "torchscript"
    captioner_version: str = __version__
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # onnxruntime vs torch, per output

    def to_json(self) -> dict[str, Any]:
        keys = ("opset", "exporter", "captioner_version", "state", "updates", "attention", "max_abs_diff")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class CheckpointConfig:
    encoder: EncoderSpec
    decoder: DecoderConfig
    generation: GenerationOptions = GenerationOptions()
    onnx: OnnxSection | None = None
    captioner_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "captioner_version": self.captioner_version,
            "format_version": self.format_version,
            "encoder": {
                "name": self.encoder.name,
                "preprocess": self.encoder.preprocess.to_dict(),
                "finetuned": self.encoder.finetuned,
            },
            "decoder": self.decoder.options(),
        }
        if self.generation.to_json():
            out["generation"] = self.generation.to_json()
        if self.onnx is not None:
            out["onnx"] = self.onnx.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = CONFIG_FILE) -> CheckpointConfig:
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: checkpoint format {version} written by captioner "
                f"{data.get('captioner_version', '?')}; this is captioner {__version__}, "
                f"which reads format {FORMAT_VERSION}"
            )
        try:
            encoder = _section(data, "encoder", where)
            spec = EncoderSpec(
                _field(encoder, "name", str, f"{where}: encoder"),
                Preprocess.from_dict(_section(encoder, "preprocess", f"{where}: encoder")),
                bool(_field(encoder, "finetuned", bool, f"{where}: encoder", default=False)),
            )
            decoder = _decoder(_section(data, "decoder", where), f"{where}: decoder")
            generation = GenerationOptions.from_json(data.get("generation", {}), f"{where}: generation")
            onnx = _onnx(data["onnx"], f"{where}: onnx") if "onnx" in data else None
        except CheckpointError:
            raise
        except CaptionerError as e:  # a Preprocess or generation value out of range
            raise CheckpointError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        return cls(spec, decoder, generation, onnx, str(data.get("captioner_version", "?")), version)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> CheckpointConfig:
        file = Path(folder) / CONFIG_FILE
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: not a checkpoint directory (no {CONFIG_FILE})") from None
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read ({e.strerror or e})") from None
        except ValueError as e:  # JSON or UTF-8
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        return cls.from_json(data, str(file))

    def write(self, folder: Path) -> None:
        (folder / CONFIG_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _section(data: dict, name: str, where: str) -> dict:
    if name not in data:
        raise CheckpointError(f"{where}: missing {name!r}")
    if not isinstance(data[name], dict):
        raise CheckpointError(f"{where}: {name!r} must be a JSON object, got {data[name]!r}")
    return data[name]


def _field(data: dict, name: str, kind: type, where: str, **default: Any) -> Any:
    if name not in data:
        if "default" in default:
            return default["default"]
        raise CheckpointError(f"{where}: missing {name!r}")
    value = data[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise CheckpointError(f"{where}.{name}: expected {kind.__name__}, got {value!r}")
    return value


def _decoder(data: dict, where: str) -> DecoderConfig:
    """The decoder section: its name and the options of `DecoderConfig` (what every decoder may take)."""
    _field(data, "name", str, where)
    hints = typing.get_type_hints(DecoderConfig)
    known = [f for f in DecoderConfig().options()]
    values = {}
    for key, value in data.items():
        if key not in known:
            raise CheckpointError(f"{where}.{key}: unknown option (known: {', '.join(known)})")
        try:
            values[key] = coerce(value, hints[key], f"{where}.{key}")
        except CaptionerError as e:
            raise CheckpointError(str(e)) from None
    return DecoderConfig(**values)


def _onnx(data: Any, where: str) -> OnnxSection:
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: must be a JSON object, got {data!r}")
    state = _field(data, "state", list, where)
    updates = _field(data, "updates", list, where)
    if not all(isinstance(n, str) for n in state + updates) or not set(updates) <= set(state):
        raise CheckpointError(
            f"{where}: state and updates must be lists of state names, updates within state"
        )
    return OnnxSection(
        state=state,
        updates=updates,
        attention=_field(data, "attention", bool, where),
        opset=_field(data, "opset", int, where, default=17),
        exporter=_field(data, "exporter", str, where, default="torchscript"),
        captioner_version=_field(data, "captioner_version", str, where, default="?"),
        max_abs_diff=dict(_field(data, "max_abs_diff", dict, where, default={})),
    )


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside `target`; when the block ends without an error, the folder replaces
    `target` (at every moment one complete version is on disk: `target`, or `.NAME.old` and the finished
    folder between the two renames, which `training.state.recover_last` finds); after an error it is
    removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; checkpoints and exports are meant to be shared
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(0o644)  # some writers create private files
        old = restore_interrupted(target)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_interrupted(target: Path) -> Path:
    """Put `.NAME.old` back as `target` when a replacement was killed between its two renames (old is then
    the whole copy); returns the `.NAME.old` path."""
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    return old


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names and values): equal digests mean exactly the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
