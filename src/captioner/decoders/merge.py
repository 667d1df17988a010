"""The "merge" model of the Keras captioning tutorials (Tanti et al., 2018).

The LSTM reads only the words; the image joins after it: image and caption encodings are added, then a
dense layer predicts the next word. The language model never sees the image.
"""

from __future__ import annotations

import torch
from torch import nn

from captioner.decoders import register


@register("merge")
class Merge(nn.Module):
    static_state = ("image",)  # the same at every step: beam search need not reorder it

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
        self.image_proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, hidden_dim), nn.ReLU())
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, vocab_size)
        )

    def _predict(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.head(image + self.dropout(text))

    def forward(self, pooled: torch.Tensor, grid: torch.Tensor, tokens: torch.Tensor):
        text, _ = self.lstm(self.dropout(self.embed(tokens)))
        return self._predict(self.image_proj(pooled).unsqueeze(1), text), pooled.new_zeros(())

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        image = self.image_proj(pooled)
        zeros = image.new_zeros(image.shape[0], self.lstm.hidden_size)
        return {"h": zeros, "c": zeros.clone(), "image": image}

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        out, (h, c) = self.lstm(self.embed(tokens).unsqueeze(1), (state["h"][None], state["c"][None]))
        log_probs = self._predict(state["image"], out[:, 0]).log_softmax(-1)
        return log_probs, {"h": h[0], "c": c[0], "image": state["image"]}, None
