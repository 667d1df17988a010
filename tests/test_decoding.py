"""Decoding: beam search is batched, always ends, and agrees with greedy and with one-image-at-a-time."""

import pytest
import torch

from captioner.decoders import create_decoder, list_decoders
from captioner.decoding import beam_search, greedy, sample

V, D, START, END = 30, 16, 1, 2


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    decoder = create_decoder(
        name, vocab_size=V, feature_dim=D, embed_dim=12, hidden_dim=20, attention_dim=8, dropout=0.0
    ).eval()
    pooled, grid = torch.randn(5, D), torch.randn(5, 9, D)
    grid = grid - grid.mean(1, keepdim=True) + pooled.unsqueeze(1)  # pooled is the grid's mean, as for real
    return decoder, pooled, grid


def test_registry_has_three_decoders():
    assert list_decoders() == ["attention", "merge", "show_tell"]


@pytest.mark.parametrize("name", ["show_tell", "merge", "attention"])
def test_beam_of_one_is_greedy(name):
    decoder, pooled, grid = make(name)
    g = greedy(decoder, pooled, grid, start_id=START, end_id=END, max_length=8)
    b = beam_search(decoder, pooled, grid, start_id=START, end_id=END, max_length=8, beam_size=1)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert [h.log_prob for h in g] == pytest.approx([hs[0].log_prob for hs in b], abs=1e-4)


@pytest.mark.parametrize("name", ["show_tell", "attention"])
def test_batched_beam_equals_one_image_at_a_time(name):
    decoder, pooled, grid = make(name)
    batched = beam_search(
        decoder, pooled, grid, start_id=START, end_id=END, max_length=10, beam_size=4, n_best=3
    )
    for i in range(pooled.shape[0]):
        single = beam_search(
            decoder,
            pooled[i : i + 1],
            grid[i : i + 1],
            start_id=START,
            end_id=END,
            max_length=10,
            beam_size=4,
            n_best=3,
        )[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        assert [h.score for h in single] == pytest.approx([h.score for h in batched[i]], abs=1e-4)


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


def test_length_penalty_prefers_longer_captions():
    decoder, pooled, grid = make("show_tell", seed=3)
    with torch.no_grad():
        decoder.fc.bias[END] += 2.5  # make stopping early attractive

    def mean_len(alpha):
        hyps = beam_search(
            decoder, pooled, grid, start_id=START, end_id=END, max_length=12, beam_size=5, alpha=alpha
        )
        return sum(len(h[0].tokens) for h in hyps) / len(hyps)

    assert mean_len(2.0) >= mean_len(0.0)


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
