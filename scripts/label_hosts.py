"""Write `src/captioner/label_hosts.tsv`: for each label word that is not an animal, the nearest other
label words by meaning, nearest first.

Grounded decoding lets a confident label the decoder never learned ("microwave", "sink") borrow the
place of a word it did learn (Hendricks et al. 2016, "Deep compositional captioning"): the new word is
scored with that word's log-probability and the decoder is fed that word after it. Which word lends
its place is the nearest one by the MiniLM sentence model the project ships, among the one-word label
words of the same kind (objects lend to objects; every animal borrows the dog's place instead). The
table lists several candidates so that any vocabulary finds one it knows.

    python scripts/label_hosts.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from captioner.grounding import ANIMAL_CLASSES
from captioner.labels import imagenet_words
from captioner.search.embedder import embed

OUT = Path(__file__).resolve().parents[1] / "src" / "captioner" / "label_hosts.tsv"
CANDIDATES = 8


def main() -> None:
    _, classes = imagenet_words()
    animals = {classes[i] for i in range(ANIMAL_CLASSES)} - set(classes[ANIMAL_CLASSES:])
    objects = sorted(set(classes) - animals)
    hosts = [w for w in objects if " " not in w]
    vectors = embed(objects)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    near = vectors @ vectors[[objects.index(h) for h in hosts]].T
    lines = ["# label word, the one-word label words nearest in meaning (MiniLM cosine), nearest first"]
    for i, word in enumerate(objects):
        order = [j for j in np.argsort(-near[i]) if hosts[j] != word][:CANDIDATES]
        lines.append(f"{word}\t{','.join(hosts[j] for j in order)}")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(objects)} words")


if __name__ == "__main__":
    main()
