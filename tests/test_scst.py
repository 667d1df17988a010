"""Self-critical training: coco-caption's CIDEr-D as the reward, and rewards that rise."""

import csv

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from captioner.training import train
from captioner.training.scst import CiderD, SelfCritical, sentence_bleu4
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


def test_sentence_bleu4_is_coco_captions_bleu4_of_each_caption_alone(capsys):
    refs = [[r.split() for r in refs] for refs in REFS]
    ours = sentence_bleu4([c.split() for c in CANDIDATES], refs)
    for i, candidate in enumerate(CANDIDATES):
        corpus, _ = Bleu(4).compute_score({0: REFS[i]}, {0: [candidate]}, verbose=0)
        assert ours[i] == pytest.approx(corpus[3], abs=1e-9)
    assert max(ours) < 1e-3  # no candidate shares a 4-gram with its references
    [shares] = sentence_bleu4(["a man rides a bike on the road".split()], refs[2:])
    assert shares > 0.3  # "a man rides a", "man rides a bike"
    assert sentence_bleu4([REFS[0][0].split(), []], refs[:2]) == [pytest.approx(1.0), 0.0]
    assert capsys.readouterr().out == ""  # the scorer's corpus totals are not printed


def test_the_mixed_reward_adds_weighted_bleu4_to_cider_d():
    refs = [[r.split() for r in refs] for refs in REFS]
    cider, words = CiderD(refs), [c.split() for c in CANDIDATES]
    mixed = SelfCritical(None, cider, bleu_weight=0.5, references=refs).reward([0, 1, 2], words)
    plain = SelfCritical(None, cider).reward([0, 1, 2], words)
    assert plain.tolist() == pytest.approx([cider.score(i, w) for i, w in enumerate(words)])
    assert mixed.tolist() == pytest.approx((plain + 0.5 * torch.tensor(sentence_bleu4(words, refs))).tolist())


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
