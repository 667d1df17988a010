"""`captioner index` and `captioner search`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from captioner.errors import CaptionerError, SearchIndexError
from captioner.generation import GenerationOptions
from captioner.search.index import PhotoIndex, joint_id

if TYPE_CHECKING:
    from captioner.model import Captioner
    from captioner.search.joint import JointEmbedding

# The model `captioner index` captions with by default: the cross-entropy Flickr8k model, not the bundled
# default. Self-critical training pulls a model towards its own favourite captions, which blunts its
# P(query | photo): on Flickr8k dev photos (benchmarks/search_recall.py) the cross-entropy model finds the
# photo in the top 5 for 72.5% of queries, the self-critical one for 66.5%.
SEARCH_MODEL = "flickr8k-xe"
# The search embedding `captioner index` embeds photos with by default, when it reads the captioner's
# encoder features (it does for flickr8k-xe): photos and sentences in one space, trained on Flickr8k.
SEARCH_EMBEDDING = "flickr8k-search"


def _resolved(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).is_dir() else name  # found again from anywhere


def choose_embedding(
    index: PhotoIndex, captioner: Captioner, requested: str | None
) -> tuple[JointEmbedding | None, str | None]:
    """The search embedding to index with, and its name: `requested` ("none" for none); else the one an
    existing index was made with; else the bundled one if it reads this captioner's features."""
    from captioner.search.joint import JointEmbedding

    new = index.is_new()  # read once: a second `captioner index` on the same new database may fill it
    if requested == "none" or (requested is None and not new and not index.embedding_name()):
        return None, None
    name = _resolved(requested or index.embedding_name() or SEARCH_EMBEDDING)
    model = JointEmbedding.from_pretrained(name)
    try:
        model.check_features(captioner.encoder.name, captioner.encoder.preprocess)
    except CaptionerError:
        if requested is not None or not new:
            raise
        print(
            f"captioner: note: the bundled search embedding does not read {captioner.encoder.name}'s "
            "features; indexing with captions only (train one: docs/training.md)",
            file=sys.stderr,
        )
        return None, None
    return model, name


def index_command(args) -> int:
    """`captioner index`: one error line per failed photo on stderr, a summary on stdout; 1 if any failed.
    Under torchrun the processes share the photos and the one index (rank 0 creates it and prints)."""
    from captioner import distributed
    from captioner.model import Captioner

    if not Path(args.folder).is_dir():  # before creating the database: a typo must not leave a file behind
        raise NotADirectoryError(f"{args.folder}: not a folder")
    d = distributed.setup()
    name = _resolved(args.model or SEARCH_MODEL)
    device = distributed.device(getattr(args, "device", "cpu"), d)
    captioner = Captioner.from_pretrained(name, device=str(device), runtime="torch")
    if not d.main:
        distributed.barrier(d)  # rank 0 creates the index and records its models first
    try:
        with PhotoIndex(args.db, create=True) as index:
            joint, joint_name = choose_embedding(index, captioner, getattr(args, "embedding", None))
            had = index.embedding_name()
            changed = index.embedding_id() != (joint_id(joint) if joint is not None else None)
            if d.main and not index.is_new() and changed:  # another embedding: re-embed what is there
                n = index.reembed(captioner, joint, joint_name)
                print(
                    f"{args.db}: search embedding {had or 'none'} -> {joint_name or 'none'} "
                    f"({n} photos embedded)"
                )
            options = GenerationOptions(beam_size=args.beam_size, n_best=args.n_best)
            counts = index.update(
                args.folder,
                captioner,
                options,
                batch_size=args.batch_size,
                model_name=name,
                joint=joint,
                joint_name=joint_name,
                keep_grid=getattr(args, "keep_grid", False),
                share=(d.rank, d.world),
                ready=(lambda: distributed.barrier(d)) if d.main and d.world > 1 else None,
            )
            for message in counts["errors"]:
                print(f"captioner: error: {message}", file=sys.stderr)
            every = distributed.gather({k: v for k, v in counts.items() if k != "errors"}, d)
            total = len(index)
    finally:
        distributed.cleanup(d)
    summed = {k: sum(c[k] for c in every) for k in every[0]}
    if d.main:
        print(
            f"{args.db}: {summed['added']} added, {summed['updated']} updated, {summed['unchanged']} "
            f"unchanged, {summed['failed']} failed, {summed['removed']} removed (gone from {args.folder}); "
            f"{total} photos searchable"
        )
    return 1 if summed["failed"] else 0


