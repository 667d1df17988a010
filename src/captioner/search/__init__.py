"""Photo search: caption a folder once into SQLite, then find photos by describing them in a sentence.

`captioner index DIR` stores each photo's n-best captions, one sentence embedding of them, a full-text
(FTS5) entry and the encoder's features; a re-run captions only new or changed files. `captioner search
"..."` ranks photos by signals that fail differently: the sentence model matches meaning ("a puppy" finds
"a dog") but blurs exact words; keywords catch exact and rare words but miss paraphrases; and both only
see what the few stored captions happen to say. So search has two stages: the caption signals, fused by
`fusion.fuse`, pick the best RERANK candidates out of any number of photos, and the captioner that
made the index orders those by how likely it finds the query as a caption of each photo,
P(query | photo), from the stored encoder features: that reads the photo, not a summary of it
(benchmarks/search_recall.py, recall@1 against the caption signals alone: 29.7% vs 23.3% on COCO-mini,
40.0% vs 26.0% on 200 Flickr8k dev photos).

    embedder.py    the sentence model (MiniLM from PyPI), loaded once
    fusion.py      reciprocal rank fusion of the semantic and keyword rankings
    likelihood.py  P(query | photo) by one teacher-forced decoder pass over stored features
    index.py       PhotoIndex: the SQLite file, updating it from a folder, and the two-stage search
    commands.py    `captioner index` and `captioner search`
"""

from captioner.search.commands import (
    SEARCH_EMBEDDING,
    SEARCH_MODEL,
    attach_embedding,
    attach_model,
    index_command,
    search_command,
)
from captioner.search.fusion import fuse
from captioner.search.index import RERANK, SCHEMA_VERSION, PhotoIndex, SearchHit

__all__ = [
    "RERANK",
    "SCHEMA_VERSION",
    "SEARCH_EMBEDDING",
    "SEARCH_MODEL",
    "PhotoIndex",
    "SearchHit",
    "attach_embedding",
    "attach_model",
    "fuse",
    "index_command",
    "search_command",
]
