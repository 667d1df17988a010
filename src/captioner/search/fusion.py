"""Fusing the caption signals of a search: the sentence model's ranking and the keyword ranking."""

from __future__ import annotations

import numpy as np

RRF_K = 60  # reciprocal rank fusion's constant, as in Cormack et al. (2009)
KEYWORD_WEIGHT = 0.5  # of the keyword ranking against the semantic one (1.0): see fuse


def fuse(
    similarity: np.ndarray,
    keyword_ranks: list[int | None],
    semantic: float = 1.0,
    keyword: float = KEYWORD_WEIGHT,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted reciprocal rank fusion: a ranking gives a photo weight / (RRF_K + its rank); they add up.

    Ranks, not scores, because the scores are not comparable: cosine similarity sits in a narrow band that
    depends on the query, and bm25 is unbounded and depends on the collection, so a fixed weighting of the
    raw scores would be wrong for some queries. RRF needs no calibration, and a photo near the top of both
    lists beats one that tops only one. Every photo has a semantic rank; only keyword matches get the second
    term. Keywords weigh half: meaning is the stronger signal (on COCO-mini, with reference captions as the
    stored captions and the others as queries, equal weights lost 3-8 points of recall@1 against semantic
    alone, half weights 1-4), yet a first keyword rank still lifts a photo past ~60 others. Scaled so that
    1.0 means first in both. Returns (score, keyword term).

    The captioner's P(query | photo) is not fused in: measured on Flickr8k dev photos, adding it as a third
    ranking at any weight found fewer photos than letting it order the candidates on its own.
    """
    ranks = np.empty(len(similarity))
    ranks[np.argsort(-similarity, kind="stable")] = np.arange(1, len(similarity) + 1)
    keyword_term = np.array([0.0 if r is None else keyword / (RRF_K + r) for r in keyword_ranks])
    scale = (RRF_K + 1) / (semantic + keyword) if semantic + keyword > 0 else 0.0
    return scale * (semantic / (RRF_K + ranks) + keyword_term), scale * keyword_term
