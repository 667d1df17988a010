"""The training loop: teacher forcing with cross-entropy (or self-critical), validated by decoding captions.

One epoch = every item of the training split once (each (image, reference caption) pair, or each image for
self-critical training), in an order fixed by the seed and the epoch number, so a run interrupted
mid-epoch resumes at the very batch it stopped at. Validation decodes the validation images (greedy by
default) and scores them with CIDEr-D: never teacher-forced BLEU, which says little about the captions a
model actually writes. The best checkpoint by validation CIDEr is kept in OUT/best, the latest in OUT/last
(with the optimiser state for --resume).

Under torchrun every process trains on its own share of each epoch's batches on its own GPU (gradients
are averaged by DistributedDataParallel, so the effective batch is batch_size x processes); rank 0 alone
logs, validates and writes checkpoints, and tells the others when to stop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner import distributed
from captioner.checkpoint import VOCAB_FILE, WEIGHTS_FILE, CheckpointConfig
from captioner.config import Config
from captioner.data import Example, load_dataset, save_split
from captioner.errors import ConfigError, TrainingRunError
from captioner.features import FeatureStore
from captioner.metrics import CaptionScorer
from captioner.model import Captioner, resolve_model
from captioner.training.data import Source, collate, epoch_batches, load_glove, target_length
from captioner.training.log import MetricsLog
from captioner.training.scst import CiderD, SelfCritical
from captioner.training.state import (
    STATE_FILE,
    RunState,
    load_state,
    make_scheduler,
    recover_last,
    save_state,
    seed_everything,
    step_scheduler,
)
from captioner.training.steps import CrossEntropyStep, SelfCriticalStep
from captioner.vocab import Vocabulary, tokenize

SPLIT_FILE = "split.json"  # in OUT: which images each split held, to evaluate on exactly that test set


@dataclass
class Run:
    """Everything one training run works with, made once by `prepare`."""

    config: Config
    out: Path
    ddp: distributed.Dist
    device: torch.device
    model: Captioner
    items: Any  # training_data.FeatureItems or ImageItems
    lengths: list[int]  # each item's length, for batching similar lengths together
    step: nn.Module  # CrossEntropyStep or SelfCriticalStep, wrapped in DDP under torchrun
    params: list[nn.Parameter]  # what the optimiser trains (and gradients are clipped over)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    source: Source
    val_examples: list[Example]
    val_features: tuple[torch.Tensor, torch.Tensor] | None
    scorer: CaptionScorer | None  # rank 0 only
    log: MetricsLog | None  # rank 0 only
    state: RunState


def train(config: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train as `config` says; returns the directory of the best checkpoint."""
    run = prepare(config, resume)
    try:
        stop = run.state.bad_epochs >= config.train.patience  # a resumed run that had stopped early
        while run.state.epoch < config.train.epochs and not stop:
            stop = train_epoch(run, progress and run.ddp.main)
            stop = end_epoch(run, stop)
        finish(run)
        if run.ddp.main:
            summarise(run)
    finally:
        if run.log is not None:
            run.log.close()
    distributed.cleanup(run.ddp)
    return run.out / "best"


def summarise(run: Run) -> None:
    """The run's last words: which epoch was best, its validation scores, where it is."""
    best = run.out / "best"
    try:
        scores = json.loads((best / "val_scores.json").read_text())
    except (OSError, ValueError):
        return
    shown = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if isinstance(v, int | float))
    epoch = f"epoch {run.state.best_epoch} of {run.state.epoch}" if run.state.best_epoch else "the best epoch"
    print(f"best: {epoch}, validation {shown}; saved in {best} (to resume or go on: {run.out / 'last'})")


