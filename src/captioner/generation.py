"""Decoding options: one frozen, validated value passed from the CLI, the server and the API to decoding.

Every field left as None means "the model's own default, else the library's" (like Hugging Face's
generation config): a checkpoint stores the defaults that did best on its validation split (for example
its length penalty) in the `generation` section of config.json, and `over(defaults)` fills them in.
A misspelt or impossible option is a `ConfigError` naming it, raised where the options are made, not deep
inside a beam search.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from captioner.errors import ConfigError
from captioner.limits import Limit

# What an option left unset everywhere means.
DEFAULTS: dict[str, Any] = {
    "beam_size": 3,
    "n_best": 1,
    "length_penalty": 0.0,
    "no_repeat_ngram": 0,
    "max_length": None,  # the vocabulary's: the longest caption the model was trained on
    "temperature": None,  # None: search (greedy or beam); a number: sample at this temperature
    "top_p": 1.0,
    "grounding": True,
    "whole_phrases": True,
    "rerank": True,
}


LIMITS = {  # the range of each number option
    "beam_size": Limit(low=1),
    "n_best": Limit(low=1),
    "no_repeat_ngram": Limit(low=0),  # 0: off
    "max_length": Limit(low=1),
    "temperature": Limit(above=0),
    "top_p": Limit(above=0, high=1),
}


@dataclass(frozen=True)
class GenerationOptions:
    beam_size: int | None = None  # 1 = greedy
    n_best: int | None = None  # captions returned per image, best first (at most beam_size)
    length_penalty: float | None = None  # GNMT alpha: 0 ranks by log-probability, higher favours longer
    no_repeat_ngram: int | None = None  # n: no caption repeats an n-gram (0 = off)
    max_length: int | None = None  # most words in a caption
    temperature: float | None = None  # sample instead of searching
    top_p: float | None = None  # nucleus sampling: keep the most likely words up to this mass
    grounding: bool | None = (
        None  # follow the visual labels (`captioner.grounding`); False: the decoder alone
    )
    whole_phrases: bool | None = None  # never end mid-phrase ("playing in the"): decoding.WholePhrases
    rerank: bool | None = None  # re-rank the beam by its training neighbours' captions: captioner.neighbours

    def __post_init__(self) -> None:
        for name in ("beam_size", "n_best", "no_repeat_ngram", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
        for name in ("grounding", "whole_phrases", "rerank"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        for name in ("length_penalty", "temperature", "top_p"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None and not limit.allows(value):
                raise ConfigError(f"{name} must be {limit}, got {value!r}")
        if self.top_p is not None and self.top_p < 1 and self.temperature is None:
            raise ConfigError("top_p applies to sampling: set temperature too")
        searching = self.temperature is None
        if (
            searching
            and self.beam_size is not None
            and self.n_best is not None
            and self.n_best > self.beam_size
        ):
            raise ConfigError(f"n_best ({self.n_best}) cannot be larger than beam_size ({self.beam_size})")

    @classmethod
    def of(cls, options: GenerationOptions | None = None, /, **kwargs: Any) -> GenerationOptions:
        """`options` with `kwargs` replacing fields: what the Python API's keyword arguments become.
        A keyword that is not an option is an error listing those that are."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(
                f"unknown decoding option {', '.join(map(repr, unknown))}; "
                f"the options are: {', '.join(known)}"
            )
        return dataclasses.replace(options or cls(), **kwargs)

    def over(self, defaults: GenerationOptions) -> GenerationOptions:
        """These options, with `defaults` (a model's stored ones) wherever a field is None."""
        return dataclasses.replace(
            self, **{f.name: getattr(defaults, f.name) for f in fields(self) if getattr(self, f.name) is None}
        )

    def value(self, name: str) -> Any:
        """A field's value, or the library default when it is unset."""
        value = getattr(self, name)
        return DEFAULTS[name] if value is None else value

    def to_json(self) -> dict[str, Any]:
        """The fields that are set: what a checkpoint's config.json stores."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, data: Any, where: str = "generation") -> GenerationOptions:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of decoding options, got {data!r}")
        try:
            return cls.of(**data)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
