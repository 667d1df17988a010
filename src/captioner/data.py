"""Readers for the common image-captioning data set layouts.

Every layout is read into the same records (`Example`), so training, evaluation and `captioner data
inspect` never care where the data came from. Bad data fails early with a `DataError` that names the
file and line, because a silent mis-read of a caption file costs hours of wasted training.

Standard library only: fast CLI commands import this module and must not pay for torch.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.errors import ConfigError, DataError
from captioner.vocab import percentile

SPLITS = ("train", "val", "test")
SPLIT_FILE = "captioner_split.json"
SPLIT_ALIASES = {
    "train": "train",
    "restval": "train",
    "val": "val",
    "dev": "val",
    "validation": "val",
    "test": "test",
}

FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
FLICKR8K_IMAGE_DIRS = ("Flickr8k_Dataset", "Flicker8k_Dataset", "Images")
# The real Flickr8k.token.txt carries five captions under this key, for a photo that does not exist.
FLICKR8K_BOGUS_KEY = "2258277193_586949ec62.jpg.1"
FLICKR30K_IMAGE_DIRS = ("flickr30k_images", "Images")
COCO_NAME = re.compile(r"captions_(train|val)(\d{4})\.json")
COCO_FILES = (
    "captions_train2017.json",
    "captions_val2017.json",
    "captions_train2014.json",
    "captions_val2014.json",
)
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
IMAGE_COLUMNS = ("image", "image_path", "file", "filename", "path")
CAPTION_COLUMNS = ("caption", "text")

# Directory layouts, most specific first: (format, files that identify it).
LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("flickr8k", (FLICKR8K_TOKEN_FILE,)),
    ("flickr8k-kaggle", ("captions.txt",)),
    ("flickr30k", ("results.csv",)),
    ("coco", tuple(f"annotations/{name}" for name in COCO_FILES)),
    ("karpathy", KARPATHY_FILES),
    ("csv", ("captions.csv",)),
    ("jsonl", ("captions.jsonl",)),
    ("csv", ("metadata.csv",)),
    ("jsonl", ("metadata.jsonl",)),
)


def _error(path: Path | str, message: str, line: int | None = None) -> DataError:
    where = f"{path}, line {line}" if line is not None else str(path)
    return DataError(f"{where}: {message}")


@dataclass(frozen=True)
class Example:
    """One image with its reference captions."""

    image: Path
    captions: tuple[str, ...]
    split: str


@dataclass
class Dataset:
    """A loaded data set. `unassigned` holds images an official split leaves out (Flickr8k has 91)."""

    format: str
    root: Path
    examples: list[Example]
    missing: list[Path]
    split_source: str
    unassigned: list[Example] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed: int = 0  # of a seeded split
    names: dict[Path, str] = field(default_factory=dict, repr=False)  # image -> its name in the annotations

    def split(self, name: str) -> list[Example]:
        """The examples of one split; "dev" means "val" as in the Flickr8k file names."""
        key = "val" if name == "dev" else name
        if key not in SPLITS:
            raise _error(self.root, f"unknown split {name!r}; expected train, val (or dev) or test")
        return [example for example in self.examples if example.split == key]

    def summary(self) -> dict:
        """JSON-serialisable facts for `captioner data inspect`; counts include unassigned images."""
        everything = self.examples + self.unassigned
        per_image = [len(example.captions) for example in everything]
        lengths = sorted(len(caption.split()) for example in everything for caption in example.captions)
        splits: dict[str, int] = {name: len(self.split(name)) for name in SPLITS}
        if self.unassigned:
            splits["unassigned"] = len(self.unassigned)
        base = self.root if self.root.is_dir() else self.root.parent
        return {
            "format": self.format,
            "root": str(self.root),
            "split_source": self.split_source,
            "images": len(everything),
            "captions": sum(per_image),
            "captions_per_image": {
                "min": min(per_image, default=0),
                "max": max(per_image, default=0),
                "mean": round(sum(per_image) / len(per_image), 2) if per_image else 0.0,
            },
            "splits": splits,
            "missing": len(self.missing),
            "missing_examples": [_display(path, base) for path in self.missing[:5]],
            "caption_length_words": {
                "p5": percentile(lengths, 5),
                "p50": percentile(lengths, 50),
                "p95": percentile(lengths, 95),
                "max": lengths[-1] if lengths else 0,
            },
            "notes": list(self.notes),
        }


def _display(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


def format_summary(summary: dict) -> str:
    """Render `Dataset.summary()` as the aligned text `captioner data inspect` prints.

    Counts are right-aligned in one column so split sizes can be compared at a glance.
    """
    per_image = summary["captions_per_image"]
    words = summary["caption_length_words"]
    counts = {"images": summary["images"], **{f"  {k}": n for k, n in summary["splits"].items()}}
    counts |= {"captions": summary["captions"], "missing": summary["missing"]}
    number_width = max(len(f"{n:,}") for n in counts.values())
    rows = [
        ("format", summary["format"]),
        ("root", summary["root"]),
        ("split source", summary["split_source"]),
        *((label, f"{n:>{number_width},}") for label, n in counts.items()),
    ]
    if summary["missing_examples"]:
        rows[-1] = ("missing", f"{rows[-1][1]}  (e.g. {', '.join(summary['missing_examples'])})")
    rows.append(
        ("captions/image", f"min {per_image['min']}  mean {per_image['mean']:.2f}  max {per_image['max']}")
    )
    rows.append(
        ("caption words", f"p5 {words['p5']}  p50 {words['p50']}  p95 {words['p95']}  max {words['max']}")
    )
    rows += [("note", note) for note in summary.get("notes", [])]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


# ---------------------------------------------------------------------------------------------------
# Detection and loading


def detect_format(root: Path) -> str:
    """Name the layout of a data set folder (or annotation file), most specific layout first."""
    root = Path(root)
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix in (".csv", ".jsonl"):
            return suffix[1:]
        if suffix == ".json":
            return "coco" if COCO_NAME.fullmatch(root.name) else "karpathy"
        raise _error(root, "not an annotation file this reader knows: expected .csv, .jsonl or .json")
    if not root.is_dir():
        raise _error(root, "no such file or directory")
    for fmt, names in LAYOUTS:
        if any((root / name).is_file() for name in names):
            return fmt
    looked_for = ", ".join(name for _, names in LAYOUTS for name in names)
    raise _error(root, f"data set layout not recognised; looked for {looked_for}")


@dataclass
class _Entry:
    """An image as a reader sees it, before existence checks and split assignment."""

    path: Path
    captions: list[str] = field(default_factory=list)
    split: str | None = None  # None: the layout has no split; "": an official split leaves it out


@dataclass
class _Loaded:
    """What a reader hands back: annotation name -> entry, in file order."""

    format: str
    sources: list[Path]  # annotation files, named in errors
    entries: dict[str, _Entry]
    split_source: str = ""  # "" when the layout has no split, so a seeded one is made
    notes: list[str] = field(default_factory=list)


def load_dataset(
    root: str | Path,
    *,
    skip_missing: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_file: str | Path | None = None,
) -> Dataset:
    """Read a data set folder or annotation file, check its images exist, and assign splits.

    The splits are `split_file`'s when given (see `save_split`), else the layout's own, else a
    `captioner_split.json` beside the data (`captioner data split` writes one), else a seeded split made
    in memory: the same for the same images and seed. Nothing is written into the data folder."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    root = Path(root).expanduser().resolve()
    fmt = detect_format(root)
    loaded = READERS[fmt](root)
    if fmt == "flickr8k":
        _drop_bogus_flickr8k_key(loaded)
    missing = _check_missing(loaded, skip_missing)
    if split_file is not None:
        loaded.split_source = _saved_split(loaded, Path(split_file), seed)
    elif not loaded.split_source:
        beside = default_split_file(root)
        if beside.is_file():
            loaded.split_source = _saved_split(loaded, beside, seed)
        else:
            loaded.split_source = _seeded_split(loaded, seed, val_fraction, test_fraction)
    everything = [
        Example(entry.path, tuple(entry.captions), entry.split or "") for entry in loaded.entries.values()
    ]
    return Dataset(
        format=loaded.format,
        root=root,
        examples=[example for example in everything if example.split],
        missing=missing,
        split_source=loaded.split_source,
        unassigned=[example for example in everything if not example.split],
        notes=loaded.notes,
        seed=seed,
        names={entry.path: name for name, entry in loaded.entries.items()},
    )


