"""Grounded decoding: the caption names what the encoder is confident is there, and not what it is
confident is absent.

The decoder learned its words from one data set (Flickr8k: people, dogs, water, grass) and on other
photos it reaches for them anyway: a plate of food becomes "a dog in the water". The encoder's own
ImageNet classifier (`captioner.labels`) still sees the plate. `Grounded` wraps a decoder and changes its
next-word log-probabilities with what the labels say, per image, before any search (greedy, beam,
sampling) looks at them. Three moves, each measured on coco-mini and Flickr8k dev (docs/experiments.md):

- **Contradiction.** A word whose absence the classifier can vouch for loses `penalty` nats: "dog" (and
  its synonyms and breed names) where the dog classes sum below `absent` (the classifier finds 98% of
  Flickr8k dev's dogs at 0.1), every animal word where all 398 animal classes together sum below
  `absent` (99% of Flickr8k dev's animal photos are above it), and a probed word's words where the label
  head's probe for it (`captioner.labels.load_probes`) is below its `probe_absent` threshold: the person
  words, and the bird words (ImageNet's 59 bird classes miss a quarter of Flickr8k's birds at any
  threshold that rules out a kitchen's). The classifier misses most of Flickr8k's cats, horses and balls
  one by one, so those words are never ruled out on their own.
- **Borrowed words** (Hendricks et al. 2016, "Deep compositional captioning"): where the dog is
  contradicted, the most probable animal (probability >= `present`) borrows the dog's place: it is
  scored with the dog's log-probability as well as its own, and the decoder is fed "dog" when it says
  it, so "a white dog is running through the grass" becomes "a white sheep is running through the
  grass". With no animal there, the most probable object takes the place instead, fed as itself ("a
  brown and white" stops waiting for its dog and ends "a brown plate ..."). The decoder knows how dogs
  appear in a sentence; that is what it lends.
- **Words the decoder never learned.** A label word outside the vocabulary ("zebra", "microwave",
  "parking meter") gets an extra id after the vocabulary's, fed to the decoder as a word it knows (its
  host): the dog for an animal, else the nearest label word by meaning (`label_hosts.tsv`, from the
  MiniLM model the project ships). It is scored as its host and can be said only where its label is
  confident (with the bonus below) or it takes the dog's place; `Captioner.words` spells it out.
- **A bonus for a confident label's word** (probability >= `confident`): `bonus` nats on the word and its
  plural until the caption has said one of them once; a soft form of constrained beam search (Anderson
  et al. 2017). The beams still rank by the model's own score plus the bonus, so the word goes where the
  language model finds room for it. "dog" and the probed words ("person") get none: they are the
  decoder's own best-known words, and a bonus only moves them about.

`GenerationOptions.grounding` switches it all off; a model without labels decodes as it always did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioner.hallucination import SYNONYMS, plural
from captioner.labels import LabelHead, imagenet_words, label_hosts

ANIMAL_CLASSES = 398  # ImageNet-1k classes 0..397 are animals, fish to primates
COCO_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")


@dataclass(frozen=True)
class GroundingSettings:
    present: float = 0.3  # a label at least this probable is in the photo
    absent: float = 0.1  # a contradictable word (or all animals together) this improbable is not
    penalty: float = 8.0  # nats taken off a contradicted word
    bonus: float = 5.0  # nats added to a confident label's word until the caption says it (0: off)
    confident: float = 0.6  # how probable a label must be for the bonus
    # a probed word's probe below its threshold: none of its words (3% of Flickr8k dev's birds fall below)
    probe_absent: tuple[tuple[str, float], ...] = (("person", 0.05), ("bird", 0.055))
    objects_borrow: bool = True  # with no animal to take it, a present object takes the dog's place


def _forms(word: str) -> tuple[str, str]:
    return word, plural(word)


def _most_probable(
    probs: torch.Tensor, candidates: list[tuple[int, list[tuple[int, int]]]]
) -> list[tuple[float, list[tuple[int, int]]]]:
    """Per image of `probs` [B, W]: (probability, places) of the candidate whose label column is most
    probable (the first listed of equals)."""
    if not candidates:
        return [(0.0, [])] * probs.shape[0]
    columns = torch.tensor([c for c, _ in candidates], device=probs.device)
    best, at = probs[:, columns].max(dim=1)
    return [(p, candidates[j][1]) for p, j in zip(best.tolist(), at.tolist(), strict=True)]


class GroundingPlan:
    """Which vocabulary ids each label word stands for; built once per model and vocabulary."""

    def __init__(self, head: LabelHead, words: list[str], settings: GroundingSettings):
        self.settings, self.vocab_size = settings, len(words)
        index = {w: i for i, w in enumerate(words)}

        def ids(forms) -> list[int]:
            return sorted({index[f] for f in forms if f in index})

        names, classes = imagenet_words()
        animal_words = {classes[i] for i in range(ANIMAL_CLASSES)} - set(classes[ANIMAL_CLASSES:])
        self.animal_columns = [head.word_index(w) for w in sorted(animal_words)]
        # words that say "an animal": the COCO animals' synonyms and the animal label words
        said = {f for a in COCO_ANIMALS for s in SYNONYMS[a] for f in _forms(s)}
        said |= {f for w in animal_words for f in _forms(w)}
        self.animal_ids = ids(said | {"animal", "animals"})
        # words that say "a dog": its synonyms and the breed names the vocabulary knows ("poodle")
        dog = {f for s in SYNONYMS["dog"] for f in _forms(s)}
        dog |= {f for n, w in zip(names, classes, strict=True) if w == "dog" for f in _forms(n.split()[-1])}
        self.dog_ids, self.dog_column = ids(dog), head.word_index("dog")
        # vetoes by probe: (the probe's column, the ids of the word's synonyms, the threshold)
        self.vetoes = [
            (column, ids(f for s in SYNONYMS[word] for f in _forms(s)), threshold)
            for word, threshold in settings.probe_absent
            if (column := head.probe_index(word)) is not None
        ]
        # label words the vocabulary can say in one token: (label column, ids of the word and its plural);
        # the ImageNet table's words only: a probe ("person") is for vetoes, never a bonus
        known = {c: w for c, w in enumerate(head.words[: head.table_size])}
        self.label_words = frozenset(known.values())  # Captioner.words fixes the article before them
        one_token = {c: w for c, w in known.items() if " " not in w and w in index}
        self.sayable = [(c, ids(_forms(w))) for c, w in one_token.items()]
        # label words it cannot say get extra ids after the vocabulary's, each fed as a word it knows
        # (its host): every animal the dog, an object the nearest label word it knows (label_hosts.tsv)
        table = label_hosts()
        self.extra_words, hosts, extra_columns = [], [], []
        for c, w in known.items():
            if c in one_token or "dog" not in index:
                continue
            host = "dog" if w in animal_words else next((h for h in table.get(w, ()) if h in index), None)
            if host is not None:
                self.extra_words.append(w)
                hosts.append(index[host])
                extra_columns.append(c)
        self.size = len(words) + len(self.extra_words)
        self.hosts = torch.tensor(hosts, dtype=torch.long)
        extra = {c: len(words) + j for j, c in enumerate(extra_columns)}
        self.sayable += [(c, [i]) for c, i in extra.items()]

        def dog_place(c: int, w: str) -> list[tuple[int, int]]:  # (a form's id, the dog form it borrows)
            if c in extra:
                return [(extra[c], index["dog"])]
            return [
                (index[f], index[d]) for f, d in zip(_forms(w), ("dog", "dogs"), strict=True) if f in index
            ]

        has_dog = "dog" in index and "dogs" in index
        # animals that can take the dog's place, and objects that can where no animal can
        places = {c: dog_place(c, w) for c, w in known.items() if (c in one_token or c in extra) and has_dog}
        self.borrowers = [
            (c, pl) for c, pl in places.items() if known[c] in animal_words and known[c] != "dog"
        ]
        self.object_borrowers = [(c, pl) for c, pl in places.items() if known[c] not in animal_words]
        # the bonus: each id of a sayable word with the label column that pays it (the last listed wins,
        # as "glasses" is both a plural and a label); "dog" gets none: the decoder's own best word
        payer = {i: c for c, ids_ in self.sayable if c != self.dog_column for i in ids_}
        self.bonus_ids = torch.tensor(list(payer), dtype=torch.long)
        self.bonus_columns = torch.tensor(list(payer.values()), dtype=torch.long)
        # group[id]: which sayable word an id says (-1: none), so that "dogs" pays for "dog"
        self.group = torch.full((self.size,), -1, dtype=torch.long)
        for g, (_, i) in enumerate(self.sayable):
            self.group[i] = g

    def state(self, word_probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image: bonus and penalty [B, V] in nats, and `feed` [B, V]: the id the decoder is fed for
        each word (itself, or "dog" for an animal that borrowed the dog's place)."""
        s, batch, device = self.settings, word_probs.shape[0], word_probs.device
        bonus = torch.zeros(batch, self.size, device=device)
        penalty = torch.zeros_like(bonus)
        # feed[b, i]: the id the decoder is fed after word i; lend[b, i]: the id whose log-probability
        # word i also gets (itself: none). An extra word is fed as its host and scored as its host.
        own = torch.arange(self.vocab_size, device=device)
        feed = torch.cat([own, self.hosts.to(device)]).repeat(batch, 1)
        lend = feed.clone()
        by_object = torch.zeros_like(bonus, dtype=torch.bool)  # words an object lends the dog's place to
        # an extra word is said only where its label is confident or it takes the dog's place
        penalty[:, self.vocab_size :] = -torch.inf
        if s.bonus and len(self.bonus_ids):
            ids, payers = self.bonus_ids.to(device), self.bonus_columns.to(device)
            sure = word_probs[:, payers] >= s.confident  # [B, ids]
            bonus[:, ids] = torch.where(sure, s.bonus, 0.0)
            extra = ids >= self.vocab_size
            penalty[:, ids[extra]] = torch.where(sure[:, extra], 0.0, -torch.inf)
        for column, word_ids, threshold in self.vetoes:
            absent = word_probs[:, column] < threshold
            penalty[:, word_ids] -= torch.where(absent, s.penalty, 0.0).unsqueeze(1)
        columns = [c for c in self.animal_columns if c is not None]
        no_animal = word_probs[:, columns].sum(1) < s.absent
        penalty[:, self.animal_ids] -= torch.where(no_animal, s.penalty, 0.0).unsqueeze(1)
        if self.dog_column is None or not self.dog_ids:
            return {"bonus": bonus, "penalty": penalty, "feed": feed, "lend": lend, "by_object": by_object}
        no_dog = word_probs[:, self.dog_column] < s.absent
        penalty[:, self.dog_ids] -= torch.where(no_dog & ~no_animal, s.penalty, 0.0).unsqueeze(1)
        animal, objects = (
            _most_probable(word_probs, self.borrowers),
            _most_probable(word_probs, self.object_borrowers),
        )
        for b in no_dog.nonzero(as_tuple=True)[0].tolist():
            p, as_dog = 0.0, True
            pairs: list[tuple[int, int]] = []
            if not no_animal[b]:  # the most probable animal borrows the dog's words, fed as "dog"
                p, pairs = animal[b]
            if p < s.present and s.objects_borrow:  # else the most probable object, fed as itself
                p, pairs = objects[b]
                as_dog = False
            if p >= s.present:
                for form, dog_form in pairs:
                    lend[b, form] = dog_form
                    if as_dog:
                        feed[b, form] = dog_form
                    else:
                        by_object[b, form] = True
                    if form >= self.vocab_size:
                        penalty[b, form] = 0.0
        return {"bonus": bonus, "penalty": penalty, "feed": feed, "lend": lend, "by_object": by_object}