def prepare(config: Config, resume: bool) -> Run:
    tc = config.train
    ddp = distributed.setup()
    device = distributed.device(tc.device, ddp)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last"
    if not resume and (last / STATE_FILE).exists():
        raise TrainingRunError(
            f"{out}: a training run is already there; pass --resume to continue it, "
            "or choose another train.out_dir"
        )
    resumable, note = None, ""
    if resume:  # the newest whole checkpoint, wherever an interrupted save left it; never a silent restart
        if ddp.main:
            resumable, note = recover_last(out)
        distributed.barrier(ddp)
        if not ddp.main:
            resumable = last if (last / STATE_FILE).exists() else None
        if resumable is None and ((out / "best").exists() or last.exists()):
            raise TrainingRunError(
                f"{out}: --resume found checkpoints but none to resume from (no whole last/ with its "
                f"{STATE_FILE}); refusing to start over, which would replace best/: train into another "
                "train.out_dir"
            )
        if resumable is None and ddp.main:
            print(f"nothing to resume in {out}: starting a new run")
    seed_everything(tc.seed + ddp.rank)  # the same initial weights are broadcast from rank 0; dropout differs

    data = load_dataset(
        config.data.root, skip_missing=config.data.skip_missing, split_file=config.data.split_file
    )
    train_examples = data.split(config.data.train_split)
    val_examples = data.split(config.data.val_split)[: config.data.val_images or None]
    start = _start_checkpoint(config) if tc.init_from else None
    if start is not None:  # its decoder settings replace the config's: they must match its weights
        config = dataclasses.replace(config, decoder=dataclasses.replace(start[1].decoder, glove=None))
    if resumable is not None:
        vocab = Vocabulary.load(last / VOCAB_FILE)
    elif start is not None:
        vocab = Vocabulary.load(start[0] / VOCAB_FILE)
    else:
        vocab = Vocabulary.build(
            (c for ex in train_examples for c in ex.captions),
            config.data.min_count,
            config.data.length_percentile,
        )

    # One process reads the cache into memory; several share it through the page cache instead.
    store = (
        FeatureStore.open(config.data.features, in_memory=ddp.world == 1) if config.data.features else None
    )
    model = _build_model(config, vocab, store, start, resumable is not None).to(device)
    source = Source(data.root, model, store, augment=tc.augment)
    if tc.scst:
        references = [[tokenize(c) for c in ex.captions] for ex in train_examples]
        cider = CiderD(references, tc.scst_count_end)
        scst = SelfCritical(model, cider, tc.scst_samples, tc.scst_baseline, tc.scst_bleu_weight, references)
        items = source.images(train_examples)
        step: nn.Module = SelfCriticalStep(model, source, scst)
    else:
        items = source.captions(train_examples, vocab)
        step = CrossEntropyStep(model, source, tc.label_smoothing)
    if ddp.world > 1:
        step = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None
        )
    groups: list[dict[str, Any]] = [{"params": list(model.decoder.parameters()), "lr": tc.lr}]
    if model.encoder_finetuned:
        trainable = [p for p in model.encoder.parameters() if p.requires_grad]
        groups.append({"params": trainable, "lr": config.encoder.lr})
    optimizer = torch.optim.Adam(groups, weight_decay=tc.weight_decay)
    scheduler = make_scheduler(optimizer, tc)
    scorer, val_features, log = None, None, None
    if ddp.main:
        scorer = CaptionScorer({str(i): list(ex.captions) for i, ex in enumerate(val_examples)})
        if not scorer.java:
            print(
                "note: Java not found: validation tokenizes captions in Python (its CIDEr within 0.5 of the "
                "PTB tokenizer's); `captioner evaluate` needs Java",
                file=sys.stderr,
            )
        val_features = source.features(val_examples) if store is not None else None

    state = RunState()
    if resumable is not None:
        model.load_weights(last / WEIGHTS_FILE)
        state = load_state(last / STATE_FILE, optimizer, scheduler)
        if ddp.main and state.bad_epochs >= tc.patience:
            print(
                f"nothing to resume in {out}: it stopped early after epoch {state.epoch} (no better "
                f"validation CIDEr for {tc.patience} epochs); raise train.patience to go on"
            )
        elif ddp.main and state.epoch >= tc.epochs:
            print(
                f"nothing to resume in {out}: it finished its {tc.epochs} epochs; raise train.epochs to go on"
            )
        elif ddp.main:
            where = f"epoch {state.epoch + 1}, step {state.step_in_epoch} of the epoch"
            print(f"resuming from {last}{note}: {where}")
    if ddp.main:
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        save_split(data, out / SPLIT_FILE)
        log = MetricsLog(out)
    return Run(
        config=config,
        out=out,
        ddp=ddp,
        device=device,
        model=model,
        items=items,
        lengths=[target_length(t) for t in items.targets],
        step=step,
        params=[p for g in groups for p in g["params"]],
        optimizer=optimizer,
        scheduler=scheduler,
        steps_per_epoch=math.ceil(len(items) / tc.batch_size) // ddp.world,
        source=source,
        val_examples=val_examples,
        val_features=val_features,
        scorer=scorer,
        log=log,
        state=state,
    )