def default_split_file(root: Path) -> Path:
    """Where `captioner data split` saves a split by default, and where `load_dataset` looks for one."""
    return root / SPLIT_FILE if root.is_dir() else root.with_name(f"{root.stem}.{SPLIT_FILE}")


def save_split(dataset: Dataset, path: str | Path) -> Path:
    """Write which images each split holds, by annotation name, for `load_dataset(split_file=...)`:
    the images may change later (new photos), but a test set saved here stays the same."""
    path = Path(path)
    saved: dict[str, Any] = {"seed": dataset.seed, "source": dataset.split_source}
    for name in SPLITS:
        saved[name] = sorted(dataset.names[example.image] for example in dataset.split(name))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _drop_bogus_flickr8k_key(loaded: _Loaded) -> None:
    """Drop the one documented bad key of Flickr8k.token.txt rather than fail on the most used data set."""
    entry = loaded.entries.get(FLICKR8K_BOGUS_KEY)
    if entry is not None and not entry.path.is_file():
        del loaded.entries[FLICKR8K_BOGUS_KEY]
        loaded.notes.append(
            f"known bogus key {FLICKR8K_BOGUS_KEY} in {FLICKR8K_TOKEN_FILE} dropped "
            f"({len(entry.captions)} captions for an image that does not exist)"
        )


