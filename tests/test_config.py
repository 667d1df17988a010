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
