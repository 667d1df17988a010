"""`captioner export`: a Captioner as ONNX graphs that `captioner.onnx.runtime` runs with onnxruntime.

Decoding (greedy, beam search, sampling) stays in Python and only ever calls a decoder's `init_state` and
`step` (see `captioner.decoders`), so only those two and the encoder become graphs (the files are listed
in `captioner.onnx`). The step returns only the state tensors it changes ("updates"); the others (an
attention decoder's grid, the merge model's image) are fed back as they were instead of being copied
through the graph at every word. Every batch axis is dynamic. The export is checked against torch before
it is swapped into place.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from captioner.checkpoint import VOCAB_FILE, CheckpointConfig, OnnxSection, atomic_directory
from captioner.decoders import StepDecoder
from captioner.errors import CheckpointError, ExportError
from captioner.model import Captioner
from captioner.onnx import ENCODER, INIT, LABELS, STEP
from captioner.ort_backbone import OPSET

__all__ = ["ExportError", "export_onnx"]

RTOL, ATOL = 1e-3, 1e-4  # onnxruntime vs torch; a wrong graph is off by far more than float rounding


class _Init(nn.Module):
    """decoder.init_state with the state dict flattened into a tuple (ONNX graphs have no dicts)."""

    def __init__(self, decoder: nn.Module, names: list[str]):
        super().__init__()
        self.decoder, self.names = decoder, names

    def forward(self, pooled: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = cast(StepDecoder, self.decoder).init_state(pooled, grid)
        return tuple(state[k] for k in self.names)


class _Step(nn.Module):
    """decoder.step on flat tensors: (tokens, *state) -> (log_probs, *updated state[, attention])."""

    def __init__(self, decoder: nn.Module, names: list[str], updates: list[str], attention: bool):
        super().__init__()
        self.decoder, self.names, self.updates, self.attention = decoder, names, updates, attention

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        decoder = cast(StepDecoder, self.decoder)
        log_probs, new, alpha = decoder.step(tokens, dict(zip(self.names, state, strict=True)))
        return (log_probs, *(new[k] for k in self.updates), *((alpha,) if self.attention else ()))


def export_onnx(model: Captioner, out: str | os.PathLike) -> Path:
    """Write the export directory `out` atomically, after checking onnxruntime agrees with torch.

    `out` may be replaced only if it is missing, empty, or a previous export: never a checkpoint or
    some other folder that a typo named.
    """
    if model.members:
        raise ExportError(
            "an ensemble is exported as its members: export each, then load the exports together "
            "(`captioner caption --runtime onnx --model A --model B`)"
        )
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"exporting to ONNX needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    out = Path(out)
    _check_replaceable(out)
    was_training = model.training
    try:
        model.eval()
        with atomic_directory(out) as tmp:
            onnx = _export_graphs(model, tmp)
            onnx = dataclasses.replace(onnx, max_abs_diff=_validate(model, tmp, onnx))
            dataclasses.replace(model.config(), onnx=onnx).write(tmp)
            model.vocab.save(tmp / VOCAB_FILE)
            if model.neighbours is not None:
                model.neighbours.save(tmp)
            if model.label_head is not None:
                linear = model.label_head.classifier
                tensors = {"weight": linear.weight, "bias": linear.bias}
                for word, probe in model.label_head.probes.items():
                    tensors |= {f"{word}.weight": probe.weight, f"{word}.bias": probe.bias}
                save_file(
                    {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, tmp / LABELS
                )
    finally:
        model.train(was_training)
    return out


def _torch_run(model: Captioner, batch: int, seed: int) -> tuple:
    """Random images and words through encoder, init_state and one step: example inputs and the torch
    outputs the graphs are traced from (and checked against)."""
    size = model.encoder.preprocess.size
    make = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=make)
    tokens = torch.randint(len(model.vocab), (batch,), generator=make)
    decoder = cast(StepDecoder, model.decoder)
    with torch.no_grad():
        pooled, grid = model.encoder(images)
        state = decoder.init_state(pooled, grid)
        log_probs, new, alpha = decoder.step(tokens, state)
    return images, tokens, pooled, grid, state, log_probs, new, alpha


def _export_graphs(model: Captioner, folder: Path) -> OnnxSection:
    """Trace the three graphs into `folder`; returns the config's "onnx" section."""
    images, tokens, pooled, grid, state, _, new, alpha = _torch_run(model, batch=2, seed=0)
    names = list(state)
    updates = [k for k in names if new[k] is not state[k]]
    attention = alpha is not None
    # The wrappers must be in eval mode too: the exporter puts each module back in its own mode afterwards,
    # and a wrapper in training mode would switch the shared decoder's dropout back on.
    _export(model.encoder, (images,), folder / ENCODER, ["images"], ["pooled", "grid"])
    _export(
        _Init(model.decoder, names).eval(),
        (pooled, grid),
        folder / INIT,
        ["pooled", "grid"],
        [f"state.{k}" for k in names],
    )
    _export(
        _Step(model.decoder, names, updates, attention).eval(),
        (tokens, *state.values()),
        folder / STEP,
        ["tokens", *(f"state.{k}" for k in names)],
        ["log_probs", *(f"next.{k}" for k in updates), *(["attention"] if attention else [])],
    )
    return OnnxSection(state=names, updates=updates, attention=attention, opset=OPSET, exporter="torchscript")


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if any(out.iterdir()):
        try:
            previous = CheckpointConfig.read(out).onnx is not None
        except CheckpointError:
            previous = False
        if not previous:
            raise ExportError(f"{out}: not empty and not a previous ONNX export; refusing to replace it")


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    """One graph through the TorchScript-based exporter, every input and output batch-first and dynamic.

    It traces in well under a second, where the torch.export-based one takes ~15 s for the encoder alone
    and needs onnxscript; both give the same numbers here. Its deprecation warning is silenced: the
    choice is deliberate, and `dynamo=True` (with dynamic_shapes) is the way forward when it is removed.
    """
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
            opset_version=OPSET,
            dynamo=False,
        )


def _validate(model: Captioner, folder: Path, onnx: OnnxSection) -> dict[str, float]:
    """Run the three graphs with onnxruntime on a batch size other than the traced one and compare with
    torch; raise ExportError if any output differs beyond float rounding. Returns each output's largest
    absolute difference, kept in config.json as a record of the check."""
    from captioner.onnx.runtime import load_session, run

    images, tokens, pooled, grid, state, log_probs, new, alpha = _torch_run(model, batch=3, seed=1)
    names = onnx.state
    checks = {
        ENCODER: ({"images": images}, [pooled, grid]),
        INIT: ({"pooled": pooled, "grid": grid}, [state[k] for k in names]),
        STEP: (
            {"tokens": tokens, **{f"state.{k}": state[k] for k in names}},
            [log_probs, *(new[k] for k in onnx.updates), *([alpha] if onnx.attention else [])],
        ),
    }
    diffs = {}
    for graph, (feeds, expected) in checks.items():
        session = load_session(folder / graph, threads=1)
        got = run(session, feeds)
        for meta, actual, want in zip(session.get_outputs(), got, expected, strict=True):
            try:
                np.testing.assert_allclose(actual, want.numpy(), rtol=RTOL, atol=ATOL)
            except AssertionError as e:
                raise ExportError(f"{graph}: onnxruntime and torch disagree on {meta.name}:{e}") from None
            diffs[meta.name] = float(np.abs(actual - want.numpy()).max())
    return diffs
