"""Top-down attention (Anderson et al., 2018, "Bottom-up and top-down attention"), two LSTM layers.

The first LSTM ("attention LSTM") reads the word, the mean image feature and the second layer's last
output, and decides where to look; the second ("language LSTM") reads the attended grid feature with the
first layer's output and predicts the word. Splitting "where to look" from "what to say" is what makes it
the strongest LSTM decoder on a frozen grid. The grid and the mean are projected to `hidden_dim` once per
image (ruotianluo's ImageCaptioning.pytorch does the same), so every step works at 512, not 1280.
"""

from __future__ import annotations

import torch
from torch import nn

from captioner.decoders import register


@register("updown")
class UpDown(nn.Module):
    static_state = ("grid", "grid_att", "mean")  # the same at every step: beam search need not reorder them

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.5,
        **_: object,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim)  # a plain table, so GloVe vectors can be copied in
        self.grid_embed = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.mean_embed = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.att_lstm = nn.LSTMCell(embed_dim + 2 * hidden_dim, hidden_dim)  # word, mean image, h2
        self.lang_lstm = nn.LSTMCell(2 * hidden_dim, hidden_dim)  # attended feature, h1
        self.grid_att = nn.Linear(hidden_dim, attention_dim)
        self.hidden_att = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = self.grid_embed(grid)
        zeros = grid.new_zeros(grid.shape[0], self.hidden_dim)
        return {
            "h1": zeros,
            "c1": zeros.clone(),
            "h2": zeros.clone(),
            "c2": zeros.clone(),
            "grid": grid,
            "grid_att": self.grid_att(grid),
            "mean": self.mean_embed(pooled),
        }

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.relu(self.embed(tokens)))

    def _advance(self, embedded: torch.Tensor, state: dict[str, torch.Tensor]):
        h1, c1 = self.att_lstm(
            torch.cat([state["h2"], state["mean"], embedded], dim=1), (state["h1"], state["c1"])
        )
        # tanh in place: the sum is a step's largest tensor, and allocating a second one costs as much again
        e = self.score(torch.tanh_(state["grid_att"] + self.hidden_att(h1).unsqueeze(1))).squeeze(2)
        alpha = e.softmax(dim=1)  # [B, L]
        context = torch.bmm(alpha.unsqueeze(1), state["grid"]).squeeze(1)
        h2, c2 = self.lang_lstm(torch.cat([context, h1], dim=1), (state["h2"], state["c2"]))
        return h2, {**state, "h1": h1, "c1": c1, "h2": h2, "c2": c2}, alpha

    def forward(self, pooled: torch.Tensor, grid: torch.Tensor, tokens: torch.Tensor):
        state = self.init_state(pooled, grid)
        embedded = self._embed(tokens)
        outputs = []
        for t in range(tokens.shape[1]):
            h, state, _ = self._advance(embedded[:, t], state)
            outputs.append(h)
        return self.fc(self.dropout(torch.stack(outputs, dim=1))), pooled.new_zeros(())

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        h, state, alpha = self._advance(self._embed(tokens), state)
        return self.fc(h).log_softmax(-1), state, alpha
