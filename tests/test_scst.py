"""Self-critical training: coco-caption's CIDEr-D as the reward, and rewards that rise."""

import csv

import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.training import train
from captioner.training.scst import CiderD
from conftest import tiny_config

REFS = [
    ["a dog runs on the grass", "a brown dog running outside", "the dog is running in a field"],
    ["two children play in the snow", "kids playing in snow", "two kids in the snow"],
    ["a man rides a bike", "a cyclist on a road", "a man riding his bicycle down the road"],
]
CANDIDATES = ["a dog running on grass", "a child in the snow", "a man riding a bike on the road"]


@pytest.mark.parametrize("count_end", [False, True])
def test_cider_d_matches_coco_caption_with_the_same_document_frequencies(count_end):
    end = " <end>" if count_end else ""  # the end token is one more word of every caption to coco-caption
    _, expected = Cider().compute_score(
        {i: [r + end for r in refs] for i, refs in enumerate(REFS)},
        {i: [c + end] for i, c in enumerate(CANDIDATES)},
    )
    cider = CiderD([[r.split() for r in refs] for refs in REFS], count_end=count_end)
    ours = [cider.score(i, c.split()) for i, c in enumerate(CANDIDATES)]
    assert ours == pytest.approx(list(expected), abs=1e-12)
    assert cider.score(0, CANDIDATES[1].split()) < ours[0]  # a caption of another image scores lower
    assert cider.score(0, []) == 0.0


def test_the_end_token_makes_a_caption_cut_mid_phrase_lose_reward():
    """Pinned: counting <end> punishes "... on the" against "... on the grass" harder than plain CIDEr-D."""
    refs = [[r.split() for r in refs] for refs in REFS]
    whole, cut = "a dog runs on the grass".split(), "a dog runs on the".split()
    plain, ended = CiderD(refs, count_end=False), CiderD(refs)
    assert ended.score(0, cut) / ended.score(0, whole) < plain.score(0, cut) / plain.score(0, whole) - 0.1


def rewards(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [float(r["reward"]) for r in csv.DictReader(f) if r["kind"] == "train"]


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_scst_raises_the_reward_of_a_cross_entropy_model(
    baseline, tiny_data, tiny_features, tiny_model, tmp_path
):
    config = tiny_config(
        tiny_data,
        tiny_features,
        tmp_path,
        epochs=30,
        max_steps=30,
        lr=5e-3,
        init_from=str(tiny_model),
        scst=True,
        scst_baseline=baseline,
        patience=100,
    )
    config.decoder.hidden_dim = 999  # replaced by the starting checkpoint's decoder settings
    train(config, progress=False)
    seen = rewards(tmp_path)
    assert len(seen) == 30
    assert sum(seen[-5:]) > sum(seen[:5]) + 5 * 5.0, seen  # mean CIDEr-D (0-100) up by 5+ points


def test_init_from_refuses_another_encoder(tiny_data, tiny_features, tiny_model, tmp_path):
    config = tiny_config(tiny_data, tiny_features, tmp_path, init_from=str(tiny_model), scst=True)
    config.encoder.name = "efficientnet_lite2"
    with pytest.raises(ValueError, match="init_from"):
        train(config, progress=False)
