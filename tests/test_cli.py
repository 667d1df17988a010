"""The command line, end to end, on the tiny data set and a tiny trained model."""

import json
import shutil
import subprocess
import sys

import pytest

from captioner.cli import main
from captioner.errors import FeatureCacheError

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "images"


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "captioner.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_version_and_help_are_quick_and_import_no_torch():
    code = "import sys, captioner.cli; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("captioner ")
    assert "caption" in run("--help").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["caption", "x.jpg", "--beam-size", "0"], "argument --beam-size: must be at least 1, got 0"),
        (["caption", "x.jpg", "--n-best", "0"], "argument --n-best: must be at least 1, got 0"),
        (["caption", "x.jpg", "--batch-size", "-2"], "argument --batch-size: must be at least 1, got -2"),
        (
            ["caption", "x.jpg", "--length-penalty", "nan"],
            "argument --length-penalty: expected a finite number, got 'nan'",
        ),
        (["caption", "x.jpg", "--temperature", "0"], "argument --temperature: must be above 0, got 0"),
        (["caption", "x.jpg", "--top-p", "1.5"], "argument --top-p: must be above 0 and at most 1, got 1.5"),
        (
            ["caption", "x.jpg", "--beam-size", "two"],
            "argument --beam-size: expected a whole number, got 'two'",
        ),
        (["index", "photos", "--n-best", "0"], "argument --n-best: must be at least 1, got 0"),
        (["evaluate", "data", "--beam-size", "3", "0"], "argument --beam-size: must be at least 1, got 0"),
        (["serve", "--port", "99999"], "argument --port: must be at least 0 and at most 65535, got 99999"),
        (["search", "a dog", "--top", "0"], "argument --top: must be at least 1, got 0"),
    ],
)
def test_every_option_is_checked_with_one_line_naming_it(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_top_p_without_temperature_is_refused_not_ignored(tiny_model, tiny_data, capsys):
    assert (
        main(
            [
                "caption",
                str(tiny_data / "images" / "red_square_0.jpg"),
                "--model",
                str(tiny_model),
                "--top-p",
                "0.9",
            ]
        )
        == 1
    )
    assert (
        capsys.readouterr().err.strip() == "captioner: error: top_p applies to sampling: set temperature too"
    )


def test_help_shows_defaults_and_the_bundled_models(capsys):
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 3)" in text and "(default: 16)" in text
    assert "flickr8k, flickr8k-search, flickr8k-xe" in text


def test_sampling_gives_n_best_samples_most_probable_first(tiny_model, tiny_data):
    from captioner.model import Captioner

    model = Captioner.from_pretrained(tiny_model)
    photos = [tiny_data / "images" / n for n in ("red_square_0.jpg", "blue_circle_1.jpg")]
    results = model.caption(photos, temperature=1.5, n_best=4)
    for result in results:
        scores = [score for _, score in result.captions]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert result.caption == result.captions[0][0]


