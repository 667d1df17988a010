"""`captioner evaluate`: caption a data set split and score it the way the published tables do.

Every image of the split is captioned from the image file through the shared pipeline (or from a feature
cache of the same encoder and preprocessing, which gives the same features faster), then scored with
pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L and CIDEr-D on the PTB-tokenized captions, 0-100 scale.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from captioner.data import load_dataset
from captioner.features import FeatureStore, image_key
from captioner.inference import caption_files
from captioner.metrics import format_scores, score_captions
from captioner.model import Captioner, resolve_model


def evaluate_model(
    root: str | Path,
    *,
    split: str = "test",
    model: str | None = None,
    beam_size: int = 3,
    length_penalty: float = 0.0,
    batch_size: int = 32,
    limit: int | None = None,
    features: str | None = None,
    output: Path | None = None,
    skip_missing: bool = False,
    quiet: bool = False,
) -> dict:
    data = load_dataset(root, skip_missing=skip_missing)
    examples = data.split(split)[:limit]
    captioner = Captioner.from_pretrained(model)
    options = {"beam_size": beam_size, "length_penalty": length_penalty}
    start = time.perf_counter()
    generated: dict[str, str] = {}
    errors: dict[str, str] = {}
    if features:
        store = FeatureStore.open(features)
        if store.encoder != captioner.encoder.name or store.preprocess != captioner.encoder.preprocess:
            raise ValueError(
                f"{features}: features of {store.encoder} {store.preprocess}, but the model uses "
                f"{captioner.encoder.name} {captioner.encoder.preprocess}"
            )
        rows = store.row_of()
        keys = [image_key(ex.image, data.root) for ex in examples]
        for s in range(0, len(keys), batch_size):
            chunk = keys[s : s + batch_size]
            pooled, grid = store.features([rows[k] for k in chunk])
            with torch.inference_mode():
                hyps = captioner.generate(pooled, grid, **options)
            generated.update(
                {k: captioner.vocab.decode(h[0].tokens) for k, h in zip(chunk, hyps, strict=True)}
            )
    else:
        paths = [ex.image for ex in examples]
        for path, result in caption_files(captioner, paths, batch_size=batch_size, **options):
            key = image_key(path, data.root)
            if "error" in result:
                errors[key] = result["error"]
            else:
                generated[key] = result["caption"]
    seconds = time.perf_counter() - start
    references = {image_key(ex.image, data.root): list(ex.captions) for ex in examples}
    scored = {k: v for k, v in references.items() if k in generated}
    scores = score_captions(scored, {k: generated[k] or "<unk>" for k in scored}, spice=True)
    report = {
        "model": str(resolve_model(model)),
        "data": str(data.root),
        "split": split,
        "images": len(examples),
        "failed": len(errors),
        "beam_size": beam_size,
        "length_penalty": length_penalty,
        "caption_seconds": round(seconds, 1),
        "scores": scores,
        "captions": [
            {
                "image": k,
                "caption": generated.get(k),
                "references": references[k],
                **({"error": errors[k]} if k in errors else {}),
            }
            for k in references
        ],
    }
    if not quiet:
        for key, message in errors.items():
            print(f"error: {key}: {message}", file=sys.stderr)
        print(
            f"{split} split of {data.root}: {len(scored):,} images, beam size {beam_size}, "
            f"captioned in {seconds:.0f} s"
        )
        print(format_scores(scores))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1) + "\n")
        if not quiet:
            print(f"scores and all {len(generated):,} captions written to {output}")
    return report
