"""The encoder's backbone run by onnxruntime on the CPU, when onnxruntime is installed.

On these mobile backbones onnxruntime's CPU kernels (depthwise convolutions, convolution + ReLU6 fused)
take about half of PyTorch's time for the same arithmetic (benchmarks/run.py). The folded backbone
(captioner.folding) is traced into an ONNX graph at the encoder's fixed input size, cached on disk
(``$CAPTIONER_CACHE``, else ``~/.cache/captioner``), and its outputs checked against PyTorch's every time
a process loads it; any failure falls back to PyTorch. ``CAPTIONER_ENCODER_RUNTIME=torch`` turns it off.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from captioner.cache import cache_dir, save

OPSET = 17  # of every graph traced here: well-trodden by the TorchScript exporter; onnxruntime >= 1.13
CHECK_ATOL = 1e-3  # on the feature map, whose values reach ~6: float rounding, not a different model
FORMAT = 1  # of the cached graphs: bump when folding or tracing changes what they hold


def enabled(device: torch.device) -> bool:
    if device.type != "cpu" or os.environ.get("CAPTIONER_ENCODER_RUNTIME", "onnxruntime") == "torch":
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Features(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)  # type: ignore[operator]


class OrtBackbone:
    """`forward_features` of a backbone as an onnxruntime session (batch size free, side fixed)."""

    def __init__(self, graph: bytes, size: int, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # notes about the graph's initialisers are not the user's business
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.size = size

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"images": x})[0])


def export(folded: nn.Module, size: int) -> bytes:
    """The folded backbone's forward_features as an ONNX graph (about 3 s for EfficientNet-Lite2)."""
    graph = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            _Features(folded).eval(),
            (torch.zeros(2, 3, size, size),),
            graph,  # type: ignore[arg-type]  # a file object works and is documented
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return graph.getvalue()


def _key(backbone: nn.Module, size: int) -> str:
    from captioner import __version__
    from captioner.checkpoint import weights_digest

    parts = [weights_digest(backbone), str(size), torch.__version__, __version__, f"format {FORMAT}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def build(backbone: nn.Module, size: int, fold: Callable[[], nn.Module]) -> OrtBackbone | None:
    """An OrtBackbone computing what `backbone` computes, or None (with a note on stderr) if onnxruntime
    cannot run it or disagrees. The graph, traced from `fold()`, is cached on disk by the weights' digest:
    the first use of a model costs a few seconds once, later processes load it in a tenth of a second."""
    threads = torch.get_num_threads()
    try:
        path = cache_dir() / f"{_key(backbone, size)}.onnx"
        if path.is_file():
            try:
                fast = OrtBackbone(path.read_bytes(), size, threads)
                if _disagreement(fast, backbone, size) <= CHECK_ATOL:
                    return fast
            except Exception:  # a damaged or foreign cache entry: traced again below
                pass
            path.unlink(missing_ok=True)
        graph = export(fold(), size)
        fast = OrtBackbone(graph, size, threads)
        if (worst := _disagreement(fast, backbone, size)) > CHECK_ATOL:
            raise RuntimeError(f"onnxruntime and torch disagree by {worst:.2g}")
        save(path, graph)
        return fast
    except Exception as e:  # any exporter or runtime failure: PyTorch still computes the same features
        print(f"captioner: note: the encoder stays in PyTorch ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _disagreement(fast: OrtBackbone, backbone: nn.Module, size: int) -> float:
    """Largest difference of the two on two random images (inf if their shapes differ)."""
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = backbone.forward_features(example.contiguous(memory_format=torch.channels_last))  # type: ignore[operator]
    got = fast.forward_features(example)
    return float((got - want).abs().max()) if got.shape == want.shape else float("inf")