def test_caption_jsonl_with_broken_files(tiny_model, tiny_data, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("red_square_0.jpg", "blue_circle_1.jpg"):
        shutil.copy(tiny_data / "images" / name, folder / name)
    shutil.copy(tiny_data / "images" / "green_square_2.jpg", folder / "sub" / "green.jpg")
    for bad in ("truncated.jpg", "empty.jpg", "not_an_image.jpg"):
        shutil.copy(FIXTURES / bad, folder / bad)
    (folder / "notes.txt").write_text("not an image and not an image suffix: ignored in folders")

    result = run(
        "caption", folder, "--model", tiny_model, "--format", "jsonl", "--n-best", "2", "--batch-size", 2
    )
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 6
    errors = {r["image"].rsplit("/", 1)[1]: r["error"] for r in records if "error" in r}
    assert set(errors) == {"truncated.jpg", "empty.jpg", "not_an_image.jpg"}
    assert "truncated" in errors["truncated.jpg"] and "empty" in errors["empty.jpg"]
    good = [r for r in records if "error" not in r]
    assert len(good) == 3
    for r in good:
        assert r["caption"] and isinstance(r["score"], float)
        assert len(r["captions"]) == 2 and r["captions"][0]["caption"] == r["caption"]


def test_caption_text_format(tiny_model, tiny_data):
    image = tiny_data / "images" / "red_square_0.jpg"
    result = run("caption", image, "--model", tiny_model, "--beam-size", 1)
    assert result.returncode == 0, result.stderr
    path, caption = result.stdout.strip().split("\t")
    assert path == str(image) and caption


def test_missing_file_is_an_error_line_not_a_crash(tiny_model, tmp_path):
    result = run("caption", tmp_path / "nope.jpg", "--model", tiny_model)
    assert result.returncode == 1
    assert "nope.jpg" in result.stderr and "not found" in result.stderr


def test_evaluate_writes_scores_and_captions(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(
            ["evaluate", str(tiny_data), "--split", "test", "--model", str(tiny_model), "--output", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr()
    for metric in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"):
        assert metric in printed.out
    assert "encoding: 100%" in printed.err and "beam 3: 100%" in printed.err  # progress bars
    report = json.loads(out.read_text())
    assert report["images"] == 8 and len(report["captions"]) == 8
    assert all(0 <= v <= 100 for k, v in report["scores"].items() if k.startswith("BLEU"))
    assert isinstance(report["scores"]["SPICE"], str) or report["scores"]["SPICE"] >= 0
    assert report["decoding"] == {  # every option as decoded: the model's defaults and the library's
        "beam_size": 3,
        "n_best": 1,
        "length_penalty": 0.0,
        "no_repeat_ngram": 0,
        "max_length": None,
        "temperature": None,
        "top_p": 1.0,
        "grounding": True,
        "whole_phrases": True,
        "rerank": True,
    }
    assert report["neighbours"] is None  # the tiny model carries none, so nothing was re-ranked


def test_evaluate_puts_several_beams_in_one_table_and_names_its_file_by_model(
    tiny_model, tiny_data, capsys, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "evaluate",
                str(tiny_data),
                "--split",
                "test",
                "--model",
                str(tiny_model),
                "--beam-size",
                "1",
                "2",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "beam 1" in line and "beam 2" in line)
    assert header.split() == ["beam", "1", "beam", "2"]
    cider = next(line for line in lines if line.startswith("CIDEr "))
    assert len(cider.split()) == 3  # the metric and one score a beam size
    assert (tmp_path / f"eval-{tiny_model.parent.name}-best-test.json").is_file()  # runs/NAME/best


def test_evaluate_from_features_matches_images(tiny_model, tiny_data, tiny_features):
    from captioner.evaluate import evaluate_model

    a = evaluate_model(tiny_data, split="test", model=str(tiny_model), beam_sizes=[1, 3], quiet=True)
    b = evaluate_model(
        tiny_data, split="test", model=str(tiny_model), features=str(tiny_features), quiet=True
    )
    assert [r["beam_size"] for r in a] == [1, 3]
    # the cache holds float16 features; the captions they give are the same
    assert [c["caption"] for c in a[1]["captions"]] == [c["caption"] for c in b[0]["captions"]]
    assert a[0]["resize"] == "squash"  # the model's own


def test_evaluate_can_crop_instead_of_squashing(tiny_model, tiny_data, tiny_features):
    from captioner.evaluate import evaluate_model

    [report] = evaluate_model(tiny_data, split="test", model=str(tiny_model), resize="crop", quiet=True)
    assert report["resize"] == "crop" and report["failed"] == 0
    # the report's captions are those of the model with the crop preprocessing (photos here are 96 x 80,
    # so the centre crop shows the encoder other pixels than squashing does)
    from captioner.model import Captioner

    crop = Captioner.from_pretrained(tiny_model, resize="crop")
    assert crop.encoder.preprocess.resize == "crop"
    images = [tiny_data / c["image"] for c in report["captions"]]
    assert [c["caption"] for c in report["captions"]] == [
        c.caption for c in crop.caption(images, beam_size=3)
    ]
    with pytest.raises(FeatureCacheError, match="features of"):  # the cache was made by squashing
        evaluate_model(
            tiny_data, split="test", model=str(tiny_model), features=str(tiny_features), resize="crop"
        )


def test_data_inspect(tiny_data, capsys):
    assert main(["data", "inspect", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert "csv" in out and "32" in out


def test_bad_data_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err


def test_extract_features_refuses_another_encoder(tiny_data, tiny_features, capsys):
    assert (
        main(["extract-features", str(tiny_data), "--encoder", "mobilenet_v2", "--out", str(tiny_features)])
        == 1
    )
    assert "refusing" in capsys.readouterr().err


def test_caption_out_resumes_where_a_killed_run_stopped(tiny_model, tiny_data, tmp_path, capsys):
    """A part file left by a killed run counts: its complete lines are kept as they are, its unfinished
    last line is dropped, and a re-run captions only the rest, each image exactly once."""
    folder = tmp_path / "photos"
    shutil.copytree(tiny_data / "images", folder)
    out = tmp_path / "captions.jsonl"
    images = sorted(str(p) for p in folder.glob("*.jpg"))
    kept = [{"image": p, "caption": "written before the kill", "score": -1.0} for p in images[:5]]
    lines = "".join(json.dumps(r) + "\n" for r in kept)
    (tmp_path / "captions.jsonl.part0").write_text(lines + '{"image": "' + images[5] + '", "capt')
    assert main(["caption", str(folder), "--model", str(tiny_model), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == images  # each once, in input order
    assert records[:5] == kept and all(r["caption"] != kept[0]["caption"] for r in records[5:])
    assert "5 done before this run" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.part*"))
    # a finished file is itself what is done: a re-run changes nothing
    before = out.read_text()
    assert main(["caption", str(folder), "--model", str(tiny_model), "--out", str(out)]) == 0
    assert out.read_text() == before
