"""The typed contracts between the parts: decoding options, config.json, errors, devices, saved splits."""

import json
from pathlib import Path

import pytest
import torch

from captioner import distributed
from captioner.checkpoint import CheckpointConfig, atomic_directory, weights_digest
from captioner.cli import main
from captioner.errors import CaptionerError, CheckpointError, ConfigError
from captioner.generation import GenerationOptions
from captioner.model import BUNDLED_DIR, Captioner

EXAMPLE = Path(__file__).parents[1] / "examples"


# --- decoding options ---


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beam_size": 0}, "beam_size must be at least 1"),
        ({"n_best": 0}, "n_best must be at least 1"),
        ({"beam_size": 2, "n_best": 3}, r"n_best \(3\) cannot be larger than beam_size \(2\)"),
        ({"temperature": 0.0}, "temperature must be above 0"),
        ({"top_p": 0.9}, "top_p applies to sampling: set temperature too"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p must be above 0 and at most 1"),
        ({"beam_size": 2.5}, "beam_size must be a whole number"),
        ({"length_penalty": float("nan")}, "length_penalty must be a number"),
    ],
)
def test_impossible_options_are_refused_where_they_are_made(options, message):
    with pytest.raises(ConfigError, match=message):
        GenerationOptions(**options)


def test_options_fill_in_the_models_defaults():
    stored = GenerationOptions(length_penalty=2.0, no_repeat_ngram=3)
    asked = GenerationOptions(beam_size=5, length_penalty=0.5).over(stored)
    assert asked == GenerationOptions(beam_size=5, length_penalty=0.5, no_repeat_ngram=3)
    assert asked.value("n_best") == 1 and asked.value("beam_size") == 5
    assert GenerationOptions.from_json(stored.to_json()) == stored
    assert stored.to_json() == {"length_penalty": 2.0, "no_repeat_ngram": 3}
    assert hash(asked) == hash(GenerationOptions(beam_size=5, length_penalty=0.5, no_repeat_ngram=3))


def test_a_misspelt_option_fails_before_decoding():
    model = Captioner.from_pretrained()
    with pytest.raises(ConfigError, match="unknown decoding option 'beam_szie'"):
        model.caption(EXAMPLE / "cat.jpg", beam_szie=5)


def test_cli_refuses_impossible_options_in_one_line(capsys):
    # each option's own range is argparse's to check (test_cli.py); this pair only the options can
    assert main(["caption", str(EXAMPLE / "cat.jpg"), "--beam-size", "3", "--n-best", "5"]) == 1
    err = capsys.readouterr().err
    assert err == "captioner: error: n_best (5) cannot be larger than beam_size (3)\n"


# --- config.json ---


@pytest.mark.parametrize("name", ["flickr8k", "flickr8k-xe"])
def test_bundled_config_reads_and_writes_back_byte_for_byte(name, tmp_path):
    text = (BUNDLED_DIR / name / "config.json").read_text()
    config = CheckpointConfig.read(BUNDLED_DIR / name)
    assert json.dumps(config.to_json(), indent=2) + "\n" == text
    config.write(tmp_path)
    assert (tmp_path / "config.json").read_text() == text


