"""The photo index: one SQLite file of captions, their embedding, a full-text entry and encoder features.

`PhotoIndex.update` captions what is new or changed in a folder; `PhotoIndex.search` ranks photos in two
stages (see `captioner.search`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from captioner.checkpoint import weights_digest
from captioner.errors import CaptionerError, SearchIndexError
from captioner.generation import GenerationOptions
from captioner.search.embedder import EMBEDDER, embed
from captioner.search.fusion import (
    CAPTIONS_BLEND,
    KEYWORD_BLEND,
    KEYWORD_WEIGHT,
    RRF_K,
    blend,
    fuse,
    good_match,
)
from captioner.search.likelihood import query_log_likelihood

if TYPE_CHECKING:
    from captioner.model import Captioner
    from captioner.search.joint import JointEmbedding

SCHEMA_VERSION = 4  # 3: visual labels (a column and an FTS5 field); 4: the search embedding (joint)
LABEL_MIN_P = 0.1  # labels at least this probable are searchable words: below, mostly noise
# The second stage is opt-in (search --rerank): with the search embedding in the first stage it adds recall
# on Flickr8k dev but costs it on coco-mini, the out-of-domain dev set (the README's search table), and its
# decoder pass over 100 candidates takes longer than the whole first stage at 100,000 photos.
RERANK_BY_DEFAULT = False
FIRST_STAGE_WEIGHT = 1.0  # of the first stage's order in the second (0: P(query | photo) alone): on dev
RERANK = 100  # how many of the caption signals' best candidates the captioner re-ranks (at least top_k)
# The encoder's grid (82 x 1280 float16, 205 KB a photo) is what re-ranking and a new search embedding read,
# but the default search needs neither: the index keeps only the pooled features (2.5 KB) and re-encodes a
# candidate's grid from its file when asked, unless it was made with keep_grid (captioner index --keep-grid).
GRID_CACHE = 512  # re-encoded grids a PhotoIndex keeps in memory (float16: about 100 MB)
# Words nearly every caption has: in an OR query they would "match" every photo and add only noise.
STOPWORDS = frozenset("a an the of in on at to and or with is are it its this that by for from".split())
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,  -- absolute, as found under root
    root TEXT NOT NULL,         -- the folder it was indexed from: lookup() serves only files still inside it
    size INTEGER NOT NULL,      -- size and mtime unchanged = not captioned again
    mtime REAL NOT NULL,
    caption TEXT,               -- the best caption (NULL when error)
    captions TEXT,              -- JSON: the n best [{"caption", "score"}], best first
    labels TEXT,                -- JSON: the encoder's visual labels [{"label", "p"}] (captioner.labels)
    embedding BLOB,             -- float32, L2-normalised: see _store_many
    features BLOB,              -- float16: the encoder's pooled features (and its grid with keep_grid)
    joint BLOB,                 -- float16: the photo in the search embedding's space (search.joint)
    error TEXT                  -- why this photo has no caption
);
-- rowid = photos.id; porter stemming so "dogs running" matches "a dog runs"; a query matches either
-- the captions or the labels, so "a pizza on a table" finds the pizza that the caption got wrong
CREATE VIRTUAL TABLE IF NOT EXISTS captions_fts USING fts5(captions, labels, tokenize = 'porter unicode61');
"""


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (POSIX advisory locks; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"waiting for another `captioner index` of {lock_file.with_suffix('')} to finish",
                file=sys.stderr,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _statements(script: str) -> list[str]:
    """The SQL statements of a script, its comments removed (a comment may hold a ";")."""
    code = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    return [st.strip() for st in code.split(";") if st.strip()]


@dataclass
class SearchHit:
    path: str  # absolute path of the photo, as indexed
    caption: str  # its best caption
    # What the ranking used, higher is better: the query's per-word probability as this photo's caption
    # (exp(likelihood)) when the captioner re-ranked, else the first stage's: fusion.blend with a search
    # embedding, else fusion.fuse's fused caption signals (1.0 = first in both).
    score: float
    semantic: float  # cosine similarity of query and captions
    keyword: float  # FTS5 contribution (0 when no keyword matched)
    likelihood: float | None  # mean log-probability per word of the query as this photo's caption
    joint: float | None = None  # cosine similarity of query and photo in the search embedding, if any
    # whether it answers the query well (fusion.good_match); None where there is no query (similar photos)
    match: bool | None = None


def model_id(captioner: Captioner) -> str:
    """Architecture and a hash of the weights: two trainings of one config are different models."""
    decoder = captioner.decoder_config.name
    return f"{captioner.encoder.name} + {decoder} decoder, weights sha256:{weights_digest(captioner)[:16]}"


def joint_id(model: JointEmbedding) -> str:
    """A hash of the search embedding's weights: the index's photo vectors are only comparable with it."""
    return f"search embedding, weights sha256:{weights_digest(model)[:16]}"


def _inside(path: str, root: str) -> bool:
    """Whether `path`, links followed, is under the folder `root` (resolved when it was indexed)."""
    return Path(os.path.realpath(path)).is_relative_to(root)


class PhotoIndex:
    """Photos with their captions and embeddings in one SQLite file (WAL: searches run while indexing)."""

    def __init__(self, db: str | Path, *, create: bool = False):
        self.db = Path(db)
        if not create and not self.db.is_file():
            raise FileNotFoundError(
                f"{self.db}: no such photo index (make one: captioner index DIR --db {db})"
            )
        if self.db.is_dir():
            raise SearchIndexError(
                f"{self.db}: a folder; --db names the index file, e.g. {self.db / 'photos.sqlite'}"
            )
        if create:
            self.db.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # one connection, shared by a server's threads
        try:
            self._conn = sqlite3.connect(self.db, timeout=30, check_same_thread=False)
        except sqlite3.Error as e:  # e.g. a folder that cannot be written
            raise SearchIndexError(f"{self.db}: cannot open the index ({e})") from None
        self._cache: tuple | None = None
        self._grids: OrderedDict[int, np.ndarray] = OrderedDict()  # re-encoded grids (see GRID_CACHE)
        self._captioner: Captioner | None = None
        self._joint: JointEmbedding | None = None
        try:
            self._open(create)
        except BaseException:
            self._conn.close()
            raise

    def _open(self, create: bool) -> None:
        c = self._conn
        if "ENABLE_FTS5" not in {row[0] for row in c.execute("PRAGMA compile_options")}:
            raise CaptionerError(f"this Python's SQLite {sqlite3.sqlite_version} was built without FTS5")
        try:
            c.execute("PRAGMA journal_mode = WAL")
            exists = c.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
            # a creation killed before its metadata (older versions made the two steps apart): still new
            unfinished = exists and self._meta("schema_version") is None and self._count_photos() == 0
        except sqlite3.DatabaseError as e:
            raise SearchIndexError(f"{self.db}: not a photo index ({e})") from None
        if not exists or unfinished:
            if not create:
                raise SearchIndexError(f"{self.db}: not a photo index (no meta table)")
            # in one write transaction: a second `captioner index` on the same new file waits for this
            # one, then finds the index made (everything is IF NOT EXISTS / OR IGNORE)
            c.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(SCHEMA):
                    c.execute(statement)
                c.executemany(
                    "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                    [("schema_version", str(SCHEMA_VERSION)), ("embedder", EMBEDDER)],
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        version = self._meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise SearchIndexError(
                f"{self.db}: schema version {version}, not {SCHEMA_VERSION}; re-index into a new file"
            )

    def attach(self, captioner: Captioner) -> bool:
        """Let search re-rank with P(query | photo) by `captioner`, if it is the model that made the index
        (the stored features are its encoder's). Returns whether it is."""
        with self._lock:
            made_by = self._meta("model")
        self._captioner = captioner if made_by is not None and made_by == model_id(captioner) else None
        return self._captioner is not None

    def attach_embedding(self, model: JointEmbedding) -> bool:
        """Let search rank by the search embedding `model`, if it is the one that embedded the photos."""
        with self._lock:
            made_by = self._meta("joint")
        self._joint = model if made_by is not None and made_by == joint_id(model) else None
        return self._joint is not None

    def names(self, paths: list[str]) -> list[str]:
        """Each indexed path as its owner knows it: relative to the folder it was indexed from."""
        out = []
        with self._lock:
            for path in paths:
                row = self._conn.execute("SELECT root FROM photos WHERE path = ?", (path,)).fetchone()
                try:
                    out.append(str(Path(path).relative_to(row[0])) if row else path)
                except ValueError:
                    out.append(path)
        return out

    @property
    def embedding(self) -> JointEmbedding | None:
        """The attached search embedding, if any (see attach_embedding)."""
        return self._joint

    def embedding_id(self) -> str | None:
        """The weights digest (joint_id) of the search embedding the photos were embedded with, if any."""
        with self._lock:
            return self._meta("joint")

    def embedding_name(self) -> str | None:
        """The bundled name or folder of the search embedding the photos were embedded with, if any."""
        with self._lock:
            return self._meta("joint_name")

    def is_new(self) -> bool:
        """Whether no photo has been indexed yet (the index has not recorded its models)."""
        with self._lock:
            return self._meta("model") is None

    def model_name(self) -> str | None:
        """The bundled model name or checkpoint directory the index was made with, if it recorded one."""
        with self._lock:
            return self._meta("model_name")

    def has_features(self) -> bool:
        with self._lock:
            found = self._conn.execute("SELECT 1 FROM photos WHERE features IS NOT NULL LIMIT 1")
            return found.fetchone() is not None

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _count_photos(self) -> int:
        if not self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'photos'").fetchone():
            return 0
        return self._conn.execute("SELECT count(*) FROM photos").fetchone()[0]

    def update(self, folder: str | Path, captioner: Captioner, *args: Any, **kwargs: Any) -> dict:
        """`_update`, one run at a time: a second `captioner index` of the same database waits for the
        first, then captions only what the first left (torchrun's processes, which share the work by
        design, take no lock: their rank 0 has recorded the models before the others start)."""
        share = kwargs.get("share", (0, 1))
        if share[1] > 1:
            return self._update(folder, captioner, *args, **kwargs)
        with _exclusive(self.db.with_name(self.db.name + ".lock")):
            return self._update(folder, captioner, *args, **kwargs)

    def _update(
        self,
        folder: str | Path,
        captioner: Captioner,
        options: GenerationOptions | None = None,
        *,
        batch_size: int = 16,
        progress: bool = True,
        model_name: str | None = None,
        joint: JointEmbedding | None = None,
        joint_name: str | None = None,
        keep_grid: bool = False,
        share: tuple[int, int] = (0, 1),
        ready: Callable[[], None] | None = None,
    ) -> dict:
        """Caption what is new or changed under `folder` (size or mtime differ) and forget what is gone.

        Returns counts: added, updated, unchanged, removed, and failed: photos under `folder` left without
        a caption, by this run or by an earlier one (not retried until the file changes). `errors` holds
        one message per failed photo. A file that links outside `folder` is recorded as failed, unread.
        `joint`, a search embedding of the captioner's encoder, also embeds each photo; an index keeps the
        embedding (or none) it was made with. `keep_grid` stores each photo's encoder grid too (205 KB a
        photo instead of about 10 KB), so that re-ranking and re-embedding need not read the files again.
        `share` = (rank, world): this process captions only every world-th photo of the folder (torchrun's
        processes share one index; SQLite takes their writes in turn) and only rank 0 forgets what is
        gone; `ready` is called once the index has recorded its models (the other ranks wait for that).
        """
        from tqdm import tqdm

        from captioner import inference

        root = Path(folder).resolve()
        if not root.is_dir():
            raise NotADirectoryError(f"{folder}: not a folder")
        with self._lock:
            model, made_by = model_id(captioner), self._meta("model")
            embedding = joint_id(joint) if joint is not None else None
            if joint is not None:
                joint.check_features(captioner.encoder.name, captioner.encoder.preprocess)
            refusal = None
            if made_by is None:  # a new index: it records its model, and the name to load it by
                with self._conn:
                    meta = [("model", model), ("model_name", model_name)]
                    meta += [("joint", embedding), ("joint_name", joint_name)]
                    meta += [("keep_grid", "1" if keep_grid else None)]
                    self._conn.executemany(
                        "INSERT INTO meta VALUES (?, ?)", [(k, v) for k, v in meta if v is not None]
                    )
            elif made_by != model:
                refusal = (
                    f"{self.db}: captioned by {made_by}, not {model}; index into a new --db so that "
                    "all captions come from one model"
                )
            elif self._meta("joint") != embedding:
                had = self._meta("joint") or "no search embedding"
                refusal = (
                    f"{self.db}: made with {had}, not {embedding or 'none'}; index into a new --db so "
                    "that every photo is embedded alike"
                )
            if ready is not None:
                ready()  # before refusing too: the other ranks then read the meta and refuse alike
            if refusal is not None:
                raise SearchIndexError(refusal)
            keep_grid = keep_grid or self._meta("keep_grid") == "1"  # as the index was made
            known = {
                p: (s, m, e)
                for p, s, m, e in self._conn.execute("SELECT path, size, mtime, error FROM photos")
            }
        counts = dict.fromkeys(("added", "updated", "unchanged", "failed", "removed"), 0)
        errors: list[str] = []
        seen: set[str] = set()
        todo: list[tuple[Path, os.stat_result, bool]] = []
        outside: list[tuple[Path, os.stat_result, bool]] = []
        rank, world = share
        for n, path in enumerate(inference.find_images([root])):
            seen.add(str(path))
            if n % world != rank:  # another process's photo
                continue
            try:
                old, stat = known.get(str(path)), path.stat()
            except OSError:  # gone since it was listed
                continue
            if old and old[:2] == (stat.st_size, stat.st_mtime):
                counts["failed" if old[2] else "unchanged"] += 1
                errors += [old[2]] if old[2] else []
            else:
                (todo if _inside(str(path), str(root)) else outside).append((path, stat, old is None))

        def record(done: list[tuple[Path, os.stat_result, bool, dict]]) -> None:
            rows = [(str(p), st.st_size, st.st_mtime, r, str(root)) for p, st, _, r in done]
            self._store_many(rows, joint, keep_grid)
            for _, _, new, result in done:
                if "error" in result:
                    counts["failed"] += 1
                    errors.append(result["error"])
                else:
                    counts["added" if new else "updated"] += 1

        record([(p, st, new, {"error": f"{p}: links to a file outside {root}"}) for p, st, new in outside])
        options = options or GenerationOptions(beam_size=3, n_best=3)
        paths = [p for p, _, _ in todo]
        results = (
            inference.caption_files(captioner, paths, options, batch_size=batch_size, keep_features=True)
            if todo
            else []
        )
        done = []
        for (path, stat, new), (_, result) in tqdm(
            zip(todo, results, strict=True),
            total=len(todo),
            disable=not (progress and todo),
            desc="captioning",
        ):
            done.append((path, stat, new, result))
            if len(done) == batch_size:  # commit as we go: an interrupted run keeps what it captioned
                record(done)
                done = []
        record(done)
        gone = [p for p in known if p not in seen and Path(p).is_relative_to(root)] if rank == 0 else []
        with self._lock, self._conn:
            for path in gone:
                self._delete(path)
        return {**counts, "removed": len(gone), "errors": errors}

    def _store(
        self,
        path: str,
        size: int,
        mtime: float,
        result: dict,
        root: str | None = None,
        joint: JointEmbedding | None = None,
    ) -> None:
        """Store one captioning result (or error) for `path`, replacing an earlier one."""
        self._store_many([(path, size, mtime, result, os.path.realpath(root or Path(path).parent))], joint)

    def _store_many(
        self,
        rows: list[tuple[str, int, float, dict, str]],
        joint: JointEmbedding | None = None,
        keep_grid: bool = False,
    ) -> None:
        # One embedding per photo: the mean of its n-best captions' embeddings, re-normalised. The n best of
        # a beam search are mostly paraphrases, so their mean is a centroid that damps one odd beam, keeps
        # search a single matrix product, and still leans towards words only an alternative has (the FTS
        # side indexes every alternative verbatim). Max-over-captions would let a weak beam win alone.
        nbest = [[] if "error" in r[3] else r[3].get("captions") or [r[3]] for r in rows]
        texts = [c["caption"] for captions in nbest for c in captions]
        vectors = iter(embed(texts) if texts else [])
        photos = iter(self._joint_vectors(joint, [r[3] for r in rows]) if joint is not None else [])
        with self._lock, self._conn:
            for (path, size, mtime, result, root), captions in zip(rows, nbest, strict=True):
                self._delete(path)
                embedding = None
                if captions:
                    mean = np.mean([next(vectors) for _ in captions], axis=0)
                    embedding = (mean / (np.linalg.norm(mean) or 1.0)).astype("<f4").tobytes()
                caption, nbest_json = result.get("caption"), json.dumps(captions) if captions else None
                labels = result.get("labels") or []
                features = joint_vector = None
                if result.get("features") is not None:
                    pooled, grid = (np.asarray(t, dtype="<f2").ravel() for t in result["features"])
                    features = (np.concatenate([pooled, grid]) if keep_grid else pooled).tobytes()
                    joint_vector = next(photos).astype("<f2").tobytes() if joint is not None else None
                rowid = self._conn.execute(
                    "INSERT INTO photos (path, root, size, mtime, caption, captions, labels, embedding, "
                    "features, joint, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        path,
                        root,
                        size,
                        mtime,
                        caption,
                        nbest_json,
                        json.dumps(labels) if captions else None,
                        embedding,
                        features,
                        joint_vector,
                        result.get("error"),
                    ),
                ).lastrowid
                if captions:
                    text = "\n".join(c["caption"] for c in captions)
                    words = "\n".join(x["label"] for x in labels if x["p"] >= LABEL_MIN_P)
                    self._conn.execute(
                        "INSERT INTO captions_fts (rowid, captions, labels) VALUES (?, ?, ?)",
                        (rowid, text, words),
                    )

    def reembed(
        self, captioner: Captioner, joint: JointEmbedding | None, joint_name: str | None, batch: int = 512
    ) -> int:
        """Embed every indexed photo again with the search embedding `joint` (None: drop the vectors), from
        the encoder features the index stores, so a new embedding needs no re-captioning. `captioner` is
        the model that made the index (its encoder made the features). Returns how many were embedded."""
        with self._lock:
            if self._meta("model") != model_id(captioner):
                raise SearchIndexError(f"{self.db}: not captioned by {model_id(captioner)}")
            if joint is not None:
                joint.check_features(captioner.encoder.name, captioner.encoder.preprocess)
            rows = self._conn.execute(
                "SELECT id, path, features FROM photos WHERE features IS NOT NULL"
            ).fetchall()
            vectors: list[tuple[bytes | None, int]] = []
            for start in range(0, len(rows), batch):
                chunk = rows[start : start + batch]
                if joint is None:
                    vectors += [(None, r[0]) for r in chunk]
                    continue
                dim = joint.config.feature_dim
                if joint.config.grid:  # a photo whose file is gone keeps no vector: search leaves it out
                    found = self._with_grid(captioner, chunk, cache=False)
                    chunk = [r for r in chunk if r[0] in found]
                    flat = [found[r[0]] for r in chunk]
                else:
                    flat = [np.frombuffer(r[2], dtype="<f2")[:dim].astype(np.float32) for r in chunk]
                if not flat:
                    continue
                pooled = np.stack([f[:dim] for f in flat]).astype(np.float32)
                grid = np.stack([f[dim:].reshape(-1, dim) for f in flat]) if joint.config.grid else None
                out = joint.images(pooled, None if grid is None else grid.astype(np.float32)).astype("<f2")
                vectors += [(v.tobytes(), r[0]) for v, r in zip(out, chunk, strict=True)]
            meta = {"joint": joint_id(joint) if joint is not None else None, "joint_name": joint_name}
            with self._conn:
                self._conn.execute("UPDATE photos SET joint = NULL")
                self._conn.executemany("UPDATE photos SET joint = ? WHERE id = ?", vectors)
                self._conn.execute("DELETE FROM meta WHERE key IN ('joint', 'joint_name')")
                self._conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [(k, v) for k, v in meta.items() if v is not None]
                )
            self._joint = None  # attach the new one to search with it
        return len(rows) if joint is not None else 0

    @staticmethod
    def _joint_vectors(joint: JointEmbedding, results: list[dict]) -> np.ndarray:
        """The search embedding's vectors of the results that carry encoder features, in order."""
        have = [r["features"] for r in results if r.get("features") is not None]
        if not have:
            return np.zeros((0, joint.config.embed_dim), np.float32)
        pooled = np.stack([np.asarray(p, dtype=np.float32).reshape(-1) for p, _ in have])
        grid = np.stack([np.asarray(g, dtype=np.float32) for _, g in have]) if joint.config.grid else None
        return joint.images(pooled, grid)

    def _delete(self, path: str) -> None:
        for (rowid,) in self._conn.execute("SELECT id FROM photos WHERE path = ?", (path,)).fetchall():
            self._conn.execute("DELETE FROM captions_fts WHERE rowid = ?", (rowid,))
            self._conn.execute("DELETE FROM photos WHERE id = ?", (rowid,))

    def search(self, query: str, top_k: int = 5, rerank: bool = False) -> list[SearchHit]:
        """The `top_k` photos best described by `query`, best first (see `captioner.search`); rerank adds
        the second stage, P(query | photo) by the attached captioner (slower: see RERANK_BY_DEFAULT)."""
        return self._rank(query, top_k, rerank=rerank)

    def _rank(
        self,
        query: str,
        top_k: int,
        *,
        joint: float = 1.0,
        semantic: float | None = None,
        keyword: float | None = None,
        rerank: bool = RERANK_BY_DEFAULT,
        labels: bool = True,
        first_stage: float = FIRST_STAGE_WEIGHT,
    ) -> list[SearchHit]:
        """`search` with other weights: 0 turns a signal off (keyword alone ranks only the matches),
        rerank=False leaves out the captioner's second stage, labels=False the labels' keywords;
        first_stage > 0 fuses the first stage's ranking into the second (0: P(query | photo) alone).
        With a search embedding (joint > 0) the first stage is fusion.blend, semantic and keyword its
        weights (default CAPTIONS_BLEND, KEYWORD_BLEND); without one, fusion.fuse's (1.0, KEYWORD_WEIGHT)."""
        with self._lock:
            ids, paths, captions, matrix, photos = self._photos()
            with_joint = self._joint is not None and photos is not None and joint > 0
            if semantic is None:
                semantic = CAPTIONS_BLEND if with_joint else 1.0
            if keyword is None:
                keyword = KEYWORD_BLEND if with_joint else KEYWORD_WEIGHT
            matches = self._keyword_ranks(query, labels) if keyword else {}
        if not ids or top_k <= 0:
            return []
        sentence = embed([query])
        similarity = matrix @ sentence[0]
        keyword_ranks = [matches.get(i) for i in ids]
        joint_similarity = None
        if with_joint:
            assert self._joint is not None and photos is not None
            joint_similarity = photos @ self._joint.texts(sentence, [query])[0]
            score, keyword_term = blend(joint_similarity, similarity, keyword_ranks, joint, semantic, keyword)
        else:
            score, keyword_term = fuse(similarity, keyword_ranks, semantic, keyword)
        ranked_by_all = semantic or (joint_similarity is not None)
        order = [i for i in range(len(ids)) if ranked_by_all or keyword_term[i] > 0]
        order.sort(key=lambda i: (-score[i], -similarity[i]))
        loglik: dict[int, float] = {}
        if self._captioner is not None and rerank:
            pool = order[: max(RERANK, top_k)]
            loglik = self._likelihoods(query, [ids[i] for i in pool])
            scored = sorted((i for i in pool if ids[i] in loglik), key=lambda i: -loglik[ids[i]])
            if first_stage > 0:  # reciprocal rank fusion of the two stages' orders of the candidates
                before = {i: r for r, i in enumerate(pool, 1)}
                fused = {
                    i: 1 / (RRF_K + r) + first_stage / (RRF_K + before[i]) for r, i in enumerate(scored, 1)
                }
                scored.sort(key=lambda i: -fused[i])
            order = scored + [i for i in order if ids[i] not in loglik]
        joints = [None] * len(ids) if joint_similarity is None else joint_similarity.tolist()
        return [
            SearchHit(
                paths[i],
                captions[i],
                float(np.exp(loglik[ids[i]])) if ids[i] in loglik else float(score[i]),
                float(similarity[i]),
                float(keyword_term[i]),
                loglik.get(ids[i]),
                joints[i],
                good_match(float(similarity[i]), joints[i]),
            )
            for i in order[:top_k]
        ]

    def similar(self, path: str, top_k: int = 5) -> list[SearchHit]:
        """The `top_k` indexed photos most like the indexed photo `path` (itself left out), by the search
        embedding; [] if the index has none. Raises KeyError if `path` is not an indexed photo."""
        with self._lock:
            row = self._conn.execute(
                "SELECT joint FROM photos WHERE path = ? AND error IS NULL", (str(path),)
            ).fetchone()
        if row is None:
            raise KeyError(f"{path}: not a photo in the index")
        if row[0] is None:
            return []
        return self.similar_to(np.frombuffer(row[0], dtype="<f2").astype(np.float32), top_k, exclude=path)

    def similar_to(self, vector: np.ndarray, top_k: int = 5, exclude: str | None = None) -> list[SearchHit]:
        """The `top_k` indexed photos nearest to a search-embedding photo vector, best first."""
        with self._lock:
            ids, paths, captions, _, photos = self._photos()
        if photos is None or top_k <= 0:
            return []
        cosine = photos @ vector.astype(np.float32)
        order = [i for i in np.argsort(-cosine, kind="stable") if paths[i] != exclude][:top_k]
        return [
            SearchHit(paths[i], captions[i], float(cosine[i]), 0.0, 0.0, None, float(cosine[i]))
            for i in order
        ]

    def _likelihoods(self, query: str, photo_ids: list[int]) -> dict[int, float]:
        """P(query | photo) (mean log-probability per word) for those of the photos with stored features
        (and, where only the pooled part is stored, a file that can still be read)."""
        assert self._captioner is not None
        with self._lock:
            marks = ",".join("?" * len(photo_ids))
            rows = self._conn.execute(
                f"SELECT id, path, features FROM photos WHERE features IS NOT NULL AND id IN ({marks})",
                photo_ids,
            ).fetchall()
        found = self._with_grid(self._captioner, rows)
        have = [photo for photo in photo_ids if photo in found]
        if not have:
            return {}
        values = query_log_likelihood(self._captioner, query, np.stack([found[p] for p in have]))
        return {photo: float(v) for photo, v in zip(have, values, strict=True)}

    def _with_grid(
        self, captioner: Captioner, rows: list[tuple[int, str, bytes]], cache: bool = True
    ) -> dict[int, np.ndarray]:
        """id -> float16 [pooled + grid] of each (id, path, features) row: the stored grid if the index kept
        it, else the photo's file encoded again (through the one image pipeline), remembered for the next
        query. A photo whose file can no longer be read is left out."""
        from captioner.images import load_batches

        dim = captioner.encoder.feature_dim
        out: dict[int, np.ndarray] = {}
        missing: list[tuple[int, str]] = []
        for photo, path, blob in rows:
            flat = np.frombuffer(blob, dtype="<f2")
            if len(flat) > dim:
                out[photo] = flat
            elif photo in self._grids:
                out[photo] = self._grids[photo]
                self._grids.move_to_end(photo)
            else:
                missing.append((photo, path))
        paths = [path for _, path in missing]
        for batch in load_batches(paths, captioner.encoder.preprocess, batch_size=16, num_workers=0):
            if batch.images is None:
                continue
            import torch

            with torch.inference_mode():
                pooled, grid = captioner.encoder(batch.images.to(captioner.device))
            both = torch.cat([pooled, grid.flatten(1)], dim=1).cpu().numpy().astype("<f2")  # as stored
            for row, flat in zip(batch.good, both, strict=True):
                photo = missing[row][0]
                out[photo] = flat
                if cache:
                    self._grids[photo] = flat
                    while len(self._grids) > GRID_CACHE:
                        self._grids.popitem(last=False)
        return out

    def _photos(self) -> tuple[list[int], list[str], list[str], np.ndarray, np.ndarray | None]:
        """Ids, paths, captions, the [N, D] caption embeddings and the [N, E] search-embedding vectors
        (None when the index has none), re-read only when the database has changed."""
        version = (self._conn.execute("PRAGMA data_version").fetchone()[0], self._conn.total_changes)
        if self._cache is None or self._cache[0] != version:
            rows = self._conn.execute(
                "SELECT id, path, caption, embedding, joint FROM photos WHERE error IS NULL ORDER BY id"
            ).fetchall()
            matrix = np.stack([np.frombuffer(r[3], dtype="<f4") for r in rows]) if rows else np.zeros((0, 1))
            photos = None
            known = [r[4] for r in rows if r[4] is not None]
            if known:  # a photo without a vector (its file was gone when re-embedded) is found by its words
                none = np.zeros(len(known[0]) // 2, "<f2").tobytes()
                photos = np.stack([np.frombuffer(r[4] or none, dtype="<f2") for r in rows]).astype(np.float32)
            ids, paths, captions = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
            self._cache = (version, ids, paths, captions, matrix, photos)
        return self._cache[1:]

    def _keyword_ranks(self, query: str, labels: bool = True) -> dict[int, int]:
        """FTS5 rank (1 = best bm25) of each photo whose n-best captions (or labels) contain any word of
        the query."""
        words = [w for w in re.findall(r"\w+", query.lower()) if w not in STOPWORDS]
        if not words:
            return {}
        match = " OR ".join(f'"{w}"' for w in words)  # quoted: the user's text is never FTS5 syntax
        if not labels:
            match = f"captions : ({match})"
        rows = self._conn.execute(
            "SELECT rowid FROM captions_fts WHERE captions_fts MATCH ? ORDER BY bm25(captions_fts)", (match,)
        )
        return {rowid: rank for rank, (rowid,) in enumerate(rows, 1)}

    def lookup(self, path: str) -> dict | None:
        """The stored row of exactly this indexed path, else None; also None if the file now resolves
        outside the folder it was indexed from (e.g. replaced by a link), so a server serves only photos."""
        if ".." in Path(path).parts:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT root, path, size, mtime, caption, captions, error FROM photos WHERE path = ?",
                (str(path),),
            ).fetchone()
        if row is None or not _inside(row[1], row[0]):
            return None
        found = dict(zip(("path", "size", "mtime", "caption", "captions", "error"), row[1:], strict=True))
        return {**found, "captions": json.loads(found["captions"] or "[]")}

    def __len__(self) -> int:
        """The number of searchable (captioned) photos."""
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM photos WHERE error IS NULL").fetchone()[0]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PhotoIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
