"""Decoding: beam search scores, ends, blocks repeats and applies its length penalty (what every decoder
must do for it, such as a beam of one being greedy, is in test_registries.py)."""

import pytest
import torch

from captioner.decoders import create_decoder
from captioner.decoding import beam_search, ends_mid_phrase, greedy, sample

V, D, START, END = 30, 16, 1, 2


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    decoder = create_decoder(
        name, vocab_size=V, feature_dim=D, embed_dim=12, hidden_dim=20, attention_dim=8, dropout=0.0
    ).eval()
    pooled, grid = torch.randn(5, D), torch.randn(5, 9, D)
    grid = grid - grid.mean(1, keepdim=True) + pooled.unsqueeze(1)  # pooled is the grid's mean, as for real
    return decoder, pooled, grid


@torch.no_grad()
def test_n_best_sorted_distinct_and_scored_by_their_own_log_probs():
    decoder, pooled, grid = make("merge")
    results = beam_search(
        decoder, pooled, grid, start_id=START, end_id=END, max_length=6, beam_size=5, n_best=5
    )
    for hyps in results:
        assert len(hyps) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5
    for h in results[0]:  # the reported log-probability is the model's own probability of that caption
        state = decoder.init_state(pooled[:1], grid[:1])
        total, prev = 0.0, torch.tensor([START])
        for w in [*h.tokens, END][:7]:
            lp, state, _ = decoder.step(prev, state)
            total += float(lp[0, w])
            prev = torch.tensor([w])
        assert h.log_prob == pytest.approx(total, abs=1e-4)


def test_search_always_ends_even_when_the_model_never_says_end():
    decoder, pooled, grid = make("show_tell")
    with torch.no_grad():
        decoder.fc.bias[END] = -1e4  # a model that never wants to stop
    for max_length in (1, 7):
        for hyps in beam_search(
            decoder, pooled, grid, start_id=START, end_id=END, max_length=max_length, beam_size=3, n_best=2
        ):
            assert all(len(h.tokens) == max_length for h in hyps)
        assert all(
            len(h.tokens) == max_length
            for h in greedy(decoder, pooled, grid, start_id=START, end_id=END, max_length=max_length)
        )


class EagerToEnd:
    """A decoder whose rows flagged in the state want <end> at once: their images finish first."""

    def __init__(self, decoder):
        self.decoder, self.static_state = decoder, decoder.static_state

    def init_state(self, pooled, grid):
        return {**self.decoder.init_state(pooled, grid), "eager": pooled[:, 0] > 0}

    def step(self, tokens, state):
        log_probs, new, alpha = self.decoder.step(tokens, {k: v for k, v in state.items() if k != "eager"})
        log_probs = log_probs.clone()
        log_probs[state["eager"], END] += 50.0
        return log_probs.log_softmax(-1), {**new, "eager": state["eager"]}, alpha


@torch.no_grad()
def test_images_that_finish_first_leave_the_batch_and_no_caption_changes():
    decoder, pooled, grid = make("attention", seed=3)
    pooled[:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])  # images 0 and 2 end at the first step
    search = {"start_id": START, "end_id": END, "max_length": 8, "beam_size": 3, "n_best": 3}
    together = beam_search(EagerToEnd(decoder), pooled, grid, **search)
    for i, hyps in enumerate(together):
        alone = beam_search(EagerToEnd(decoder), pooled[i : i + 1], grid[i : i + 1], **search)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        for h, a in zip(hyps, alone, strict=True):
            assert h.log_prob == pytest.approx(a.log_prob, abs=1e-5)
            assert torch.allclose(h.attention, a.attention, atol=1e-6)
    assert [len(together[i][0].tokens) for i in (0, 2)] == [0, 0]
    assert min(len(together[i][0].tokens) for i in (1, 3, 4)) > 0


class OneWordOrEnd:
    """A decoder that says word 5 or <end>, with P(<end>) = 0.2 at every step: a caption of n words has
    log-probability n log 0.8 + log 0.2, highest for the empty caption, so only the penalty lengthens it."""

    def init_state(self, pooled, grid):
        return {"h": pooled[:, :1]}

    def step(self, tokens, state):
        lp = torch.full((tokens.shape[0], V), float("-inf"))
        lp[:, END], lp[:, 5] = torch.tensor(0.2).log(), torch.tensor(0.8).log()
        return lp, state, None


def test_length_penalty_prefers_longer_captions():
    pooled, grid = torch.randn(3, D), torch.randn(3, 9, D)

    def lengths(alpha):
        hyps = beam_search(
            OneWordOrEnd(), pooled, grid, start_id=START, end_id=END, max_length=12, beam_size=3, alpha=alpha
        )
        return [len(h[0].tokens) for h in hyps]

    # GNMT penalty ((5 + n) / 6) ** alpha on n words plus <end>: with alpha = 2 the longest caption ranks
    # best ((12 log 0.8 + log 0.2) / (18 / 6) ** 2 = -0.48, against -1.61 for the empty one).
    assert lengths(0.0) == [0, 0, 0]
    assert lengths(2.0) == [12, 12, 12]


def test_attention_weights_per_word():
    decoder, pooled, grid = make("attention")
    hyps = beam_search(decoder, pooled, grid, start_id=START, end_id=END, max_length=6, beam_size=3)
    for (h,) in hyps:
        assert h.attention.shape == (len(h.tokens), 9)
        assert torch.allclose(h.attention.sum(1), torch.ones(len(h.tokens)), atol=1e-5)


