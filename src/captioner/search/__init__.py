"""Photo search: caption a folder once into SQLite, then find photos by describing them in a sentence.

`captioner index DIR` stores each photo's n-best captions, one sentence embedding of them, a full-text
(FTS5) entry, the encoder's features and the photo's vector in the search embedding (`joint.py`: photos
and sentences in one space, trained contrastively on Flickr8k); a re-run captions only new or changed
files. `captioner search "..."` ranks photos by signals that fail differently: the search embedding reads
the photo itself; the sentence model matches the query's meaning to the stored captions ("a puppy" finds
"a dog"); keywords catch exact and rare words. Search has two stages: the three rankings, fused by
`fusion.fuse` (the embedding weighs most), pick the best RERANK candidates out of any number of photos;
then the captioner that made the index scores each by how likely it finds the query as a caption of it,
P(query | photo), and that order is fused with the first stage's (benchmarks/search_recall.py; the
README's search section has the measured recall of each choice). `captioner search --image` and
`PhotoIndex.similar` find the photos nearest to a photo in the embedding's space.

    embedder.py     the sentence model (MiniLM from PyPI), loaded once
    joint.py        the search embedding: two small towers over encoder features and MiniLM vectors
    train_joint.py  training it (`captioner train`, train.task: search) on a feature cache
    evaluate.py     `captioner evaluate-search`: recall@k on the standard protocol
    fusion.py       reciprocal rank fusion of the rankings
    likelihood.py   P(query | photo) by one teacher-forced decoder pass over stored features
    index.py        PhotoIndex: the SQLite file, updating it from a folder, and the two-stage search
    commands.py     `captioner index` and `captioner search`
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
