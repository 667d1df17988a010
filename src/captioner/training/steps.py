"""The two losses, each an `nn.Module` over one batch (the module DistributedDataParallel wraps).

Both take (inputs, grid, target) as `data.Batch` holds them, already on the model's device, and return
(loss, mean reward or None).
"""

from __future__ import annotations

import torch
from torch import nn

from captioner.model import Captioner
from captioner.training.data import Source
from captioner.training.scst import SelfCritical


class CrossEntropyStep(nn.Module):
    """Teacher forcing: the decoder reads the reference caption and predicts each next word."""

    def __init__(self, model: Captioner, source: Source, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.source = model, source
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=model.vocab.pad_id, label_smoothing=label_smoothing)

    def forward(self, inputs: torch.Tensor, grid: torch.Tensor | None, tokens: torch.Tensor):
        pooled, grid = self.source.encode_tensors(inputs, grid)
        logits, aux = self.model.decoder(pooled, grid, tokens[:, :-1])
        loss = self.loss_fn(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) + aux
        return loss, None


class SelfCriticalStep(nn.Module):
    """Self-critical training: the model samples captions of each image, rewarded by their CIDEr-D."""

    def __init__(self, model: Captioner, source: Source, scst: SelfCritical):
        super().__init__()
        self.model, self.source, self.scst = model, source, scst

    def forward(self, inputs: torch.Tensor, grid: torch.Tensor | None, images: torch.Tensor):
        pooled, grid = self.source.encode_tensors(inputs, grid)
        return self.scst(pooled, grid, images)
