import pytest

from captioner.config import load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("decoder:\n  name: merge\ntrain:\n  epochs: 3\n  lr: 1.0e-3\n")
    c = load_config(path, ["train.lr=3e-4", "train.epochs=7", "data.features=null", "encoder.finetune=1"])
    assert c.decoder.name == "merge"
    assert c.train.epochs == 7 and c.train.lr == pytest.approx(3e-4) and isinstance(c.train.lr, float)
    assert c.data.features is None and c.encoder.finetune == 1.0
    assert c.decoder.hidden_dim == 512  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=many", "train.epochs: expected int"),
        ("train.nope=1", "unknown key train.nope"),
        ("model.x=1", "unknown section"),
        ("epochs=3", "expected section.key=value"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_a_typo_on_the_command_line_is_blamed_on_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ValueError, match=r"^command line 'train.epoch=3': unknown key train.epoch"):
        load_config(path, ["train.epoch=3"])
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ValueError, match=rf"^{path}: unknown key train.epoch"):
        load_config(path, [])


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("train:\n  save_dtype: int8\n", "train.save_dtype must be one of float16, float32, got 'int8'"),
        ("train:\n  save_dtype: bogus\n", "train.save_dtype must be one of float16, float32"),
        ("train:\n  epochs: 0\n", "train.epochs must be at least 1, got 0"),
        ("train:\n  batch_size: -4\n", "train.batch_size must be at least 1, got -4"),
        ("train:\n  batch_size: 0\n", "train.batch_size must be at least 1, got 0"),
        ("train:\n  lr: -0.1\n", "train.lr must be above 0, got -0.1"),
        ("train:\n  lr: .nan\n", "train.lr must be above 0, got nan"),
        ("train:\n  val_beam_size: 0\n", "train.val_beam_size must be at least 1"),
        ("decoder:\n  hidden_dim: 0\n", "decoder.hidden_dim must be at least 1, got 0"),
        ("decoder:\n  dropout: 1.0\n", "decoder.dropout must be at least 0 and below 1"),
        ("encoder:\n  finetune: 7\n", "encoder.finetune must be at least 0 and at most 1, got 7.0"),
        (
            "data:\n  length_percentile: 200\n",
            "data.length_percentile must be above 0 and at most 100, got 200.0",
        ),
        ("train: 5\n", "section 'train' must be a mapping of keys, got 5"),
        ("train:\n  epochs: [3\n", "not valid YAML"),
    ],
)
def test_every_value_is_checked_when_the_config_loads(tmp_path, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=f"^{path}: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_the_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(path)