def _check_missing(loaded: _Loaded, skip_missing: bool) -> list[Path]:
    """Fail on images absent from disk, or drop and return them when the user asked to skip them."""
    missing = [name for name, entry in loaded.entries.items() if not entry.path.is_file()]
    if missing and not skip_missing:
        sources = ", ".join(str(path) for path in loaded.sources)
        raise _error(
            sources,
            f"{len(missing):,} listed image(s) missing on disk (first {min(len(missing), 5)}: "
            f"{', '.join(missing[:5])}); pass skip_missing=True (CLI: --skip-missing) to skip them",
        )
    return [loaded.entries.pop(name).path for name in missing]


# ---------------------------------------------------------------------------------------------------
# Seeded splits, for layouts that come without one


def _saved_split(loaded: _Loaded, split_file: Path, seed: int) -> str:
    """Assign the splits a saved split file lists; images it does not list go to train."""
    assignment, saved_seed = _read_split_file(split_file)
    new = [name for name in loaded.entries if name not in assignment]
    if new:
        loaded.notes.append(f"{len(new):,} image(s) not in {split_file.name} assigned to train")
    if saved_seed != seed:
        loaded.notes.append(f"{split_file.name} was made with seed {saved_seed}")
    for name, entry in loaded.entries.items():
        entry.split = assignment.get(name, "train")
    return f"saved split ({split_file})"


def _seeded_split(loaded: _Loaded, seed: int, val_fraction: float, test_fraction: float) -> str:
    """A split made from the seed and the sorted image names: the same on every run over the same images."""
    assignment = _make_split(sorted(loaded.entries), seed, val_fraction, test_fraction)
    for name, entry in loaded.entries.items():
        entry.split = assignment[name]
    return f"seeded split (seed {seed}; save it with `captioner data split`)"


