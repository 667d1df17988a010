"""Turning a decoder's next-word distributions into captions: greedy, beam search, sampling.

All three work on a whole batch of images at once and for any decoder (see `captioner.decoders`). Each
loop runs at most `max_length + 1` steps, the last of which can only emit <end>: decoding always ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    log_prob: float  # sum of the words' log-probabilities (including <end>)
    score: float  # log_prob after the length penalty: what the ranking used
    attention: torch.Tensor | None  # [len(tokens), H*W] attention weights, for attention decoders


class WithoutWords:
    """A decoder whose steps never propose the given words (e.g. <unk>, <pad>, <start>): readers of a
    caption should never see a placeholder. The remaining words' probabilities are renormalised."""

    def __init__(self, decoder, banned: list[int]):
        self.decoder, self.banned = decoder, banned
        self.static_state = getattr(decoder, "static_state", ())

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder.init_state(pooled, grid)

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        log_probs, state, alpha = self.decoder.step(tokens, state)
        log_probs = log_probs.index_fill(1, torch.tensor(self.banned, device=log_probs.device), float("-inf"))
        return log_probs.log_softmax(-1), state, alpha


# Words a caption cannot end on: it would stop mid-phrase ("two boys are playing in the").
FUNCTION_WORDS = (
    "a an the in on of with and at to for from by into onto through under near across along around "
    "behind beside between is are his her their its or while as that who which"
).split()
ARTICLES = ("a", "an", "the")
# Words that may stand between an article and its noun: "a large brown and white" has no noun yet.
MODIFIERS = (
    "and black white brown red blue green yellow orange pink purple grey gray tan dark light large small "
    "big little young old tall long short wet muddy fluffy furry striped spotted"
).split()


def ends_mid_phrase(caption: str) -> bool:
    """Whether a caption stops mid-phrase: on a function word, or after an article with no noun yet
    ("sitting on a red"). What `WholePhrases` prevents and `evaluate` counts."""
    words = caption.split()
    if not words:
        return False
    if words[-1] in FUNCTION_WORDS:
        return True
    tail = len(words)
    while tail > 0 and words[tail - 1] in MODIFIERS:
        tail -= 1
    return tail < len(words) and tail > 0 and words[tail - 1] in ARTICLES


class WholePhrases:
    """A decoder that does not end a caption mid-phrase: <end> loses `penalty` nats right after a
    function word ("playing in the") and after an article whose noun has not come ("sitting on a red").
    Self-critical training and grounded decoding both make such endings; a finite penalty (not -inf)
    leaves the forced <end> of the last step possible. The open phrase is a state the beams carry.
    Given `max_length`, the last word a caption can have before that forced <end> must close its
    phrase too: a run-on caption that reaches the limit still ends on a noun. Nor does it say a word
    twice in a row ("a dog is is running"), which no caption needs."""

    KEY = "phrase.open"
    STEP = "phrase.step"  # words fed so far, per row: where the last word slot is

    def __init__(
        self, decoder, words: list[str], end_id: int, penalty: float = 20.0, max_length: int | None = None
    ):
        self.decoder, self.end_id, self.penalty, self.max_length = decoder, end_id, penalty, max_length
        index = {w: i for i, w in enumerate(words)}
        self.function, self.articles, self.modifiers = (
            torch.tensor([index[w] for w in group if w in index], dtype=torch.long)
            for group in (FUNCTION_WORDS, ARTICLES, MODIFIERS)
        )
        self.static_state = getattr(decoder, "static_state", ())

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.decoder.init_state(pooled, grid)
        rows, device = pooled.shape[0], pooled.device
        return {
            **state,
            self.KEY: torch.zeros(rows, dtype=torch.bool, device=device),
            self.STEP: torch.zeros(rows, dtype=torch.long, device=device),
        }

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        inner = {k: v for k, v in state.items() if k not in (self.KEY, self.STEP)}
        log_probs, new, alpha = self.decoder.step(tokens, inner)
        if self.function.device != tokens.device:
            self.function, self.articles, self.modifiers = (
                t.to(tokens.device) for t in (self.function, self.articles, self.modifiers)
            )
        opened = torch.isin(tokens, self.articles) | (state[self.KEY] & torch.isin(tokens, self.modifiers))
        dangling = opened | torch.isin(tokens, self.function)
        log_probs = log_probs.clone()
        log_probs[:, self.end_id] -= torch.where(dangling, self.penalty, 0.0)
        again = tokens.unsqueeze(1)  # the word just said, not again
        log_probs.scatter_add_(1, again, torch.full_like(again, -self.penalty, dtype=log_probs.dtype))
        step = state[self.STEP] + 1  # this step proposes word number `step`; after max_length, only <end>
        if self.max_length is not None:
            last = step == self.max_length
            keeps_open = torch.zeros_like(log_probs, dtype=torch.bool)
            keeps_open[:, self.function] = True
            keeps_open[:, self.articles] = True
            keeps_open[:, self.modifiers] |= opened.unsqueeze(1)
            log_probs -= torch.where(keeps_open & last.unsqueeze(1), self.penalty, 0.0)
        return log_probs.log_softmax(-1), {**new, self.KEY: opened, self.STEP: step}, alpha


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT length penalty ((5 + n) / 6) ** alpha; alpha = 0 ranks by raw log-probability."""
    return ((5.0 + length.float()) / 6.0) ** alpha


def _select(
    state: dict[str, torch.Tensor], index: torch.Tensor, keep: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Reorder every state tensor along the batch; `keep` names tensors that are equal for all beams of
    an image (the encoder grid), which a reordering within each image cannot change."""
    return {k: v if k in keep else v.index_select(0, index) for k, v in state.items()}