class Grounded:
    """A decoder whose next-word log-probabilities follow the image's labels (see the module docstring).

    The bonus left to pay and the places still lent are state tensors, so beam search reorders them with
    the beams: a hypothesis loses its bonus once it has said the word, and an object takes the dog's
    place once ("a group of sled dogs" must not become "sled sleds sleds"); an animal keeps it. The
    penalty and the feed never change."""

    KEYS = {
        "bonus": "grounding.bonus",
        "penalty": "grounding.penalty",
        "feed": "grounding.feed",
        "lend": "grounding.lend",
        "by_object": "grounding.by_object",
    }

    def __init__(self, decoder, plan: GroundingPlan, word_probs: torch.Tensor):
        self.decoder, self.plan, self.word_probs = decoder, plan, word_probs
        self.group = plan.group
        static = (self.KEYS["penalty"], self.KEYS["feed"], self.KEYS["by_object"])
        self.static_state = (*getattr(decoder, "static_state", ()), *static)

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        extra = self.plan.state(self.word_probs.to(pooled.device))
        return {**self.decoder.init_state(pooled, grid), **{self.KEYS[k]: v for k, v in extra.items()}}

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        bonus, penalty, feed, lend, by_object = (state[self.KEYS[k]] for k in self.KEYS)
        inner = {k: v for k, v in state.items() if k not in self.KEYS.values()}
        log_probs, new, alpha = self.decoder.step(feed.gather(1, tokens.unsqueeze(1)).squeeze(1), inner)
        if self.plan.size > log_probs.shape[1]:  # the extra words: scored below as their hosts
            pad = log_probs.new_full((log_probs.shape[0], self.plan.size - log_probs.shape[1]), -torch.inf)
            log_probs = torch.cat([log_probs, pad], dim=1)
        if self.group.device != tokens.device:
            self.group = self.group.to(tokens.device)
        said = self.group[tokens]  # [rows]: the sayable word each hypothesis just said, or -1
        if bool((said >= 0).any()):  # its bonus (and its plural's) is paid
            paid = (self.group.unsqueeze(0) == said.unsqueeze(1)) & (said >= 0).unsqueeze(1)
            bonus = bonus.masked_fill(paid, 0.0)
        returned = by_object.gather(1, tokens.unsqueeze(1))  # [rows, 1]: an object took the dog's place
        if bool(returned.any()):  # the dog's place goes back: the object is scored as before
            lend = torch.where(returned & by_object, feed, lend)
        # a borrowed word is also scored as the word it stands in for (whose own score the penalty takes)
        borrowed = lend != torch.arange(lend.shape[1], device=lend.device)
        if bool(borrowed.any()):
            log_probs = torch.logaddexp(
                log_probs, log_probs.gather(1, lend).masked_fill(~borrowed, -torch.inf)
            )
        log_probs = (log_probs + bonus + penalty).log_softmax(-1)
        new = {**new, self.KEYS["bonus"]: bonus, self.KEYS["penalty"]: penalty}
        new |= {self.KEYS["feed"]: feed, self.KEYS["lend"]: lend, self.KEYS["by_object"]: by_object}
        return log_probs, new, alpha
