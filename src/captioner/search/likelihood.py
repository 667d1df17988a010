"""The second stage of a search: how likely the captioner finds the query as a caption of each photo."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from captioner.model import Captioner


def query_log_likelihood(captioner: Captioner, query: str, features: np.ndarray) -> np.ndarray:
    """Mean log-probability per word of `query` (with its <end>) as a caption of each photo, from the
    stored features [N, pooled + grid] by one teacher-forced pass of the decoder over all N photos."""
    import torch

    dim = captioner.encoder.feature_dim
    x = torch.from_numpy(features.astype(np.float32)).to(captioner.device)
    pooled, grid = x[:, :dim], x[:, dim:].reshape(len(x), -1, dim)
    tokens = torch.tensor(captioner.vocab.encode(query), device=x.device).unsqueeze(0).expand(len(x), -1)
    with torch.inference_mode():
        logits, _ = captioner.decoder(pooled, grid, tokens[:, :-1])
        words = logits.log_softmax(-1).gather(2, tokens[:, 1:, None]).squeeze(2)
    return words.mean(1).cpu().numpy()
