"""Ensembles: several trained decoders captioning together, as one decoder.

At every step each member predicts the next word from its own state, and the ensemble's log-probability of
a word is the members' log-probabilities averaged (then renormalised): the same beam search, greedy search
or sampling then runs over the ensemble as over any decoder. The members share one encoder pass, so they
must agree on the encoder (and its preprocessing) and on the vocabulary; models trained from different
seeds (or checkpoints of different decoders over the same features) usually gain 1-2 BLEU points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from captioner.checkpoint import EncoderSpec
from captioner.errors import CheckpointError


class Ensemble(nn.Module):
    """Decoders (`init_state`/`step`, see `captioner.decoders`) over one vocabulary, as one decoder.

    Member i's state tensors are the ensemble's under "i.<name>", so searches reorder them like any state.
    Torch members are registered as submodules (`.to()`, `.eval()` reach them); onnxruntime ones are not.
    """

    def __init__(self, members: Sequence[Any]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two decoders")
        self.members = list(members)
        self.torch_members = nn.ModuleList([m for m in members if isinstance(m, nn.Module)])
        self.static_state = tuple(
            f"{i}.{k}" for i, m in enumerate(members) for k in getattr(m, "static_state", ())
        )

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            f"{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.init_state(pooled, grid).items()
        }

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        log_probs, new_state, attention = [], {}, None
        for i, member in enumerate(self.members):
            prefix = f"{i}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            lp, own, alpha = member.step(tokens, own)
            log_probs.append(lp)
            new_state.update({prefix + k: v for k, v in own.items()})
            if attention is None:
                attention = alpha  # the first attending member's weights: what the web page draws
        return torch.stack(log_probs).mean(0).log_softmax(-1), new_state, attention


def check_members(
    names: Sequence[str], vocabularies: Sequence[list[str]], encoders: Sequence[EncoderSpec]
) -> None:
    """Refuse members that cannot share one encoder pass and one vocabulary, naming the odd one out."""
    for name, encoder in zip(names, encoders, strict=True):
        if encoder.finetuned:
            raise CheckpointError(
                f"{name}: its encoder was fine-tuned; ensemble members share one encoder pass, so each "
                "needs the frozen pretrained encoder"
            )
    for name, words, encoder in zip(names[1:], vocabularies[1:], encoders[1:], strict=True):
        if words != vocabularies[0]:
            raise CheckpointError(
                f"{name}: its vocabulary differs from {names[0]}'s; ensemble members must share one "
                "(train them on the same data with the same data.min_count)"
            )
        if encoder != encoders[0]:
            raise CheckpointError(
                f"{name}: its encoder ({encoder.name}, {encoder.preprocess}) differs from {names[0]}'s "
                f"({encoders[0].name}, {encoders[0].preprocess}); ensemble "
                "members share one encoder pass, so they need the same frozen encoder and preprocessing"
            )
