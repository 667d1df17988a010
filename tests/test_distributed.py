"""Two CPU processes under torchrun: they train one model (identical weights) and share feature extraction."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import tiny_config


def torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "captioner",
    ]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_two_processes_train_identical_replicas_and_the_loss_falls(tiny_data, tiny_features, tmp_path):
    config = tiny_config(tiny_data, tiny_features, tmp_path / "run", "attention", epochs=4, lr=1e-2)
    config.train.batch_size = 8
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    result = torchrun("train", "--config", path)
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((tmp_path / "run" / "distributed.json").read_text())
    assert check["processes"] == 2 and check["identical_weights"], check
    with open(tmp_path / "run" / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["kind"] == "train"]
    assert len(losses) == 4 * 3  # 48 pairs / (8 x 2 processes) = 3 steps an epoch
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    # and it resumes like a single-process run
    path.write_text(yaml.safe_dump({**config.to_dict(), "train": {**config.to_dict()["train"], "epochs": 5}}))
    again = torchrun("train", "--config", path, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout


def test_two_processes_share_feature_extraction(tiny_data, tiny_features, tmp_path):
    result = torchrun(
        "extract-features", tiny_data, "--encoder", "efficientnet_lite0", "--out", tmp_path / "f"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "32 of 32 images encoded" in result.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "f" / "grid.npy"), np.load(tiny_features / "grid.npy"))


def test_two_processes_caption_exactly_what_one_does(tiny_model, tiny_data, tmp_path):
    import shutil

    from captioner.cli import main

    folder = tmp_path / "photos"
    shutil.copytree(tiny_data / "images", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert (
        main(["caption", str(folder), "--model", str(tiny_model), "--out", str(tmp_path / "one.jsonl")]) == 1
    )
    result = torchrun("caption", folder, "--model", tiny_model, "--out", tmp_path / "two.jsonl")
    assert result.returncode == 1, result.stderr[-3000:]  # 1: the broken file, reported once
    assert result.stderr.count("broken.jpg") == 1
    one, two = (
        [json.loads(x) for x in (tmp_path / n).read_text().splitlines()] for n in ("one.jsonl", "two.jsonl")
    )
    assert len(one) == 33 and [r["image"] for r in two] == [r["image"] for r in one]  # input order
    # the same captions; scores and label probabilities agree up to the float rounding of other batches
    assert [(r.get("caption"), r.get("error")) for r in two] == [
        (r.get("caption"), r.get("error")) for r in one
    ]
    for a, b in zip(one, two, strict=True):
        assert a.get("score", 0) == pytest.approx(b.get("score", 0), abs=1e-3)
        assert [x["label"] for x in a.get("labels", [])][:1] == [x["label"] for x in b.get("labels", [])][:1]
    assert not list(tmp_path.glob("*.part*"))


def test_two_processes_share_one_index(tiny_model, tiny_data, tmp_path):
    import shutil
    import sqlite3

    from captioner.cli import main

    folder = tmp_path / "photos"
    shutil.copytree(tiny_data / "images", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    args = ["--model", tiny_model, "--embedding", "none"]
    assert main(["index", str(folder), "--db", str(tmp_path / "one.sqlite"), *map(str, args)]) == 1
    result = torchrun("index", folder, "--db", tmp_path / "two.sqlite", *args)
    assert result.returncode == 1, result.stderr[-3000:]  # 1: the broken file, reported once
    assert result.stderr.count("broken.jpg") == 1
    assert "32 added, 0 updated, 0 unchanged, 1 failed" in result.stdout
    rows = {}
    for name in ("one", "two"):
        with sqlite3.connect(tmp_path / f"{name}.sqlite") as conn:
            rows[name] = conn.execute(
                "SELECT path, caption, error IS NULL FROM photos ORDER BY path"
            ).fetchall()
    assert len(rows["two"]) == 33 and rows["two"] == rows["one"]  # each photo once, captioned alike
    again = torchrun("index", folder, "--db", tmp_path / "two.sqlite", *args)  # a re-run: nothing to do
    assert "0 added, 0 updated, 32 unchanged, 1 failed" in again.stdout, again.stderr[-3000:]
