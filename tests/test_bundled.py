"""The model that ships in the package: loads with no arguments and tells photos apart."""

from pathlib import Path

from captioner import Captioner
from captioner.generation import GenerationOptions

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.jpg"))


def test_bundled_model_captions_the_examples_differently():
    model = Captioner.from_pretrained()
    assert model.encoder.name == "efficientnet_lite2" and model.decoder_config.name == "attention"
    assert model.generation == GenerationOptions(length_penalty=2.0, no_repeat_ngram=3)
    results = model.caption(EXAMPLES)
    captions = [r.caption for r in results]
    assert len(EXAMPLES) >= 5 and all(len(c.split()) >= 4 for c in captions), captions
    assert len(set(captions)) == len(captions), captions  # never the same caption for every photo
    assert all(r.attention is not None and r.grid_shape == (9, 9) for r in results)
    assert all(w not in {"<unk>", "<pad>", "<start>", "<end>"} for r in results for w in r.words)
    for r in results:  # trigram blocking: no three-word sequence twice
        trigrams = list(zip(r.words, r.words[1:], r.words[2:], strict=False))
        assert len(trigrams) == len(set(trigrams)), r.caption


def test_bundled_model_vetoes_people_and_birds_by_probe_and_carries_its_neighbours():
    model = Captioner.from_pretrained()
    head = model.label_head
    assert head is not None and list(head.probes) == ["bird", "person"]  # scripts/train_label_probe.py
    vocab = model.vocab.words
    vetoed = {word for _, ids, _ in model.grounding_plan().vetoes for word in (vocab[i] for i in ids)}
    assert {"bird", "birds", "person", "people", "man", "woman"} <= vetoed and "dog" not in vetoed
    assert model.neighbours is not None and model.neighbours.keys.shape == (6000, 128)
    assert (model.neighbours.k, model.neighbours.weight) == (10, 4.0)
