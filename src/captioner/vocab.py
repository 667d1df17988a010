"""Tokenizer and vocabulary: words <-> ids, saved as JSON beside every model.

Captions are lower-cased and split into words with punctuation split off. Punctuation tokens are dropped
by default, as in the standard Karpathy preprocessing: the coco-caption PTB tokenizer removes them before
scoring anyway, and a model that spends capacity on full stops gains nothing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from captioner.errors import CheckpointError, DataError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str, keep_punctuation: bool = False) -> list[str]:
    """'A dog, running.' -> ['a', 'dog', 'running'] (or with punctuation: [..., ',', ..., '.'])."""
    tokens = _TOKEN.findall(text.lower())
    if keep_punctuation:
        return tokens
    return [t for t in tokens if t[0].isalnum()]


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats drifting
    return ordered[int(rank) - 1]


@dataclass
class Vocabulary:
    words: list[str]  # index -> word; the four specials come first
    max_length: int  # longest caption (in words, without <start>/<end>) the model emits
    keep_punctuation: bool = False
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.words[:4]) != SPECIALS:
            raise CheckpointError(f"a vocabulary must start with {SPECIALS}, got {self.words[:4]}")
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise CheckpointError("a vocabulary lists a word twice")

    pad_id = property(lambda self: 0)
    start_id = property(lambda self: 1)
    end_id = property(lambda self: 2)
    unk_id = property(lambda self: 3)

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(
        cls,
        captions: Iterable[str],
        min_count: int = 5,
        length_percentile: float = 95.0,
        keep_punctuation: bool = False,
    ) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical: deterministic)."""
        counts: Counter[str] = Counter()
        lengths = []
        for caption in captions:
            tokens = tokenize(caption, keep_punctuation)
            counts.update(tokens)
            lengths.append(len(tokens))
        if not lengths:
            raise DataError("cannot build a vocabulary from no captions")
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept, max(1, percentile(lengths, length_percentile)), keep_punctuation)

    def encode(self, caption: str, max_length: int | None = None) -> list[int]:
        """<start> w1 .. wn <end>, unknown words as <unk>, truncated to max_length words."""
        limit = self.max_length if max_length is None else max_length
        ids = [self.index.get(t, self.unk_id) for t in tokenize(caption, self.keep_punctuation)][:limit]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at <end> and skipping <start>/<pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"words": self.words, "max_length": self.max_length, "keep_punctuation": self.keep_punctuation}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        return cls(list(d["words"]), int(d["max_length"]), bool(d.get("keep_punctuation", False)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        from captioner.errors import CheckpointError

        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, or not a vocabulary
            raise CheckpointError(f"{path}: not a vocabulary file ({type(e).__name__}: {e})") from None
