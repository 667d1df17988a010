"""Show and Tell (Vinyals et al., 2015): the image is the LSTM's first input, then the words follow."""

from __future__ import annotations

import torch
from torch import nn

from captioner.decoders import register


@register("show_tell")
class ShowTell(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        dropout: float = 0.5,
        **_: object,
    ):
        super().__init__()
        self.image_proj = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.Dropout(dropout))
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def forward(self, pooled: torch.Tensor, grid: torch.Tensor, tokens: torch.Tensor):
        image = self.image_proj(pooled).unsqueeze(1)  # time step -1: the image
        inputs = torch.cat([image, self.dropout(self.embed(tokens))], dim=1)
        out, _ = self.lstm(inputs)
        return self.fc(self.dropout(out[:, 1:])), pooled.new_zeros(())

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        _, (h, c) = self.lstm(self.image_proj(pooled).unsqueeze(1))
        return {"h": h[0], "c": c[0]}

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        out, (h, c) = self.lstm(self.embed(tokens).unsqueeze(1), (state["h"][None], state["c"][None]))
        return self.fc(out[:, 0]).log_softmax(-1), {"h": h[0], "c": c[0]}, None
