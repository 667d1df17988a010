"""A Captioner as ONNX graphs: `export` writes them (`captioner export`), `runtime` runs them with
onnxruntime (`captioner caption --runtime onnx`). An export directory holds:

    encoder.onnx       images [B, 3, S, S] -> pooled [B, D], grid [B, L, D]
    decoder_init.onnx  pooled, grid -> state.<name> for each state tensor
    decoder_step.onnx  tokens [B], state.<name>... -> log_probs [B, V], next.<name>...[, attention [B, L]]
    config.json        the checkpoint's config plus an "onnx" section (`checkpoint.OnnxSection`)
    vocab.json         the vocabulary
    labels.safetensors the encoder's ImageNet classifier (weight, bias), for visual labels; absent when
                       the model has none (`captioner.labels`)
"""

from __future__ import annotations

ENCODER, INIT, STEP = "encoder.onnx", "decoder_init.onnx", "decoder_step.onnx"
LABELS = "labels.safetensors"
GRAPHS = (ENCODER, INIT, STEP)

from captioner.onnx.export import ExportError, export_onnx  # noqa: E402  (they read the names above)
from captioner.onnx.runtime import OnnxCaptioner, load_session  # noqa: E402

__all__ = ["ENCODER", "GRAPHS", "INIT", "STEP", "ExportError", "OnnxCaptioner", "export_onnx", "load_session"]