def _block_repeats(log_probs: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Forbid, in place, each word that would complete an n-gram already in that row's history."""
    t = history.shape[1]
    if t < n:
        return
    windows = history.unfold(1, n, 1)  # [rows, t - n + 1, n]: every n-gram so far
    prefix = history[:, t - n + 1 :].unsqueeze(1)  # the last n - 1 words
    rows, at = (windows[:, :, :-1] == prefix).all(dim=2).nonzero(as_tuple=True)
    log_probs[rows, windows[rows, at, -1]] = float("-inf")


@torch.no_grad()
def beam_search(
    decoder,
    pooled: torch.Tensor,
    grid: torch.Tensor,
    *,
    start_id: int,
    end_id: int,
    max_length: int,
    beam_size: int = 3,
    n_best: int = 1,
    alpha: float = 0.0,
    no_repeat_ngram: int = 0,
) -> list[list[Hypothesis]]:
    """Batched beam search: one decoder step advances every beam of every image together.

    Finished beams stay in the beam with their score frozen (they can only extend with <end> at no cost),
    so an image's tensors keep a fixed shape [K]; an image whose K beams have all finished leaves the
    batch, so the steps left cost only what the images still being captioned need. Candidates are ranked
    by length-penalised score. With no_repeat_ngram = n, no caption repeats an n-gram ("a man in a hat
    and a hat and a hat"). Returns, per image, the `n_best` hypotheses, best first.
    """
    batch, k = pooled.shape[0], beam_size
    n_best = min(n_best, k)
    device = pooled.device
    state = decoder.init_state(pooled, grid)
    state = _select(state, torch.arange(batch, device=device).repeat_interleave(k))
    # Beams only ever move within their own image, so per-image tensors need no copying at every step.
    static = tuple(getattr(decoder, "static_state", ()))
    log_prob = torch.full((batch, k), float("-inf"), device=device)
    log_prob[:, 0] = 0.0  # all beams start identical: keep one alive
    tokens = torch.full((batch * k,), start_id, dtype=torch.long, device=device)
    history = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    attention: torch.Tensor | None = None
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
    images = list(range(batch))  # the original index of each image still in the batch
    results: list[list[Hypothesis]] = [[] for _ in range(batch)]

    def done(rows: list[int]) -> None:  # the best n of these images' beams, now final
        scores = log_prob / length_penalty(lengths, alpha)
        for b in rows:
            for j in scores[b].argsort(descending=True)[:n_best].tolist():
                row = b * k + j
                words = [w for w in history[row].tolist() if w != end_id][: int(lengths[b, j]) - 1]
                att = attention[row, : len(words)] if attention is not None else None
                results[images[b]].append(Hypothesis(words, float(log_prob[b, j]), float(scores[b, j]), att))

    for t in range(max_length + 1):
        step_lp, state, alpha_t = decoder.step(tokens, state)
        live, vocab = len(images), step_lp.shape[1]
        step_lp = step_lp.view(live, k, vocab).clone()
        if no_repeat_ngram > 0:
            _block_repeats(step_lp.view(live * k, vocab), history, no_repeat_ngram)
        if t == max_length:  # hard stop: only <end> is allowed now
            forced = torch.full_like(step_lp, float("-inf"))
            forced[..., end_id] = step_lp[..., end_id]
            step_lp = forced
        step_lp[finished] = float("-inf")
        step_lp[..., end_id][finished] = 0.0  # a finished beam carries on unchanged
        total = log_prob.unsqueeze(2) + step_lp  # [B, K, V]
        new_len = torch.where(finished, lengths, lengths + 1).unsqueeze(2).expand_as(total)
        ranked = (total / length_penalty(new_len, alpha)).view(live, -1)
        _, flat = ranked.topk(k, dim=1)  # [B, K]
        beam, word = flat // vocab, flat % vocab
        log_prob = total.view(live, -1).gather(1, flat)
        origin = (beam + torch.arange(live, device=device).unsqueeze(1) * k).view(-1)
        was_finished = finished.gather(1, beam)
        lengths = torch.where(was_finished, lengths.gather(1, beam), lengths.gather(1, beam) + 1)
        finished = was_finished | (word == end_id)
        state = _select(state, origin, keep=static)
        history = torch.cat([history.index_select(0, origin), word.view(-1, 1)], dim=1)
        if alpha_t is not None:
            prev = attention.index_select(0, origin) if attention is not None else None
            new = alpha_t.index_select(0, origin).unsqueeze(1)
            attention = new if prev is None else torch.cat([prev, new], dim=1)
        tokens = word.view(-1)
        over = finished.all(dim=1)
        if bool(over.all()):
            break
        if bool(over.any()):  # those images leave the batch: every tensor keeps the others' rows
            done(over.nonzero(as_tuple=True)[0].tolist())
            keep = (~over).nonzero(as_tuple=True)[0]
            rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            state = _select(state, rows)
            history, tokens = history.index_select(0, rows), tokens.index_select(0, rows)
            attention = attention.index_select(0, rows) if attention is not None else None
            log_prob, finished, lengths = log_prob[keep], finished[keep], lengths[keep]
            images = [images[b] for b in keep.tolist()]
    done(list(range(len(images))))
    return results


@torch.no_grad()
def greedy(
    decoder, pooled: torch.Tensor, grid: torch.Tensor, *, start_id: int, end_id: int, max_length: int
) -> list[Hypothesis]:
    """The most likely word at every step; exactly beam search with one beam, but cheaper."""
    return _sample_loop(decoder, pooled, grid, start_id, end_id, max_length, pick=None)


@torch.no_grad()
def sample(
    decoder,
    pooled: torch.Tensor,
    grid: torch.Tensor,
    *,
    start_id: int,
    end_id: int,
    max_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[Hypothesis]:
    """Ancestral sampling with temperature and nucleus (top-p) truncation."""

    def pick(lp: torch.Tensor) -> torch.Tensor:
        probs = (lp / max(temperature, 1e-6)).softmax(-1)
        if top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely word
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _sample_loop(decoder, pooled, grid, start_id, end_id, max_length, pick=pick)


def _sample_loop(decoder, pooled, grid, start_id, end_id, max_length, pick) -> list[Hypothesis]:
    batch = pooled.shape[0]
    state = decoder.init_state(pooled, grid)
    tokens = torch.full((batch,), start_id, dtype=torch.long, device=pooled.device)
    done = torch.zeros(batch, dtype=torch.bool, device=pooled.device)
    total = torch.zeros(batch, device=pooled.device)
    words: list[torch.Tensor] = []
    alphas: list[torch.Tensor] = []
    for t in range(max_length + 1):
        lp, state, alpha_t = decoder.step(tokens, state)
        if t == max_length:
            tokens = torch.full_like(tokens, end_id)
        else:
            tokens = lp.argmax(-1) if pick is None else pick(lp)
        total += torch.where(done, torch.zeros_like(total), lp.gather(1, tokens[:, None]).squeeze(1))
        tokens = torch.where(done, torch.full_like(tokens, end_id), tokens)
        words.append(tokens)
        if alpha_t is not None:
            alphas.append(alpha_t)
        done |= tokens == end_id
        if bool(done.all()):
            break
    seq = torch.stack(words, dim=1)
    att = torch.stack(alphas, dim=1) if alphas else None
    out = []
    for b in range(batch):
        ids = seq[b].tolist()
        ids = ids[: ids.index(end_id)] if end_id in ids else ids
        out.append(
            Hypothesis(ids, float(total[b]), float(total[b]), att[b, : len(ids)] if att is not None else None)
        )
    return out
