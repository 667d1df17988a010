"""Caption decoders chosen by name, like the encoders.

Every decoder is an `nn.Module` with the same three methods, so training, beam search, sampling and export
treat them alike:

    forward(pooled, grid, tokens) -> (logits [B, T, V], aux_loss)   teacher forcing over a whole caption
    init_state(pooled, grid)      -> state dict of batch-first tensors
    step(tokens [B], state)       -> (log_probs [B, V], new state, attention weights [B, H*W] or None)

`tokens` holds <start> w1 .. wn (the inputs); logits at position t predict token t+1 (ending with <end>).
Decoding reorders beams by indexing every tensor of a state along dimension 0, except those a decoder
names in `static_state` (per-image tensors that no step changes, such as the encoder grid).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from captioner.errors import UnknownNameError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class StepDecoder(Protocol):
    """`init_state` and `step` as above. Typed here because mypy sees the attributes of a plain nn.Module
    (such as Captioner.decoder) as Tensor | Module."""

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def step(
        self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]: ...


def register(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_decoders() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def create_decoder(name: str, *, vocab_size: int, feature_dim: int, **options) -> nn.Module:
    """Build decoder `name`; `options` are its constructor's keyword arguments (sizes, dropout, ...)."""
    _load_all()
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown decoder {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](vocab_size=vocab_size, feature_dim=feature_dim, **options)


def _load_all() -> None:
    from captioner.decoders import attention, merge, show_tell, updown  # noqa: F401  (each registers itself)