def test_sampling_near_zero_temperature_is_greedy_and_top_p_is_seeded():
    decoder, pooled, grid = make("merge")
    g = greedy(decoder, pooled, grid, start_id=START, end_id=END, max_length=8)
    s = sample(decoder, pooled, grid, start_id=START, end_id=END, max_length=8, temperature=1e-4)
    assert [h.tokens for h in g] == [h.tokens for h in s]
    a = sample(
        decoder,
        pooled,
        grid,
        start_id=START,
        end_id=END,
        max_length=8,
        top_p=0.9,
        generator=torch.Generator().manual_seed(1),
    )
    b = sample(
        decoder,
        pooled,
        grid,
        start_id=START,
        end_id=END,
        max_length=8,
        top_p=0.9,
        generator=torch.Generator().manual_seed(1),
    )
    assert [h.tokens for h in a] == [h.tokens for h in b]


def test_placeholders_are_never_generated():
    from captioner.decoding import WithoutWords

    decoder, pooled, grid = make("show_tell")
    with torch.no_grad():
        decoder.fc.bias[3] = 50.0  # a model that loves <unk> (id 3)
    plain = greedy(decoder, pooled, grid, start_id=START, end_id=END, max_length=5)
    assert all(3 in h.tokens for h in plain)
    banned = WithoutWords(decoder, [0, 1, 3])
    for search in (
        greedy(banned, pooled, grid, start_id=START, end_id=END, max_length=5),
        [
            hs[0]
            for hs in beam_search(banned, pooled, grid, start_id=START, end_id=END, max_length=5, beam_size=3)
        ],
    ):
        assert all(not {0, 1, 3} & set(h.tokens) for h in search)


def test_no_repeated_ngrams():
    decoder, pooled, grid = make("show_tell", seed=5)
    with torch.no_grad():
        decoder.fc.bias[END] = -1e4  # long captions: plenty of room to repeat
    plain = beam_search(decoder, pooled, grid, start_id=START, end_id=END, max_length=25, beam_size=3)
    blocked = beam_search(
        decoder, pooled, grid, start_id=START, end_id=END, max_length=25, beam_size=3, no_repeat_ngram=3
    )

    def repeats(tokens):
        grams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
        return len(grams) - len(set(grams))

    assert sum(repeats(h[0].tokens) for h in plain) > 0  # without blocking this model repeats itself
    assert all(repeats(h[0].tokens) == 0 for h in blocked)


class EndsMidPhrase:
    """A language model that says "a man sits on a red" and would rather stop there (P(<end>) 0.9 after
    "on", "a" and "red"); "ball" is its only other word after "red", and a word it says anywhere with
    probability 1e-4."""

    WORDS = ["<pad>", "<start>", "<end>", "a", "man", "sits", "on", "red", "ball"]
    SCRIPT = ["a", "man", "sits", "on", "a", "red", "ball"]

    def init_state(self, pooled, grid):
        return {"t": torch.zeros(pooled.shape[0], dtype=torch.long)}

    def step(self, tokens, state):
        t = int(state["t"][0])
        lp = torch.full((tokens.shape[0], len(self.WORDS)), -30.0)
        lp[:, self.WORDS.index(self.SCRIPT[min(t, 6)])] = torch.tensor(0.1).log()
        lp[:, END] = torch.tensor(0.9 if t >= 4 else 0.0001).log()
        ball = self.WORDS.index("ball")
        lp[:, ball] = lp[:, ball].clamp(min=torch.tensor(0.0001).log())
        return lp.log_softmax(-1), {"t": state["t"] + 1}, None


def test_ends_mid_phrase_is_what_evaluate_counts():
    cut = [
        "two boys are playing in the",
        "a group of men are playing in a red",
        "a dog on a",
        "a man and",
        "the red",
    ]
    whole = ["a dog runs", "a man in red", "", "a black and white dog", "people in the water"]
    assert all(ends_mid_phrase(c) for c in cut)
    assert not any(ends_mid_phrase(c) for c in whole)


@pytest.mark.parametrize("beam", [1, 3])
def test_whole_phrases_never_end_on_a_function_word_or_an_open_article(beam):
    from captioner.decoding import WholePhrases

    pooled, grid = torch.zeros(1, D), torch.zeros(1, 9, D)
    words = EndsMidPhrase.WORDS

    def caption(decoder):
        kw = {"start_id": START, "end_id": END, "max_length": 10}
        hyp = (
            greedy(decoder, pooled, grid, **kw)[0]
            if beam == 1
            else beam_search(decoder, pooled, grid, beam_size=beam, **kw)[0][0]
        )
        return " ".join(words[t] for t in hyp.tokens)

    assert caption(EndsMidPhrase()) == "a man sits on"  # the model alone stops mid-phrase
    assert caption(WholePhrases(EndsMidPhrase(), words, END)) == "a man sits on a red ball"
    assert ends_mid_phrase("a man sits on") and not ends_mid_phrase("a man sits on a red ball")
    # a caption that runs to the length limit closes its phrase with its last word, not "... on a"
    kw = {"start_id": START, "end_id": END, "max_length": 5}
    short = WholePhrases(EndsMidPhrase(), words, END, max_length=5)
    hyp = greedy(short, pooled, grid, **kw)[0]
    assert [words[t] for t in hyp.tokens] == ["a", "man", "sits", "on", "ball"]
    hyp = beam_search(WholePhrases(EndsMidPhrase(), words, END, max_length=5), pooled, grid, **kw)[0][0]
    assert not ends_mid_phrase(" ".join(words[t] for t in hyp.tokens)) and len(hyp.tokens) <= 5
    # without the limit it knows nothing of the last slot: the forced <end> cuts the phrase
    hyp = greedy(WholePhrases(EndsMidPhrase(), words, END), pooled, grid, **kw)[0]
    assert [words[t] for t in hyp.tokens] == ["a", "man", "sits", "on", "a"]