def _start_checkpoint(config: Config) -> tuple[Path, CheckpointConfig]:
    """The checkpoint `train.init_from` names; its encoder must be the configured one."""
    path = resolve_model(config.train.init_from)
    saved = CheckpointConfig.read(path)
    if saved.encoder.name != config.encoder.name:
        raise ConfigError(
            f"train.init_from: {path} was trained on {saved.encoder.name} features, "
            f"but encoder.name is {config.encoder.name}"
        )
    return path, saved


def _build_model(
    config: Config,
    vocab: Vocabulary,
    store: FeatureStore | None,
    start: tuple[Path, CheckpointConfig] | None,
    resume: bool,
) -> Captioner:
    """The model as configured: new, or with the weights of `train.init_from`.

    With a feature cache the encoder's weights are not needed to train: the checkpoint names the encoder
    and loads its pretrained weights later. Its preprocessing must be the one the cache was made with."""
    finetune = config.encoder.finetune > 0 and store is None
    model = Captioner.build(
        config.encoder.name,
        config.decoder,
        vocab,
        pretrained_encoder=store is None,
        resize=config.encoder.resize,
        encoder_finetuned=finetune or (start is not None and start[1].encoder.finetuned),
        generation=start[1].generation if start is not None else None,
    )
    if store is not None:
        store.check_fits(model.encoder.name, model.encoder.preprocess)
    if start is not None and not resume:
        model.load_weights(start[0] / WEIGHTS_FILE)
        print(f"starting from the weights of {start[0]}")
    elif config.decoder.glove and not resume:
        embed = cast(nn.Embedding, model.decoder.embed)  # every decoder keeps its word vectors in `embed`
        found = load_glove(embed, vocab, config.decoder.glove)
        print(f"GloVe: initialised {found:,} of {len(vocab):,} word vectors from {config.decoder.glove}")
    model.encoder.set_trainable(config.encoder.finetune if finetune else 0.0)
    return model


def train_epoch(run: Run, progress: bool) -> bool:
    """Train the rest of the current epoch; returns True if train.max_steps was reached."""
    tc, state, ddp = run.config.train, run.state, run.ddp
    epoch = state.epoch
    # The epoch's order and the loader's worker seeds come from their own generator, never from the
    # global one that dropout draws from, so a resumed run repeats the interrupted one exactly.
    epoch_rng = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
    batches = epoch_batches(run.lengths, tc.batch_size, epoch_rng)
    batches = batches[: run.steps_per_epoch * ddp.world][ddp.rank :: ddp.world]  # this process's share
    loader = DataLoader(
        run.items,
        batch_sampler=batches[state.step_in_epoch :],
        collate_fn=collate,
        num_workers=tc.num_workers,
        generator=epoch_rng,
        pin_memory=run.device.type == "cuda",
    )
    run.model.train()
    run.model.encoder.eval()  # batch norm keeps its ImageNet statistics, even when fine-tuning
    bar = tqdm(
        loader,
        total=run.steps_per_epoch,
        initial=state.step_in_epoch,
        disable=not progress,
        desc=f"epoch {epoch + 1}/{tc.epochs}",
        unit="batch",
    )
    started, seen, loss_sum, reward_sum, batches_seen = time.perf_counter(), 0, 0.0, 0.0, 0
    for batch in bar:
        batch = batch.to(run.device)
        loss, reward = run.step(batch.inputs, batch.grid, batch.target)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(run.params, tc.grad_clip)
        run.optimizer.step()
        state.step_in_epoch += 1
        state.global_step += 1
        seen, loss_sum, batches_seen = seen + len(batch), loss_sum + loss.item(), batches_seen + 1
        reward_sum += reward or 0.0
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last_step = tc.max_steps and state.global_step >= tc.max_steps
        if state.global_step % tc.log_every == 0 or last_step or state.step_in_epoch == run.steps_per_epoch:
            if run.log is not None:  # the mean loss since the last line; an epoch always ends with one
                run.log.write(
                    "train",
                    state,
                    loss=loss_sum / batches_seen,
                    lr=run.optimizer.param_groups[0]["lr"],
                    captions_per_s=seen / max(time.perf_counter() - started, 1e-9),
                    reward=100 * reward_sum / batches_seen if tc.scst else None,  # CIDEr-D, 0-100 like val
                )
            started, seen, loss_sum, reward_sum, batches_seen = time.perf_counter(), 0, 0.0, 0.0, 0
        if tc.save_every_steps and state.global_step % tc.save_every_steps == 0:
            save(run, run.out / "last")
        if last_step:
            bar.close()
            return True
    bar.close()
    return False


