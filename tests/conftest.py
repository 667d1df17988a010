"""Shared fixtures: a tiny captioning data set the tests make themselves, and the real data if present."""

from __future__ import annotations

import atexit
import contextlib
import csv
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

# The encoder runs in PyTorch in the tests (processes they start inherit this), except where a test asks
# for onnxruntime: tracing every tiny model the tests train would cost seconds each. The graphs such tests
# make are cached here, not in the user's ~/.cache.
os.environ.setdefault("CAPTIONER_ENCODER_RUNTIME", "torch")
if "CAPTIONER_CACHE" not in os.environ:
    os.environ["CAPTIONER_CACHE"] = tempfile.mkdtemp(prefix="captioner-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CAPTIONER_CACHE"], ignore_errors=True)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}
SHAPES = ("square", "circle")


def make_tiny_dataset(root: Path, per_class: int = 3) -> Path:
    """Photos of coloured shapes with captions that describe them, in the generic CSV layout.

    8 classes x `per_class` images; the last image of each class goes to val, the one before to test.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for k in range(per_class):
                name = f"images/{colour}_{shape}_{k}.jpg"
                img = Image.new("RGB", (96, 80), (245, 245, 245))
                draw = ImageDraw.Draw(img)
                box = (16 + 4 * k, 12 + 2 * k, 70 + 4 * k, 66 + 2 * k)
                (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=rgb)
                img.save(root / name, quality=90)
                split = "val" if k == per_class - 1 else "test" if k == per_class - 2 else "train"
                for text in (
                    f"a {colour} {shape} on a white background",
                    f"a {shape} that is {colour}",
                    f"one {colour} {shape}",
                ):
                    rows.append({"image": name, "caption": text, "split": split})
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), per_class=4)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets (`../shared`), named by CAPTIONER_DATA; tests that need them skip without it."""
    root = os.environ.get("CAPTIONER_DATA")
    if not root or not (Path(root) / "flickr8k").is_dir():
        pytest.skip("CAPTIONER_DATA does not point at the shared data sets")
    return Path(root)


@pytest.fixture(scope="session")
def tiny_features(tiny_data, tmp_path_factory) -> Path:
    """EfficientNet-Lite0 features of the tiny data set (real pretrained weights)."""
    from captioner.data import load_dataset
    from captioner.encoders import create_encoder
    from captioner.features import extract_features, image_key

    data = load_dataset(tiny_data)
    out = tmp_path_factory.mktemp("features") / "lite0"
    paths = [ex.image for ex in data.examples]
    extract_features(
        paths,
        [image_key(p, data.root) for p in paths],
        create_encoder("efficientnet_lite0"),
        out,
        batch_size=16,
        num_workers=0,
        progress=False,
    )
    return out


def tiny_config(tiny_data: Path, features: Path | None, out: Path, decoder: str = "attention", **train):
    """A small, fast training config over the tiny data set."""
    from captioner.config import from_dict

    return from_dict(
        {
            "data": {"root": str(tiny_data), "features": str(features) if features else None, "min_count": 1},
            "encoder": {"name": "efficientnet_lite0"},
            "decoder": {
                "name": decoder,
                "embed_dim": 48,
                "hidden_dim": 64,
                "attention_dim": 32,
                "dropout": 0.1,
            },
            "train": {
                "out_dir": str(out),
                "epochs": 3,
                "batch_size": 16,
                "lr": 3e-3,
                "log_every": 1,
                "schedule": "constant",
                **train,
            },
        }
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tiny_features, tmp_path_factory) -> Path:
    """A checkpoint trained for a few epochs on the tiny data set."""
    from captioner.training import train

    out = tmp_path_factory.mktemp("run")
    return train(tiny_config(tiny_data, tiny_features, out, epochs=6), progress=False)


def tiny_joint_config(tiny_data: Path, features: Path, out: Path, embedding: dict | None = None, **train):
    """A small search-embedding config (train.task search) over the tiny data set's feature cache."""
    from captioner.config import from_dict

    return from_dict(
        {
            "data": {"root": str(tiny_data), "features": str(features)},
            "encoder": {"name": "efficientnet_lite0"},
            "embedding": {"embed_dim": 32, "hidden_dim": 64, "dropout": 0.1, **(embedding or {})},
            "train": {
                "task": "search",
                "out_dir": str(out),
                "epochs": 40,
                "batch_size": 8,
                "lr": 3e-3,
                "patience": 100,
                **train,
            },
        }
    )


@pytest.fixture(scope="session")
def tiny_embedding(tiny_data, tiny_features, tmp_path_factory) -> Path:
    """A search embedding trained on the tiny data set's (EfficientNet-Lite0) features: its best folder."""
    from captioner.search.train_joint import train_joint

    # with word vectors, as the bundled one: every index and search test reads them
    words = {"word_dim": 8, "word_min_count": 1}
    return train_joint(tiny_joint_config(tiny_data, tiny_features, tmp_path_factory.mktemp("joint"), words))


@contextlib.contextmanager
def serve(app, **limits) -> Iterator[str]:
    """Run the app as `captioner serve` does (uvicorn, behind http_timeouts' deadlines, with these
    limits), in a thread on a free loopback port; yields its URL."""
    import uvicorn

    from captioner.http_timeouts import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port in between
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", **limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert server.started, "uvicorn did not start within 30 s"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
