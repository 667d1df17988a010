"""Fusing the caption signals of a search: the sentence model's ranking and the keyword ranking."""

from __future__ import annotations

import numpy as np

RRF_K = 60  # reciprocal rank fusion's constant, as in Cormack et al. (2009)
KEYWORD_WEIGHT = 0.5  # of the keyword ranking against the semantic one (1.0): see fuse
# A hit whose match_score is below these is "no good match" (the search says so, and still shows it):
# chosen on Flickr8k dev and coco-mini by scripts/match_threshold.py (docs/experiments.md).
GOOD_MATCH = 0.441  # with a search embedding
GOOD_MATCH_CAPTIONS = 0.379  # for an index made without one


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """1 = highest score; ties keep their order."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return ranks


def fuse(
    similarity: np.ndarray,
    keyword_ranks: list[int | None],
    semantic: float = 1.0,
    keyword: float = KEYWORD_WEIGHT,
    joint_similarity: np.ndarray | None = None,
    joint: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted reciprocal rank fusion: a ranking gives a photo weight / (RRF_K + its rank); they add up.

    Ranks, not scores, because the scores are not comparable: cosine similarity sits in a narrow band that
    depends on the query, and bm25 is unbounded and depends on the collection, so a fixed weighting of the
    raw scores would be wrong for some queries. RRF needs no calibration, and a photo near the top of both
    lists beats one that tops only one. Every photo has a semantic rank (and a joint one, the search
    embedding's, when `joint_similarity` is given); only keyword matches get the keyword term. Keywords
    weigh half of the captions' meaning: on COCO-mini, with reference captions as the stored captions and
    the others as queries, equal weights lost 3-8 points of recall@1 against semantic alone, half weights
    1-4; yet a first keyword rank still lifts a photo past ~60 others. The joint weight is chosen on
    Flickr8k dev (index.JOINT_WEIGHT). Scaled so that 1.0 means first in all. Returns (score, keyword term).
    """
    keyword_term = np.array([0.0 if r is None else keyword / (RRF_K + r) for r in keyword_ranks])
    score = semantic / (RRF_K + ranks_of(similarity)) + keyword_term
    total = semantic + keyword
    if joint_similarity is not None and joint > 0:
        score = score + joint / (RRF_K + ranks_of(joint_similarity))
        total += joint
    scale = (RRF_K + 1) / total if total > 0 else 0.0
    return scale * score, scale * keyword_term


def match_score(semantic, joint):
    """How well a photo answers a query on a scale that, unlike the fused rank score, means the same for
    every query: the mean of the query's cosine similarity to the photo in the search embedding and to its
    captions in the sentence model's space; the captions' alone when there is no embedding (joint None)."""
    return semantic if joint is None else (semantic + joint) / 2


def good_match(semantic: float, joint: float | None) -> bool:
    return bool(match_score(semantic, joint) >= (GOOD_MATCH_CAPTIONS if joint is None else GOOD_MATCH))