def end_epoch(run: Run, stop: bool) -> bool:
    """Validate, keep the best and the last checkpoint, step the schedule; returns whether to stop."""
    tc, state, ddp = run.config.train, run.state, run.ddp
    epoch = state.epoch
    finished_epoch = state.step_in_epoch >= run.steps_per_epoch
    if finished_epoch:
        state.epoch += 1
        state.step_in_epoch = 0
    scores: dict[str, float] = {"CIDEr": 0.0}
    if run.scorer is not None and run.log is not None:
        scores = validate(
            run.model, run.source, run.val_examples, run.val_features, run.scorer, tc.val_beam_size
        )
        run.log.write("val", state, **scores)
        print(f"epoch {epoch + 1}: validation " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    # Every rank takes the same decisions (best, schedule, early stop) from rank 0's score.
    scores["CIDEr"], stop_now = distributed.broadcast([scores["CIDEr"], float(stop)], ddp)
    stop = bool(stop_now)
    if scores["CIDEr"] > state.best_cider:
        state.best_cider, state.bad_epochs, state.best_epoch = scores["CIDEr"], 0, epoch + 1
        save(run, run.out / "best", scores)
    elif finished_epoch:
        state.bad_epochs += 1
    if finished_epoch:
        step_scheduler(run.scheduler, tc, scores["CIDEr"])
    save(run, run.out / "last", scores)
    if run.log is not None:
        run.log.plot()
    if state.bad_epochs >= tc.patience:
        if ddp.main:
            print(f"early stop: no better validation CIDEr for {tc.patience} epochs")
        stop = True
    distributed.barrier(ddp)  # the others wait while rank 0 validates and saves
    return stop


def save(run: Run, where: Path, scores: dict | None = None) -> None:
    """A checkpoint (rank 0 only); OUT/last also holds the training state, in full precision."""
    if not run.ddp.main:
        return
    last = where.name == "last"

    def extra(tmp: Path) -> None:
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(run.config.to_dict(), sort_keys=False))
        if scores is not None:
            (tmp / "val_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        if last:
            save_state(tmp / STATE_FILE, run.state, run.optimizer, run.scheduler)

    dtype = torch.float32 if last else getattr(torch, run.config.train.save_dtype)
    run.model.save_pretrained(where, dtype=dtype, extra=extra)


def finish(run: Run) -> None:
    if run.ddp.world > 1:
        sums = distributed.checksums(run.model.decoder, run.ddp)
        if run.ddp.main:
            check = {"processes": run.ddp.world, "identical_weights": len(set(sums)) == 1, "checksums": sums}
            (run.out / "distributed.json").write_text(json.dumps(check, indent=2) + "\n")


@torch.no_grad()
def validate(
    model: Captioner,
    source: Source,
    examples: Sequence[Example],
    features: tuple[torch.Tensor, torch.Tensor] | None,
    scorer: CaptionScorer,
    beam_size: int = 1,
    batch_size: int = 100,
) -> dict[str, float]:
    """Decode real captions for the validation images and score them (CIDEr-D, BLEU-4)."""
    model.eval()
    captions: dict[str, str] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if features is not None:
            pooled, grid = features[0][start : start + batch_size], features[1][start : start + batch_size]
        else:
            pooled, grid = source.features(chunk)
        # the decoder alone: a checkpoint is chosen for what it learned, not for what decoding adds
        hyps = model.generate(
            pooled.to(model.device),
            grid.to(model.device),
            beam_size=beam_size,
            grounding=False,
            whole_phrases=False,
        )
        for j, h in enumerate(hyps):
            captions[str(start + j)] = model.decode(h[0].tokens) or model.vocab.words[model.vocab.unk_id]
    model.train()
    model.encoder.eval()
    scores = scorer.score(captions, metrics=("BLEU-4", "CIDEr"))
    return {k: float(v) for k, v in scores.items()}
