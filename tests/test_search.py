"""Photo index and search: incremental indexing with the tiny model, ranking on captions we choose."""

import copy
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import inference
from captioner.cli import main
from captioner.errors import SearchIndexError
from captioner.generation import GenerationOptions
from captioner.search import SCHEMA_VERSION, PhotoIndex, attach_embedding, attach_model, fuse

FIXTURES = Path(__file__).parent / "fixtures" / "images"
CAPTIONS = {  # photo -> its n-best captions, best first
    "red_circle": ["a red circle on a white background", "a red ball", "one red circle"],
    "red_square": ["a red square on a white background", "a red box", "one red square"],
    "blue_circle": ["a blue circle on a white background", "a blue ball", "one blue circle"],
    "dog": ["a dog running in the snow", "a brown dog in the snow", "a dog playing"],
    "shop": ["a shop front with a sign", "a store on a street", "a shop sign reading kowalski"],
    "swapped": ["a green square", "a green box", "one green square"],
}


@pytest.fixture(scope="module")
def captioner(tiny_model):
    from captioner.model import Captioner

    return Captioner.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """An index of photos with known captions, stored directly: ranking tests need no captioning model."""
    root = tmp_path_factory.mktemp("stored")
    folder = root / "photos"
    folder.mkdir()
    with PhotoIndex(root / "photos.sqlite", create=True) as index:
        for name, texts in CAPTIONS.items():
            path = folder / f"{name}.jpg"
            path.write_bytes(b"not read by search")
            result = {
                "caption": texts[0],
                "score": -1.0,
                "captions": [{"caption": t, "score": -1.0} for t in texts],
            }
            index._store(str(path), 18, 1.0, result, root=str(folder))
    return root / "photos.sqlite"


def test_update_captions_only_new_or_changed_photos(captioner, tiny_data, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    shutil.copytree(tiny_data / "images", folder)
    captioned = []
    real = inference.caption_files
    monkeypatch.setattr(
        inference,
        "caption_files",
        lambda m, paths, *a, **o: captioned.extend(paths) or real(m, paths, *a, **o),
    )
    index = PhotoIndex(tmp_path / "photos.sqlite", create=True)

    def update() -> dict:
        captioned.clear()
        options = GenerationOptions(beam_size=3, n_best=3)
        counts = index.update(folder, captioner, options, batch_size=64, progress=False)
        return {k: v for k, v in counts.items() if v and k != "errors"}

    assert update() == {"added": 32} and len(captioned) == 32 and len(index) == 32
    row = index.lookup(str(folder / "red_circle_0.jpg"))
    assert row["caption"] and row["caption"] == row["captions"][0]["caption"] and row["error"] is None
    assert 1 <= len(row["captions"]) <= 3 and row["size"] == (folder / "red_circle_0.jpg").stat().st_size

    assert update() == {"unchanged": 32} and captioned == []  # the captioner is not even called

    touched = folder / "blue_square_1.jpg"
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 5))
    assert update() == {"updated": 1, "unchanged": 31} and captioned == [touched]

    (folder / "green_circle_2.jpg").unlink()
    assert update() == {"unchanged": 31, "removed": 1} and captioned == []
    assert index.lookup(str(folder / "green_circle_2.jpg")) is None and len(index) == 31

    with index._conn:  # a database captioned by another model refuses to mix in this one's captions
        index._conn.execute("UPDATE meta SET value = 'another model' WHERE key = 'model'")
    with pytest.raises(ValueError, match="captioned by another model"):
        update()
    index.close()


