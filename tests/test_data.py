"""Tests for captioner.data: every layout is built as a tiny data set in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from captioner.data import (
    DataError,
    Dataset,
    Example,
    default_split_file,
    detect_format,
    format_summary,
    load_dataset,
    save_split,
)
from captioner.vocab import percentile

try:
    from PIL import Image
except ImportError:  # readers only check that image files exist
    Image = None


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if Image is not None:
            Image.new("RGB", (4, 4), (200, 30, 30)).save(folder / name, format="JPEG")
        else:
            (folder / name).write_bytes(b"\xff")


def raises(match_file: str, line: int | None = None) -> AbstractContextManager:
    """pytest.raises(DataError) whose message must name the file (and the line)."""
    pattern = rf"{match_file}" + (rf", line {line}:" if line is not None else "")
    return pytest.raises(DataError, match=pattern)


def splits(dataset: Dataset) -> dict[str, set[str]]:
    return {name: {e.image.name for e in dataset.split(name)} for name in ("train", "val", "test")}


# --- Flickr8k, original layout ---------------------------------------------------------------------

TOKENS = (
    "a.jpg#0\tA dog, a cat and a ball .\n"
    "a.jpg#1\t  Two animals play .  \n"
    "b.jpg#0\tA bird .\n"
    "c.jpg#0\tA car .\n"
    "d.jpg#0\tA duck .\n"
)


@pytest.fixture
def flickr8k(tmp_path: Path) -> Path:
    images(tmp_path / "Flicker8k_Dataset", "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    write(tmp_path / "Flickr8k.token.txt", TOKENS)
    write(tmp_path / "Flickr_8k.trainImages.txt", "a.jpg\n")
    write(tmp_path / "Flickr_8k.devImages.txt", "b.jpg\n")
    write(tmp_path / "Flickr_8k.testImages.txt", "c.jpg")
    return tmp_path


def test_flickr8k_official_split(flickr8k: Path) -> None:
    ds = load_dataset(flickr8k)
    assert detect_format(flickr8k) == "flickr8k" and ds.format == "flickr8k"
    assert ds.split_source == "official split files"
    assert splits(ds) == {"train": {"a.jpg"}, "val": {"b.jpg"}, "test": {"c.jpg"}}
    assert ds.split("dev") == ds.split("val")
    a = ds.split("train")[0]
    assert a.image == flickr8k / "Flicker8k_Dataset" / "a.jpg" and a.image.is_absolute()
    assert a.captions == ("A dog, a cat and a ball .", "Two animals play .")
    # d.jpg is in no split file: kept out of examples, counted in the summary
    assert [e.image.name for e in ds.unassigned] == ["d.jpg"]
    summary = ds.summary()
    assert summary["images"] == 4 and summary["captions"] == 5
    assert summary["splits"] == {"train": 1, "val": 1, "test": 1, "unassigned": 1}


def test_flickr8k_bogus_key_dropped_other_missing_raises(flickr8k: Path) -> None:
    bogus = "".join(f"2258277193_586949ec62.jpg.1#{i}\tPeople wait .\n" for i in range(5))
    write(flickr8k / "Flickr8k.token.txt", TOKENS + bogus)
    ds = load_dataset(flickr8k)
    assert ds.missing == [] and any("known bogus key" in note for note in ds.notes)
    write(flickr8k / "Flickr8k.token.txt", TOKENS + bogus + "e.jpg#0\tAn eel .\n")
    with pytest.raises(
        DataError, match=r"Flickr8k.token.txt.*1 listed image\(s\) missing.*e\.jpg.*skip_missing=True"
    ):
        load_dataset(flickr8k)
    ds = load_dataset(flickr8k, skip_missing=True)
    assert ds.missing == [flickr8k / "Flicker8k_Dataset" / "e.jpg"]
    assert ds.summary()["missing"] == 1 and ds.summary()["missing_examples"] == ["Flicker8k_Dataset/e.jpg"]


def test_flickr8k_prefers_original_over_kaggle(flickr8k: Path) -> None:
    write(flickr8k / "captions.txt", "image,caption\na.jpg,Something else\n")
    ds = load_dataset(flickr8k)
    assert ds.format == "flickr8k" and ds.split("train")[0].captions[0] == "A dog, a cat and a ball ."
    assert any("captions.txt" in note for note in ds.notes)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("b.jpg#1 no tab here", "no tab"),
        ("b.jpg\tno hash", "missing '#'"),
        ("a.jpg#1\tduplicate id", "duplicate caption id 'a.jpg#1' \\(first on line 2\\)"),
        ("b.jpg#1\t   ", "empty caption"),
    ],
)
def test_flickr8k_token_errors(flickr8k: Path, line: str, message: str) -> None:
    write(flickr8k / "Flickr8k.token.txt", TOKENS + line + "\n")
    with pytest.raises(DataError, match=rf"Flickr8k.token.txt, line 6: .*{message}"):
        load_dataset(flickr8k)


def test_flickr8k_image_in_two_split_files(flickr8k: Path) -> None:
    write(flickr8k / "Flickr_8k.testImages.txt", "c.jpg\na.jpg\n")
    with raises("Flickr_8k.testImages.txt", 2):
        load_dataset(flickr8k)


# --- Flickr8k, Kaggle layout and seeded splits -----------------------------------------------------

KAGGLE = 'image,caption\na.jpg,"A dog, a cat, and a ball ."\na.jpg,Two animals .\nb.jpg,A bird .\n'


@pytest.fixture
def kaggle(tmp_path: Path) -> Path:
    names = [f"{i:02d}.jpg" for i in range(10)]
    images(tmp_path / "Images", "a.jpg", "b.jpg", *names)
    write(tmp_path / "captions.txt", KAGGLE + "".join(f"{n},Photo {n} .\n" for n in names))
    return tmp_path


def test_kaggle_seeded_split_made_in_memory_and_saved_on_request(kaggle: Path) -> None:
    before = sorted(p.name for p in kaggle.iterdir())
    ds = load_dataset(kaggle, seed=3)
    assert ds.format == "flickr8k-kaggle" and ds.split_source.startswith("seeded split (seed 3")
    assert sorted(p.name for p in kaggle.iterdir()) == before  # loading writes nothing into the data folder
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [10, 1, 1]
    a = next(e for e in ds.examples if e.image.name == "a.jpg")
    assert a.captions == ("A dog, a cat, and a ball .", "Two animals .")
    # saved explicitly (as `captioner data split` does), the file is read back, even with another seed
    saved_to = save_split(ds, default_split_file(ds.root))
    assert saved_to == kaggle / "captioner_split.json"
    saved = json.loads(saved_to.read_text())
    assert saved["seed"] == 3 and {n for s in ("train", "val", "test") for n in saved[s]} == {
        e.image.name for e in ds.examples
    }
    again = load_dataset(kaggle, seed=99)
    assert splits(again) == splits(ds) and any("seed 3" in note for note in again.notes)
    assert again.split_source == f"saved split ({saved_to})"


def test_seeded_split_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    for root in (first, second):
        images(root / "Images", *[f"{i}.jpg" for i in range(20)])
        write(root / "captions.txt", "image,caption\n" + "".join(f"{i}.jpg,Photo {i} .\n" for i in range(20)))
    assert splits(load_dataset(first, seed=7)) == splits(load_dataset(second, seed=7))
    assert [len(x) for x in splits(load_dataset(first)).values()] == [16, 2, 2]


def test_saved_split_with_new_and_removed_images(kaggle: Path, tmp_path: Path) -> None:
    first = load_dataset(kaggle)
    split_file = save_split(first, tmp_path / "run-split.json")  # e.g. a training run's OUT/split.json
    images(kaggle / "Images", "new.jpg")
    text = (kaggle / "captions.txt").read_text().replace("b.jpg,A bird .\n", "") + "new.jpg,A new photo .\n"
    write(kaggle / "captions.txt", text)
    ds = load_dataset(kaggle, split_file=split_file)
    assert "b.jpg" not in {e.image.name for e in ds.examples}
    assert "new.jpg" in splits(ds)["train"] and any("1 image(s) not in run-split.json" in n for n in ds.notes)
    kept = {s: names - {"new.jpg"} for s, names in splits(ds).items()}
    assert kept == {s: names - {"b.jpg"} for s, names in splits(first).items()}  # the test set stays


def test_a_read_only_data_folder_loads(kaggle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(Path, "write_text", refuse)
    monkeypatch.setattr(Path, "write_bytes", refuse)
    ds = load_dataset(kaggle)
    assert ds.split_source.startswith("seeded split") and len(ds.examples) == 12


def test_kaggle_uses_official_split_files(kaggle: Path) -> None:
    write(kaggle / "Flickr_8k.trainImages.txt", "a.jpg\n")
    write(kaggle / "Flickr_8k.devImages.txt", "b.jpg\n")
    write(kaggle / "Flickr_8k.testImages.txt", "00.jpg\n")
    ds = load_dataset(kaggle)
    assert ds.split_source == "official split files" and len(ds.unassigned) == 9
    assert splits(ds) == {"train": {"a.jpg"}, "val": {"b.jpg"}, "test": {"00.jpg"}}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("image,text\na.jpg,A dog .\n", 1),
        ("image,caption\na.jpg,A dog .\nb.jpg,A bird, unquoted .\n", 3),
        ("image,caption\na.jpg,A dog .\n\nb.jpg,  \n", 4),
    ],
)
def test_kaggle_errors(kaggle: Path, text: str, line: int) -> None:
    write(kaggle / "captions.txt", text)
    with raises("captions.txt", line):
        load_dataset(kaggle)


# --- Flickr30k -------------------------------------------------------------------------------------

RESULTS = """image_name| comment_number| comment
1.jpg| 0| A man rides a bike , fast .
1.jpg| 1| A cyclist .
2.jpg| 0| A dog .
2199200615.jpg| 4   A dog runs across the grass .
3.jpg| 0| A cat .
"""


@pytest.fixture
def flickr30k(tmp_path: Path) -> Path:
    images(tmp_path / "flickr30k_images", "1.jpg", "2.jpg", "3.jpg", "2199200615.jpg")
    write(tmp_path / "results.csv", RESULTS)
    return tmp_path


def test_flickr30k_recovers_run_together_row(flickr30k: Path) -> None:
    ds = load_dataset(flickr30k)
    assert ds.format == "flickr30k" and len(ds.examples) == 4 and ds.summary()["captions"] == 5
    dog = next(e for e in ds.examples if e.image.name == "2199200615.jpg")
    assert dog.captions == ("A dog runs across the grass .",)
    assert (
        next(e for e in ds.examples if e.image.name == "1.jpg").captions[0] == "A man rides a bike , fast ."
    )
    assert any("recovered 1 row" in note for note in ds.notes)
    assert ds.split_source.startswith("seeded split")


@pytest.mark.parametrize(
    "row", ["3.jpg| A cat without a number", "3.jpg", "3.jpg| x| A cat .", "1.jpg| 1| again"]
)
def test_flickr30k_malformed_row(flickr30k: Path, row: str) -> None:
    write(flickr30k / "results.csv", RESULTS + row + "\n")
    with raises("results.csv", 7):
        load_dataset(flickr30k)


# --- COCO ------------------------------------------------------------------------------------------


def coco_json(images_: list[tuple[int, str]], captions: list[tuple[int, int, str]]) -> str:
    return json.dumps(
        {
            "info": {},
            "images": [{"id": i, "file_name": f} for i, f in images_],
            "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in captions],
        }
    )


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    images(tmp_path / "train2017", "1.jpg", "2.jpg")
    images(tmp_path / "val2017", "3.jpg")
    write(
        tmp_path / "annotations/captions_train2017.json",
        coco_json([(1, "1.jpg"), (2, "2.jpg")], [(10, 1, "A"), (11, 1, " B "), (12, 2, "C")]),
    )
    write(tmp_path / "annotations/captions_val2017.json", coco_json([(3, "3.jpg")], [(13, 3, "D")]))
    return tmp_path


def test_coco_splits_from_file_names(coco: Path) -> None:
    ds = load_dataset(coco)
    assert ds.format == "coco" and "no public test" in ds.split_source
    assert splits(ds) == {"train": {"1.jpg", "2.jpg"}, "val": {"3.jpg"}, "test": set()}
    assert (
        ds.split("train")[0].captions == ("A", "B") and ds.split("val")[0].image == coco / "val2017" / "3.jpg"
    )
    only_train = load_dataset(coco / "annotations" / "captions_train2017.json")
    assert only_train.format == "coco" and len(only_train.examples) == 2


@pytest.mark.parametrize(
    ("images_", "captions", "message"),
    [
        ([(1, "1.jpg"), (1, "2.jpg")], [(10, 1, "A")], "duplicate image id 1"),
        ([(1, "1.jpg")], [(10, 1, "A"), (10, 1, "B")], "duplicate annotation id 10"),
        ([(1, "1.jpg")], [(10, 7, "A")], "image_id 7 is not among the images"),
        ([(1, "1.jpg")], [(10, 1, "  ")], "empty caption"),
    ],
)
def test_coco_errors(coco: Path, images_: list, captions: list, message: str) -> None:
    write(coco / "annotations/captions_train2017.json", coco_json(images_, captions))
    with pytest.raises(DataError, match=rf"captions_train2017.json: .*{message}"):
        load_dataset(coco)


# --- Karpathy --------------------------------------------------------------------------------------


def test_karpathy_restval_is_train(tmp_path: Path) -> None:
    images(tmp_path / "val2014", "x.jpg")
    images(tmp_path / "Images", "y.jpg", "z.jpg", "w.jpg")
    entries = [
        {"filepath": "val2014", "filename": "x.jpg", "split": "restval", "sentences": [{"raw": "X ."}]},
        {"filename": "y.jpg", "split": "train", "sentences": [{"raw": "Y, one ."}, {"raw": "Y two ."}]},
        {"filename": "z.jpg", "split": "val", "sentences": [{"raw": "Z ."}]},
        {"filename": "w.jpg", "split": "test", "sentences": [{"raw": "W ."}]},
    ]
    write(tmp_path / "dataset_coco.json", json.dumps({"images": entries, "dataset": "coco"}))
    ds = load_dataset(tmp_path)
    assert ds.format == "karpathy" and ds.split_source == "karpathy json"
    assert splits(ds) == {"train": {"x.jpg", "y.jpg"}, "val": {"z.jpg"}, "test": {"w.jpg"}}
    assert ds.split("train")[0].image == tmp_path / "val2014" / "x.jpg"
    assert load_dataset(tmp_path / "dataset_coco.json").summary()["captions"] == 5
    entries[2]["split"] = "holdout"
    write(tmp_path / "dataset_coco.json", json.dumps({"images": entries}))
    with pytest.raises(DataError, match=r"dataset_coco.json: images\[2\]: unknown split 'holdout'"):
        load_dataset(tmp_path)


# --- Generic CSV / JSONL ---------------------------------------------------------------------------


def test_generic_csv_with_split_column(tmp_path: Path) -> None:
    images(tmp_path / "photos", "p1.jpg", "p2.jpg")
    write(
        tmp_path / "captions.csv",
        'Image_Path,Text,split\nphotos/p1.jpg,"Me, on a hill",train\n'
        "photos/p1.jpg,A hill,train\nphotos/p2.jpg,Sea,dev\n",
    )
    ds = load_dataset(tmp_path)
    assert ds.format == "csv" and ds.split_source == "split column"
    assert splits(ds) == {"train": {"p1.jpg"}, "val": {"p2.jpg"}, "test": set()}
    assert ds.split("train")[0].captions == ("Me, on a hill", "A hill")


def test_generic_csv_file_root_resolves_images_folder(tmp_path: Path) -> None:
    images(tmp_path / "images", *[f"{i}.jpg" for i in range(5)])
    path = write(tmp_path / "mine.csv", "file,caption\n" + "".join(f"{i}.jpg,Photo {i}\n" for i in range(5)))
    ds = load_dataset(path)
    assert ds.format == "csv" and ds.examples[0].image == tmp_path / "images" / "0.jpg"
    assert [len(x) for x in splits(ds).values()] == [3, 1, 1]
    assert default_split_file(path) == tmp_path / "mine.captioner_split.json"
    assert not default_split_file(path).exists()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("picture,caption\na.jpg,A\n", 1),
        ("image,caption\na.jpg,A,extra\n", 2),
        ("image,caption,split\na.jpg,A,train\nb.jpg,B,\n", 3),
        ("image,caption,split\na.jpg,A,train\na.jpg,B,test\n", 3),
        ("image,caption,split\na.jpg,A,holdout\n", 2),
    ],
)
def test_generic_csv_errors(tmp_path: Path, text: str, line: int) -> None:
    images(tmp_path, "a.jpg", "b.jpg")
    write(tmp_path / "metadata.csv", text)
    with raises("metadata.csv", line):
        load_dataset(tmp_path)


def test_generic_jsonl(tmp_path: Path) -> None:
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    lines = [
        {"image": "a.jpg", "captions": ["A one", "A, two"]},
        {"image": "b.jpg", "caption": "B"},
        {"image": "a.jpg", "caption": "A three"},
        {"image": "c.jpg", "caption": "C"},
    ]
    write(tmp_path / "captions.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    ds = load_dataset(tmp_path)
    assert ds.format == "jsonl" and len(ds.examples) == 3 and ds.summary()["captions"] == 5
    assert next(e for e in ds.examples if e.image.name == "a.jpg").captions == ("A one", "A, two", "A three")
    assert [len(x) for x in splits(ds).values()] == [1, 1, 1]
    write(tmp_path / "captions.jsonl", json.dumps(lines[0]) + "\n{not json\n")
    with raises("captions.jsonl", 2):
        load_dataset(tmp_path)
    write(tmp_path / "captions.jsonl", json.dumps({"image": "a.jpg"}) + "\n")
    with raises("captions.jsonl", 1):
        load_dataset(tmp_path)


# --- General errors, summary -----------------------------------------------------------------------


def test_unrecognised_directory(tmp_path: Path) -> None:
    images(tmp_path, "a.jpg")
    with pytest.raises(
        DataError, match=rf"{tmp_path}: data set layout not recognised; looked for .*captions.txt"
    ):
        detect_format(tmp_path)


def test_not_utf8_and_empty_files(tmp_path: Path) -> None:
    images(tmp_path / "Images", "a.jpg")
    (tmp_path / "captions.txt").write_bytes(b"image,caption\na.jpg,caf\xe9\n")
    with raises("captions.txt", 2):
        load_dataset(tmp_path)
    (tmp_path / "captions.txt").write_bytes(b"  \n")
    with pytest.raises(DataError, match="captions.txt: file is empty"):
        load_dataset(tmp_path)


def test_unknown_split_name(flickr8k: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        load_dataset(flickr8k).split("holdout")


def test_summary_and_format_summary(tmp_path: Path) -> None:
    examples = [
        Example(tmp_path / f"{i}.jpg", ("one two three",) * (1 + i % 3), "train") for i in range(1234)
    ]
    ds = Dataset("csv", tmp_path, examples, [tmp_path / "gone.jpg"], "split column")
    summary = ds.summary()
    json.dumps(summary)
    assert summary["images"] == 1234 and summary["captions_per_image"] == {"min": 1, "max": 3, "mean": 2.0}
    assert summary["caption_length_words"] == {"p5": 3, "p50": 3, "p95": 3, "max": 3}
    assert summary["splits"] == {"train": 1234, "val": 0, "test": 0} and summary["missing_examples"] == [
        "gone.jpg"
    ]
    text = format_summary(summary)
    assert "images          1,234" in text and "captions        2,467" in text and "(e.g. gone.jpg)" in text
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95) == 10 and percentile([4, 9], 50) == 4
    assert percentile([], 50) == 0


def test_no_torch_import() -> None:
    code = "import sys, captioner.data; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )


# --- Real data (only when CAPTIONER_DATA points at a folder holding flickr8k/) ---------------------


def real_data(name: str) -> Path:
    root = Path(os.environ.get("CAPTIONER_DATA", "")) / name
    if not os.environ.get("CAPTIONER_DATA") or not root.is_dir():
        pytest.skip(f"set CAPTIONER_DATA to a folder containing {name}/")
    return root


def test_real_flickr8k() -> None:
    ds = load_dataset(real_data("flickr8k"))
    summary = ds.summary()
    assert summary["images"] == 8091 and summary["captions"] == 5 * 8091
    assert summary["captions_per_image"]["min"] == summary["captions_per_image"]["max"] == 5
    assert summary["splits"] == {"train": 6000, "val": 1000, "test": 1000, "unassigned": 91}
    assert ds.missing == [] and any("known bogus key" in note for note in ds.notes)


def test_real_coco_mini() -> None:
    ds = load_dataset(real_data("coco-mini"))
    assert len(ds.examples) == 80 and ds.summary()["captions"] == 400 and len(ds.split("train")) == 80
