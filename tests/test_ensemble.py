"""Ensembles: decoders captioning together, one encoder pass, log-probabilities averaged at every step."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from captioner.ensemble import Ensemble
from captioner.errors import CheckpointError
from captioner.images import build_transform, load_image
from captioner.model import Captioner
from captioner.vocab import Vocabulary


def batch_of(model, tiny_data, n=8):
    transform = build_transform(model.encoder.preprocess)
    paths = sorted((tiny_data / "images").glob("*.jpg"))[:n]
    return torch.stack([transform(load_image(p)) for p in paths])


@pytest.fixture(scope="module")
def other_member(tiny_model, tmp_path_factory):
    """The tiny model with its decoder weights moved: another member over the same vocabulary."""
    model = Captioner.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.abs().mean().clamp(min=1e-3))
    return model.save_pretrained(tmp_path_factory.mktemp("other") / "member")


@pytest.mark.parametrize("options", [{"beam_size": 1}, {"beam_size": 3, "n_best": 3}])
def test_an_ensemble_of_two_copies_gives_the_model_s_captions(tiny_model, tiny_data, options):
    single = Captioner.from_pretrained(tiny_model)
    pair = Captioner.from_pretrained([tiny_model, tiny_model])
    assert isinstance(pair.decoder, Ensemble) and pair.members == [str(tiny_model)] * 2
    batch = batch_of(single, tiny_data)
    want, got = single.caption_tensors(batch, **options), pair.caption_tensors(batch, **options)
    assert all(c.words for c in want)
    for w, g in zip(want, got, strict=True):
        assert g.captions == [(t, pytest.approx(s, abs=1e-5)) for t, s in w.captions]
        assert [x.label for x in g.labels] == [x.label for x in w.labels]
        torch.testing.assert_close(g.attention, w.attention)


def test_the_ensemble_averages_the_members_log_probabilities(tiny_model, other_member, tiny_data):
    a, b = Captioner.from_pretrained(tiny_model), Captioner.from_pretrained(other_member)
    pair = Captioner.from_pretrained([tiny_model, other_member])
    with torch.inference_mode():
        pooled, grid = a.encoder(batch_of(a, tiny_data))
        tokens = torch.full((pooled.shape[0],), a.vocab.start_id)
        lp = [m.decoder.step(tokens, m.decoder.init_state(pooled, grid))[0] for m in (a, b)]
        got = pair.decoder.step(tokens, pair.decoder.init_state(pooled, grid))[0]
    torch.testing.assert_close(got, ((lp[0] + lp[1]) / 2).log_softmax(-1))
    assert not torch.allclose(lp[0], lp[1])  # the members really differ
    # and the whole search runs on it: captions for every image
    assert all(c.words for c in pair.caption_tensors(batch_of(a, tiny_data), beam_size=3))


def test_members_must_share_the_vocabulary_and_the_encoder(tiny_model, tmp_path):
    model = Captioner.from_pretrained(tiny_model)
    other = Captioner.build("efficientnet_lite0", model.decoder_config, Vocabulary.build(["a b c"], 1))
    odd = other.save_pretrained(tmp_path / "odd-vocab")
    with pytest.raises(CheckpointError, match="odd-vocab: its vocabulary differs"):
        Captioner.from_pretrained([tiny_model, odd])
    crop = shutil.copytree(tiny_model, tmp_path / "cropped")
    config = json.loads((crop / "config.json").read_text())
    config["encoder"]["preprocess"]["resize"] = "crop"
    (crop / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cropped: its encoder"):
        Captioner.from_pretrained([tiny_model, crop])
    with pytest.raises(CheckpointError, match="save .* its members"):
        Captioner.from_pretrained([tiny_model, tiny_model]).save_pretrained(tmp_path / "pair")


def test_cli_caption_and_evaluate_take_several_models(tiny_model, other_member, tiny_data):
    image = sorted((tiny_data / "images").glob("*.jpg"))[0]

    def caption(*models):
        args = [sys.executable, "-m", "captioner.cli", "caption", str(image), "--format", "jsonl"]
        for m in models:
            args += ["--model", str(m)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert caption(tiny_model, tiny_model)["caption"] == caption(tiny_model)["caption"]
    pair = Captioner.from_pretrained([tiny_model, other_member]).caption(image)
    assert caption(tiny_model, other_member)["caption"] == pair.caption


def test_evaluate_scores_an_ensemble_as_its_members_say(tiny_model, tiny_data, tmp_path):
    from captioner.evaluate import evaluate_model

    kw = {"split": "test", "beam_sizes": [1], "quiet": True}
    [single] = evaluate_model(tiny_data, model=str(tiny_model), output=tmp_path / "a.json", **kw)
    [pair] = evaluate_model(tiny_data, model=[str(tiny_model)] * 2, output=tmp_path / "b.json", **kw)
    assert pair["model"] == f"{tiny_model} + {tiny_model}"
    assert pair["scores"]["CIDEr"] == pytest.approx(single["scores"]["CIDEr"])
    assert [c["caption"] for c in pair["captions"]] == [c["caption"] for c in single["captions"]]
