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
  `absent` (99% of Flickr8k dev's animal photos are above it), and the person words where the label
  head's person probe (`captioner.labels.load_probes`) is below `person_absent`. The classifier misses
  most of Flickr8k's cats, horses and balls one by one, so those words are never ruled out on their own.
- **Borrowed words** (Hendricks et al. 2016, "Deep compositional captioning"): where the dog is
  contradicted but another animal is confident (probability >= `present`), that animal's word borrows
  the dog's place: it is scored with the dog's log-probability as well as its own, and the decoder is
  fed "dog" when it says it, so "a white dog is running through the grass" becomes "a white sheep is
  running through the grass". The decoder knows how dogs appear in a sentence; that is what it lends.
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
from captioner.labels import LabelHead, imagenet_words

ANIMAL_CLASSES = 398  # ImageNet-1k classes 0..397 are animals, fish to primates
COCO_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")


@dataclass(frozen=True)
class GroundingSettings:
    present: float = 0.3  # a label at least this probable is in the photo
    absent: float = 0.1  # a contradictable word (or all animals together) this improbable is not
    penalty: float = 8.0  # nats taken off a contradicted word
    bonus: float = 3.0  # nats added to a confident label's word until the caption says it (0: off)
    confident: float = 0.5  # how probable a label must be for the bonus
    person_absent: float = 0.05  # the person probe below this: no person words


def _forms(word: str) -> tuple[str, str]:
    return word, plural(word)


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
        # words that say "a person": COCO's synonyms, where the head has a person probe
        self.person_ids, self.person_column = ids(f for s in SYNONYMS["person"] for f in _forms(s)), None
        if "person" in getattr(head, "probes", {}):
            self.person_column = head.word_index("person")
        # label words the vocabulary can say in one token: (label column, ids of the word and its plural)
        probed = set(getattr(head, "probes", {}))  # the decoder's own words ("person"): never a bonus
        self.sayable = [
            (c, ids(_forms(w)))
            for c, w in enumerate(head.words)
            if " " not in w and w in index and w not in probed
        ]
        # animals that can take the dog's place: (label column, [(a form's id, the dog form it borrows)])
        self.borrowers = [
            (
                c,
                [
                    (index[f], index[d])
                    for f, d in zip(_forms(w), ("dog", "dogs"), strict=True)
                    if f in index and d in index
                ],
            )
            for c, w in enumerate(head.words)
            if w in animal_words and w != "dog" and " " not in w and w in index
        ]
        # group[id]: which sayable word a vocabulary id says (-1: none), so that "dogs" pays for "dog"
        self.group = torch.full((len(words),), -1, dtype=torch.long)
        for g, (_, i) in enumerate(self.sayable):
            self.group[i] = g

    def state(self, word_probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image: bonus and penalty [B, V] in nats, and `feed` [B, V]: the id the decoder is fed for
        each word (itself, or "dog" for an animal that borrowed the dog's place)."""
        s, batch, device = self.settings, word_probs.shape[0], word_probs.device
        bonus = torch.zeros(batch, self.vocab_size, device=device)
        penalty = torch.zeros_like(bonus)
        feed = torch.arange(self.vocab_size, device=device).repeat(batch, 1)
        if s.bonus:
            for column, i in self.sayable:
                if column == self.dog_column:  # the decoder's own best word: a bonus only moves it
                    continue
                bonus[:, i] = torch.where(word_probs[:, column] >= s.confident, s.bonus, 0.0).unsqueeze(1)
        if self.person_column is not None:
            nobody = word_probs[:, self.person_column] < s.person_absent
            penalty[:, self.person_ids] -= torch.where(nobody, s.penalty, 0.0).unsqueeze(1)
        columns = [c for c in self.animal_columns if c is not None]
        no_animal = word_probs[:, columns].sum(1) < s.absent
        penalty[:, self.animal_ids] -= torch.where(no_animal, s.penalty, 0.0).unsqueeze(1)
        if self.dog_column is None or not self.dog_ids:
            return {"bonus": bonus, "penalty": penalty, "feed": feed}
        no_dog = word_probs[:, self.dog_column] < s.absent
        penalty[:, self.dog_ids] -= torch.where(no_dog & ~no_animal, s.penalty, 0.0).unsqueeze(1)
        for b in (no_dog & ~no_animal).nonzero(as_tuple=True)[0].tolist():
            confident = [(float(word_probs[b, c]), pairs) for c, pairs in self.borrowers]
            p, pairs = max(confident, default=(0.0, []), key=lambda x: x[0])
            if p >= s.present:  # the most probable animal borrows the dog's words
                for form, dog_form in pairs:
                    feed[b, form] = dog_form
        return {"bonus": bonus, "penalty": penalty, "feed": feed}


class Grounded:
    """A decoder whose next-word log-probabilities follow the image's labels (see the module docstring).

    The bonus left to pay is a state tensor, so beam search reorders it with the beams and each
    hypothesis loses its bonus once it has said the word; the penalty and the feed never change."""

    KEYS = {"bonus": "grounding.bonus", "penalty": "grounding.penalty", "feed": "grounding.feed"}

    def __init__(self, decoder, plan: GroundingPlan, word_probs: torch.Tensor):
        self.decoder, self.plan, self.word_probs = decoder, plan, word_probs
        self.group = plan.group
        static = (self.KEYS["penalty"], self.KEYS["feed"])
        self.static_state = (*getattr(decoder, "static_state", ()), *static)

    def init_state(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        extra = self.plan.state(self.word_probs.to(pooled.device))
        return {**self.decoder.init_state(pooled, grid), **{self.KEYS[k]: v for k, v in extra.items()}}

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]):
        bonus, penalty, feed = (state[self.KEYS[k]] for k in ("bonus", "penalty", "feed"))
        inner = {k: v for k, v in state.items() if k not in self.KEYS.values()}
        log_probs, new, alpha = self.decoder.step(feed.gather(1, tokens.unsqueeze(1)).squeeze(1), inner)
        if self.group.device != tokens.device:
            self.group = self.group.to(tokens.device)
        said = self.group[tokens]  # [rows]: the sayable word each hypothesis just said, or -1
        if bool((said >= 0).any()):  # its bonus (and its plural's) is paid
            paid = (self.group.unsqueeze(0) == said.unsqueeze(1)) & (said >= 0).unsqueeze(1)
            bonus = bonus.masked_fill(paid, 0.0)
        # a borrowed word is also scored as the word it stands in for (whose own score the penalty takes)
        borrowed = feed != torch.arange(feed.shape[1], device=feed.device)
        if bool(borrowed.any()):
            log_probs = torch.logaddexp(
                log_probs, log_probs.gather(1, feed).masked_fill(~borrowed, -torch.inf)
            )
        log_probs = (log_probs + bonus + penalty).log_softmax(-1)
        new = {**new, self.KEYS["bonus"]: bonus, self.KEYS["penalty"]: penalty, self.KEYS["feed"]: feed}
        return log_probs, new, alpha
