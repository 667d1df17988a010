"""Show, Attend and Tell (Xu et al., 2015), soft attention.

At each word the LSTM looks at the encoder's spatial grid through an additive (Bahdanau) attention,
scaled by a learned gate; the "doubly stochastic" penalty pushes every grid cell to receive, summed over
the caption, about one unit of attention, so the model looks at the whole picture.
"""

from __future__ import annotations

import torch
from torch import nn

from captioner.decoders import register


class Attention(nn.Module):
    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.feature_att = nn.Linear(feature_dim, attention_dim)
        self.hidden_att = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, grid: torch.Tensor, grid_att: torch.Tensor, h: torch.Tensor):
        """grid [B, L, D], grid_att = feature_att(grid) [B, L, A] (computed once per image), h [B, H]."""
        # tanh in place: the sum is a step's largest tensor, and allocating a second one costs as much again
        e = self.score(torch.tanh_(grid_att + self.hidden_att(h).unsqueeze(1))).squeeze(2)  # [B, L]
        alpha = e.softmax(dim=1)
        return torch.bmm(alpha.unsqueeze(1), grid).squeeze(1), alpha  # the weighted sum of the grid cells


@register("attention")
class SoftAttention(nn.Module):
    static_state = ("grid", "grid_att")  # the same at every step: beam search need not reorder them

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.5,
        alpha_c: float = 1.0,
        **_: object,
    ):
        super().__init__()
        self.alpha_c = alpha_c
        self.attention = Attention(feature_dim, hidden_dim, attention_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.gate = nn.Linear(
            hidden_dim, feature_dim
        )  # the gate beta (the paper's gating scalar), here one per feature channel
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        mean = grid.mean(dim=1)
        return {
            "h": torch.tanh(self.init_h(mean)),
            "c": torch.tanh(self.init_c(mean)),
            "grid": grid,
            "grid_att": self.attention.feature_att(grid),
        }

    def _advance(self, embedded: torch.Tensor, state: dict[str, torch.Tensor]):
        context, alpha = self.attention(state["grid"], state["grid_att"], state["h"])
        context = torch.sigmoid(self.gate(state["h"])) * context
        h, c = self.cell(torch.cat([embedded, context], dim=1), (state["h"], state["c"]))
        return h, {**state, "h": h, "c": c}, alpha

    def forward(self, pooled: torch.Tensor, grid: torch.Tensor, tokens: torch.Tensor):
        state = self.init_state(pooled, grid)
        embedded = self.embed(tokens)
        outputs, alphas = [], []
        for t in range(tokens.shape[1]):
            h, state, alpha = self._advance(embedded[:, t], state)
            outputs.append(h)
            alphas.append(alpha)
        logits = self.fc(self.dropout(torch.stack(outputs, dim=1)))
        alphas_t = torch.stack(alphas, dim=1)  # [B, T, L]
        real = (tokens != 0).float().unsqueeze(2)  # no attention budget for <pad>
        penalty = ((1.0 - (alphas_t * real).sum(dim=1)) ** 2).mean()
        return logits, self.alpha_c * penalty

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        h, state, alpha = self._advance(self.embed(tokens), state)
        return self.fc(h).log_softmax(-1), state, alpha