def _make_split(names: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    order = list(names)
    random.Random(seed).shuffle(order)

    def size(fraction: float) -> int:
        count = round(len(order) * fraction)
        return max(count, 1) if len(order) >= 3 and fraction > 0 else count

    n_test = size(test_fraction)
    n_val = min(size(val_fraction), len(order) - n_test)
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(order) - n_test - n_val)
    return dict(zip(order, splits, strict=True))


def _read_split_file(path: Path) -> tuple[dict[str, str], object]:
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(name), list) for name in SPLITS):
        raise _error(
            path,
            'not a captioner split file: expected {"seed": ..., "train": [...], "val": [...], "test": [...]}',
        )
    assignment: dict[str, str] = {}
    for split in SPLITS:
        for name in data[split]:
            if name in assignment:
                raise _error(path, f"{name!r} is listed in both {assignment[name]} and {split}")
            assignment[name] = split
    return assignment, data.get("seed")


# ---------------------------------------------------------------------------------------------------
# File helpers


def _read_text(path: Path) -> str:
    """Whole file as text; non-UTF-8 bytes and empty files are errors naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _error(path, f"cannot read file: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _error(path, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", line) from None
    if not text.strip():
        raise _error(path, "file is empty")
    return text


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for the non-blank lines of a text file."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            yield number, line


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise _error(path, f"invalid JSON: {exc.msg}", exc.lineno) from None


def _get(obj: object, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """obj[key] if obj is a JSON object holding a value of that kind, else an error saying where."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _error(path, f"{where}: missing or invalid {key!r}")
    return value


def _caption(text: object, path: Path, line: int | None, where: str = "") -> str:
    caption = text.strip() if isinstance(text, str) else ""
    if not caption:
        raise _error(path, f"{where}empty caption", line)
    return caption


def _split_name(value: str, path: Path, line: int | None, where: str = "") -> str:
    split = SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise _error(path, f"{where}unknown split {value!r}; expected train, val, test or restval", line)
    return split


def _first_dir(root: Path, names: tuple[str, ...]) -> Path:
    """The first of the usual image folders that exists (the root if none does)."""
    return next((root / name for name in names if (root / name).is_dir()), root)


def _first_file(candidates: list[Path]) -> Path:
    """The first candidate image path that exists (the first one if none does, for the missing report)."""
    return next((path for path in candidates if path.is_file()), candidates[0])


def _annotation_file(root: Path, names: tuple[str, ...]) -> Path:
    return root if root.is_file() else next(root / name for name in names if (root / name).is_file())


# ---------------------------------------------------------------------------------------------------
# One reader per layout


def _read_flickr8k(root: Path) -> _Loaded:
    """Original Flickr8k: `IMAGE#N<TAB>caption` lines, official split files."""
    path = root / FLICKR8K_TOKEN_FILE
    image_dir = _first_dir(root, FLICKR8K_IMAGE_DIRS)
    entries: dict[str, _Entry] = {}
    seen: dict[str, int] = {}
    for number, line in _lines(path):
        key, tab, caption = line.partition("\t")
        if not tab:
            raise _error(path, "expected IMAGE#N<TAB>caption (no tab found)", number)
        name, hash_sign, index = key.strip().rpartition("#")
        if not hash_sign or not name or not index.isdigit():
            raise _error(path, f"caption id {key!r} is not IMAGE#N (missing '#')", number)
        if key in seen:
            raise _error(path, f"duplicate caption id {key!r} (first on line {seen[key]})", number)
        seen[key] = number
        entries.setdefault(name, _Entry(image_dir / name)).captions.append(_caption(caption, path, number))
    loaded = _Loaded("flickr8k", [path], entries)
    if (root / "captions.txt").is_file():
        loaded.notes.append(
            f"captions.txt (Kaggle layout) also present; read the original {FLICKR8K_TOKEN_FILE}"
        )
    _apply_flickr8k_split(root, loaded)
    return loaded