def test_index_command_records_failures(tiny_model, tiny_data, tmp_path, capsys):
    folder, db = tmp_path / "photos", tmp_path / "photos.sqlite"
    folder.mkdir()
    for name in ("red_circle_0.jpg", "blue_square_1.jpg", "yellow_circle_2.jpg"):
        shutil.copy(tiny_data / "images" / name, folder / name)
    shutil.copy(FIXTURES / "truncated.jpg", folder / "truncated.jpg")
    (folder / "link.jpg").symlink_to(tiny_data / "images" / "green_square_0.jpg")  # a photo outside DIR
    index = ["index", folder, "--db", db, "--model", tiny_model, "--batch-size", "2"]

    assert main(list(map(str, index))) == 1
    out, err = capsys.readouterr()
    assert "3 added, 0 updated, 0 unchanged, 2 failed, 0 removed" in out and "3 photos searchable" in out
    errors = [line for line in err.splitlines() if line.startswith("captioner: error: ")]  # not progress bars
    assert len(errors) == 2
    assert any("truncated.jpg" in e for e in errors)
    assert any("link.jpg" in e and "outside" in e for e in errors)
    with PhotoIndex(db) as photos:
        broken = photos.lookup(str(folder / "truncated.jpg"))
        assert broken["caption"] is None and "truncated" in broken["error"]
        assert photos.lookup(str(folder / "link.jpg")) is None  # recorded, but never served

    assert main(list(map(str, index))) == 1  # still broken: reported again, not re-tried
    out, err = capsys.readouterr()
    assert "0 added, 0 updated, 3 unchanged, 2 failed" in out and err.count("captioner: error: ") == 2

    shutil.copy(tiny_data / "images" / "green_square_1.jpg", folder / "truncated.jpg")  # fixed
    (folder / "link.jpg").unlink()
    assert main(list(map(str, index))) == 0
    out, err = capsys.readouterr()
    assert "0 added, 1 updated, 3 unchanged, 0 failed, 1 removed" in out and "error" not in err


def test_fusion_lets_a_keyword_match_overtake():
    similarity = np.array([0.9, 0.8, 0.1])
    score, keyword = fuse(similarity, [None, 1, None])
    assert list(np.argsort(-score)) == [1, 0, 2]  # second by meaning, but the only keyword match
    assert keyword[0] == keyword[2] == 0 and keyword[1] > 0
    top, _ = fuse(np.array([0.5, 0.1]), [1, None])
    assert top[0] == pytest.approx(1.0)  # first in both rankings


def test_blend_keeps_the_embeddings_order_unless_a_near_tie():
    from captioner.search.fusion import blend

    joint = np.array([0.60, 0.50, 0.59])
    captions = np.array([0.2, 0.9, 0.2])  # the captions prefer photo 1 by far ...
    score, keyword = blend(joint, captions, [None, None, None])
    assert list(np.argsort(-score)) == [1, 0, 2]  # ... which weighs 0.15 of them: 0.635 > 0.63
    score, _ = blend(joint, np.zeros(3), [None, None, 1])
    assert list(np.argsort(-score)) == [2, 0, 1] and keyword.sum() == 0  # a keyword match breaks a near-tie
    score, _ = blend(np.array([0.6, 0.4]), np.zeros(2), [None, 1])
    assert list(np.argsort(-score)) == [0, 1]  # but does not overturn a clear lead
    alone, _ = blend(joint, captions, [1, None, None], semantic=0.0, keyword=0.0)
    assert np.array_equal(alone, joint)


def test_search_ranks_by_meaning_and_keywords(stored):
    with PhotoIndex(stored) as index:
        hits = index.search("a red circle", top_k=3)
        assert [Path(h.path).stem for h in hits[:2]] == ["red_circle", "red_square"]
        assert hits[0].caption == CAPTIONS["red_circle"][0] and hits[0].semantic > 0.8
        assert hits[0].score > hits[1].score > hits[2].score and len(hits) == 3

        # only an alternative (not the best) caption has the name; the keyword signal adds to its score
        hits = index.search("kowalski", top_k=10)
        assert Path(hits[0].path).stem == "shop" and hits[0].keyword > 0
        assert all(h.keyword == 0 for h in hits[1:]) and len(hits) == len(CAPTIONS)
        assert hits[0].score == pytest.approx(1.0)  # first in both rankings

        assert Path(index.search("a puppy in winter", 1)[0].path).stem == "dog"  # meaning, no shared word
        assert Path(index.search('dog" OR * NEAR(', 1)[0].path).stem == "dog"  # never parsed as FTS5 syntax
        assert index.search("the a of", 2)[0].keyword == 0 and index.search("dog", 0) == []


