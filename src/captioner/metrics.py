"""coco-caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) from pycocoevalcap's own scorers.

We call the scorers directly instead of `COCOEvalCap.evaluate()`, which runs SPICE first and fails without
the Stanford CoreNLP models. Captions are tokenized with the PTB tokenizer the published numbers use
(it lower-cases and strips punctuation), and scores are reported on the 0-100 scale of the papers.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from captioner.errors import DataError

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


JAVA_MISSING = (
    "Java was not found: the coco-caption tools (the PTB tokenizer, METEOR) run in Java; install it, e.g. "
    "`apt-get install openjdk-17-jre-headless` (Debian, Ubuntu) or `brew install openjdk@17` (macOS)"
)


def have_java() -> bool:
    return shutil.which("java") is not None


def tokenize(captions: Mapping[str, Sequence[str]], *, java: bool | None = None) -> dict[str, list[str]]:
    """PTB-tokenize {id: [caption, ...]} into {id: ["a dog runs", ...]}: with pycocoevalcap's tokenizer
    (Java) when `java` (default: when Java is installed), else with `ptb_tokens`, its Python twin."""
    if java is None:
        java = have_java()
    if not java:
        return {k: [" ".join(ptb_tokens(c)) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {k: [{"caption": c} for c in v] for k, v in captions.items()}
    with contextlib.redirect_stdout(io.StringIO()), _java_stderr_silenced():
        return PTBTokenizer().tokenize(data)


# What pycocoevalcap's PTBTokenizer removes after Stanford's tokenizer has split the text (brackets
# arrive as -LRB- and the like, removed too).
_PTB_PUNCTUATION = set("'`.?!,:-;(){}\"") | {"''", "``", "--", "..."}
_CLITIC = re.compile(r"(?<=[a-z0-9])(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PTB_TOKEN = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:[-./&'][a-z0-9]+)*|\.\.\.|--|[^\sa-z0-9]")


def ptb_tokens(caption: str) -> list[str]:
    """Stanford's PTB tokenizer as pycocoevalcap runs it (lower-cased, punctuation removed), in Python:
    "A dog's ball, black-and-white." -> ["a", "dog", "'s", "ball", "black-and-white"]. For validation
    during training on a machine without Java; tests/test_metrics.py holds it to the Java tokenizer."""
    text = _CLITIC.sub(r" \1", caption.lower().replace("\u2019", "'"))
    return [t for t in _PTB_TOKEN.findall(text) if t not in _PTB_PUNCTUATION]


@contextlib.contextmanager
def _java_stderr_silenced():
    """The tokenizer's Java process reports its speed on stderr for every call; hide that chatter."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None if its Stanford CoreNLP jar is installed."""
    import pycocoevalcap.spice as spice

    jar = Path(spice.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar"
    if not jar.exists():
        return f"SPICE needs the Stanford CoreNLP 3.6.0 models ({jar.name}), which are not installed"
    return None


def score_captions(
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
    *,
    metrics: Sequence[str] = METRICS,
    spice: bool = False,
) -> dict[str, float | str]:
    """Corpus scores (0-100) of one candidate per id against that id's references."""
    return CaptionScorer(references).score(candidates, metrics=metrics, spice=spice)


class CaptionScorer:
    """Scores many sets of candidates against fixed references, tokenizing the references only once
    (validation scores the same split every epoch)."""

    def __init__(self, references: Mapping[str, Sequence[str]], *, java: bool | None = None):
        """`java`: tokenize with the Java PTB tokenizer (True), its Python twin (False) or the first when
        Java is installed (None). METEOR and SPICE need Java whatever the tokenizer."""
        if not references:
            raise DataError("no reference captions to score against")
        self.java = have_java() if java is None else java
        self.references = tokenize(references, java=self.java)

    def score(
        self, candidates: Mapping[str, str], *, metrics: Sequence[str] = METRICS, spice: bool = False
    ) -> dict[str, float | str]:
        if set(self.references) != set(candidates):
            differ = sorted(set(self.references) ^ set(candidates))[:5]
            raise ValueError(
                f"references and candidates must cover the same images (they differ at {differ})"
            )
        refs = self.references
        cands = tokenize({k: [v] for k, v in candidates.items()}, java=self.java)
        scores: dict[str, float | str] = {}
        wanted = set(metrics)
        if wanted & {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}:
            from pycocoevalcap.bleu.bleu import Bleu

            with contextlib.redirect_stdout(io.StringIO()):
                bleu, _ = Bleu(4).compute_score(refs, cands)
            scores.update({f"BLEU-{n + 1}": 100 * bleu[n] for n in range(4) if f"BLEU-{n + 1}" in wanted})
        if "METEOR" in wanted:
            scores["METEOR"] = 100 * _meteor(refs, cands) if have_java() else f"unavailable: {JAVA_MISSING}"
        if "ROUGE-L" in wanted:
            from pycocoevalcap.rouge.rouge import Rouge

            scores["ROUGE-L"] = 100 * Rouge().compute_score(refs, cands)[0]
        if "CIDEr" in wanted:
            from pycocoevalcap.cider.cider import Cider

            scores["CIDEr"] = 100 * Cider().compute_score(refs, cands)[0]
        if spice:
            reason = spice_unavailable_reason()
            scores["SPICE"] = f"unavailable: {reason}" if reason else 100 * _spice(refs, cands)
        return scores


def _meteor(refs: dict[str, list[str]], cands: dict[str, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    return float(Meteor().compute_score(refs, cands)[0])


def _spice(refs: dict[str, list[str]], cands: dict[str, list[str]]) -> float:
    from pycocoevalcap.spice.spice import Spice

    return float(Spice().compute_score(refs, cands)[0])


def format_scores(scores: Mapping[str, float | str]) -> str:
    width = max(len(k) for k in scores)
    return "\n".join(
        f"{k:<{width}}  {v:6.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in scores.items()
    )


def format_table(columns: Mapping[str, Mapping[str, float | str]]) -> str:
    """Several runs' scores side by side: a row per metric, a column per run (e.g. "beam 1", "beam 3");
    a score one run lacks or could not compute (SPICE) is shown as "-", with the reason below once."""
    names = list(columns)
    metrics = list(dict.fromkeys(k for scores in columns.values() for k in scores))
    width = max(len(k) for k in metrics)
    cell = max(8, *(len(n) for n in names))
    lines = [" " * width + "".join(f"  {n:>{cell}}" for n in names)]
    notes = {}
    for k in metrics:
        values = [columns[n].get(k) for n in names]
        if all(isinstance(v, int | float) for v in values):
            lines.append(f"{k:<{width}}" + "".join(f"  {v:>{cell}.2f}" for v in values))
        else:
            lines.append(f"{k:<{width}}" + "".join(f"  {'-':>{cell}}" for _ in values))
            notes[k] = next((v for v in values if isinstance(v, str)), "")
    lines += [f"{k}: {v}" for k, v in notes.items() if v]
    return "\n".join(lines)