def _read_flickr8k_kaggle(root: Path) -> _Loaded:
    """Kaggle Flickr8k: `captions.txt`, CSV with header image,caption; official split if its files exist."""
    path = root / "captions.txt"
    image_dir = _first_dir(root, ("Images", *FLICKR8K_IMAGE_DIRS))
    entries: dict[str, _Entry] = {}
    for number, image, caption, _ in _csv_records(path, ("image",), ("caption",), exact=True):
        if not image:
            raise _error(path, "empty image name", number)
        entries.setdefault(image, _Entry(image_dir / image)).captions.append(caption)
    loaded = _Loaded("flickr8k-kaggle", [path], entries)
    _apply_flickr8k_split(root, loaded)
    return loaded


def _apply_flickr8k_split(root: Path, loaded: _Loaded) -> None:
    """Use the official Flickr_8k.*Images.txt split; images in none of the files stay unassigned."""
    paths = {split: root / name for split, name in FLICKR8K_SPLIT_FILES.items()}
    absent = [path.name for path in paths.values() if not path.is_file()]
    if absent:
        if len(absent) < len(paths):
            loaded.notes.append(
                f"official split incomplete (no {', '.join(absent)}); made a seeded split instead"
            )
        return
    assigned: dict[str, str] = {}
    for split, path in paths.items():
        for number, line in _lines(path):
            name = line.strip()
            if assigned.get(name, split) != split:
                raise _error(path, f"{name} is also in the {assigned[name]} split", number)
            assigned[name] = split
    for name, entry in loaded.entries.items():
        entry.split = assigned.get(name, "")
    loaded.split_source = "official split files"


def _read_flickr30k(root: Path) -> _Loaded:
    """Kaggle Flickr30k: `results.csv` with `image_name| comment_number| comment` rows."""
    path = root / "results.csv"
    image_dir = _first_dir(root, FLICKR30K_IMAGE_DIRS)
    lines = _lines(path)
    number, header = next(lines)
    if [cell.strip() for cell in header.split("|")] != ["image_name", "comment_number", "comment"]:
        raise _error(path, "expected header 'image_name| comment_number| comment'", number)
    entries: dict[str, _Entry] = {}
    seen: dict[tuple[str, str], int] = {}
    recovered = 0
    for number, line in lines:
        fields = [cell.strip() for cell in line.split("|", 2)]
        run_together = re.fullmatch(r"(\d+)\s+(\S.*)", fields[1]) if len(fields) == 2 else None
        if run_together:  # a known broken row: `image| 4   A dog ...` with no second pipe
            fields = [fields[0], *run_together.groups()]
            recovered += 1
        if len(fields) != 3:
            raise _error(path, f"expected 3 '|'-separated fields, found {len(fields)}", number)
        name, index, caption = fields
        if not name or not index.isdigit():
            raise _error(path, "expected 'image_name| comment_number| comment'", number)
        if (name, index) in seen:
            raise _error(
                path, f"duplicate caption {name} #{index} (first on line {seen[name, index]})", number
            )
        seen[name, index] = number
        entries.setdefault(name, _Entry(image_dir / name)).captions.append(_caption(caption, path, number))
    loaded = _Loaded("flickr30k", [path], entries)
    if recovered:
        loaded.notes.append(
            f"recovered {recovered} row(s) of {path.name} whose comment_number and comment ran together"
        )
    return loaded


def _read_coco(root: Path) -> _Loaded:
    """Official COCO captions JSON; the file a caption came from (train/val) decides its split."""
    notes = []
    if root.is_file():
        files = [root]
        root = root.parent.parent if root.parent.name == "annotations" else root.parent
    else:
        found = [
            root / "annotations" / name for name in COCO_FILES if (root / "annotations" / name).is_file()
        ]
        year = found[0].stem[-4:]  # 2017 comes first in COCO_FILES: its train set already holds most of 2014
        files = [path for path in found if path.stem.endswith(year)]
        if len(files) < len(found):
            notes.append(
                f"read the {year} annotations; ignored {', '.join(p.name for p in found if p not in files)}"
            )
    entries: dict[str, _Entry] = {}
    for path in files:
        match = COCO_NAME.fullmatch(path.name)
        assert match is not None  # detect_format and COCO_FILES only ever pass names that match
        split, year = match.groups()
        for file_name, captions in _coco_captions(path).items():
            candidates = [root / f"{split}{year}" / file_name, root / file_name]
            entries[f"{split}{year}/{file_name}"] = _Entry(_first_file(candidates), captions, split)
    return _Loaded(
        "coco", files, entries, "coco file names (train/val; COCO has no public test captions)", notes
    )


