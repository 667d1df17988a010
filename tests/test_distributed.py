"""Two CPU processes under torchrun: they train one model (identical weights) and share feature extraction."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
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
