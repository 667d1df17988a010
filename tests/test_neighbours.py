"""Consensus re-ranking by the training neighbours' captions (captioner.neighbours)."""

from __future__ import annotations

import shutil

import pytest
import torch

from captioner.cli import main
from captioner.decoding import Hypothesis
from captioner.errors import CheckpointError, ConfigError
from captioner.model import Captioner
from captioner.neighbours import NEIGHBOURS_FILE, Neighbours, from_dataset

CAPTIONS = [
    ["a red square", "a square that is red"],
    ["a blue circle", "one blue circle"],
    ["a green square", "a square that is green"],
    ["a blue square", "one blue square"],
]


def toy(k: int = 1, weight: float = 2.0) -> tuple[Neighbours, torch.Tensor]:
    torch.manual_seed(0)
    pooled = torch.randn(4, 6)
    return Neighbours.build(pooled, CAPTIONS, dim=3, k=k, weight=weight, source="toy"), pooled


def hyp(words: str, score: float, vocab: list[str]) -> Hypothesis:
    return Hypothesis([vocab.index(w) for w in words.split()], score, score, None)


def test_a_training_photo_is_its_own_nearest_neighbour():
    neighbours, pooled = toy(k=2)
    assert neighbours.keys.shape == (4, 3)
    assert torch.allclose(neighbours.keys.norm(dim=1), torch.ones(4))
    assert neighbours.nearest(pooled)[:, 0].tolist() == [0, 1, 2, 3]


def test_consensus_prefers_what_the_neighbours_say_and_weight_zero_keeps_the_beam_order():
    vocab = sorted({w for caps in CAPTIONS for c in caps for w in c.split()})
    spell = lambda tokens: [vocab[t] for t in tokens]  # noqa: E731
    neighbours, pooled = toy(k=1)
    candidates = [hyp("a blue circle", -1.0, vocab), hyp("a red square", -1.5, vocab)]
    assert neighbours.consensus([0], ["a", "red", "square"]) > neighbours.consensus(
        [0], "a blue circle".split()
    )
    [order] = neighbours.rerank(pooled[:1], [candidates], spell)  # photo 0 is the red square's
    assert [" ".join(spell(h.tokens)) for h in order] == ["a red square", "a blue circle"]
    assert [h.score for h in order] == [-1.5, -1.0]  # scores are the beam's, only the order moves
    neighbours.weight = 0.0
    [order] = neighbours.rerank(pooled[:1], [candidates], spell)
    assert [h.score for h in order] == [-1.0, -1.5]


def test_saved_and_loaded_whole(tmp_path):
    neighbours, pooled = toy(k=2, weight=1.5)
    file = neighbours.save(tmp_path)
    assert file.name == NEIGHBOURS_FILE and not list(tmp_path.glob(".*"))  # no temp file left
    loaded = Neighbours.load(tmp_path)
    assert loaded is not None
    assert (loaded.k, loaded.weight, loaded.source, loaded.captions) == (2, 1.5, "toy", CAPTIONS)
    assert torch.equal(loaded.nearest(pooled), neighbours.nearest(pooled))
    assert Neighbours.load(tmp_path / "elsewhere") is None


def test_a_broken_neighbours_file_names_itself(tmp_path):
    (tmp_path / NEIGHBOURS_FILE).write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match=f"{NEIGHBOURS_FILE}: not a readable neighbours file"):
        Neighbours.load(tmp_path)


@pytest.mark.parametrize("settings", [{"k": 0}, {"k": 5}, {"weight": -1.0}, {"dim": 7}])
def test_impossible_settings_are_refused(settings):
    with pytest.raises(ConfigError, match="neighbours: "):
        Neighbours.build(torch.randn(4, 6), CAPTIONS, **{"dim": 3, **settings})


@pytest.fixture(scope="module")
def with_neighbours(tiny_model, tiny_data, tiny_features, tmp_path_factory):
    """A copy of the tiny model carrying its training photos, written by `captioner neighbours`."""
    path = tmp_path_factory.mktemp("reranked") / "model"
    shutil.copytree(tiny_model, path)
    args = ["neighbours", str(tiny_data), "--model", str(path), "--features", str(tiny_features)]
    assert main([*args, "--dim", "8", "--k", "3"]) == 0
    return path


def test_the_command_writes_the_training_split(with_neighbours, tiny_data):
    neighbours = Neighbours.load(with_neighbours)
    assert neighbours is not None and (neighbours.k, neighbours.keys.shape) == (3, (16, 8))  # 8 x 2 photos
    assert {len(caps) for caps in neighbours.captions} == {3}
    assert "a red square on a white background" in [c for caps in neighbours.captions for c in caps]
    assert neighbours.source == f"{tiny_data.name} train split, 16 photos"


def test_beam_search_keeps_the_candidate_with_the_best_score_plus_consensus(with_neighbours, tiny_data):
    model = Captioner.from_pretrained(with_neighbours)
    assert model.neighbours is not None
    images = sorted((tiny_data / "images").glob("*.jpg"))[:6]
    plain = model.caption(images, beam_size=3, n_best=3, rerank=False)
    reranked = model.caption(images, beam_size=3, n_best=2)
    for p, r in zip(plain, reranked, strict=True):
        pooled = p.features[0][None]
        row = model.neighbours.nearest(pooled)[0].tolist()
        total = {
            t: s + model.neighbours.weight * model.neighbours.consensus(row, t.split()) for t, s in p.captions
        }
        want = sorted(total, key=total.get, reverse=True)[:2]
        assert [text for text, _ in r.captions] == want
        assert dict(r.captions) == {t: s for t, s in p.captions if t in want}  # the beam's own scores
    greedy = model.caption(images[:2], beam_size=1)  # one candidate: nothing to re-rank
    assert [g.caption for g in greedy] == [
        g.caption for g in model.caption(images[:2], beam_size=1, rerank=False)
    ]


def test_neighbours_travel_with_save_pretrained(with_neighbours, tmp_path):
    model = Captioner.from_pretrained(with_neighbours)
    model.save_pretrained(tmp_path / "copy")
    again = Captioner.from_pretrained(tmp_path / "copy")
    assert again.neighbours is not None and again.neighbours.captions == model.neighbours.captions


def test_from_dataset_encodes_when_there_is_no_cache(with_neighbours, tiny_data, tiny_features):
    model = Captioner.from_pretrained(with_neighbours)
    encoded = from_dataset(model, tiny_data, dim=8, k=3, progress=False)
    cached = Neighbours.load(with_neighbours)
    assert encoded.captions == cached.captions
    assert torch.allclose(encoded.keys.abs(), cached.keys.abs(), atol=2e-2)  # a component's sign may flip


def test_the_json_api_re_ranks_by_default_and_says_so(with_neighbours, tiny_data):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from captioner.server import create_app

    model = Captioner.from_pretrained(with_neighbours)
    photo = tiny_data / "images" / "blue_circle_0.jpg"
    with TestClient(create_app(model)) as client:
        for form, reranked in (({}, True), ({"rerank": "false"}, False)):
            files = {"file": (photo.name, photo.read_bytes(), "image/jpeg")}
            body = client.post("/api/caption", files=files, data=form).json()
            want = model.caption(photo, beam_size=3, n_best=3, rerank=reranked)
            assert body["rerank"] is reranked
            assert [c["caption"] for c in body["captions"]] == [text for text, _ in want.captions]
        files = {"file": (photo.name, photo.read_bytes(), "image/jpeg")}
        assert client.post("/api/caption", files=files, params={"rerank": "maybe"}).status_code == 422
