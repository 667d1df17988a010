"""ONNX export and the onnxruntime runtime: the same captions as torch, for each kind of decoder step."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from captioner.decoders import list_decoders
from captioner.decoders.merge import Merge  # noqa: E402
from captioner.images import build_transform, load_image  # noqa: E402
from captioner.model import Captioner, CheckpointError  # noqa: E402
from captioner.onnx import (  # noqa: E402
    ExportError,
    OnnxCaptioner,  # noqa: E402
    export_onnx,
)
from captioner.vocab import Vocabulary  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "images"
SMALL = {"embed_dim": 16, "hidden_dim": 16, "dropout": 0.2}  # dropout: export must run it in eval mode


def untrained(tiny_data: Path, name: str, out: Path) -> Path:
    """A checkpoint of an untrained decoder over the tiny data set's vocabulary, saved and loaded."""
    with open(tiny_data / "captions.csv", newline="") as f:
        vocab = Vocabulary.build([row["caption"] for row in csv.DictReader(f)], min_count=1)
    torch.manual_seed(0)
    model = Captioner.build("efficientnet_lite0", {"name": name, **SMALL}, vocab)
    fc = getattr(model.decoder, "fc", None)
    if fc is not None:  # random weights may end every caption at once: give the comparison words to compare
        with torch.no_grad():
            fc.bias[vocab.end_id] -= 3.0
    return model.save_pretrained(out)


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tiny_data, tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per registered decoder: attention trained, every other one untrained."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "attention": Path(tiny_model),
        **{name: untrained(tiny_data, name, root / name) for name in list_decoders() if name != "attention"},
    }


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {
        name: export_onnx(Captioner.from_pretrained(path), root / name) for name, path in checkpoints.items()
    }


def test_export_directory_is_self_contained(exports, checkpoints):
    for name, folder in exports.items():
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json",
            "decoder_init.onnx",
            "decoder_step.onnx",
            "encoder.onnx",
            "labels.safetensors",  # the test encoders are pretrained: they have an ImageNet classifier
            "vocab.json",
        ]
        config = json.loads((folder / "config.json").read_text())
        onnx = config.pop("onnx")
        assert config == json.loads((checkpoints[name] / "config.json").read_text())
        assert (folder / "vocab.json").read_text() == (checkpoints[name] / "vocab.json").read_text()
        assert onnx["attention"] == (name in ("attention", "updown"))
        known = {
            "attention": ["h", "c", "grid", "grid_att"],
            "merge": ["h", "c", "image"],
            "show_tell": ["h", "c"],
            "updown": ["h1", "c1", "h2", "c2", "grid", "grid_att", "mean"],
        }
        assert onnx["state"] == known[name]
        # Only the recurrent state comes back from a step; the per-image tensors are fed back as they were.
        assert onnx["updates"] == [k for k in known[name] if k[0] in "hc"]
        assert onnx["max_abs_diff"]["log_probs"] < 1e-5


@pytest.mark.parametrize("name", list_decoders())
def test_onnx_captions_match_torch(name, checkpoints, exports, tiny_data):
    torch_model = Captioner.from_pretrained(checkpoints[name])
    onnx_model = OnnxCaptioner.from_pretrained(exports[name], threads=1)
    transform = build_transform(onnx_model.encoder.preprocess)
    paths = sorted((tiny_data / "images").glob("*.jpg"))
    batch = torch.stack([transform(load_image(p)) for p in paths])

    with torch.inference_mode():
        want, got = torch_model.encoder(batch), onnx_model.encoder(batch)
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
        # One step from <start> for the whole batch: the log-probabilities every search builds on.
        tokens = torch.full((len(paths),), torch_model.vocab.start_id)
        lp_torch = torch_model.decoder.step(tokens, torch_model.decoder.init_state(*want))[0]
        lp_onnx = onnx_model.decoder.step(tokens, onnx_model.decoder.init_state(*want))[0]
        assert (lp_torch - lp_onnx).abs().max() < 1e-5

    for options in ({"beam_size": 1}, {"beam_size": 3, "n_best": 3}):
        expected = torch_model.caption_tensors(batch, **options)
        actual = onnx_model.caption_tensors(batch, **options)
        assert [c.caption for c in actual] == [c.caption for c in expected]
        assert [[t for t, _ in c.captions] for c in actual] == [[t for t, _ in c.captions] for c in expected]
        for a, e in zip(actual, expected, strict=True):
            assert a.score == pytest.approx(e.score, abs=1e-4)
            assert a.words == e.words and a.grid_shape == e.grid_shape
            assert [x.label for x in a.labels] == [x.label for x in e.labels]
            assert [x.p for x in a.labels] == pytest.approx([x.p for x in e.labels], abs=1e-4)
            if name in ("attention", "updown"):  # the decoders that attend over the grid
                torch.testing.assert_close(a.attention, e.attention, rtol=1e-3, atol=1e-5)
            else:
                assert a.attention is None and e.attention is None
    assert all(c.words for c in expected)  # the comparison is not one of empty captions
    assert all(c.labels for c in expected)  # nor one of empty labels


