"""A photo library, captioned and searched: this code against an older checkout of it, in one run.

    python benchmarks/library.py --photos /tmp/photos-12mp --flickr ../shared/flickr8k/Images

(benchmarks/run.py runs it too, into docs/benchmarks.md.) The older code is `git archive`d from --baseline
into a temporary folder and imported from there (PYTHONPATH), so both run on this machine, in turn, on the
same files, and only their ratios are read. Measured:
  * end to end (JPEG files -> captions, beam 3, the default model, each version's own defaults) on
    12-megapixel photos and on the 224 px Flickr8k JPEGs, with whether the captions are the same;
  * the batch size, loader processes and threads that caption 12-megapixel photos fastest, and loader
    processes on the 224 px photos (this code);
  * the cold start of every command, and `captioner search` with 1 and with 20 queries in one call;
  * the index's size per photo;
  * first-stage search latency at 1,000, 10,000 and 100,000 indexed photos (synthetic rows), plotted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASELINE = "323a631"  # the last commit before the photo-library speed work: "today's code" of that issue
COMMANDS = ["caption", "index", "search", "evaluate", "evaluate-search", "train", "serve", "export"]
sys.path.insert(0, str(HERE))

from search_latency import QUERIES  # noqa: E402  (benchmarks/ is not a package)


def checkout(ref: str, into: Path) -> Path:
    """The package source of `ref`, as its src/ folder under `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def _env(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src)}


def caption_speed(src: Path, images: Path, count: int, *extra: str) -> dict:
    """benchmarks/caption_speed.py in a fresh process with the package from `src`."""
    cmd = [sys.executable, str(HERE / "caption_speed.py"), "--images", str(images), "--count", str(count)]
    done = subprocess.run([*cmd, *extra], env=_env(src), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"caption_speed.py with {src} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


LIKE_FOR_LIKE = "now, the baseline's decoding"
"""This code with the decoding the baseline had by default (no consensus re-ranking, which became the
default after it): the speed of the same work, and whether it gives the same captions."""


def end_to_end(trees: dict[str, Path], sets: dict[str, tuple[Path, int]], rounds: int) -> dict:
    """Images/s of the baseline, this code's defaults and this code with the baseline's decoding on each
    set, taking turns `rounds` times (best kept); each against the baseline's speed and captions."""
    runs = {
        "before": (trees["before"], []),
        "now": (trees["now"], []),
        LIKE_FOR_LIKE: (trees["now"], ["--no-rerank"]),
    }
    out = {}
    for name, (images, count) in sets.items():
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for run, (src, extra) in runs.items():
                r = caption_speed(src, images, count, *extra)
                if run not in best or r["img_s"] > best[run]["img_s"]:
                    best[run] = r
        before = best.pop("before")
        out[name] = {"images": count, "before_img_s": before["img_s"], "variants": {}}
        for run, r in best.items():
            pairs = list(zip(before["captions"], r["captions"], strict=True))
            out[name]["variants"][run] = {
                "img_s": r["img_s"],
                "speedup": r["img_s"] / before["img_s"],
                "differ": sum(a != b for a, b in pairs),
                "differing": [[a, b] for a, b in pairs if a != b],
            }
    return out


def sweep(src: Path, images: Path, count: int, small: Path | None = None) -> list[dict]:
    """This code on 12-megapixel photos: batch size x loader processes, and 1 against 2 threads; on the
    `small` photos (224 px) loader processes at batch 16."""
    rows = []
    for workers in (0, 2) if small is not None else ():
        r = caption_speed(
            src, small, count, "--batch-size", "16", "--workers", str(workers), "--threads", "2"
        )
        rows.append({"photos": "224 px", "threads": 2, "workers": workers, "batch": 16, "img_s": r["img_s"]})
    for threads in (2, 1):
        for workers in (0, 1, 2):
            for batch in (8, 16, 32) if threads == 2 else (16,):
                extra = ["--batch-size", str(batch), "--workers", str(workers), "--threads", str(threads)]
                r = caption_speed(src, images, count, *extra)
                rows.append(
                    {
                        "photos": "12 MP",
                        "threads": threads,
                        "workers": workers,
                        "batch": batch,
                        "img_s": r["img_s"],
                    }
                )
    return rows


def wall(args: list[str], src: Path, repeat: int = 3) -> float:
    """Median wall seconds of a command in a fresh process (it must succeed)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(args, env=_env(src), capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return statistics.median(times)


def index_size(db: Path) -> int:
    """Bytes on disk of an index, its write-ahead log checkpointed into it."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db.stat().st_size


def commands(trees: dict[str, Path], photo: Path, gallery: Path, tmp: Path) -> dict:
    """Cold starts, index size per photo, and search with 1 and 20 queries, for each tree."""
    exe = [sys.executable, "-m", "captioner"]
    out: dict = {"help": {}, "index_kb_per_photo": {}, "caption_one": {}, "search_1": {}}
    photos = len(list(gallery.glob("*.jpg")))
    for tree, src in trees.items():
        out["help"][tree] = {c: wall([*exe, *([c] if c else []), "--help"], src) for c in ["", *COMMANDS]}
        db = tmp / f"{tree}.sqlite"
        wall([*exe, "index", str(gallery), "--db", str(db)], src, repeat=1)
        out["index_kb_per_photo"][tree] = index_size(db) / photos / 1000
        out["caption_one"][tree] = wall([*exe, "caption", str(photo)], src)
        out["search_1"][tree] = wall([*exe, "search", QUERIES[0], "--db", str(db)], src)
    db = tmp / "now.sqlite"
    out["search_20"] = wall([*exe, "search", *QUERIES[:20], "--db", str(db)], trees["now"])
    out["search_20_over_1"] = out["search_20"] / out["search_1"]["now"]
    # --rerank on an index without grids: the 100 candidates' grids are encoded again from their files
    out["search_rerank"] = wall([*exe, "search", QUERIES[0], "--rerank", "--db", str(db)], trees["now"])
    out["gallery"] = photos
    return out


def scaling(captions: Path, tmp: Path, sizes: tuple[int, ...]) -> list[dict]:
    """First-stage search latency (median and p95 over the queries) at each gallery size."""
    import numpy as np
    from search_latency import build, timed

    from captioner.data import load_dataset
    from captioner.search import SEARCH_EMBEDDING, PhotoIndex
    from captioner.search.joint import JointEmbedding

    joint = JointEmbedding.from_pretrained(SEARCH_EMBEDDING)
    texts = [c for ex in load_dataset(captions).examples for c in ex.captions]
    rows = []
    for n in sizes:
        db = tmp / f"synthetic-{n}.sqlite"
        build(db, n, texts, joint.config.embed_dim)
        with PhotoIndex(db) as index:
            index._joint = joint  # random vectors: only the arithmetic counts
            times = timed(lambda q, index=index: index._rank(q, 10, rerank=False))
        rows.append(
            {
                "photos": n,
                "median_ms": 1000 * statistics.median(times),
                "p95_ms": 1000 * float(np.percentile(times, 95)),
            }
        )
        db.unlink()
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    n = [r["photos"] for r in rows]
    ax.loglog(n, [r["median_ms"] for r in rows], "o-", label="median")
    ax.loglog(n, [r["p95_ms"] for r in rows], "s--", label="95th percentile")
    ax.axhline(500, color="grey", lw=0.8, ls=":", label="0.5 s target")
    ax.set_xlabel("indexed photos")
    ax.set_ylabel("query latency (ms), first stage")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(out)


def run(
    photos: Path, flickr: Path, captions: Path, baseline: str, rounds: int, sizes: tuple[int, ...]
) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trees = {"before": checkout(baseline, tmp), "now": REPO / "src"}
        report: dict = {"baseline": baseline}
        report["end_to_end"] = end_to_end(
            trees, {"12-megapixel JPEGs": (photos, 32), "224 px Flickr8k JPEGs": (flickr, 64)}, rounds
        )
        report["sweep"] = sweep(trees["now"], photos, 32, small=flickr)
        gallery = tmp / "gallery"
        gallery.mkdir()
        for p in sorted(flickr.glob("*.jpg"))[:100]:
            shutil.copy(p, gallery / p.name)
        first_photo = sorted(photos.glob("*.jpg"))[0]
        report["commands"] = commands(trees, first_photo, gallery, tmp)
        report["scaling"] = scaling(captions, tmp, sizes)
    return report


def render(r: dict) -> list[str]:
    lines = [
        "## A photo library: this code against the code before the speed work",
        "",
        f"Each figure from `python benchmarks/library.py` (run by `benchmarks/run.py`): the code at commit "
        f"`{r['baseline']}` and this code take turns on the same files; best of their turns. Beam 3, the "
        "default model, each version's own defaults (batch 16; one loader process before; on two cores now "
        "none, two threads of the model's process decoding ahead of it).",
        "",
        "| images | before (images/s) | now (images/s) | speed-up | same captions as before |",
        "|---|---:|---:|---:|---|",
    ]
    for name, e in r["end_to_end"].items():
        for run, v in e["variants"].items():
            same = "yes" if not v["differ"] else f"{e['images'] - v['differ']} of {e['images']}"
            label = "now (defaults)" if run == "now" else run
            lines.append(
                f"| {e['images']} {name}: {label} | {e['before_img_s']:.2f} | {v['img_s']:.2f} | "
                f"**{v['speedup']:.2f}x** | {same} |"
            )
    lines += [
        "",
        f'"{LIKE_FOR_LIKE}": this code with `--no-rerank`, the decoding the baseline had by default; the '
        "defaults now also re-rank the beam by the captions of the nearest training photos "
        "(docs/experiments.md section 13), which changes captions on purpose and costs time.",
    ]
    for name, e in r["end_to_end"].items():
        v = e["variants"][LIKE_FOR_LIKE]
        if v["differing"]:
            lines += ["", f"The captions that differ on the {name}, {LIKE_FOR_LIKE} (before -> now):", ""]
            lines += [f"- {before} -> {now}" for before, now in v["differing"]]
    lines += [
        "",
        "This code: images/s by torch threads, loader processes (0: two decoding threads in the model's "
        "process) and batch size.",
        "",
        "| photos | threads | loader processes | batch | images/s |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s.get('photos', '12 MP')} | {s['threads']} | {s['workers']} | {s['batch']} | {s['img_s']:.2f} |"
        for s in r["sweep"]
    ]
    c = r["commands"]
    lines += [
        "",
        "Commands from a cold start (seconds, medians of 3; `--help` shows the cost of importing each one):",
        "",
        "| command | before | now |",
        "|---|---:|---:|",
    ]
    for cmd in c["help"]["now"]:
        lines.append(
            f"| `captioner {cmd + ' ' if cmd else ''}--help` | {c['help']['before'][cmd]:.2f} | "
            f"{c['help']['now'][cmd]:.2f} |"
        )
    lines += [
        f"| `captioner caption` one 12-megapixel photo | {c['caption_one']['before']:.2f} | "
        f"{c['caption_one']['now']:.2f} |",
        f"| `captioner search` one query, {c['gallery']} photos | {c['search_1']['before']:.2f} | "
        f"{c['search_1']['now']:.2f} |",
        f"| `captioner search` 20 queries in one call | (one call a query) | {c['search_20']:.2f} |",
        f"| `captioner search --rerank` one query (grids from the files) | | {c['search_rerank']:.2f} |",
        "",
        f"20 queries in one call cost **{c['search_20_over_1']:.2f}x** one query's call. The index of "
        f"{c['gallery']} Flickr8k photos takes **{c['index_kb_per_photo']['now']:.1f} KB a photo** "
        f"({c['index_kb_per_photo']['before']:.1f} KB before).",
        "",
        "First-stage search latency by library size (synthetic rows: real caption texts, random vectors; "
        "benchmarks/search_latency.py):",
        "",
        "| photos | median (ms) | 95th percentile (ms) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {s['photos']:,} | {s['median_ms']:.0f} | {s['p95_ms']:.0f} |" for s in r["scaling"]]
    lines += ["", "![search latency against library size](images/search-latency.png)"]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=Path, required=True, help="12-megapixel JPEGs (benchmarks/photos.py)")
    p.add_argument("--flickr", type=Path, default=Path("../shared/flickr8k/Images"))
    p.add_argument("--captions", type=Path, default=Path("../shared/flickr8k"))
    p.add_argument("--baseline", default=BASELINE)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sizes", default="1000,10000,100000")
    args = p.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    report = run(args.photos, args.flickr, args.captions, args.baseline, args.rounds, sizes)
    plot(report["scaling"], REPO / "docs" / "images" / "search-latency.png")
    print(json.dumps(report, indent=1))
    print("\n".join(render(report)))


if __name__ == "__main__":
    main()
