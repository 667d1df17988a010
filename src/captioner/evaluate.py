"""`captioner evaluate`: caption a data set split and score it the way the published tables do.

Every image of the split goes through the shared image pipeline and the encoder once (or comes from a
feature cache of the same encoder and preprocessing); the captions are then decoded at each requested beam
size and scored with pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L and CIDEr-D on PTB-tokenized captions, on
the 0-100 scale of the papers, beside object hallucination (CHAIR-s, CHAIR-i, grounded; see
`captioner.hallucination`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.data import load_dataset
from captioner.decoding import ends_mid_phrase
from captioner.errors import CaptionerError, DataError
from captioner.features import FeatureStore, image_key
from captioner.generation import DEFAULTS, GenerationOptions
from captioner.hallucination import chair
from captioner.images import load_batches
from captioner.metrics import JAVA_MISSING, CaptionScorer, format_scores, format_table, have_java
from captioner.model import DEFAULT_MODEL, Captioner


def encode_images(
    model: Captioner,
    paths: Sequence[Path],
    batch_size: int = 32,
    progress: bool = False,
    keep_grid: bool = True,
) -> tuple[list[int], torch.Tensor, torch.Tensor, dict[int, str]]:
    """Encoder features of the readable images: (their indices, pooled, grid, {index: error}); without
    `keep_grid` the grid is left empty (for many photos it is 80 times the pooled vectors' size)."""
    ok: list[int] = []
    pooled, grid, errors = [], [], {}
    model.eval()
    bar = tqdm(total=len(paths), unit="img", desc="encoding", disable=not progress, mininterval=1.0)
    with torch.inference_mode(), bar:
        for batch in load_batches(paths, model.encoder.preprocess, batch_size=batch_size):
            errors.update(batch.errors)
            if batch.images is not None:
                p, g = model.encoder(batch.images.to(model.device))
                ok.extend(batch.good)
                pooled.append(p)
                if keep_grid:
                    grid.append(g)
            bar.update(len(batch.rows))
    if not ok:
        return ok, torch.empty(0), torch.empty(0), errors
    return ok, torch.cat(pooled), torch.cat(grid) if keep_grid else torch.empty(0), errors


def decode(
    model: Captioner,
    pooled: torch.Tensor,
    grid: torch.Tensor,
    options: GenerationOptions,
    batch_size: int = 32,
    progress: str | None = None,
) -> list[str]:
    """The best caption of each image's features; `progress`: a bar with this title."""
    captions: list[str] = []
    bar = tqdm(total=pooled.shape[0], unit="img", desc=progress, disable=progress is None, mininterval=1.0)
    with torch.inference_mode(), bar:
        for s in range(0, pooled.shape[0], batch_size):
            chunk = pooled[s : s + batch_size].to(model.device), grid[s : s + batch_size].to(model.device)
            captions.extend(model.decode(h[0].tokens) for h in model.generate(*chunk, options))
            bar.update(chunk[0].shape[0])
    return captions


def default_output(model: str | Sequence[str] | None, split: str) -> Path:
    """eval-MODEL-SPLIT.json, so that evaluating another model (or split) keeps the first one's file:
    runs/a/best -> eval-a-best-test.json; an ensemble's names are joined by "+"."""

    def name(m: str) -> str:
        p = Path(m.rstrip("/"))
        text = f"{p.parent.name}-{p.name}" if p.name in ("best", "last") and p.parent.name else p.name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"

    models = [model] if isinstance(model, str) else list(model or [DEFAULT_MODEL])
    return Path(f"eval-{'+'.join(name(m) for m in models)}-{split}.json")


def evaluate_model(
    root: str | Path,
    *,
    split: str = "test",
    model: str | Sequence[str] | None = None,
    beam_sizes: Sequence[int] = (3,),
    options: GenerationOptions | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    features: str | None = None,
    output: Path | None = None,
    skip_missing: bool = False,
    resize: str | None = None,
    quiet: bool = False,
    split_file: str | Path | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Score `model` on a split at each beam size (other decoding `options` as given, else the model's);
    returns one report per beam size.

    `resize` ("squash" or "crop") overrides how the model's preprocessing makes photos square, to measure
    what the choice costs on photos of other shapes than the training ones."""
    if not have_java():  # the published protocol's tokenizer and METEOR: no scores without them
        raise CaptionerError(JAVA_MISSING)
    data = load_dataset(root, skip_missing=skip_missing, split_file=split_file)
    examples = data.split(split)[:limit]
    captioner = Captioner.from_pretrained(model, device=device, resize=resize, runtime="torch")
    described = " + ".join(captioner.members) or str(captioner.path)  # an ensemble: its members
    base = (options or GenerationOptions()).over(captioner.generation)
    runs = [dataclasses.replace(base, beam_size=b, n_best=None) for b in beam_sizes]  # validates each
    keys = [image_key(ex.image, data.root) for ex in examples]
    start = time.perf_counter()
    if features:
        store = FeatureStore.open(features)
        store.check_fits(captioner.encoder.name, captioner.encoder.preprocess)
        rows = store.row_of()
        ok = [i for i, k in enumerate(keys) if k in rows]
        errors = {
            i: f"{keys[i]}: not in the feature cache {features}"
            for i in range(len(keys))
            if keys[i] not in rows
        }
        pooled, grid = store.features([rows[keys[i]] for i in ok])
    else:
        ok, pooled, grid, errors = encode_images(
            captioner, [ex.image for ex in examples], batch_size, progress=not quiet
        )
    encode_seconds = time.perf_counter() - start
    references = {keys[i]: list(examples[i].captions) for i in ok}
    scorer = CaptionScorer(references) if references else None
    if not quiet:
        for message in errors.values():
            print(f"error: {message}", file=sys.stderr)
        print(f"{split} split of {data.root}: {len(ok):,} images ({len(errors)} failed)")
        print(f"model {described}")
    reports = []
    for run in runs:
        beam_size = run.value("beam_size")
        start = time.perf_counter()
        captions = decode(captioner, pooled, grid, run, batch_size, None if quiet else f"beam {beam_size}")
        generated = {keys[i]: c for i, c in zip(ok, captions, strict=True)}
        decode_seconds = time.perf_counter() - start
        if scorer is None:
            raise DataError(f"no image of the {split} split could be read")
        scores = scorer.score({k: c or "<unk>" for k, c in generated.items()}, spice=True)
        scores |= chair(generated, references)  # object hallucination, from the same references
        scores["mid-phrase"] = sum(ends_mid_phrase(c) for c in generated.values())  # captions cut short
        reports.append(
            {
                "model": described,
                "data": str(data.root),
                "split": split,
                "images": len(examples),
                "failed": len(errors),
                "beam_size": beam_size,
                "resize": captioner.encoder.preprocess.resize,
                "length_penalty": run.value("length_penalty"),
                "decoding": {name: run.value(name) for name in DEFAULTS},  # every option, as decoded
                "neighbours": captioner.neighbours.source if captioner.neighbours is not None else None,
                "encode_seconds": round(encode_seconds, 1),
                "decode_seconds": round(decode_seconds, 1),
                "scores": scores,
                "captions": [
                    {
                        "image": keys[i],
                        "caption": generated.get(keys[i]),
                        "references": list(examples[i].captions),
                    }
                    | ({"error": errors[i]} if i in errors else {})
                    for i in range(len(examples))
                ],
            }
        )
        if not quiet:
            print(f"\nbeam size {beam_size} (decoded in {decode_seconds:.0f} s)")
            if len(runs) == 1:
                print(format_scores(scores))
    if not quiet and len(runs) > 1:  # one table: the beam sizes side by side
        print("\n" + format_table({f"beam {r['beam_size']}": r["scores"] for r in reports}))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1) + "\n")
        if not quiet:
            print(f"\nscores and every caption written to {output}")
    return reports
