"""Visual labels, grounded decoding and the CHAIR counting, on hand-made inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captioner.decoding import WithoutWords, beam_search, greedy
from captioner.grounding import Grounded, GroundingPlan, GroundingSettings
from captioner.hallucination import chair, invented_objects, objects
from captioner.labels import TABLE, LabelHead, imagenet_words

# --- the label table ---


def test_every_imagenet_class_has_a_plain_word():
    names, words = imagenet_words()
    assert len(names) == len(words) == 1000
    assert all(w.strip() == w and w and w == w.lower() for w in words)
    rows = [line for line in TABLE.read_text().splitlines() if line and not line.startswith("#")]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(1000))
    word = dict(zip(names, words, strict=True))
    assert {word["tabby"], word["tiger cat"], word["Persian cat"]} == {"cat"}
    assert word["espresso"] == "coffee" and word["space shuttle"] == "space shuttle"
    assert word["missile"] == "rocket" and word["refrigerator"] == "refrigerator"
    assert set(words[151:269]) == {"dog"}  # ImageNet's dog breeds
    assert sum(w == "dog" for w in words) == 118 + 1  # and the dingo


def test_label_head_sums_class_probabilities_per_word():
    names, words = imagenet_words()
    linear = nn.Linear(4, 1000)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    with torch.no_grad():
        linear.bias[151:269] = 5.0  # every dog breed, equally: none alone is sure, "dog" together is
    head = LabelHead(linear)
    probs = head(torch.zeros(2, 4))
    assert probs.shape == (2, len(set(words)))
    assert probs.sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    top = head.top(probs)[0]
    assert top[0].label == "dog" and top[0].p > 0.9 and top[0].to_json()["label"] == "dog"
    assert all(label.p >= 0.02 for label in top)
    assert (
        float(linear(torch.zeros(1, 4)).detach().softmax(-1).max()) < 0.01
    )  # no breed alone would be a label


# --- grounded decoding, on a decoder whose every step prefers the same words ---

WORDS = [
    "<pad>",
    "<start>",
    "<end>",
    "<unk>",
    "a",
    "dog",
    "dogs",
    "cat",
    "man",
    "pizza",
    "on",
    "grass",
    "plate",
]
ID = {w: i for i, w in enumerate(WORDS)}


class Scripted:
    """Step t proposes the words of `script[t]`, in that order of preference, and records what it was fed:
    a language model that always says "a dog on grass"."""

    def __init__(self, script: list[list[str]]):
        self.script, self.fed = script, []

    def init_state(self, pooled, grid):
        return {"t": torch.zeros(pooled.shape[0], dtype=torch.long)}

    def step(self, tokens, state):
        self.fed.append(tokens.tolist())
        t = int(state["t"][0])
        lp = torch.full((tokens.shape[0], len(WORDS)), -12.0)
        for rank, w in enumerate(self.script[min(t, len(self.script) - 1)]):
            lp[:, ID[w]] = -1.0 - 2.0 * rank
        return lp.log_softmax(-1), {"t": state["t"] + 1}, None


SCRIPT = [["a"], ["dog", "pizza", "cat", "man"], ["on"], ["grass"], ["<end>"]]


def head() -> LabelHead:
    return LabelHead(nn.Linear(4, 1000))


def word_probs(h: LabelHead | None = None, **p: float) -> torch.Tensor:
    h = h or head()
    q = torch.zeros(1, len(h.words))
    for w, v in p.items():
        q[0, h.word_index(w.replace("_", " "))] = v
    return q


def decode(
    q: torch.Tensor | None,
    settings: GroundingSettings | None = None,
    beam: int = 3,
    labels: LabelHead | None = None,
    script: list[list[str]] = SCRIPT,
):
    settings = settings or GroundingSettings()
    decoder = Scripted(script)
    plan = GroundingPlan(labels or head(), WORDS, settings)
    wrapped = decoder if q is None else Grounded(decoder, plan, q)
    wrapped = WithoutWords(wrapped, [ID["<pad>"], ID["<start>"], ID["<unk>"]])
    pooled, grid = torch.zeros(1, 4), torch.zeros(1, 2, 4)
    ids = {"start_id": ID["<start>"], "end_id": ID["<end>"], "max_length": 8}
    if beam == 1:
        hyp = greedy(wrapped, pooled, grid, **ids)[0]
    else:
        hyp = beam_search(wrapped, pooled, grid, beam_size=beam, **ids)[0][0]
    words = WORDS + (wrapped.decoder.plan.extra_words if q is not None else [])
    return " ".join(words[t] for t in hyp.tokens), decoder.fed


@pytest.mark.parametrize("beam", [1, 3])
def test_without_grounding_the_decoder_says_what_it_learned(beam):
    assert decode(None, beam=beam)[0] == "a dog on grass"


@pytest.mark.parametrize("beam", [1, 3])
def test_a_dog_the_labels_contradict_is_not_named(beam):
    # A photo of food: the dog classes sum to 0.03, but the encoder sees animals nowhere either.
    caption, _ = decode(word_probs(dog=0.03, plate=0.6), beam=beam)
    assert "dog" not in caption.split() and caption.startswith("a ")
    # A real dog keeps its word.
    assert decode(word_probs(dog=0.8), beam=beam)[0] == "a dog on grass"


@pytest.mark.parametrize("beam", [1, 3])
def test_a_confident_animal_borrows_the_dogs_place(beam):
    caption, fed = decode(word_probs(dog=0.02, cat=0.85), beam=beam)
    assert caption == "a cat on grass"
    # the decoder was fed "dog" where the caption says "cat": the cat borrowed the dog's embedding
    assert any(ID["dog"] in step for step in fed) and not any(ID["cat"] in step for step in fed)


@pytest.mark.parametrize("beam", [1, 3])
def test_with_no_animal_a_present_object_takes_the_dogs_place(beam):
    caption, fed = decode(word_probs(dog=0.02, plate=0.4), beam=beam)
    assert caption == "a plate on grass"  # the decoder's own next choice would be "pizza"
    assert [step for step in fed if ID["plate"] in step]  # an object is fed as itself
    alone = decode(word_probs(dog=0.02, plate=0.4), GroundingSettings(objects_borrow=False))[0]
    assert alone == "a pizza on grass"


@pytest.mark.parametrize("beam", [1, 3])
def test_a_label_the_vocabulary_lacks_borrows_a_known_words_place(beam):
    plan = GroundingPlan(head(), WORDS, GroundingSettings())
    assert "zebra" in plan.extra_words and "microwave" in plan.extra_words
    assert "parking meter" not in plan.extra_words  # none of its hosts is in this vocabulary
    assert "pizza" not in plan.extra_words and "person" not in plan.extra_words
    # an animal takes the dog's place, fed as "dog"
    caption, fed = decode(word_probs(dog=0.02, zebra=0.9), beam=beam)
    assert caption == "a zebra on grass" and any(ID["dog"] in step for step in fed)
    assert all(t < len(WORDS) for step in fed for t in step)  # the decoder is only fed words it knows
    # an object where the dog is, fed as its host: the nearest label word the vocabulary has
    host = WORDS[int(plan.hosts[plan.extra_words.index("microwave")])]
    assert host == "pizza"  # label_hosts.tsv: microwave -> stove, bowl, radio, coffee, pepper, pizza
    assert decode(word_probs(dog=0.02, microwave=0.9), beam=beam)[0] == "a microwave on grass"
    # an unconfident label the vocabulary lacks is never said
    for q in (word_probs(dog=0.8, zebra=0.2), word_probs(dog=0.8, microwave=0.2)):
        assert decode(q, beam=beam)[0] == "a dog on grass"


def test_a_probed_word_is_vetoed_where_its_probe_is_low_and_keeps_its_imagenet_label():
    """A probe for a word the ImageNet table also has ("bird"): its own column, read only for the veto."""
    h = LabelHead(nn.Linear(4, 1000), {"cat": nn.Linear(4, 1)})
    assert h.word_index("cat") < h.table_size and h.probe_index("cat") == h.table_size == len(h.words) - 1
    settings, cats = (
        GroundingSettings(probe_absent=(("cat", 0.5),)),
        [["a"], ["cat", "dog"], ["on"], ["<end>"]],
    )

    def probs(probe: float, **table: float) -> torch.Tensor:
        q = word_probs(h, dog=0.8, **table)
        q[0, h.probe_index("cat")] = probe
        return q

    assert decode(probs(0.9), settings, labels=h, script=cats)[0] == "a cat on"  # the probe sees a cat
    assert decode(probs(0.1), settings, labels=h, script=cats)[0] == "a dog on"  # it sees none: vetoed
    assert decode(probs(0.1), GroundingSettings(probe_absent=()), labels=h, script=cats)[0] == "a cat on"
    # the table's "cat" still pays its bonus: a confident ImageNet cat lifts "cat" over a preferred "dog"
    dogs = [["a"], ["dog", "cat"], ["on"], ["<end>"]]
    assert decode(probs(0.9, cat=0.9), settings, labels=h, script=dogs)[0] == "a cat on"
    assert decode(probs(0.9), settings, labels=h, script=dogs)[0] == "a dog on"


def test_a_confident_label_gets_its_word_once():
    caption, _ = decode(word_probs(dog=0.8, pizza=0.9))
    assert caption.split().count("pizza") == 1
    assert decode(word_probs(dog=0.8, pizza=0.9), GroundingSettings(bonus=0.0))[0] == "a dog on grass"


def test_grounding_with_the_captioner_switch(tiny_model, tiny_data):
    from captioner.model import Captioner

    model = Captioner.from_pretrained(tiny_model)
    assert model.label_head is not None and model.labels_unavailable is None
    paths = sorted((tiny_data / "images").glob("*.jpg"))[:4]
    plain = model.caption(paths, grounding=False)
    grounded = model.caption(paths)  # on by default
    assert all(c.labels for c in grounded) and [c.labels for c in plain] == [c.labels for c in grounded]
    assert all(c.caption == " ".join(c.words) for c in grounded)
    # switched off, decoding is the decoder's alone: what a model without a label head decodes
    pooled = torch.stack([c.features[0] for c in plain])
    grid = torch.stack([c.features[1] for c in plain])
    off = [h[0].tokens for h in model.generate(pooled, grid, grounding=False)]
    model.label_head = None
    assert off == [h[0].tokens for h in model.generate(pooled, grid)]


# --- CHAIR ---


def test_objects_match_two_word_names_first_and_plurals():
    assert objects("a hot dog next to two dogs") == {"hot dog", "dog"}
    assert objects("a teddy bear on a bed") == {"teddy bear", "bed"}
    assert objects("Three women riding bicycles.") == {"person", "bicycle"}
    assert objects("a photo of the sky") == set()


def test_chair_counts_on_hand_made_captions():
    refs = {
        "a": ["A dog runs on the grass.", "A brown dog in a field."],
        "b": ["A pizza on a table.", "A plate with pizza."],
        "c": ["A red sky over the sea."],
        "d": ["A man rides a horse."],
    }
    captions = {
        "a": "a dog is running",  # grounded, nothing invented
        "b": "a dog is eating a pizza",  # grounded (pizza) and hallucinating (dog)
        "c": "the sky at sunset",  # names nothing: neither
        "d": "a man and a cat and a dog",  # person right; cat and dog invented
    }
    scores = chair(captions, refs)
    assert scores["CHAIR-s"] == pytest.approx(100 * 2 / 4)
    assert scores["CHAIR-i"] == pytest.approx(100 * 3 / 6)  # dog, pizza | dog | person, cat, dog
    assert scores["grounded"] == pytest.approx(100 * 3 / 4)
    assert sorted(invented_objects(captions, refs)) == ["cat", "dog", "dog"]


def test_the_article_before_a_label_word_agrees_with_it():
    from captioner import Captioner
    from captioner.model import article

    assert [article(w) for w in ("elephant", "ice cream", "umbrella", "unicycle", "uniform", "dog")] == [
        "an", "an", "an", "a", "a", "a",
    ]  # fmt: skip
    model = Captioner.from_pretrained("flickr8k")
    plan, index = model.grounding_plan(), model.vocab.index
    extra = len(model.vocab.words) + plan.extra_words.index("alligator")  # a label Flickr8k never taught
    assert model.decode([index["a"], extra]) == "an alligator"  # "a" was chosen for the dog it stands for
    assert model.decode([index["a"], index["elephant"]]) == "an elephant"  # a label word in the vocabulary
    assert model.decode([index["an"], index["dog"]]) == "a dog"
    assert model.decode([index["a"], index["in"]]) == "a in"  # the decoder's own words are left as they are
