"""The scores without Java: the Python twin of the PTB tokenizer, held to the Java one."""

import shutil

import pytest

from captioner import metrics
from captioner.metrics import CaptionScorer, ptb_tokens

java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("A dog's ball, black-and-white.", ["a", "dog", "'s", "ball", "black-and-white"]),
        ("Two men don't (really) run...", ["two", "men", "do", "n't", "really", "run"]),
        ('A "big" dog; 3.5 feet!', ["a", "big", "dog", "3.5", "feet"]),
    ],
)
def test_python_tokens_are_the_ptb_tokenizers(caption, tokens):
    assert ptb_tokens(caption) == tokens


@java
def test_the_python_tokenizer_agrees_with_java_on_flickr8k_dev(shared_data):
    from captioner.data import load_dataset

    examples = load_dataset(shared_data / "flickr8k").split("val")
    captions = {str(i): list(ex.captions) for i, ex in enumerate(examples)}
    by_java, by_python = metrics.tokenize(captions, java=True), metrics.tokenize(captions, java=False)
    pairs = [(a, b) for k in captions for a, b in zip(by_java[k], by_python[k], strict=True)]
    assert sum(a == b for a, b in pairs) / len(pairs) > 0.995, [p for p in pairs if p[0] != p[1]][:10]
    # CIDEr of each photo's first caption against its other four: the scores training chooses by
    candidates = {k: v[0] for k, v in captions.items()}
    references = {k: v[1:] for k, v in captions.items()}
    with_java = CaptionScorer(references, java=True).score(candidates, metrics=("BLEU-4", "CIDEr"))
    with_python = CaptionScorer(references, java=False).score(candidates, metrics=("BLEU-4", "CIDEr"))
    assert abs(with_java["CIDEr"] - with_python["CIDEr"]) < 0.5
    assert abs(with_java["BLEU-4"] - with_python["BLEU-4"]) < 0.5


def test_without_java_training_scores_and_meteor_says_how_to_install(monkeypatch):
    monkeypatch.setattr(metrics, "have_java", lambda: False)
    scorer = CaptionScorer({"1": ["a dog runs on the grass", "a brown dog is running"]})
    scores = scorer.score({"1": "A dog runs on the grass."}, metrics=("BLEU-4", "CIDEr", "METEOR"))
    assert scores["BLEU-4"] > 90
    assert "apt-get install openjdk-17-jre-headless" in str(scores["METEOR"])


def test_evaluate_without_java_says_how_to_install_it(monkeypatch, tiny_data, capsys):
    from captioner import evaluate
    from captioner.cli import main

    monkeypatch.setattr(evaluate, "have_java", lambda: False)
    assert main(["evaluate", str(tiny_data), "--split", "test"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("captioner: error: Java was not found") and "openjdk-17-jre-headless" in err
