"""What every registered decoder and encoder must do: a new one gets these tests by registering itself.

The rule every decoder keeps: teacher-forced `forward` computes the same next-word distributions as
`init_state` + word-by-word `step`. Training uses the first, beam search, sampling, self-critical training
and the ONNX export the second; if they disagree, a model is trained for one thing and used for another.
"""

import pytest
import torch

from captioner.config import DecoderConfig
from captioner.decoders import create_decoder, list_decoders
from captioner.decoding import beam_search, greedy
from captioner.encoders import create_encoder, encoder_info, list_encoders
from captioner.images import Preprocess
from captioner.model import Captioner
from captioner.vocab import Vocabulary

V, D, START, END = 30, 16, 1, 2
SMALL = {"embed_dim": 12, "hidden_dim": 20, "attention_dim": 8}


def make(name: str, seed: int = 0, batch: int = 5, cells: int = 9):
    torch.manual_seed(seed)
    decoder = create_decoder(name, vocab_size=V, feature_dim=D, dropout=0.0, **SMALL).eval()
    pooled, grid = torch.randn(batch, D), torch.randn(batch, cells, D)
    grid = grid - grid.mean(1, keepdim=True) + pooled.unsqueeze(1)  # pooled is the grid's mean, as for real
    return decoder, pooled, grid


@pytest.mark.parametrize("name", list_decoders())
def test_teacher_forced_forward_equals_word_by_word_step(name):
    decoder, pooled, grid = make(name)
    tokens = torch.randint(4, V, (5, 7))
    tokens[:, 0] = START
    with torch.no_grad():
        logits, aux = decoder(pooled, grid, tokens)
        assert logits.shape == (5, 7, V) and aux.dim() == 0
        state = decoder.init_state(pooled, grid)
        for t in range(tokens.shape[1]):
            log_probs, state, _ = decoder.step(tokens[:, t], state)
            assert torch.allclose(log_probs, logits[:, t].log_softmax(-1), atol=1e-5), f"{name}: word {t}"


@pytest.mark.parametrize("name", list_decoders())
def test_state_is_batch_first_and_static_state_never_changes(name):
    decoder, pooled, grid = make(name)
    with torch.no_grad():
        state = decoder.init_state(pooled, grid)
        assert state and all(v.shape[0] == 5 for v in state.values())
        log_probs, new, alpha = decoder.step(torch.full((5,), START), state)
    assert log_probs.shape == (5, V) and torch.allclose(log_probs.exp().sum(1), torch.ones(5), atol=1e-5)
    assert set(new) == set(state)
    for key in getattr(decoder, "static_state", ()):
        assert new[key] is state[key], f"{name}: static {key!r} changed by a step"
    assert alpha is None or alpha.shape == (5, grid.shape[1])


@pytest.mark.parametrize("name", list_decoders())
def test_beam_of_one_is_greedy(name):
    decoder, pooled, grid = make(name)
    g = greedy(decoder, pooled, grid, start_id=START, end_id=END, max_length=8)
    b = beam_search(decoder, pooled, grid, start_id=START, end_id=END, max_length=8, beam_size=1)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert [h.log_prob for h in g] == pytest.approx([hs[0].log_prob for hs in b], abs=1e-4)


@pytest.mark.parametrize("name", list_decoders())
def test_batched_beam_equals_one_image_at_a_time(name):
    decoder, pooled, grid = make(name)
    options = {"start_id": START, "end_id": END, "max_length": 10, "beam_size": 4, "n_best": 3}
    batched = beam_search(decoder, pooled, grid, **options)
    for i in range(pooled.shape[0]):
        [single] = beam_search(decoder, pooled[i : i + 1], grid[i : i + 1], **options)
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        assert [h.score for h in single] == pytest.approx([h.score for h in batched[i]], abs=1e-4)


@pytest.mark.parametrize("name", list_decoders())
def test_checkpoint_round_trip(name, tmp_path):
    vocab = Vocabulary.build(["a red square", "a blue circle on grass"], min_count=1)
    torch.manual_seed(0)
    model = Captioner.build(
        "mobilenet_v2", DecoderConfig(name=name, **SMALL, dropout=0.0), vocab, pretrained_encoder=False
    )
    pooled, grid = torch.randn(2, model.encoder.feature_dim), torch.randn(2, 49, model.encoder.feature_dim)
    before = model.eval().generate(pooled, grid, beam_size=2, n_best=2)
    model.save_pretrained(tmp_path / name, dtype=torch.float32)  # exactly: random weights make near-ties
    loaded = Captioner.from_pretrained(tmp_path / name)
    assert loaded.decoder_config == model.decoder_config and type(loaded.decoder) is type(model.decoder)
    after = loaded.generate(pooled, grid, beam_size=2, n_best=2)
    assert [[h.tokens for h in hs] for hs in after] == [[h.tokens for h in hs] for hs in before]


@pytest.mark.parametrize("name", list_encoders())
def test_every_encoder_gives_pooled_features_and_a_grid(name):
    encoder = create_encoder(name, pretrained=False)
    info = encoder_info(name)
    assert isinstance(encoder.preprocess, Preprocess) and info.description
    size = encoder.preprocess.size
    with torch.no_grad():
        pooled, grid = encoder(torch.zeros(1, 3, size, size))
        logits = encoder.classify(torch.zeros(1, 3, size, size))
    assert pooled.shape == (1, encoder.feature_dim)
    assert grid.shape[0] == 1 and grid.shape[2] == encoder.feature_dim and grid.shape[1] >= 1
    assert torch.allclose(grid.mean(1), pooled, atol=1e-4)  # the pooled vector is the grid's mean
    assert logits.shape == (1, 1000)  # the ImageNet head
    preprocess = create_encoder(name, pretrained=False, resize="crop").preprocess
    assert preprocess.resize == "crop" and preprocess.size == size