def test_the_labels_are_searchable_words(tmp_path):
    """A photo whose caption is wrong is found by what its encoder saw, and only labels >= 0.1 count."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = {
        "food": (
            "a dog is running in the grass",
            [{"label": "pizza", "p": 0.62}, {"label": "plate", "p": 0.05}],
        ),
        "street": ("a man is riding a bike", [{"label": "bicycle", "p": 0.4}]),
    }
    with PhotoIndex(tmp_path / "photos.sqlite", create=True) as index:
        for name, (caption, labels) in rows.items():
            result = {"caption": caption, "score": -1.0, "captions": [{"caption": caption, "score": -1.0}]}
            index._store(str(folder / f"{name}.jpg"), 1, 1.0, result | {"labels": labels}, root=str(folder))
        hits = index._rank("a pizza on a table", 2, semantic=0.0, keyword=1.0, rerank=False)
        assert [Path(h.path).stem for h in hits] == ["food"]
        assert (
            index._rank("a pizza on a table", 2, semantic=0.0, keyword=1.0, rerank=False, labels=False) == []
        )
        assert index._rank("a plate", 2, semantic=0.0, keyword=1.0, rerank=False) == []  # 0.05: noise
        assert Path(index.search("a pizza", 1)[0].path).stem == "food"  # and in the default ranking
        stored = json.loads(
            index._conn.execute("SELECT labels FROM photos WHERE path LIKE '%food.jpg'").fetchone()[0]
        )
        assert stored == rows["food"][1]


def test_lookup_serves_only_indexed_paths(stored, tmp_path):
    folder = stored.parent / "photos"
    secret = tmp_path / "secret.jpg"
    secret.write_text("not a photo")
    with PhotoIndex(stored) as index:
        assert index.lookup(str(folder / "dog.jpg"))["caption"] == CAPTIONS["dog"][0]
        assert index.lookup(folder / "dog.jpg") is not None
        for path in (
            secret,
            folder / "missing.jpg",
            folder / ".." / "photos" / "dog.jpg",
            f"{folder}/../photos.sqlite",
            "photos/dog.jpg",
        ):
            assert index.lookup(str(path)) is None, path
        (folder / "link.jpg").symlink_to(secret)  # a link someone put there: not indexed
        assert index.lookup(str(folder / "link.jpg")) is None
        (folder / "swapped.jpg").unlink()
        (folder / "swapped.jpg").symlink_to(secret)  # an indexed photo replaced by a link to outside
        assert index.lookup(str(folder / "swapped.jpg")) is None


def test_search_command_formats(stored, capsys):
    assert main(["search", "a red circle", "--db", str(stored), "--top", "2"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(rank, Path(path).stem) for rank, _, path, _ in lines] == [
        ("1", "red_circle"),
        ("2", "red_square"),
    ]
    assert lines[0][3] == CAPTIONS["red_circle"][0] and float(lines[0][1]) > float(lines[1][1])

    assert main(["search", "a dog", "--db", str(stored), "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 5 and [r["rank"] for r in records] == [1, 2, 3, 4, 5]
    fields = {
        "query",
        "rank",
        "path",
        "caption",
        "score",
        "semantic",
        "keyword",
        "likelihood",
        "joint",
        "match",
    }
    assert set(records[0]) == fields and records[0]["query"] == "a dog"
    assert Path(records[0]["path"]).stem == "dog" and records[0]["keyword"] > 0


def test_a_query_no_photo_answers_is_said_to_have_no_good_match(stored, capsys):
    with PhotoIndex(stored) as index:
        assert index.search("a dog running in the snow", 1)[0].match is True
        nearest = index.search("a plate of spaghetti with meatballs", 3)
        assert len(nearest) == 3 and not any(h.match for h in nearest)  # still shown: the nearest photos
    assert main(["search", "a plate of spaghetti with meatballs", "a red ball", "--db", str(stored)]) == 0
    out, err = capsys.readouterr()
    assert err.count("no good match") == 1 and "'a plate of spaghetti with meatballs'" in err
    assert "# a red ball" in out


def test_good_match_thresholds_the_match_score():
    from captioner.search.fusion import GOOD_MATCH, GOOD_MATCH_CAPTIONS, good_match, match_score

    assert match_score(0.6, 0.2) == pytest.approx(0.4) and match_score(0.6, None) == 0.6
    assert good_match(GOOD_MATCH_CAPTIONS, None) and not good_match(GOOD_MATCH_CAPTIONS - 0.01, None)
    assert good_match(GOOD_MATCH + 0.1, GOOD_MATCH - 0.1) and not good_match(GOOD_MATCH, GOOD_MATCH - 0.02)


def test_many_queries_in_one_start_up_match_one_at_a_time(stored, capsys, monkeypatch):
    queries = ["a red circle", "a dog", "a blue square"]
    alone = []
    for query in queries:
        assert main(["search", query, "--db", str(stored), "--top", "3"]) == 0
        alone.append(capsys.readouterr().out.splitlines())
    assert main(["search", *queries, "--db", str(stored), "--top", "3"]) == 0
    together = capsys.readouterr().out.splitlines()
    assert together == [line for q, lines in zip(queries, alone, strict=True) for line in [f"# {q}", *lines]]

    monkeypatch.setattr("sys.stdin", io.StringIO("a red circle\n\n  a dog  \n"))
    assert main(["search", "-", "--db", str(stored), "--top", "3", "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in records] == ["a red circle"] * 3 + ["a dog"] * 3  # blank lines skipped
    assert [r["path"] for r in records[3:]] == [line.split("\t")[2] for line in alone[1]]


def test_missing_empty_or_foreign_db_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere.sqlite"
    with pytest.raises(FileNotFoundError, match="nowhere.sqlite"):
        PhotoIndex(missing)
    assert not missing.exists()
    PhotoIndex(tmp_path / "empty.sqlite", create=True).close()
    (tmp_path / "notes.sqlite").write_text("not a database at all")
    for name, message in [
        ("nowhere", "no such photo index"),
        ("empty", "no captioned photos"),
        ("notes", "not a"),
    ]:
        assert main(["search", "a dog", "--db", str(tmp_path / f"{name}.sqlite")]) == 1
        err = capsys.readouterr().err
        assert f"{name}.sqlite" in err and message in err


def test_database_layout(stored):
    conn = sqlite3.connect(stored)
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == str(SCHEMA_VERSION) and "MiniLM" in meta["embedder"]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for (blob,) in conn.execute("SELECT embedding FROM photos"):
        vector = np.frombuffer(blob, dtype="<f4")
        assert vector.shape == (384,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert conn.execute(
        "SELECT count(*) FROM captions_fts WHERE captions_fts MATCH 'kowalski'"
    ).fetchone() == (1,)
    conn.close()


def test_the_captioner_reranks_by_the_likelihood_of_the_query(captioner, tiny_model, tiny_data, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(tiny_data / "images", folder)
    with PhotoIndex(tmp_path / "photos.sqlite", create=True) as index:
        index.update(folder, captioner, progress=False, model_name=str(tiny_model))
        assert index.has_features()
        assert all(h.likelihood is None for h in index.search("a blue square", 5, rerank=True))  # unattached
        assert index.attach(captioner)
        query = "a blue square on a white background"
        # every photo is a candidate here (fewer than RERANK); first_stage=0: the likelihood alone orders
        hits = index._rank(query, 40, rerank=True, first_stage=0.0)
        assert len(hits) == len(index) == 32
        values = [h.likelihood for h in hits]
        assert all(v is not None and v < 0 for v in values) and values == sorted(values, reverse=True)
        assert [h.score for h in hits] == pytest.approx(np.exp(values).tolist())
        assert {Path(h.path).stem.rsplit("_", 1)[0] for h in hits[:4]} == {"blue_square"}, values[:6]
        # by default that order is fused with the first stage's: the same photos, each with its likelihood
        fused = index.search(query, 40, rerank=True)
        assert sorted(h.path for h in fused) == sorted(h.path for h in hits)
        assert all(h.likelihood is not None for h in fused) and _kind(fused[0].path) == "blue_square"
        captions_only = index._rank(query, 40, rerank=False)
        assert all(h.likelihood is None for h in captions_only) and len(captions_only) == 32

        other = copy.deepcopy(captioner)
        with torch.no_grad():
            other.decoder.fc.bias.add_(0.1)  # another model: its features or likelihoods would not fit
        assert not index.attach(other)
        assert all(h.likelihood is None for h in index.search(query, 3, rerank=True))

    with PhotoIndex(tmp_path / "photos.sqlite") as index:  # the index finds its own model by name
        assert index.model_name() == str(tiny_model)
        assert (
            attach_model(index, loaded=other)
            and index.search(query, 1, rerank=True)[0].likelihood is not None
        )


def test_a_small_index_re_encodes_the_candidates_it_re_ranks(captioner, tiny_data, tmp_path):
    """By default only the pooled features are stored: re-ranking encodes each candidate's grid from its
    file (the same likelihoods as an index that kept the grids), and skips a photo whose file is gone."""
    folder = tmp_path / "photos"
    shutil.copytree(tiny_data / "images", folder)
    query = "a blue square on a white background"
    likelihoods = {}
    for keep in (False, True):
        with PhotoIndex(tmp_path / f"keep{keep}.sqlite", create=True) as index:
            index.update(folder, captioner, progress=False, keep_grid=keep)
            sizes = {n for (n,) in index._conn.execute("SELECT length(features) FROM photos")}
            dim = captioner.encoder.feature_dim
            cells = captioner.encoder.preprocess.size // 32  # the grid's side
            assert sizes == {2 * dim * (1 + cells * cells if keep else 1)}  # float16: pooled (+ grid)
            assert index.attach(captioner)
            hits = index._rank(query, 40, rerank=True, first_stage=0.0)
            likelihoods[keep] = {h.path: h.likelihood for h in hits}
    assert likelihoods[False].keys() == likelihoods[True].keys() and len(likelihoods[False]) == 32
    for path, value in likelihoods[True].items():
        assert likelihoods[False][path] == pytest.approx(value, abs=1e-3)

    gone = sorted(likelihoods[False])[0]
    Path(gone).unlink()
    with PhotoIndex(tmp_path / "keepFalse.sqlite") as index:
        assert index.attach(captioner)
        hits = index._rank(query, 40, rerank=True, first_stage=0.0)
        assert len(hits) == 32 and [h.path for h in hits if h.likelihood is None] == [gone]
        # an index made with keep_grid keeps them on every later update
        assert PhotoIndex(tmp_path / "keepTrue.sqlite")._meta("keep_grid") == "1"


def _kind(path: str) -> str:
    return Path(path).stem.rsplit("_", 1)[0]  # red_circle_3.jpg -> red_circle


def test_the_search_embedding_embeds_ranks_and_finds_similar_photos(
    tiny_model, tiny_embedding, tiny_data, tmp_path, capsys
):
    from captioner.model import Captioner

    folder, db = tmp_path / "photos", tmp_path / "photos.sqlite"
    shutil.copytree(tiny_data / "images", folder)
    index_args = ["index", str(folder), "--db", str(db), "--model", str(tiny_model)]
    assert main([*index_args, "--embedding", str(tiny_embedding)]) == 0
    capsys.readouterr()
    with PhotoIndex(db) as index:
        assert index.embedding_name() == str(tiny_embedding.resolve())
        photos = index._photos()[4]
        assert photos.shape == (32, 32) and np.allclose(np.linalg.norm(photos, axis=1), 1.0, atol=1e-2)
        assert all(h.joint is None for h in index.search("a red circle", 3))  # not attached yet
        assert attach_embedding(index) and index.embedding is not None
        # the embedding alone (no captions, no keywords, no re-ranking) finds the shapes it was trained on
        hits = index._rank("a red circle", 4, semantic=0, keyword=0, rerank=False)
        assert [h.joint for h in hits] == sorted([h.joint for h in hits], reverse=True)
        assert _kind(hits[0].path) == "red_circle", [(h.path, h.joint) for h in hits]
        assert all(h.joint is not None for h in index.search("a red circle", 3))

        red = str(folder / "red_circle_0.jpg")
        alike = index.similar(red, 3)
        assert len(alike) == 3 and red not in [h.path for h in alike]
        assert [h.score for h in alike] == sorted([h.score for h in alike], reverse=True)
        assert {_kind(h.path) for h in alike[:1]} == {"red_circle"}, alike
        with pytest.raises(KeyError, match="not a photo in the index"):
            index.similar(str(folder / "missing.jpg"))

    # by photo from the command line: the photo itself is not a result, the rest are ranked alike
    assert main(["search", "--image", red, "--db", str(db), "--top", "3"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [p for _, _, p, _ in lines] == [h.path for h in alike]
    with pytest.raises(SystemExit, match="one of them"):
        main(["search", "red", "--image", red, "--db", str(db)])

    # a re-index keeps the embedding the index was made with; another one re-embeds the stored features
    assert main(index_args) == 0 and "32 unchanged" in capsys.readouterr().out
    assert main([*index_args, "--embedding", "none"]) == 0
    assert "-> none (0 photos embedded)" in capsys.readouterr().out
    with PhotoIndex(db) as index:
        assert index.embedding_name() is None and index._photos()[4] is None
    assert main([*index_args, "--embedding", str(tiny_embedding)]) == 0
    assert "-> " + str(tiny_embedding.resolve()) + " (32 photos embedded)" in capsys.readouterr().out
    with PhotoIndex(db) as index:
        assert np.allclose(index._photos()[4], photos, atol=1e-3)  # the same vectors as when captioning
        with index._conn:  # a mixed index is refused, whatever the caller asks
            index._conn.execute("UPDATE meta SET value = 'other' WHERE key = 'joint'")
        with pytest.raises(SearchIndexError, match="made with other"):
            index.update(folder, Captioner.from_pretrained(tiny_model), progress=False, joint=None)


def test_the_bundled_embedding_is_used_only_for_its_own_encoder(tiny_model, tiny_data, tmp_path, capsys):
    folder, db = tmp_path / "photos", tmp_path / "photos.sqlite"
    folder.mkdir()
    shutil.copy(tiny_data / "images" / "red_circle_0.jpg", folder)
    # the tiny model reads EfficientNet-Lite0 features, the bundled embedding Lite2's
    assert main(["index", str(folder), "--db", str(db), "--model", str(tiny_model)]) == 0
    assert "does not read efficientnet_lite0" in capsys.readouterr().err
    with PhotoIndex(db) as index:
        assert index.embedding_name() is None and index._photos()[4] is None
        assert index.similar(str(folder / "red_circle_0.jpg")) == []
        with pytest.raises(SearchIndexError, match="without a search embedding"):
            from captioner.search.commands import image_vector

            image_vector(index, str(folder / "red_circle_0.jpg"))


def test_the_sentence_model_in_onnxruntime_embeds_as_sentence_transformers_does(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from captioner.search import embedder

    texts = ["a dog runs through the grass", "A Kitchen, with a STOVE!", "word " * 400]  # 400: truncated
    want = embedder._sentence_transformers().encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    fast = embedder._fast()
    assert isinstance(fast, embedder.OrtMiniLM)
    np.testing.assert_allclose(fast.encode(texts), want, atol=1e-5)
    assert len(list((tmp_path / "encoders").glob("minilm-*"))) == 2  # the graph and its check vectors
    # a later process loads the cached graph, without sentence-transformers
    monkeypatch.setattr(embedder, "_sentence_transformers", lambda: pytest.fail("loaded the slow way"))
    np.testing.assert_allclose(embedder._fast().encode(texts), want, atol=1e-5)
    monkeypatch.setenv("CAPTIONER_TEXT_RUNTIME", "torch")
    assert embedder._fast() is None


def test_two_index_runs_on_one_new_database_share_it(tiny_model, tiny_data, tmp_path):
    import subprocess
    import sys

    folder, db = tmp_path / "photos", tmp_path / "photos.sqlite"
    folder.mkdir()
    names = sorted(p.name for p in (tiny_data / "images").glob("*.jpg"))[:6]
    for name in names:
        shutil.copy(tiny_data / "images" / name, folder / name)
    command = [
        sys.executable,
        "-m",
        "captioner.cli",
        "index",
        str(folder),
        "--db",
        str(db),
        "--model",
        str(tiny_model),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outs]
    added = [int(out.split(" added")[0].rsplit(" ", 1)[-1]) for out, _ in outs]
    assert sorted(added) == [0, 6]  # one captioned them all, the other waited and found nothing to do
    with PhotoIndex(db) as photos:
        assert len(photos) == 6


def test_a_database_whose_creation_was_killed_before_its_metadata_is_usable(tmp_path):
    db = tmp_path / "photos.sqlite"
    with sqlite3.connect(db) as c:  # the tables, and no metadata: where a kill could leave older versions
        c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    with PhotoIndex(db, create=True) as photos:
        assert len(photos) == 0 and photos._meta("schema_version") == str(SCHEMA_VERSION)


def test_index_db_that_is_a_folder_is_one_line(tiny_model, tiny_data, tmp_path, capsys):
    assert main(["index", str(tiny_data / "images"), "--db", str(tmp_path), "--model", str(tiny_model)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"captioner: error: {tmp_path}: a folder; --db names the index file")
    assert "\n" not in err