def test_cli_recognises_an_onnx_export_by_itself(exports, checkpoints, tiny_data, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["blue_circle_1.jpg", "green_square_2.jpg", "red_square_0.jpg"]
    for name in names:
        shutil.copy(tiny_data / "images" / name, folder / name)
    shutil.copy(FIXTURES / "truncated.jpg", folder / "truncated.jpg")
    result = subprocess.run(
        [sys.executable, "-m", "captioner.cli", "caption", folder, "--model", exports["attention"]]
        + ["--format", "jsonl", "--batch-size", "2"],  # no --runtime onnx: the directory says it
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr
    records = {Path(r["image"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert sorted(records) == sorted([*names, "truncated.jpg"])
    assert "truncated" in records["truncated.jpg"]["error"]
    expected = Captioner.from_pretrained(checkpoints["attention"]).caption([folder / n for n in names])
    assert [records[n]["caption"] for n in names] == [c.caption for c in expected]
    assert [[x["label"] for x in records[n]["labels"]] for n in names] == [
        [x.label for x in c.labels] for c in expected
    ]


def test_from_pretrained_of_an_export_gives_the_onnxruntime_captioner(exports, checkpoints, tiny_data):
    photo = tiny_data / "images" / "blue_circle_1.jpg"
    model = Captioner.from_pretrained(exports["attention"])
    assert isinstance(model, OnnxCaptioner)
    assert (
        model.caption(photo).caption
        == Captioner.from_pretrained(checkpoints["attention"]).caption(photo).caption
    )
    with pytest.raises(
        CheckpointError, match="an ONNX export .*the checkpoint directory it was exported from"
    ):
        Captioner.from_pretrained(exports["attention"], runtime="torch")  # what evaluate and serve ask for


def test_a_bad_graph_fails_the_export_and_leaves_nothing(checkpoints, tmp_path):
    class BakedBatch(Merge):
        """A step that tracing gets wrong: the Python branch is frozen at the traced batch size."""

        def step(self, tokens, state):
            log_probs, state, alpha = super().step(tokens, state)
            return (log_probs if tokens.shape[0] == 2 else log_probs.roll(1, dims=1)), state, alpha

    good = Captioner.from_pretrained(checkpoints["merge"])
    decoder = BakedBatch(vocab_size=len(good.vocab), feature_dim=good.encoder.feature_dim, **SMALL)
    model = Captioner(good.encoder, decoder, good.vocab, good.decoder_config)
    with pytest.raises(ExportError, match="decoder_step.onnx.*log_probs"):
        export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert model.training  # put back as it was


def test_export_replaces_only_a_previous_export(checkpoints, exports, tmp_path):
    model = Captioner.from_pretrained(checkpoints["show_tell"])
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"not really")
    with pytest.raises(ExportError, match="not empty and not a previous ONNX export"):
        export_onnx(model, precious)
    with pytest.raises(ExportError, match="not empty and not a previous ONNX export"):
        export_onnx(model, checkpoints["merge"])  # a torch checkpoint is not an export either
    assert [p.name for p in precious.iterdir()] == ["holiday.jpg"]

    again = shutil.copytree(exports["attention"], tmp_path / "export")
    export_onnx(model, again)
    assert json.loads((again / "config.json").read_text())["decoder"]["name"] == "show_tell"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "photos"]  # no temporary left behind


def test_runtime_refuses_a_torch_checkpoint(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="captioner export"):
        OnnxCaptioner.from_pretrained(checkpoints["merge"])
    with pytest.raises(CheckpointError, match="no config.json"):
        OnnxCaptioner.from_pretrained(tmp_path)


def test_an_onnx_ensemble_of_two_copies_gives_the_export_s_captions(exports, checkpoints, tiny_data):
    single = OnnxCaptioner.from_pretrained(exports["attention"], threads=1)
    pair = OnnxCaptioner.from_pretrained([exports["attention"], exports["attention"]], threads=1)
    assert pair.members == [str(exports["attention"])] * 2 and pair.label_head is not None
    transform = build_transform(single.encoder.preprocess)
    batch = torch.stack([transform(load_image(p)) for p in sorted((tiny_data / "images").glob("*.jpg"))[:6]])
    want, got = single.caption_tensors(batch, beam_size=3), pair.caption_tensors(batch, beam_size=3)
    assert [c.caption for c in got] == [c.caption for c in want] and all(c.words for c in want)
    assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-5)
    with pytest.raises(ExportError, match="exported as its members"):
        export_onnx(Captioner.from_pretrained([checkpoints["attention"]] * 2), "unused")
