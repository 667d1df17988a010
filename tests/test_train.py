"""Training: every decoder learns, a killed run resumes exactly, checkpoints round-trip."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from captioner.decoders import list_decoders
from captioner.errors import DataError
from captioner.generation import GenerationOptions
from captioner.model import Captioner, CheckpointError
from captioner.training import train
from conftest import tiny_config


def losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["kind"] == "train"]


@pytest.mark.parametrize("decoder", list_decoders())
def test_each_decoder_loss_falls(decoder, tiny_data, tiny_features, tmp_path):
    train(
        tiny_config(tiny_data, tiny_features, tmp_path, decoder, epochs=50, max_steps=25, lr=1e-2),
        progress=False,
    )
    seen = losses(tmp_path)
    assert len(seen) == 25
    assert sum(seen[-3:]) < 0.8 * sum(seen[:3]), seen


def test_training_on_images_without_a_cache(tiny_data, tmp_path):
    train(tiny_config(tiny_data, None, tmp_path, "merge", epochs=1, max_steps=2), progress=False)
    model = Captioner.from_pretrained(tmp_path / "last")
    assert model.encoder.name == "efficientnet_lite0"
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_a_short_run_logs_its_loss_and_says_which_epoch_was_best(tiny_data, tiny_features, tmp_path, capsys):
    config = tiny_config(tiny_data, tiny_features, tmp_path, "merge", epochs=2, log_every=50)  # > steps
    train(config, progress=False)
    assert len(losses(tmp_path)) == 2  # one line an epoch, though log_every is never reached
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("best: epoch ") and " of 2, validation BLEU-4 " in last
    assert f"saved in {tmp_path / 'best'}" in last
    assert json.loads((tmp_path / "best" / "val_scores.json").read_text())["CIDEr"] >= 0


def test_resume_finds_the_whole_checkpoint_an_interrupted_save_left(
    tiny_data, tiny_features, tmp_path, capsys
):
    import os
    import shutil

    from captioner.errors import TrainingRunError

    train(tiny_config(tiny_data, tiny_features, tmp_path, "merge", epochs=2), progress=False)
    best_scores = (tmp_path / "best" / "val_scores.json").read_text()
    # killed between the save's two renames: last/ is gone, .last.old is the only whole copy
    os.replace(tmp_path / "last", tmp_path / ".last.old")
    (tmp_path / ".best.k1ll3d").mkdir()  # and a temporary folder a killed save of best/ left
    capsys.readouterr()
    train(tiny_config(tiny_data, tiny_features, tmp_path, "merge", epochs=3), resume=True, progress=False)
    out = capsys.readouterr().out
    assert "resuming from" in out and "recovered from .last.old" in out and "epoch 3, step 0" in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # leftovers gone
    assert [r["epoch"] for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["kind"] == "val"] == [
        "1",
        "2",
        "3",
    ]
    if (
        json.loads(best_scores)["CIDEr"]
        >= json.loads((tmp_path / "best" / "val_scores.json").read_text())["CIDEr"]
    ):
        assert (tmp_path / "best" / "val_scores.json").read_text() == best_scores  # not an epoch-1 model

    # a run whose last/ cannot be resumed is refused, not restarted over its best/
    (tmp_path / "last" / "training_state.pt").write_bytes(b"")
    with pytest.raises(TrainingRunError, match="none to resume from .*refusing to start over"):
        train(tiny_config(tiny_data, tiny_features, tmp_path, "merge", epochs=4), resume=True, progress=False)
    shutil.rmtree(tmp_path / "last")
    with pytest.raises(TrainingRunError, match="refusing to start over"):
        train(tiny_config(tiny_data, tiny_features, tmp_path, "merge", epochs=4), resume=True, progress=False)


def test_resume_of_an_early_stopped_run_says_so_and_trains_nothing(
    tiny_data, tiny_features, tmp_path, capsys
):
    config = tiny_config(tiny_data, tiny_features, tmp_path, "merge", epochs=2)
    train(config, progress=False)
    state_file = tmp_path / "last" / "training_state.pt"
    saved = torch.load(state_file, weights_only=True)
    saved["state"]["bad_epochs"] = config.train.patience  # as early stopping leaves it
    torch.save(saved, state_file)
    capsys.readouterr()
    train(tiny_config(tiny_data, tiny_features, tmp_path, "merge", epochs=5), resume=True, progress=False)
    out = capsys.readouterr().out
    assert "nothing to resume" in out and "stopped early after epoch 2" in out
    assert torch.load(state_file, weights_only=True)["state"]["epoch"] == 2  # no epoch trained


def test_refuses_to_overwrite_a_run_without_resume(tiny_data, tiny_features, tmp_path):
    config = tiny_config(tiny_data, tiny_features, tmp_path, "merge", epochs=1, max_steps=1)
    train(config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, progress=False)


def _cli_train(config_path, out, *extra):
    return [
        sys.executable,
        "-m",
        "captioner.cli",
        "train",
        "--config",
        str(config_path),
        f"train.out_dir={out}",
        *extra,
    ]


def test_killed_mid_epoch_resumes_and_matches_an_uninterrupted_run(tiny_data, tiny_features, tmp_path):
    import yaml

    config = tiny_config(
        tiny_data, tiny_features, tmp_path / "unused", "attention", epochs=3, save_every_steps=1
    )
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))

    straight = tmp_path / "straight"
    subprocess.run(_cli_train(config_path, straight), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli_train(config_path, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state_file = killed / "last" / "training_state.pt"
    deadline = time.time() + 120
    while not state_file.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(state_file, weights_only=True)["state"]
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 3, "expected to stop mid-epoch"

    resumed = subprocess.run(
        _cli_train(config_path, killed, "--resume"), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    final = torch.load(state_file, weights_only=True)["state"]
    assert final["epoch"] == 3 and final["global_step"] == 9
    a, b = (
        load_file(str(straight / "last" / "model.safetensors")),
        load_file(str(state_file.parent / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_gives_the_same_captions(tiny_model, tiny_data, tmp_path):
    image = next((tiny_data / "images").glob("red_square_*.jpg"))
    model = Captioner.from_pretrained(tiny_model)
    first = model.caption(image, beam_size=3, n_best=2)
    model.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]
    again = Captioner.from_pretrained(tmp_path / "copy").caption(image, beam_size=3, n_best=2)
    assert again.captions == first.captions
    saved = load_file(tmp_path / "copy" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}  # inference weights: half the size
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["encoder"]["name"] == "efficientnet_lite0" and config["decoder"]["name"] == "attention"
    assert config["captioner_version"]
    assert "generation" not in config


def test_generation_defaults_travel_with_the_model(tiny_model, tiny_data, tmp_path):
    image = next((tiny_data / "images").glob("blue_*.jpg"))
    model = Captioner.from_pretrained(tiny_model)
    model.generation = GenerationOptions(length_penalty=3.0)
    model.save_pretrained(tmp_path / "lp")
    loaded = Captioner.from_pretrained(tmp_path / "lp")
    assert loaded.generation == GenerationOptions(length_penalty=3.0)
    by_default = loaded.caption(image, beam_size=3)
    assert by_default.score == loaded.caption(image, beam_size=3, length_penalty=3.0).score
    assert by_default.score != loaded.caption(image, beam_size=3, length_penalty=0.0).score


def test_incompatible_checkpoint_is_refused_clearly(tiny_model, tmp_path):
    Captioner.from_pretrained(tiny_model).save_pretrained(tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format 99"):
        Captioner.from_pretrained(tmp_path / "ck")


def test_tiny_model_learned_to_describe_shapes(tiny_model, tiny_data):
    model = Captioner.from_pretrained(tiny_model)
    captions = [c.caption for c in model.caption(sorted((tiny_data / "images").glob("*_0.jpg")))]
    assert len(set(captions)) > 1, captions  # not the same caption for every image


def test_glove_vectors_initialise_the_embeddings(tiny_data, tiny_features, tmp_path):
    from captioner.training import load_glove
    from captioner.vocab import Vocabulary

    glove = tmp_path / "glove.txt"
    glove.write_text("red " + " ".join(["0.5"] * 48) + "\nzebra " + " ".join(["1"] * 48) + "\n")
    vocab = Vocabulary.build(["a red square"], min_count=1)
    embedding = torch.nn.Embedding(len(vocab), 48)
    assert load_glove(embedding, vocab, glove) == 1
    assert torch.all(embedding.weight[vocab.index["red"]] == 0.5)
    with pytest.raises(DataError, match="line 1: 48 numbers, but decoder.embed_dim is 16"):
        load_glove(torch.nn.Embedding(len(vocab), 16), vocab, glove)
    # and through a training config: one optimiser step (Adam moves a weight by at most about lr) later,
    # the vector of a word GloVe knows is still GloVe's, and the others are not
    config = tiny_config(tiny_data, tiny_features, tmp_path / "run", "merge", epochs=1, max_steps=1)
    config.decoder.glove = str(glove)
    train(config, progress=False)
    trained = Captioner.from_pretrained(tmp_path / "run" / "last")
    weights = trained.decoder.embed.weight
    lr = config.train.lr
    assert torch.allclose(weights[trained.vocab.index["red"]], torch.full((48,), 0.5), atol=2 * lr)
    assert not torch.allclose(weights[trained.vocab.index["blue"]], torch.full((48,), 0.5), atol=0.1)


def test_encoder_fine_tuning_saves_the_encoder(tiny_data, tmp_path):
    from captioner.encoders import create_encoder

    config = tiny_config(tiny_data, None, tmp_path, "show_tell", epochs=1, max_steps=2)
    config.encoder.finetune = 0.2
    config.encoder.lr = 1e-3
    train(config, progress=False)
    model = Captioner.from_pretrained(tmp_path / "last")
    assert model.encoder_finetuned
    original = create_encoder("efficientnet_lite0").state_dict()
    tuned = model.encoder.state_dict()
    changed = [k for k in original if not torch.equal(original[k], tuned[k])]
    assert changed and "backbone.conv_stem.weight" not in changed  # only the last layers were trained
    assert not any("running" in k for k in changed)  # batch norm statistics stay ImageNet's