def attach_model(index: PhotoIndex, name: str | None = None, loaded: Captioner | None = None) -> bool:
    """Attach the model that made `index` for re-ranking: `loaded` if it is that model, else `name` or
    the name the index recorded. Returns whether a model is attached."""
    from captioner.model import Captioner

    if loaded is not None and index.attach(loaded):
        return True
    name = name or index.model_name()
    if name is None:
        return False
    try:
        return index.attach(Captioner.from_pretrained(name, runtime="torch"))
    except (CaptionerError, OSError):
        return False


def attach_embedding(index: PhotoIndex) -> bool:
    """Attach the search embedding `index` was made with, if it has one and it loads."""
    from captioner.search.joint import JointEmbedding

    name = index.embedding_name()
    if name is None:
        return False
    try:
        return index.attach_embedding(JointEmbedding.from_pretrained(name))
    except (CaptionerError, OSError):
        return False


def image_vector(index: PhotoIndex, image: str) -> np.ndarray:
    """`image` (any photo, indexed or not) in the search space of `index`'s attached embedding."""
    from captioner.search.evaluate import photo_features

    model = index.embedding
    if model is None:
        raise SearchIndexError(f"{index.db}: made without a search embedding, so it cannot search by photo")
    _, pooled, grid, errors = photo_features(model, [Path(image)], [image], None)
    if errors:
        raise SearchIndexError(next(iter(errors.values())))
    return model.images(pooled, grid if model.config.grid else None)[0]


def search_command(args) -> int:
    """`captioner search`: one line (text) or JSON object (jsonl) per hit, best first; with --image, the
    photos most like that one (by the search embedding) instead of a query's.

    Several queries (arguments, or one per line of standard input for ``-``) share one start-up: the
    index, the sentence model and the embedding load once, and each query's results print as soon as they
    are found, under a ``# query`` line in text form (each JSON object carries its query)."""
    try:
        index = PhotoIndex(args.db)
    except (FileNotFoundError, SearchIndexError) as e:
        print(f"captioner: error: {e}", file=sys.stderr)
        return 1
    with index:
        if not len(index):
            print(f"captioner: error: {args.db}: the index has no captioned photos yet", file=sys.stderr)
            return 1
        if index.embedding_name() and not attach_embedding(index):
            print(
                f"captioner: note: cannot load the search embedding {index.embedding_name()} that made "
                f"{args.db}; ranking without it",
                file=sys.stderr,
            )
        if args.image is not None:
            try:
                vector = image_vector(index, args.image)
            except SearchIndexError as e:
                print(f"captioner: error: {e}", file=sys.stderr)
                return 1
            same = os.path.realpath(args.image)  # the photo itself, if indexed, is not a result
            hits = [h for h in index.similar_to(vector, args.top + 1) if os.path.realpath(h.path) != same]
            _print_hits(hits[: args.top], args.format, query=None, header=False)
            return 0
        rerank = getattr(args, "rerank", False)
        if rerank and index.has_features() and not attach_model(index, args.model):
            print(
                f"captioner: note: cannot load the model that made {args.db} (pass it with --model); "
                "ranking by the stored captions only",
                file=sys.stderr,
            )
        queries = list(args.query)
        header = len(queries) > 1 or queries == ["-"]
        for query in _queries(queries):
            hits = index.search(query, args.top, rerank=rerank)
            if hits and not any(h.match for h in hits):
                note = f"captioner: note: no good match for {query!r}; the nearest photos follow"
                print(note, file=sys.stderr)
            _print_hits(hits, args.format, query=query, header=header)
    return 0


def _queries(args: list[str]) -> Iterator[str]:
    """The queries in order; ``-`` stands for the non-blank lines of standard input, read as they come."""
    for query in args:
        if query == "-":
            yield from (line.strip() for line in sys.stdin if line.strip())
        else:
            yield query


def _print_hits(hits: list, fmt: str, *, query: str | None, header: bool) -> None:
    if header and fmt == "text":
        print(f"# {query}")
    for rank, hit in enumerate(hits, 1):
        if fmt == "jsonl":
            asked = {"query": query} if query is not None else {}
            print(json.dumps({**asked, "rank": rank, **asdict(hit)}))
        else:
            print(f"{rank}\t{hit.score:.4f}\t{hit.path}\t{hit.caption}")
    sys.stdout.flush()  # a pipe reading results query by query sees them now
