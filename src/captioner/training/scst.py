"""Self-critical sequence training (Rennie et al., 2017): fine-tune a captioner on its own captions.

Cross-entropy teaches a model to predict the next reference word given the reference so far; at test time
it reads its own words instead, and is scored with CIDEr. SCST closes that gap with REINFORCE: sample a few
captions per image, score each with CIDEr-D against the image's references, and raise the log-probability
of the samples that beat a baseline while lowering the others. The baseline is either the greedy caption's
reward (the paper) or the mean reward of the image's other samples (Luo, 2020: no extra decoding pass).

CIDEr-D here is coco-caption's (pycocoevalcap's n-gram counting, tf-idf weighting, clipping and length
penalty), but its document frequencies come once from the training captions rather than from each batch,
and each image's reference vectors are computed once: a reward is needed for every sample of every step.

With `count_end` (the default) every caption, sampled or reference, ends in an end token that takes part in
the n-grams, as in the later self-critical implementations (ruotianluo's ImageCaptioning.pytorch): a
reference never ends "in the <end>", so a sample that stops mid-phrase loses those n-grams' reward. Without
it, "two boys are playing in the" scores nearly as well as "... in the water" and SCST learns to stop early.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from captioner.decoding import WithoutWords, greedy
from captioner.errors import ConfigError

NGRAMS, SIGMA = 4, 6.0
END = "<end>"  # the PTB tokenizer never yields it, so it matches only another caption's end


def _counts(words: Sequence[str], count_end: bool) -> dict[tuple[str, ...], int]:
    from pycocoevalcap.cider.cider_scorer import precook

    return precook(" ".join([*words, END] if count_end else words), NGRAMS)


def _ngrams(words: Sequence[str], count_end: bool) -> set[tuple[str, ...]]:
    """The distinct n-grams of `_counts` (what document frequencies count), without counting them."""
    w = [*words, END] if count_end else list(words)
    return {g for n in range(1, NGRAMS + 1) for g in zip(*(w[i:] for i in range(n)), strict=False)}


class CiderD:
    """CIDEr-D of candidate captions against fixed references, document frequencies from those references.

    `references[i]` are image i's reference captions, each a list of words. Scores are on coco-caption's
    scale (matching every reference scores 10), per candidate. `count_end`: see the module docstring
    """

    def __init__(self, references: Sequence[Sequence[Sequence[str]]], count_end: bool = True):
        self.count_end = count_end
        self.df: dict[tuple[str, ...], float] = defaultdict(float)
        for refs in references:  # an image's distinct n-grams: only sets here, the counts when scored
            for ngram in {g for r in refs for g in _ngrams(r, count_end)}:
                self.df[ngram] += 1
        self.log_n = math.log(float(len(references)))
        self._refs = references
        self._merged_refs: dict[int, tuple] = {}

    def _vector(self, counts: dict[tuple[str, ...], int]):
        """(weights {n-gram: tf-idf}, the norm of each order's weights, the length in words)."""
        vec: dict[tuple[str, ...], float] = {}
        norm = [0.0] * NGRAMS
        length = 0
        for ngram, tf in counts.items():
            n = len(ngram) - 1
            w = float(tf) * (self.log_n - math.log(max(1.0, self.df.get(ngram, 0.0))))
            vec[ngram] = w
            norm[n] += w * w
            if n == 0:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, image: int, words: Sequence[str]) -> float:
        """CIDEr-D of one caption (a list of words) for reference set `image`."""
        return self.mean_score([image], words)

    def _references(self, image: int):
        """Reference set `image`: ({n-gram: [(reference, weight), ...]}, [(norms, length) a reference])."""
        if image not in self._merged_refs:
            merged: dict[tuple[str, ...], list[tuple[int, float]]] = defaultdict(list)
            shapes = []
            for j, ref in enumerate(self._refs[image]):
                vec_r, norm_r, length_r = self._vector(_counts(ref, self.count_end))
                for g, r in vec_r.items():
                    merged[g].append((j, r))
                shapes.append((norm_r, length_r))
            self._merged_refs[image] = (dict(merged), shapes)
        return self._merged_refs[image]

    def mean_score(self, images: Sequence[int], words: Sequence[str]) -> float:
        """The mean CIDEr-D of one caption over several reference sets (its vector made once).

        One lookup per n-gram of the caption and reference set (re-ranking scores every beam candidate
        against 10 photos' 50 captions, so this is on captioning's critical path); the sums are
        pycocoevalcap's, term for term, in its order."""
        if not words:
            return 0.0  # nothing said: no reward, whatever the end token would match
        vec, norm, length = self._vector(_counts(words, self.count_end))
        scores = []
        for image in images:
            merged, shapes = self._references(image)
            dots = [[0.0] * NGRAMS for _ in shapes]
            for g, w in vec.items():
                for j, r in merged.get(g, ()):
                    dots[j][len(g) - 1] += min(w, r) * r
            total = 0.0
            for (norm_r, length_r), dot_r in zip(shapes, dots, strict=True):
                penalty = math.exp(-((length - length_r) ** 2) / (2 * SIGMA**2))
                for n in range(NGRAMS):
                    dot = dot_r[n]
                    if norm[n] != 0 and norm_r[n] != 0:
                        dot /= norm[n] * norm_r[n]
                    total += dot * penalty
            scores.append(10.0 * total / NGRAMS / len(shapes))
        return sum(scores) / len(scores)


