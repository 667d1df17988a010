"""The feature cache: right shapes, resumable, and a bad image costs one row, not the run."""

import json
import shutil

import numpy as np
import pytest

from captioner.data import load_dataset
from captioner.encoders import create_encoder
from captioner.features import (
    DONE,
    FAILED,
    PENDING,
    FeatureCacheError,
    FeatureStore,
    extract_features,
    image_key,
)

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "images"


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("efficientnet_lite0")


def _inputs(root):
    data = load_dataset(root)
    paths = [ex.image for ex in data.examples][:6]
    return paths, [image_key(p, data.root) for p in paths]


def test_cache_shapes_and_lookup(tiny_features):
    store = FeatureStore.open(tiny_features)
    assert store.encoder == "efficientnet_lite0"
    n = len(store.meta["keys"])
    assert store.pooled.shape == (n, 1280) and store.grid.shape == (n, 49, 1280)
    assert store.pooled.dtype == np.float16 and (store.done == DONE).all()
    pooled, grid = store.features([0, 1])
    assert str(pooled.dtype) == "torch.float32"
    np.testing.assert_allclose(grid.mean(1).numpy(), pooled.numpy(), atol=2e-2)


def test_resume_encodes_only_what_is_left(tiny_data, encoder, tmp_path):
    paths, keys = _inputs(tiny_data)
    out = tmp_path / "cache"
    extract_features(paths, keys, encoder, out, batch_size=4, num_workers=0, progress=False)
    complete = np.load(out / "grid.npy").copy()
    # Pretend the run was killed after the first batch: rows 4.. never written.
    done = np.load(out / "done.npy", mmap_mode="r+")
    done[4:] = PENDING
    done.flush()
    grid = np.load(out / "grid.npy", mmap_mode="r+")
    grid[4:] = 0
    grid.flush()
    result = extract_features(paths, keys, encoder, out, batch_size=4, num_workers=0, progress=False)
    assert result["encoded"] == 6 and result["failed"] == 0
    np.testing.assert_array_equal(np.load(out / "grid.npy"), complete)


@pytest.mark.parametrize("name", ["grid.npy", "pooled.npy", "done.npy"])
def test_a_cut_short_cache_is_refused_not_extended_with_zeros(tiny_data, encoder, tmp_path, name):
    paths, keys = _inputs(tiny_data)
    out = tmp_path / "cache"
    extract_features(paths, keys, encoder, out, batch_size=4, num_workers=0, progress=False)
    file = out / name
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size - (size - 128) // 2)  # half its data gone, as a copy cut short leaves it
    for attempt in (
        lambda: extract_features(paths, keys, encoder, out, batch_size=4, num_workers=0, progress=False),
        lambda: FeatureStore.open(out),
    ):
        with pytest.raises(FeatureCacheError, match=rf"{name}: .* bytes .* the cache is damaged"):
            attempt()
    assert file.stat().st_size < size  # left as it was found: nothing zero-filled


def test_bad_image_is_one_error_row(tiny_data, encoder, tmp_path):
    paths, keys = _inputs(tiny_data)
    bad = tmp_path / "truncated.jpg"
    shutil.copy(FIXTURES / "truncated.jpg", bad)
    result = extract_features(
        [*paths, bad],
        [*keys, "truncated.jpg"],
        encoder,
        tmp_path / "c",
        batch_size=4,
        num_workers=0,
        progress=False,
    )
    assert result["encoded"] == 6 and result["failed"] == 1
    assert "truncated.jpg" in result["errors"][0]
    store = FeatureStore.open(tmp_path / "c")
    assert store.done[-1] == FAILED and "truncated.jpg" not in store.row_of()
    line = json.loads((tmp_path / "c" / "errors.jsonl").read_text().splitlines()[0])
    assert line["key"] == "truncated.jpg"


def test_refuses_a_different_image_list(tiny_data, encoder, tmp_path):
    paths, keys = _inputs(tiny_data)
    extract_features(paths[:2], keys[:2], encoder, tmp_path / "c", num_workers=0, progress=False)
    with pytest.raises(FeatureCacheError, match="different list of images"):
        extract_features(paths, keys, encoder, tmp_path / "c", num_workers=0, progress=False)