def broken(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in ("config.json", "vocab.json", "model.safetensors"):
        (folder / f).write_bytes((BUNDLED_DIR / "flickr8k" / f).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["decoder"].pop("name"), "config.json: decoder: missing 'name'"),
        (lambda c: c["decoder"].update(hidden=3), r"config.json: decoder.hidden: unknown option \(known: "),
        (lambda c: c["decoder"].update(hidden_dim="big"), "decoder.hidden_dim: expected int, got 'big'"),
        (lambda c: c.pop("encoder"), "config.json: missing 'encoder'"),
        (lambda c: c["encoder"]["preprocess"].update(resize="zoom"), "resize must be 'squash' or 'crop'"),
        (
            lambda c: c["generation"].update(beam_size=0),
            "config.json: generation: beam_size must be at least 1",
        ),
        (lambda c: c.update(format_version=7), "checkpoint format 7 written by captioner"),
    ],
)
def test_a_broken_config_json_names_the_file_and_the_field(tmp_path, capsys, edit, message):
    folder = broken(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        Captioner.from_pretrained(folder)
    assert main(["caption", str(EXAMPLE / "cat.jpg"), "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"captioner: error: {folder}") and err.count("\n") == 1


def test_not_json_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointConfig.read(tmp_path)


def test_atomic_directory_keeps_the_old_version_on_error(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(ZeroDivisionError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second")
        raise ZeroDivisionError("interrupted while writing")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind


def test_weights_digest_tells_models_apart():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert weights_digest(a) == weights_digest(a) and weights_digest(a) != weights_digest(b)


# --- errors ---


def test_a_bug_keeps_its_traceback(monkeypatch):
    import captioner.inference

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(captioner.inference, "caption_paths", bug)
    with pytest.raises(ZeroDivisionError):
        main(["caption", str(EXAMPLE / "cat.jpg")])


def test_traceback_flag_and_debug_variable_show_every_error(monkeypatch, tmp_path):
    missing = str(tmp_path / "nowhere")
    assert main(["caption", str(EXAMPLE / "cat.jpg"), "--model", missing]) == 1
    with pytest.raises(CheckpointError):
        main(["--traceback", "caption", str(EXAMPLE / "cat.jpg"), "--model", missing])
    monkeypatch.setenv("CAPTIONER_DEBUG", "1")
    with pytest.raises(CaptionerError):
        main(["caption", str(EXAMPLE / "cat.jpg"), "--model", missing])


# --- results ---


def test_a_caption_prints_short_and_serialises_once():
    result = Captioner.from_pretrained().caption(EXAMPLE / "cat.jpg", beam_size=3, n_best=2)
    assert repr(result).startswith("Caption(") and "\n" not in repr(result) and len(repr(result)) < 200
    plain = result.to_json()
    assert set(plain) == {"caption", "score", "captions", "labels"} and len(plain["captions"]) == 2
    assert plain["labels"][0]["label"] == "cat" and plain["labels"][0]["p"] > 0.5  # the encoder sees it
    detail = result.to_json(detail=True)
    assert detail["words"] == result.caption.split()
    assert detail["attention"]["grid"] == [9, 9] and len(detail["attention"]["weights"]) == len(result.words)


# --- devices ---


def test_device_settings():
    assert distributed.device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert distributed.device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device"):
        distributed.device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            distributed.device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_training_step_and_captioning_on_the_gpu(tiny_data, tiny_features, tmp_path):
    from captioner.training import train
    from conftest import tiny_config

    for features in (tiny_features, None):  # cached features, and images through the encoder
        out = tmp_path / ("cached" if features else "images")
        config = tiny_config(tiny_data, features, out, epochs=1, max_steps=1, device="cuda")
        train(config, progress=False)
        model = Captioner.from_pretrained(out / "last", device="cuda")
        assert model.device.type == "cuda"
        result = model.caption(next((tiny_data / "images").glob("*.jpg")), beam_size=2)
        assert result.caption and result.features is not None and result.features[0].device.type == "cpu"


# --- saved splits ---


def test_data_split_command_and_a_training_run_save_the_split(tiny_data, tiny_features, tmp_path, capsys):
    from captioner.data import load_dataset
    from captioner.training import SPLIT_FILE, train
    from conftest import tiny_config

    out = tmp_path / "split.json"
    assert main(["data", "split", str(tiny_data), "--out", str(out)]) == 0
    assert "16 train, 8 val, 8 test (split column)" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert len(saved["test"]) == 8 and saved["test"] == sorted(saved["test"])
    again = load_dataset(tiny_data, split_file=out)
    assert {e.image.name for e in again.split("test")} == {Path(n).name for n in saved["test"]}

    config = tiny_config(tiny_data, tiny_features, tmp_path / "run", "merge", epochs=1, max_steps=1)
    train(config, progress=False)
    assert json.loads((tmp_path / "run" / SPLIT_FILE).read_text())["test"] == saved["test"]


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("model.safetensors", b"", "model.safetensors: not a readable safetensors file"),
        ("model.safetensors", b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":', "not a readable safetensors file"),
        ("model.safetensors", None, "model.safetensors: missing"),
        ("vocab.json", b"{not json", "vocab.json: not a vocabulary file"),
        ("vocab.json", b"[1, 2]", "vocab.json: not a vocabulary file"),
        ("config.json", b"[]", "config.json: expected a JSON object, got list"),
    ],
)
def test_a_damaged_checkpoint_file_is_named_in_one_line(tmp_path, file, content, message):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR / "flickr8k", copy)
    if content is None:
        (copy / file).unlink()
    else:
        (copy / file).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as caught:
        Captioner.from_pretrained(copy)
    assert "\n" not in str(caught.value)


def test_weights_of_another_vocabulary_are_refused_in_one_line(tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR / "flickr8k", copy)
    vocab = json.loads((copy / "vocab.json").read_text())
    vocab["words"] = vocab["words"][:-10]  # a vocabulary of other data: ten words fewer than the weights
    (copy / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match="the weights do not fit .*different checkpoints") as caught:
        Captioner.from_pretrained(copy)
    assert "\n" not in str(caught.value)