def sample_with_log_probs(
    decoder, pooled: torch.Tensor, grid: torch.Tensor, *, start_id: int, end_id: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one caption per row, keeping the graph: (tokens [B, T], log-probs [B, T], mask [B, T]).

    The mask covers each caption's words and its <end> (the choice to stop is learned too); the last step
    can only emit <end>, so sampling always ends.
    """
    batch = pooled.shape[0]
    state = decoder.init_state(pooled, grid)
    tokens = torch.full((batch,), start_id, dtype=torch.long, device=pooled.device)
    alive = torch.ones(batch, dtype=torch.bool, device=pooled.device)
    words, log_probs, masks = [], [], []
    for t in range(max_length + 1):
        lp, state, _ = decoder.step(tokens, state)
        if t == max_length:
            tokens = torch.full_like(tokens, end_id)
        else:
            tokens = torch.multinomial(lp.detach().exp(), 1).squeeze(1)
        tokens = torch.where(alive, tokens, torch.full_like(tokens, end_id))
        words.append(tokens)
        log_probs.append(lp.gather(1, tokens[:, None]).squeeze(1))
        masks.append(alive.clone())
        alive = alive & (tokens != end_id)
        if not bool(alive.any()):
            break
    return torch.stack(words, 1), torch.stack(log_probs, 1), torch.stack(masks, 1).float()


def sentence_bleu4(
    candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> list[float]:
    """coco-caption's BLEU-4 of each candidate (a list of words) against its references, on 0-1: the
    per-sentence scores pycocoevalcap's BleuScorer computes on the way to the corpus score (clipped n-gram
    precisions, brevity penalty against the closest reference length)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for words, refs in zip(candidates, references, strict=True):
        scorer += (" ".join(words), [" ".join(r) for r in refs])
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its corpus totals
        _, per_sentence = scorer.compute_score(option="closest", verbose=0)
    return [float(b) if words else 0.0 for b, words in zip(per_sentence[3], candidates, strict=True)]


class SelfCritical:
    """The SCST loss of a batch of images (what `steps.SelfCriticalStep` computes). The reward is CIDEr-D,
    plus `bleu_weight` x sentence BLEU-4 (0-1) against the same references where that is set (a mixed
    reward: CIDEr-D alone learns the consensus words and leaves BLEU's exact 4-grams behind)."""

    def __init__(
        self,
        model,
        cider: CiderD,
        samples: int = 5,
        baseline: str = "mean",
        bleu_weight: float = 0.0,
        references: Sequence[Sequence[Sequence[str]]] | None = None,
    ):
        if baseline not in ("mean", "greedy"):
            raise ConfigError(f"train.scst_baseline: {baseline!r} is not 'mean' or 'greedy'")
        if baseline == "mean" and samples < 2:
            raise ConfigError("train.scst_samples: the mean-of-samples baseline needs at least 2 samples")
        if bleu_weight and references is None:
            raise ValueError("a BLEU-4 reward needs the references")
        self.model, self.cider, self.samples, self.baseline = model, cider, samples, baseline
        self.bleu_weight, self.references = bleu_weight, references

    def reward(self, images: Sequence[int], captions: Sequence[list[str]]) -> torch.Tensor:
        """The reward of each caption (a list of words) for its image (an index into the references)."""
        values = [self.cider.score(i, words) for i, words in zip(images, captions, strict=True)]
        if self.bleu_weight:
            assert self.references is not None
            bleu = sentence_bleu4(captions, [self.references[i] for i in images])
            values = [c + self.bleu_weight * b for c, b in zip(values, bleu, strict=True)]
        return torch.tensor(values)

    def _words(self, ids: list[int]) -> list[str]:
        return self.model.vocab.decode(ids).split()  # up to <end>

    def __call__(self, pooled: torch.Tensor, grid: torch.Tensor, images: torch.Tensor):
        """Returns (loss, mean sample reward); `images` are the rows' indices into the CiderD references."""
        # Sample from the model as it will be used: without dropout (gradients flow all the same).
        self.model.decoder.eval()
        v = self.model.vocab
        decoder = WithoutWords(self.model.decoder, [v.pad_id, v.start_id, v.unk_id])
        ids = {"start_id": v.start_id, "end_id": v.end_id, "max_length": v.max_length}
        k = self.samples
        tokens, log_probs, mask = sample_with_log_probs(
            decoder, pooled.repeat_interleave(k, 0), grid.repeat_interleave(k, 0), **ids
        )
        owners = images.repeat_interleave(k).tolist()
        reward = self.reward(owners, [self._words(row) for row in tokens.tolist()]).view(-1, k)
        if self.baseline == "mean":
            base = (reward.sum(1, keepdim=True) - reward) / (k - 1)
        else:
            best = greedy(decoder, pooled, grid, **ids)  # no graph: the baseline is a constant
            base = self.reward(images.tolist(), [self._words(h.tokens) for h in best]).view(-1, 1)
        advantage = (reward - base).view(-1, 1).to(log_probs.device)
        loss = -(advantage * log_probs * mask).sum() / mask.sum()
        return loss, float(reward.mean())
