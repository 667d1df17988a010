"""`captioner index` and `captioner search`."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from captioner.errors import CaptionerError, SearchIndexError
from captioner.generation import GenerationOptions
from captioner.search.index import PhotoIndex

if TYPE_CHECKING:
    from captioner.model import Captioner

# The model `captioner index` captions with by default: the cross-entropy Flickr8k model, not the bundled
# default. Self-critical training pulls a model towards its own favourite captions, which blunts its
# P(query | photo): on Flickr8k dev photos (benchmarks/search_recall.py) the cross-entropy model finds the
# photo in the top 5 for 72.5% of queries, the self-critical one for 66.5%.
SEARCH_MODEL = "flickr8k-xe"


def index_command(args) -> int:
    """`captioner index`: one error line per failed photo on stderr, a summary on stdout; 1 if any failed."""
    from captioner.model import Captioner

    if not Path(args.folder).is_dir():  # before creating the database: a typo must not leave a file behind
        raise NotADirectoryError(f"{args.folder}: not a folder")
    name = args.model or SEARCH_MODEL
    name = str(Path(name).resolve()) if Path(name).is_dir() else name  # found again from anywhere
    captioner = Captioner.from_pretrained(name, device=getattr(args, "device", "cpu"))
    with PhotoIndex(args.db, create=True) as index:
        options = GenerationOptions(beam_size=args.beam_size, n_best=args.n_best)
        counts = index.update(args.folder, captioner, options, batch_size=args.batch_size, model_name=name)
        total = len(index)
    for message in counts["errors"]:
        print(f"captioner: error: {message}", file=sys.stderr)
    print(
        f"{args.db}: {counts['added']} added, {counts['updated']} updated, {counts['unchanged']} unchanged, "
        f"{counts['failed']} failed, {counts['removed']} removed (gone from {args.folder}); "
        f"{total} photos searchable"
    )
    return 1 if counts["failed"] else 0


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
        return index.attach(Captioner.from_pretrained(name))
    except (CaptionerError, OSError):
        return False


def search_command(args) -> int:
    """`captioner search`: one line (text) or JSON object (jsonl) per hit, best first."""
    try:
        index = PhotoIndex(args.db)
    except (FileNotFoundError, SearchIndexError) as e:
        print(f"captioner: error: {e}", file=sys.stderr)
        return 1
    with index:
        if not len(index):
            print(f"captioner: error: {args.db}: the index has no captioned photos yet", file=sys.stderr)
            return 1
        if index.has_features() and not attach_model(index, args.model):
            print(
                f"captioner: note: cannot load the model that made {args.db} (pass it with --model); "
                "ranking by the stored captions only",
                file=sys.stderr,
            )
        hits = index.search(args.query, args.top)
    for rank, hit in enumerate(hits, 1):
        if args.format == "jsonl":
            print(json.dumps({"rank": rank, **asdict(hit)}))
        else:
            print(f"{rank}\t{hit.score:.4f}\t{hit.path}\t{hit.caption}")
    return 0
