"""`captioner caption --runtime onnx`: run a `captioner export` directory with onnxruntime.

The graphs replace only the numbers: `OnnxDecoder` offers a torch decoder's `init_state`/`step` on top of
the two decoder graphs, so greedy, beam search, sampling and the banned-word filter of `captioner.decoding`
run unchanged, on the whole batch and every beam in one graph call per word.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from captioner.checkpoint import VOCAB_FILE, CheckpointConfig
from captioner.ensemble import Ensemble, check_members
from captioner.errors import CheckpointError, MissingDependencyError
from captioner.generation import GenerationOptions
from captioner.images import Preprocess
from captioner.labels import LabelHead
from captioner.model import Captioner
from captioner.neighbours import Neighbours
from captioner.onnx import ENCODER, GRAPHS, INIT, LABELS, STEP
from captioner.vocab import Vocabulary


def load_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session. threads=None follows OMP_NUM_THREADS, as torch does, so that both
    runtimes get the same share of the machine (0, onnxruntime's default, means one per core)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError("the ONNX runtime is not installed: pip install onnxruntime") from e
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() else 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: not a warning per unused initializer
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(session, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Run a session on torch tensors. Feeds the graph does not take are skipped: the exporter drops
    inputs a graph never reads (show_tell's init ignores the grid, attention's the pooled vector)."""
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: _numpy(v) for k, v in feeds.items() if k in wanted})


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def load_label_head(path: Path) -> LabelHead:
    """The label head an export saved: the encoder's ImageNet classifier, run in torch (one small matmul)."""
    from safetensors.torch import load_file

    tensors = load_file(path)

    def linear(prefix: str) -> torch.nn.Linear:
        weight = tensors[f"{prefix}weight"]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": tensors[f"{prefix}bias"]})
        return layer.eval()

    words = sorted({k.split(".")[0] for k in tensors if "." in k})  # the word probes ("person.weight")
    return LabelHead(linear(""), {w: linear(f"{w}.") for w in words})


class OnnxEncoder:
    """The encoder graph behind the torch Encoder's interface: name, preprocess, enc(x) -> (pooled, grid)."""

    def __init__(self, session, name: str, preprocess: Preprocess):
        self.session, self.name, self.preprocess = session, name, preprocess

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, grid = run(self.session, {"images": images})
        return torch.from_numpy(pooled), torch.from_numpy(grid)


class OnnxDecoder:
    """A torch decoder's `init_state`/`step` (see `captioner.decoders`) computed by the two decoder graphs.

    The step graph returns only the state tensors it changes (`updates`); the rest carry over as they were.
    """

    def __init__(self, init, step, names: list[str], updates: list[str], attention: bool):
        self.init, self.step_session = init, step
        self.names, self.updates, self.attention = names, updates, attention
        self.static_state = tuple(n for n in names if n not in updates)  # never changed by a step

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = run(self.init, {"pooled": pooled, "grid": grid})
        return {k: torch.from_numpy(v) for k, v in zip(self.names, outs, strict=True)}

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        outs = run(self.step_session, {"tokens": tokens, **{f"state.{k}": state[k] for k in self.names}})
        changed = outs[1 : 1 + len(self.updates)]
        new = {**state, **{k: torch.from_numpy(v) for k, v in zip(self.updates, changed, strict=True)}}
        alpha = torch.from_numpy(outs[-1]) if self.attention else None
        return torch.from_numpy(outs[0]), new, alpha


class OnnxCaptioner:
    """A Captioner whose encoder and decoder steps run in onnxruntime.

    `generate`, `caption_tensors` and `caption` are the torch Captioner's own methods, borrowed: the two
    runtimes share every line of decoding and can differ only in the numbers the graphs compute.
    """

    device = torch.device("cpu")  # where caption_tensors puts the images: onnxruntime takes CPU tensors

    def __init__(
        self,
        encoder: OnnxEncoder,
        decoder: OnnxDecoder | Ensemble,
        vocab: Vocabulary,
        config: CheckpointConfig,
    ):
        self.encoder, self.decoder, self.vocab, self.config = encoder, decoder, vocab, config
        self.members: list[str] = []  # an ensemble's exports (see `from_pretrained`)
        self.generation: GenerationOptions = config.generation
        self.label_head: LabelHead | None = None
        self.labels_unavailable: str | None = "the export has no ImageNet classifier (labels.safetensors)"
        self.neighbours: Neighbours | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | Sequence[str | os.PathLike] | None,
        *,
        threads: int | None = None,
    ) -> OnnxCaptioner:
        """Load a directory written by `captioner export` (threads: see `load_session`); a list of two or
        more loads an ensemble, as `Captioner.from_pretrained` does."""
        if not isinstance(path, str | os.PathLike | None):
            paths = list(path)
            if len(paths) > 1:
                return cls._ensemble([cls.from_pretrained(p, threads=threads) for p in paths], paths)
            path = paths[0] if paths else None
        if path is None:
            raise CheckpointError(
                "the onnx runtime needs --model DIR, a directory made by `captioner export`"
            )
        path = Path(path)
        try:
            config = CheckpointConfig.read(path)
        except CheckpointError as e:
            if not (path / "config.json").exists():
                raise CheckpointError(f"{path}: not an ONNX export (no config.json)") from e
            raise
        if config.onnx is None:
            raise CheckpointError(
                f"{path}: a torch checkpoint, not an ONNX export; make one with "
                f"`captioner export --model {path} --out DIR`"
            )
        missing = [f for f in (*GRAPHS, VOCAB_FILE) if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path}: an incomplete ONNX export, missing {', '.join(missing)}")
        encoder = OnnxEncoder(
            load_session(path / ENCODER, threads), config.encoder.name, config.encoder.preprocess
        )
        decoder = OnnxDecoder(
            load_session(path / INIT, threads),
            load_session(path / STEP, threads),
            list(config.onnx.state),
            list(config.onnx.updates),
            config.onnx.attention,
        )
        model = cls(encoder, decoder, Vocabulary.load(path / VOCAB_FILE), config)
        if (path / LABELS).exists():
            model.label_head, model.labels_unavailable = load_label_head(path / LABELS), None
        model.neighbours = Neighbours.load(path)
        return model

    @classmethod
    def _ensemble(cls, members: list[OnnxCaptioner], paths: list) -> OnnxCaptioner:
        names = [str(p) for p in paths]
        check_members(names, [m.vocab.words for m in members], [m.config.encoder for m in members])
        first = members[0]
        model = cls(first.encoder, Ensemble([m.decoder for m in members]), first.vocab, first.config)
        model.label_head, model.labels_unavailable = first.label_head, first.labels_unavailable
        model.members, model.neighbours = names, first.neighbours
        return model

    def eval(self) -> OnnxCaptioner:  # what Captioner.caption_tensors calls on itself
        return self

    generate = Captioner.generate
    grounding_plan = Captioner.grounding_plan
    words = Captioner.words
    decode = Captioner.decode
    caption_tensors = Captioner.caption_tensors
    caption = Captioner.caption
