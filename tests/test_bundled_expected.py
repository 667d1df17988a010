"""The bundled models caption the example photos exactly as recorded (tests/expected/bundled_captions.json).

The file was written by the release that trained them, for the decoder alone (`grounding=False`,
`whole_phrases=False`, `rerank=False`); any change to loading, preprocessing or decoding that alters a
caption, or moves a score by more than float rounding, fails here. "beam3-grounded" pins grounded decoding
with whole phrases the same way; it was re-recorded when borrowed label words and whole phrases joined it,
and again when the last word before the length limit had to close its phrase. "beam3-default" is the
default decoding: that, then consensus re-ranking by the training neighbours (`captioner.neighbours`) for
the models that carry them.
"""

import json
from pathlib import Path

import pytest

from captioner import Captioner

ROOT = Path(__file__).parents[1]
EXPECTED = json.loads((ROOT / "tests" / "expected" / "bundled_captions.json").read_text())
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
OPTIONS = {
    "beam1": {"beam_size": 1, "grounding": False, "whole_phrases": False, "rerank": False},
    "beam3": {"beam_size": 3, "n_best": 3, "grounding": False, "whole_phrases": False, "rerank": False},
    "beam3-grounded": {"beam_size": 3, "n_best": 3, "rerank": False},
    "beam3-default": {"beam_size": 3, "n_best": 3},  # grounded, whole phrases, re-ranked by neighbours
}


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])  # the encoder's CPU backends (ort_backbone)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_model_captions_as_recorded(name, runtime, monkeypatch):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CAPTIONER_ENCODER_RUNTIME", runtime)
    model = Captioner.from_pretrained(name)
    for key, options in OPTIONS.items():
        results = model.caption(EXAMPLES, **options)
        for path, result in zip(EXAMPLES, results, strict=True):
            want = EXPECTED[name][key][path.name]
            assert [text for text, _ in result.captions] == [text for text, _ in want], (name, key, path)
            assert [s for _, s in result.captions] == pytest.approx([s for _, s in want], abs=2e-3)