def _coco_captions(path: Path) -> dict[str, list[str]]:
    """file_name -> captions of one COCO captions file, checking ids; images without captions are left out."""
    data = _read_json(path)
    file_names: dict[object, str] = {}
    for i, image in enumerate(_get(data, "images", list, path, "top level")):
        image_id = _get(image, "id", (int, str), path, f"images[{i}]")
        if image_id in file_names:
            raise _error(path, f"images[{i}]: duplicate image id {image_id}")
        file_names[image_id] = _get(image, "file_name", str, path, f"images[{i}]")
    captions: dict[str, list[str]] = {}
    annotation_ids: set[object] = set()
    for i, annotation in enumerate(_get(data, "annotations", list, path, "top level")):
        where = f"annotations[{i}]: "
        annotation_id = _get(annotation, "id", (int, str), path, where[:-2])
        if annotation_id in annotation_ids:
            raise _error(path, f"{where}duplicate annotation id {annotation_id}")
        annotation_ids.add(annotation_id)
        image_id = _get(annotation, "image_id", (int, str), path, where[:-2])
        if image_id not in file_names:
            raise _error(path, f"{where}image_id {image_id} is not among the images")
        caption = _caption(annotation.get("caption"), path, None, where)
        captions.setdefault(file_names[image_id], []).append(caption)
    return captions


def _read_karpathy(root: Path) -> _Loaded:
    """Karpathy's dataset_*.json: images with their split ("restval" is train) and sentences."""
    path = _annotation_file(root, KARPATHY_FILES)
    base = path.parent
    entries: dict[str, _Entry] = {}
    for i, image in enumerate(_get(_read_json(path), "images", list, path, "top level")):
        where = f"images[{i}]"
        filename = _get(image, "filename", str, path, where)
        filepath = str(image.get("filepath") or "")
        name = f"{filepath}/{filename}" if filepath else str(filename)
        if name in entries:
            raise _error(path, f"{where}: duplicate image {name}")
        split = _split_name(str(image.get("split", "")), path, None, f"{where}: ")
        sentences = _get(image, "sentences", list, path, where)
        captions = [
            _caption(s.get("raw") if isinstance(s, dict) else None, path, None, f"{where}.sentences[{j}]: ")
            for j, s in enumerate(sentences)
        ]
        candidates = [
            base / name,
            base / "Images" / str(filename),
            base / "images" / str(filename),
            base / str(filename),
        ]
        entries[name] = _Entry(_first_file(candidates), captions, split)
    loaded = _Loaded("karpathy", [path], entries, "karpathy json")
    others = [
        name for name in KARPATHY_FILES if root.is_dir() and (root / name).is_file() and name != path.name
    ]
    if others:
        loaded.notes.append(f"read {path.name}; ignored {', '.join(others)}")
    return loaded


def _read_csv(root: Path) -> _Loaded:
    """A user's own CSV: image and caption columns, optional split column; one row per caption."""
    path = _annotation_file(root, ("captions.csv", "metadata.csv"))
    generic = _Generic(path)
    for number, image, caption, split in _csv_records(path, IMAGE_COLUMNS, CAPTION_COLUMNS):
        generic.add(number, image, [caption], split)
    return generic.loaded("csv")


