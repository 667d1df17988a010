"""Fusing a search's signals: the search embedding, the sentence model's match to the captions, keywords."""

from __future__ import annotations

import numpy as np

RRF_K = 60  # reciprocal rank fusion's constant, as in Cormack et al. (2009)
KEYWORD_WEIGHT = 0.5  # of the keyword ranking against the semantic one (1.0): see fuse
# With a search embedding (blend): what the captions' cosine and a keyword match add to the embedding's
# cosine, chosen on Flickr8k dev (5,000 queries) and coco-mini (400) (docs/experiments.md section 14).
CAPTIONS_BLEND = 0.15
KEYWORD_BLEND = 0.05
# A hit whose match_score is below these is "no good match" (the search says so, and still shows it):
# chosen on Flickr8k dev and coco-mini by scripts/match_threshold.py (docs/experiments.md).
GOOD_MATCH = 0.441  # with a search embedding
GOOD_MATCH_CAPTIONS = 0.379  # for an index made without one


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """1 = highest score; ties keep their order."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return ranks


def _keyword_term(keyword_ranks: list[int | None], weight: float) -> np.ndarray:
    """A keyword match's reciprocal rank term, weight / (RRF_K + rank); 0 for a photo without a match."""
    return np.array([0.0 if r is None else weight / (RRF_K + r) for r in keyword_ranks])


def fuse(
    similarity: np.ndarray,
    keyword_ranks: list[int | None],
    semantic: float = 1.0,
    keyword: float = KEYWORD_WEIGHT,
) -> tuple[np.ndarray, np.ndarray]:
    """The captions' signals of an index without a search embedding, by weighted reciprocal rank fusion:
    a ranking gives a photo weight / (RRF_K + its rank); they add up.

    Ranks, not scores, because the scores are not comparable: cosine similarity sits in a narrow band that
    depends on the query, and bm25 is unbounded and depends on the collection, so a fixed weighting of the
    raw scores would be wrong for some queries. RRF needs no calibration, and a photo near the top of both
    lists beats one that tops only one. Every photo has a semantic rank; only keyword matches get the
    keyword term. Keywords weigh half of the captions' meaning: on COCO-mini, with reference captions as
    the stored captions and the others as queries, equal weights lost 3-8 points of recall@1 against
    semantic alone, half weights 1-4; yet a first keyword rank still lifts a photo past ~60 others. Scaled
    so that 1.0 means first in all. Returns (score, keyword term).

    An index with a search embedding ranks by `blend` instead: fused with it by RRF (weight 8, as before),
    RRF's flat top (rank 1 and rank 2 1.6% apart at RRF_K 60) let the weaker caption signals reorder the
    embedding's best few (Flickr8k dev recall@1 21.8 against the embedding's own 24.8).
    """
    keyword_term = _keyword_term(keyword_ranks, keyword)
    score = semantic / (RRF_K + ranks_of(similarity)) + keyword_term
    total = semantic + keyword
    scale = (RRF_K + 1) / total if total > 0 else 0.0
    return scale * score, scale * keyword_term


def blend(
    joint_similarity: np.ndarray,
    similarity: np.ndarray,
    keyword_ranks: list[int | None],
    joint: float = 1.0,
    semantic: float = CAPTIONS_BLEND,
    keyword: float = KEYWORD_BLEND,
) -> tuple[np.ndarray, np.ndarray]:
    """The first stage of an index with a search embedding: the embedding's cosine, plus `semantic` x the
    query's cosine to the captions, plus `keyword` x a keyword match's reciprocal rank (1.0 for the first
    match, as in `fuse`). Scores, not ranks: the embedding was trained to put the right photo first by its
    cosine, and the captions' cosine is on the same scale (both are unit vectors' dot products); the two
    small weights let the captions and the labels' keywords break the embedding's near-ties, which out of
    domain (coco-mini) is where they add most. Returns (score, keyword term)."""
    keyword_term = (RRF_K + 1) * _keyword_term(keyword_ranks, keyword)
    return joint * joint_similarity + semantic * similarity + keyword_term, keyword_term


def match_score(semantic, joint):
    """How well a photo answers a query on a scale that, unlike the fused rank score, means the same for
    every query: the mean of the query's cosine similarity to the photo in the search embedding and to its
    captions in the sentence model's space; the captions' alone when there is no embedding (joint None)."""
    return semantic if joint is None else (semantic + joint) / 2


def good_match(semantic: float, joint: float | None) -> bool:
    return bool(match_score(semantic, joint) >= (GOOD_MATCH_CAPTIONS if joint is None else GOOD_MATCH))
