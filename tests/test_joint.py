"""The search embedding: retrieval metrics, training on a feature cache, resuming, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.errors import CheckpointError, TrainingRunError
from captioner.search.joint import JointConfig, JointEmbedding, contrastive_loss, recall_at
from captioner.search.train_joint import train_joint
from conftest import tiny_joint_config


def test_recall_at_counts_ranks_by_hand():
    similarity = np.array(
        [
            [0.9, 0.1, 0.0],  # photo 0 first
            [0.5, 0.4, 0.6],  # photo 1 third
            [0.2, 0.8, 0.7],  # photo 2 second
            [0.3, 0.3, 0.1],  # photo 1 tied with photo 0: the tie counts for the query
        ]
    )
    scores = recall_at(similarity, np.array([0, 1, 2, 1]), ks=(1, 2))
    assert scores["R@1"] == 50.0 and scores["R@2"] == 75.0
    assert scores["median rank"] == 1.5 and scores["mean rank"] == 7 / 4


def test_contrastive_loss_is_lower_for_matching_pairs():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(np.log(10.0))
    shuffled = x[torch.randperm(8)]
    assert contrastive_loss(x, x, scale) < contrastive_loss(x, shuffled, scale)
    assert contrastive_loss(x, x, scale, hard=0.2) < contrastive_loss(x, shuffled, scale, hard=0.2)


def _config(tiny_data, tiny_features, out, **train):
    return tiny_joint_config(tiny_data, tiny_features, out, **train)


@pytest.fixture(scope="module")
def trained(tiny_embedding):
    return tiny_embedding, tiny_embedding.parent


def test_training_finds_the_photos_of_captions_it_never_saw(trained):
    best, _ = trained
    scores = json.loads((best / "scores.json").read_text())["val"]
    # 8 validation photos of coloured shapes, 24 captions: chance is 12.5% recall@1
    assert scores["R@1"] >= 50.0, scores


def test_checkpoint_round_trip(trained, tmp_path):
    best, _ = trained
    model = JointEmbedding.from_pretrained(best)
    pooled, grid = np.random.rand(3, 1280).astype("f4"), np.random.rand(3, 4, 1280).astype("f4")
    a = model.images(pooled, grid)
    model.save_pretrained(tmp_path / "copy")
    b = JointEmbedding.from_pretrained(tmp_path / "copy").images(pooled, grid)
    assert np.allclose(a, b, atol=1e-3) and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert json.loads((best / "config.json").read_text())["encoder"] == "efficientnet_lite0"


def test_word_vectors_are_saved_read_and_used(trained, tmp_path):
    best, _ = trained
    model = JointEmbedding.from_pretrained(best)
    assert model.config.word_dim == 8 and (best / "words.json").is_file()
    assert model.words[:2] == ["<pad>", "<unk>"] and "red" in model.words
    ids = model.word_ids(["A red square.", "a zzzz"])
    assert ids[0, :3].tolist() == [model.word_index[w] for w in ("a", "red", "square")] and ids[0, 3] == 0
    assert ids[1, 1] == 1  # a word the list lacks
    vectors = np.random.rand(2, 384).astype("f4")
    a = model.texts(vectors[[0, 0]], ["a red square", "a blue square"])
    assert not np.allclose(a[0], a[1], atol=1e-3)  # same MiniLM vector, other words: another point
    model.save_pretrained(tmp_path / "copy")
    b = JointEmbedding.from_pretrained(tmp_path / "copy").texts(
        vectors[[0, 0]], ["a red square", "a blue square"]
    )
    assert np.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="2 sentences for 1 vectors"):
        model.texts(vectors[:1], ["a", "b"])
    (tmp_path / "copy" / "words.json").unlink()
    with pytest.raises(CheckpointError, match="words.json is missing"):
        JointEmbedding.from_pretrained(tmp_path / "copy")
    (tmp_path / "copy" / "words.json").write_text('{"a": 1}')
    with pytest.raises(CheckpointError, match="not a list"):
        JointEmbedding.from_pretrained(tmp_path / "copy")


def test_a_captioner_is_not_a_search_embedding(tiny_model):
    with pytest.raises(CheckpointError, match="not a search embedding"):
        JointEmbedding.from_pretrained(tiny_model)


def test_features_of_another_encoder_are_refused():
    from captioner.images import Preprocess

    pre = Preprocess(size=224)
    model = JointEmbedding(JointConfig(encoder="efficientnet_lite0", preprocess=pre.to_dict()))
    model.check_features("efficientnet_lite0", pre)
    with pytest.raises(CheckpointError, match="efficientnet_lite2"):
        model.check_features("efficientnet_lite2", pre)


def test_resume_continues_exactly(tiny_data, tiny_features, tmp_path, monkeypatch):
    from captioner.search import train_joint as module

    straight = train_joint(_config(tiny_data, tiny_features, tmp_path / "a", epochs=4))
    evaluate, calls = module.evaluate, []

    def killed_in_epoch_3(*args):
        calls.append(1)
        if len(calls) == 3:  # epoch 3 trained, not yet saved
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(module, "evaluate", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_joint(_config(tiny_data, tiny_features, tmp_path / "b", epochs=4))
    monkeypatch.setattr(module, "evaluate", evaluate)
    resumed = train_joint(_config(tiny_data, tiny_features, tmp_path / "b", epochs=4), resume=True)
    for name in ("last", "best"):
        a = JointEmbedding.from_pretrained(straight.parent / name).state_dict()
        b = JointEmbedding.from_pretrained(resumed.parent / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_without_a_run_says_so(tiny_data, tiny_features, tmp_path):
    with pytest.raises(TrainingRunError, match="nothing to resume"):
        train_joint(_config(tiny_data, tiny_features, tmp_path / "none"), resume=True)


def test_evaluate_search_from_images_and_from_the_cache_agree(
    trained, tiny_data, tiny_features, tmp_path, capsys
):
    from captioner.cli import main

    best, _ = trained
    out_images, out_cache = tmp_path / "images.json", tmp_path / "cache.json"
    args = ["evaluate-search", str(tiny_data), "--split", "val", "--embedding", str(best)]
    assert main([*args, "--output", str(out_images)]) == 0
    assert main([*args, "--features", str(tiny_features), "--output", str(out_cache)]) == 0
    a, b = (json.loads(f.read_text()) for f in (out_images, out_cache))
    assert a["photos"] == 8 and a["queries"] == 24 and a["failed"] == 0
    # the cache holds float16 features: the ranks may move by a tie, not more
    assert abs(a["text to image"]["R@5"] - b["text to image"]["R@5"]) <= 100 / 24
    assert "| text to image |" in capsys.readouterr().out
    assert main([*args, "--queries", "1", "--output", str(out_images)]) == 0
    assert json.loads(out_images.read_text())["queries"] == 8
