"""Speed and memory benchmarks, measured in one run so that ratios are fair on a noisy machine.

    python benchmarks/run.py --images ../shared/flickr8k/Images --features features/flickr8k-lite2

Writes a Markdown report (default docs/benchmarks.md) with the machine it ran on:
  * encoder-only images/s, and end-to-end images/s (JPEG on disk -> caption) at batch 1 and 32, greedy
    and beam 3, with the ratio end-to-end / encoder-only;
  * batched beam search against one image at a time (same model, same images, same captions);
  * training throughput on cached features, and peak memory of training and of captioning;
  * cold start of `captioner --help` and `captioner caption one.jpg`;
  * PyTorch against onnxruntime for the same captions;
  * a photo library (benchmarks/library.py): this code against the code before the speed work on
    12-megapixel photos and 224 px ones, the fastest batch/loader/thread settings, each command's cold
    start, multi-query search, the index's size per photo and search latency up to 100,000 photos.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from captioner.decoding import beam_search
from captioner.generation import GenerationOptions
from captioner.images import build_transform, load_image
from captioner.inference import caption_files
from captioner.model import Captioner, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
import library  # noqa: E402  (benchmarks/ is not a package)
from photos import make_photos  # noqa: E402


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = (
        int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        / 2**20
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, no GPU; Python {platform.python_version()}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` runs (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def throughput(model: Captioner, paths: list[Path], repeat: int) -> list[dict]:
    transform = build_transform(model.encoder.preprocess)
    tensors = torch.stack([transform(load_image(p)) for p in paths])
    rows = []
    for batch in (1, 32):

        def encode(batch=batch):
            with torch.inference_mode():
                for s in range(0, len(tensors), batch):
                    model.encoder(tensors[s : s + batch])

        enc = len(paths) / timed(encode, repeat)
        for beam in (1, 3):

            def end_to_end(batch=batch, beam=beam):
                for _ in caption_files(model, paths, GenerationOptions(beam_size=beam), batch_size=batch):
                    pass

            e2e = len(paths) / timed(end_to_end, repeat)
            rows.append(
                {"batch": batch, "beam": beam, "encoder_img_s": enc, "e2e_img_s": e2e, "ratio": e2e / enc}
            )
    return rows


def beam_batched_vs_single(model: Captioner, paths: list[Path], repeat: int) -> dict:
    transform = build_transform(model.encoder.preprocess)
    with torch.inference_mode():
        pooled, grid = model.encoder(torch.stack([transform(load_image(p)) for p in paths]))
    ids = {
        "start_id": model.vocab.start_id,
        "end_id": model.vocab.end_id,
        "max_length": model.vocab.max_length,
    }
    out: dict = {}

    def batched():
        out["batched"] = []
        with torch.inference_mode():
            for s in range(0, len(paths), 32):
                out["batched"] += beam_search(
                    model.decoder, pooled[s : s + 32], grid[s : s + 32], beam_size=3, **ids
                )

    def one_by_one():  # our search, one image at a time: its k beams are the batch
        out["single"] = []
        with torch.inference_mode():
            for i in range(len(paths)):
                out["single"] += beam_search(
                    model.decoder, pooled[i : i + 1], grid[i : i + 1], beam_size=3, **ids
                )

    def tutorial():  # one image at a time, and each step as the popular tutorials write it
        out["tutorial"] = []
        with torch.inference_mode():
            for i in range(len(paths)):
                out["tutorial"] += beam_search(
                    TutorialStep(model.decoder), pooled[i : i + 1], grid[i : i + 1], beam_size=3, **ids
                )

    t_batched, t_single, t_tutorial = (
        timed(batched, repeat),
        timed(one_by_one, repeat),
        timed(tutorial, repeat),
    )
    tokens = {k: [h[0].tokens for h in v] for k, v in out.items()}
    return {
        "batched_cap_s": len(paths) / t_batched,
        "single_cap_s": len(paths) / t_single,
        "tutorial_cap_s": len(paths) / t_tutorial,
        "speedup": t_single / t_batched,
        "speedup_tutorial": t_tutorial / t_batched,
        "same_captions": tokens["batched"] == tokens["single"] == tokens["tutorial"],
    }


class TutorialStep:
    """A decoder step as the popular tutorials' beam search runs it (e.g. sgrvinod's caption.py): the
    attention projects the whole encoder grid again at every step, and each beam's copy of the grid is
    reordered with the beams (no per-image state). Same arithmetic, so the same captions."""

    def __init__(self, decoder):
        self.decoder = decoder  # no static_state: beam search reorders every state tensor

    def init_state(self, pooled, grid):
        return self.decoder.init_state(pooled, grid)

    def step(self, tokens, state):
        if "grid_att" in state:
            state = {**state, "grid_att": self.decoder.attention.feature_att(state["grid"])}
        return self.decoder.step(tokens, state)


def training_throughput(features: str | None, model_dir: Path, steps: int) -> list[dict]:
    if not features:
        return []
    from captioner.decoders import create_decoder
    from captioner.features import FeatureStore
    from captioner.vocab import Vocabulary

    store = FeatureStore.open(features)
    vocab = Vocabulary.load(model_dir / "vocab.json")
    rows = []
    for name in ("show_tell", "merge", "attention"):
        torch.manual_seed(0)
        decoder = create_decoder(name, vocab_size=len(vocab), feature_dim=store.grid.shape[2])
        optimizer = torch.optim.Adam(decoder.parameters(), 4e-4)
        pooled, grid = store.features(range(64))
        tokens = torch.randint(4, len(vocab), (64, 14))
        tokens[:, 0] = vocab.start_id

        args = (decoder, optimizer, pooled, grid, tokens)
        _train_step(*args)  # warm-up
        seconds = timed(lambda args=args: [_train_step(*args) for _ in range(steps)])
        rows.append({"decoder": name, "captions_s": 64 * steps / seconds})
    return rows


def _train_step(decoder, optimizer, pooled, grid, tokens) -> None:
    logits, aux = decoder(pooled, grid, tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    (loss + aux).backward()
    optimizer.step()


def run_command(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB) of a command, run in a fresh process."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], capture_output=True); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    ).stdout
    seconds, kib, rc = out.split()
    if rc != "0":
        raise RuntimeError(f"{' '.join(args)} failed with {rc}")
    return float(seconds), int(kib) / 1024


def onnx_vs_torch(model: Captioner, paths: list[Path], repeat: int) -> dict | None:
    try:
        from captioner.onnx import OnnxCaptioner, export_onnx
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        onnx = OnnxCaptioner.from_pretrained(export_onnx(model, Path(tmp) / "onnx"))
        captions = {}

        def run(m, key):
            captions[key] = [
                r.get("caption")
                for _, r in caption_files(m, paths, GenerationOptions(beam_size=3), batch_size=32)
            ]

        t_torch = timed(lambda: run(model, "torch"), repeat)
        t_onnx = timed(lambda: run(onnx, "onnx"), repeat)
    return {
        "torch_img_s": len(paths) / t_torch,
        "onnx_img_s": len(paths) / t_onnx,
        "speedup": t_torch / t_onnx,
        "same_captions": captions["torch"] == captions["onnx"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="a folder of JPEGs")
    p.add_argument("--model", default=None)
    p.add_argument("--features", default=None, help="a feature cache for the training benchmark")
    p.add_argument("--data", default="../shared/flickr8k", help="the data set the feature cache was made of")
    p.add_argument("--count", type=int, default=64, help="images per measurement")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument(
        "--photos", default=None, help="12-megapixel JPEGs (default: made by benchmarks/photos.py)"
    )
    p.add_argument("--baseline", default=library.BASELINE, help="the older code to compare with (a git ref)")
    p.add_argument("--no-library", action="store_true", help="leave out benchmarks/library.py")
    args = p.parse_args()

    paths = sorted(Path(args.images).glob("*.jpg"))[: args.count]
    model_dir = resolve_model(args.model)
    model = Captioner.from_pretrained(args.model)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = {"machine": machine(), "model": str(model_dir), "images": len(paths)}
    report["throughput"] = throughput(model, paths, args.repeat)
    report["beam"] = beam_batched_vs_single(model, paths, args.repeat)
    report["training"] = training_throughput(args.features, model_dir, steps=10)
    report["onnx"] = onnx_vs_torch(model, paths, args.repeat)
    exe = [sys.executable, "-m", "captioner"]
    with_model = ["--model", args.model] if args.model else []
    report["cold_start"] = {
        "help_s": statistics.median(run_command([*exe, "--help"])[0] for _ in range(3)),
        "caption_one_s": statistics.median(
            run_command([*exe, "caption", str(paths[0]), *with_model])[0] for _ in range(3)
        ),
    }
    report["memory_mib"] = {
        "caption_32": run_command(
            [*exe, "caption", *map(str, paths[:32]), "--batch-size", "32", *with_model]
        )[1],
    }
    if args.features:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(__file__).parents[1] / "configs" / "flickr8k_attention.yaml"
            overrides = [
                f"train.out_dir={tmp}/run",
                "train.max_steps=20",
                "data.val_images=50",
                f"data.root={args.data}",
                f"data.features={args.features}",
            ]
            report["memory_mib"]["train_20_steps"] = run_command(
                [*exe, "train", "--config", str(config), *overrides]
            )[1]
    if not args.no_library:
        with tempfile.TemporaryDirectory() as tmp:
            photos = Path(args.photos or tmp)
            if args.photos is None:
                make_photos(Path(args.data).parent / "coco-mini", photos, 32)
            report["library"] = library.run(
                photos, Path(args.images), Path(args.data), args.baseline, 2, (1_000, 10_000, 100_000)
            )
        library.plot(report["library"]["scaling"], Path(args.out).parent / "images" / "search-latency.png")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The hand-written reading of the numbers (from "## What the numbers say" on) survives a re-run.
    notes = out.read_text().partition(NOTES)[1:] if out.exists() else ("", "")
    out.write_text(render(report, started) + ("\n" + "".join(notes) if notes[0] else ""))
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(render(report, started))


NOTES = "## What the numbers say"


def render(r: dict, started: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Measured {started} by `python benchmarks/run.py` on {r['machine']}.",
        f"Model: `{r['model']}`; {r['images']} Flickr8k JPEGs per measurement; best of repeated runs.",
        "",
        "## Captioning throughput (images/s)",
        "",
        "| batch | beam | encoder only | end to end (JPEG -> caption) | end to end / encoder |",
        "|---:|---:|---:|---:|---:|",
    ]
    for t in r["throughput"]:
        lines.append(
            f"| {t['batch']} | {t['beam']} | {t['encoder_img_s']:.1f} | {t['e2e_img_s']:.1f} | "
            f"{t['ratio']:.2f} |"
        )
    b = r["beam"]
    lines += [
        "",
        "## Beam search (beam 3): batched against one image at a time",
        "",
        "| search | captions/s | batched is faster by |",
        "|---|---:|---:|",
        f"| batched, 32 images at a time | {b['batched_cap_s']:.1f} | |",
        f"| the same search, one image at a time | {b['single_cap_s']:.1f} | {b['speedup']:.1f}x |",
        f"| one image at a time, steps as the tutorials write them | {b['tutorial_cap_s']:.1f} | "
        f"**{b['speedup_tutorial']:.1f}x** |",
        "",
        f"Same captions from all three: {b['same_captions']}. The tutorials' step projects the encoder grid "
        "again at every step and reorders each beam's copy of it; ours projects it once per image and "
        "leaves it in place.",
    ]
    if r["training"]:
        lines += [
            "",
            "## Training on cached features (batch 64)",
            "",
            "| decoder | captions/s |",
            "|---|---:|",
        ]
        lines += [f"| {t['decoder']} | {t['captions_s']:.0f} |" for t in r["training"]]
    if r["onnx"]:
        o = r["onnx"]
        lines += [
            "",
            "## PyTorch against onnxruntime (batch 32, beam 3, end to end)",
            "",
            f"PyTorch {o['torch_img_s']:.1f} images/s, onnxruntime {o['onnx_img_s']:.1f} images/s "
            f"({o['speedup']:.2f}x); same captions: {o['same_captions']}.",
        ]
    c, m = r["cold_start"], r["memory_mib"]
    lines += [
        "",
        "## Cold start and memory",
        "",
        f"`captioner --help`: {c['help_s']:.2f} s; `captioner caption one.jpg` (imports, model load, "
        f"caption): {c['caption_one_s']:.1f} s (medians of 3).",
        "",
        "Peak resident memory: "
        + "; ".join(f"{k.replace('_', ' ')} {v:.0f} MiB" for k, v in m.items())
        + ".",
    ]
    if r.get("library"):
        lines += ["", *library.render(r["library"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