def _read_jsonl(root: Path) -> _Loaded:
    """A user's own JSON Lines: {"image": ..., "caption": ... or "captions": [...], "split": optional}."""
    path = _annotation_file(root, ("captions.jsonl", "metadata.jsonl"))
    generic = _Generic(path)
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _error(path, f"invalid JSON: {exc.msg}", number) from None
        if not isinstance(record, dict):
            raise _error(path, "expected a JSON object", number)
        image = next((record[key] for key in IMAGE_COLUMNS if isinstance(record.get(key), str)), "")
        captions = record.get("captions")
        if captions is None:
            captions = [next((record[key] for key in CAPTION_COLUMNS if key in record), None)]
        if not isinstance(captions, list) or not captions:
            raise _error(path, 'expected "caption" (text) or "captions" (a list of texts)', number)
        split = record.get("split") or ""
        generic.add(number, image, [_caption(text, path, number) for text in captions], str(split))
    return generic.loaded("jsonl")


@dataclass
class _Generic:
    """Collects the rows of a user's CSV / JSONL into entries; shared so both formats behave alike."""

    path: Path
    entries: dict[str, _Entry] = field(default_factory=dict)
    first_line: dict[str, int] = field(default_factory=dict)

    def add(self, number: int, image: str, captions: list[str], split: str) -> None:
        image = image.strip()
        if not image:
            raise _error(self.path, "missing or empty image path", number)
        base = self.path.parent
        if image not in self.entries:
            relative = Path(image)
            candidates = (
                [relative]
                if relative.is_absolute()
                else [base / image, base / "images" / image, base / "Images" / image]
            )
            self.entries[image] = _Entry(_first_file(candidates))
            self.first_line[image] = number
        entry = self.entries[image]
        entry.captions.extend(captions)
        new_split = _split_name(split, self.path, number) if split.strip() else None
        if entry.split is not None and new_split is not None and new_split != entry.split:
            raise _error(
                self.path, f"{image} is in split {entry.split} on an earlier row, {new_split} here", number
            )
        entry.split = entry.split or new_split

    def loaded(self, fmt: str) -> _Loaded:
        """A split column is all or nothing: without one a seeded split is made."""
        unsplit = [name for name, entry in self.entries.items() if entry.split is None]
        if unsplit and len(unsplit) < len(self.entries):
            raise _error(
                self.path, f"{unsplit[0]} has no split while other images do", self.first_line[unsplit[0]]
            )
        return _Loaded(fmt, [self.path], self.entries, "" if unsplit else "split column")


def _csv_records(
    path: Path, image_columns: tuple[str, ...], caption_columns: tuple[str, ...], exact: bool = False
) -> Iterator[tuple[int, str, str, str]]:
    """(line, image, caption, split) per CSV row; split is "" without a split column.

    `exact`: the header must be exactly the image and caption columns (Kaggle captions.txt).
    """
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = [cell.strip().lower() for cell in next(reader)]
    image_col = next((header.index(name) for name in image_columns if name in header), None)
    caption_col = next((header.index(name) for name in caption_columns if name in header), None)
    if image_col is None or caption_col is None or (exact and len(header) != 2):
        images, captions = " / ".join(image_columns), " / ".join(caption_columns)
        wanted = f"an image column ({images}) and a caption column ({captions})"
        raise _error(path, f"header must name {wanted}; found {','.join(header)!r}", 1)
    split_col = header.index("split") if "split" in header else None
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise _error(path, f"expected {len(header)} fields, found {len(row)}", reader.line_num)
            split = row[split_col].strip() if split_col is not None else ""
            yield (
                reader.line_num,
                row[image_col].strip(),
                _caption(row[caption_col], path, reader.line_num),
                split,
            )
    except csv.Error as exc:
        raise _error(path, f"bad CSV: {exc}", reader.line_num) from None


READERS: dict[str, Callable[[Path], _Loaded]] = {
    "flickr8k": _read_flickr8k,
    "flickr8k-kaggle": _read_flickr8k_kaggle,
    "flickr30k": _read_flickr30k,
    "coco": _read_coco,
    "karpathy": _read_karpathy,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
}
