"""Typed training configuration: dataclasses, loaded from YAML, overridable with `section.key=value`."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from captioner.errors import ConfigError
from captioner.limits import Limit


@dataclass
class DataConfig:
    root: str = "../shared/flickr8k"  # data set directory (any layout `captioner data inspect` reads)
    features: str | None = None  # feature cache of the encoder; None trains on images
    split_file: str | None = None  # a split saved by `captioner data split` (default: the layout's own)
    train_split: str = "train"
    val_split: str = "val"
    val_images: int = 0  # validate on the first N images of val_split (0 = all)
    min_count: int = 5  # vocabulary: words seen fewer times become <unk>
    length_percentile: float = 95.0  # vocabulary: maximum caption length from this percentile
    skip_missing: bool = False


@dataclass
class EncoderConfig:
    name: str = "efficientnet_lite2"
    resize: str = "squash"  # "squash" or "crop": how images of any shape become square
    finetune: float = 0.0  # fraction of the encoder's parameter tensors to train, the last ones (images only)
    lr: float = 1e-5  # encoder learning rate when fine-tuning


@dataclass
class DecoderConfig:
    name: str = "attention"  # show_tell, merge, attention or updown
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5
    alpha_c: float = 1.0  # doubly stochastic attention penalty (attention only)
    glove: str | None = None  # GloVe-format text file to initialise word embeddings

    def options(self) -> dict:
        """What the decoder's constructor takes, plus its name: stored in every checkpoint."""
        d = dataclasses.asdict(self)
        d.pop("glove")
        return d


@dataclass
class EmbeddingConfig:
    """The search embedding (`train.task: search`, `captioner.search.joint`): photo and sentence towers."""

    embed_dim: int = 256
    hidden_dim: int = 1024
    grid: bool = True  # attention-pool the encoder's grid beside the pooled vector
    dropout: float = 0.1
    hard_margin: float = 0.0  # > 0: add VSE++'s hardest-negative hinge with this margin to InfoNCE
    word_dim: int = 0  # > 0: learned word vectors of this size beside MiniLM's sentence vector
    word_min_count: int = 3  # the word vectors' words: those in at least this many training captions
    word_dropout: float = 0.0  # in training, each word left out of the word vectors' mean at this rate


@dataclass
class TrainConfig:
    task: str = "caption"  # "caption" trains a captioner; "search" the search embedding (section embedding)
    out_dir: str = "runs/default"
    device: str = "auto"  # "auto" (the GPU when there is one), "cpu", "cuda" or "cuda:N"
    epochs: int = 20
    max_steps: int = 0  # stop after this many optimiser steps in all (0 = no limit)
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    schedule: str = "plateau"  # "plateau" (on validation CIDEr), "cosine" or "constant"
    lr_decay: float = 0.5  # plateau: factor applied after `lr_patience` epochs without gain
    lr_patience: int = 2  # >= 1
    patience: int = 6  # early stopping: epochs without a better validation CIDEr
    val_beam_size: int = 1
    augment: bool = True  # image training only: random crop and colour jitter
    num_workers: int = 0
    seed: int = 0
    log_every: int = 50
    save_every_steps: int = 0  # also checkpoint mid-epoch every N steps (0 = once per epoch)
    save_dtype: str = "float16"  # of OUT/best, for inference: "float16" (half the size) or "float32"
    init_from: str | None = None  # start from this checkpoint's weights, vocabulary and decoder settings
    scst: bool = False  # self-critical training (CIDEr-D reward) instead of cross-entropy; use with init_from
    scst_samples: int = 5  # captions sampled per image
    scst_baseline: str = "mean"  # "mean" of the image's other samples, or its "greedy" caption's reward
    scst_count_end: bool = True  # the end token counts in the reward's n-grams: no captions cut mid-phrase
    scst_bleu_weight: float = 0.0  # reward CIDEr-D + this x sentence BLEU-4 (0-1); 0: CIDEr-D alone


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


POSITIVE, COUNT, SIZE, FRACTION = Limit(above=0), Limit(low=0), Limit(low=1), Limit(low=0, below=1)
LIMITS = {
    "data.val_images": COUNT,
    "data.min_count": SIZE,
    "data.length_percentile": Limit(above=0, high=100),
    "encoder.resize": Limit(choices=("squash", "crop")),
    "encoder.finetune": Limit(low=0, high=1),
    "encoder.lr": POSITIVE,
    "decoder.embed_dim": SIZE,
    "decoder.hidden_dim": SIZE,
    "decoder.attention_dim": SIZE,
    "decoder.dropout": FRACTION,
    "decoder.alpha_c": COUNT,
    "embedding.embed_dim": SIZE,
    "embedding.hidden_dim": SIZE,
    "embedding.dropout": FRACTION,
    "embedding.hard_margin": COUNT,
    "embedding.word_dim": COUNT,
    "embedding.word_min_count": COUNT,
    "embedding.word_dropout": FRACTION,
    "train.task": Limit(choices=("caption", "search")),
    "train.epochs": SIZE,
    "train.max_steps": COUNT,
    "train.batch_size": SIZE,
    "train.lr": POSITIVE,
    "train.weight_decay": COUNT,
    "train.grad_clip": COUNT,
    "train.label_smoothing": FRACTION,
    "train.schedule": Limit(choices=("plateau", "cosine", "constant")),
    "train.lr_decay": Limit(above=0, high=1),
    "train.lr_patience": SIZE,
    "train.patience": SIZE,
    "train.val_beam_size": SIZE,
    "train.num_workers": COUNT,
    "train.log_every": SIZE,
    "train.save_every_steps": COUNT,
    "train.save_dtype": Limit(choices=("float16", "float32")),
    "train.scst_samples": SIZE,
    "train.scst_baseline": Limit(choices=("mean", "greedy")),
    "train.scst_bleu_weight": COUNT,
}
"""Checked as each value is read, so a bad one fails at load time, naming its file (or the command
line) and key, not an epoch later."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file (missing keys keep their defaults), then `section.key=value` overrides."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{path}: a config is a mapping of sections (data, encoder, decoder, train, embedding)"
            )
    config = from_dict(raw, source=str(path or "config"))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=5")
        section, name = key.split(".", 1)
        _apply(config, {section: {name: yaml.safe_load(value)}}, f"command line {item!r}")
    return config


def from_dict(raw: dict, source: str = "config") -> Config:
    return _apply(Config(), raw, source)


def _apply(config: Config, raw: dict, source: str) -> Config:
    for section, values in raw.items():
        if section not in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"{source}: unknown section {section!r}")
        if not isinstance(values, dict | None):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys, got {values!r}")
        target = getattr(config, section)
        hints = typing.get_type_hints(type(target))
        for name, value in (values or {}).items():
            if name not in hints:
                known = ", ".join(f.name for f in dataclasses.fields(target))
                raise ConfigError(f"{source}: unknown key {section}.{name} (known: {known})")
            value = coerce(value, hints[name], f"{source}: {section}.{name}")
            limit = LIMITS.get(f"{section}.{name}")
            if limit is not None and value is not None and not limit.allows(value):
                raise ConfigError(f"{source}: {section}.{name} must be {limit}, got {value!r}")
            setattr(target, name, value)
    return config


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are expected."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for kind in options:
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if kind is bool and isinstance(value, bool):
            return value
        if kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in options)
    raise ConfigError(f"{where}: expected {names}, got {value!r}")
