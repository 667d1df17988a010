"""The training loop: teacher forcing with cross-entropy, validated by decoding real captions.

One epoch = every (image, reference caption) pair of the training split once, in an order fixed by the
seed and the epoch number, so a run interrupted mid-epoch resumes at the very batch it stopped at.
Validation decodes the validation images (greedy by default) and scores them with CIDEr-D: never
teacher-forced BLEU, which says little about the captions a model actually writes. The best checkpoint
by validation CIDEr is kept in OUT/best, the latest in OUT/last (with the optimiser state for --resume).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from captioner import distributed
from captioner.config import Config
from captioner.data import Example, load_dataset
from captioner.encoders import create_encoder
from captioner.features import FeatureStore, image_key
from captioner.images import ImageError, build_transform, load_image
from captioner.metrics import CaptionScorer
from captioner.model import Captioner, resolve_model
from captioner.scst import CiderD, SelfCritical
from captioner.vocab import Vocabulary, tokenize

STATE_FILE = "training_state.pt"


# --- data: (image or its features, caption) pairs ---


class FeaturePairs(TorchDataset):
    """Pairs read from a feature cache: (pooled, grid, caption ids)."""

    def __init__(self, store: FeatureStore, rows: Sequence[int], captions: Sequence[list[int]]):
        self.store, self.rows, self.captions = store, rows, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        pooled, grid = self.store.features([self.rows[i]])
        return pooled[0], grid[0], self.captions[i]


class ImagePairs(TorchDataset):
    """Pairs read from image files through the shared pipeline; a bad image is skipped with a warning."""

    def __init__(self, paths: Sequence[Path], captions: Sequence[list[int]], transform):
        self.paths, self.captions, self.transform = paths, captions, transform

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_image(self.paths[i])), None, self.captions[i]
        except ImageError as e:
            tqdm.write(f"warning: skipping {e}")
            return None


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    items = [it for it in items if it is not None]
    if not items:
        raise ValueError("every image in a batch failed to load")
    longest = max(len(c) for _, _, c in items)
    tokens = torch.zeros(len(items), longest, dtype=torch.long)  # 0 is <pad>
    for i, (_, _, c) in enumerate(items):
        tokens[i, : len(c)] = torch.tensor(c)
    first = torch.stack([a for a, _, _ in items])
    grid = torch.stack([g for _, g, _ in items]) if items[0][1] is not None else None
    return first, grid, tokens


class Source:
    """Where features come from: a cache (rows) or the images themselves (through the encoder)."""

    def __init__(self, config: Config, root: Path, model: Captioner, store: FeatureStore | None):
        self.config, self.root, self.model, self.store = config, root, model, store
        self.rows = store.row_of() if store else {}

    def row(self, example: Example) -> int:
        key = image_key(example.image, self.root)
        if key not in self.rows:
            raise ValueError(
                f"{self.store.root if self.store else ''}: no features for {key}; "
                "re-run `captioner extract-features` on this data set"
            )
        return self.rows[key]

    def pairs(self, examples: Sequence[Example], vocab: Vocabulary, train: bool) -> FeaturePairs | ImagePairs:
        """Every (image, caption) pair of `examples`: what cross-entropy training reads."""
        index = [(ex, vocab.encode(c)) for ex in examples for c in ex.captions]
        augment = train and self.config.train.augment
        return self._dataset([ex for ex, _ in index], [c for _, c in index], augment)

    def images(self, examples: Sequence[Example]) -> FeaturePairs | ImagePairs:
        """One item per image, its "caption" the image's index: what self-critical training samples from."""
        return self._dataset(examples, [[i] for i in range(len(examples))], self.config.train.augment)

    def _dataset(
        self, examples: Sequence[Example], captions: Sequence[list[int]], augment: bool
    ) -> FeaturePairs | ImagePairs:
        """Item i: example i's features from the cache (or its image) with captions[i]."""
        if self.store is not None:
            return FeaturePairs(self.store, [self.row(ex) for ex in examples], captions)
        transform = build_transform(self.model.encoder.preprocess, train=augment)
        return ImagePairs([ex.image for ex in examples], captions, transform)

    def encode(self, first: torch.Tensor, grid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if grid is not None:
            return first, grid
        with torch.set_grad_enabled(self.model.encoder_finetuned and self.model.training):
            return self.model.encoder(first)

    def features(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of whole images, for validation."""
        if self.store is not None:
            return self.store.features([self.row(ex) for ex in examples])
        transform = build_transform(self.model.encoder.preprocess)
        images = torch.stack([transform(load_image(ex.image)) for ex in examples])
        with torch.no_grad():
            return self.model.encoder(images)


class TrainingStep(nn.Module):
    """Encoder (if images), decoder and loss: the module DistributedDataParallel wraps.

    Cross-entropy under teacher forcing on (image, caption) batches; or, given `scst`, the self-critical
    loss on batches of images, whose "tokens" are then the images' indices. Returns (loss, mean reward).
    """

    def __init__(self, model: Captioner, source: Source, label_smoothing: float = 0.0, scst=None):
        super().__init__()
        self.model, self.source, self.scst = model, source, scst
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=model.vocab.pad_id, label_smoothing=label_smoothing)

    def forward(self, first: torch.Tensor, grid: torch.Tensor | None, tokens: torch.Tensor):
        pooled, grid = self.source.encode(first, grid)
        if self.scst is not None:
            return self.scst(pooled, grid, tokens[:, 0])
        logits, aux = self.model.decoder(pooled, grid, tokens[:, :-1])
        loss = self.loss_fn(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) + aux
        return loss, None


# --- the loop ---


def train(config: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train as `config` says; returns the directory of the best checkpoint.

    Under torchrun every process trains on its own share of each epoch's batches (gradients are averaged
    by DistributedDataParallel, so the effective batch is batch_size x processes); rank 0 alone logs,
    validates and writes checkpoints, and tells the others when to stop.
    """
    tc = config.train
    ddp = distributed.setup()
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last, best = out / "last", out / "best"
    if not resume and (last / STATE_FILE).exists():
        raise FileExistsError(
            f"{out}: a training run is already there; pass --resume to continue it, "
            "or choose another train.out_dir"
        )
    _seed(tc.seed + ddp.rank)  # the same initial weights are broadcast from rank 0; dropout differs per rank
    progress = progress and ddp.main

    data = load_dataset(config.data.root, skip_missing=config.data.skip_missing)
    train_examples = data.split(config.data.train_split)
    val_examples = data.split(config.data.val_split)[: config.data.val_images or None]
    start, saved = _start_checkpoint(config) if tc.init_from else (None, {})
    if resume and (last / "vocab.json").exists():
        vocab = Vocabulary.load(last / "vocab.json")
    elif start is not None:
        vocab = Vocabulary.load(start / "vocab.json")
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
    if store is not None and store.encoder != config.encoder.name:
        raise ValueError(
            f"{config.data.features}: features of {store.encoder}, but encoder.name is {config.encoder.name}"
        )
    # With a feature cache the encoder's weights are not needed to train: the checkpoint names the encoder
    # and loads its pretrained weights later. Its preprocessing must be the one the cache was made with.
    if store is not None and store.preprocess.resize != config.encoder.resize:
        raise ValueError(
            f"{config.data.features}: features made with resize={store.preprocess.resize}, but "
            f"encoder.resize is {config.encoder.resize}; re-extract with --resize or change the config"
        )
    encoder = create_encoder(config.encoder.name, pretrained=store is None)
    encoder.preprocess = (
        store.preprocess if store else dataclasses.replace(encoder.preprocess, resize=config.encoder.resize)
    )
    model = Captioner.build(encoder, config.decoder.options(), vocab)
    if start is not None and not resume:
        model.encoder_finetuned = bool(saved["encoder"]["finetuned"])
        model.generation = dict(saved.get("generation", {}))
        model.load_weights(start / "model.safetensors")
        print(f"starting from the weights of {start}")
    elif config.decoder.glove and not resume:
        embed = cast(nn.Embedding, model.decoder.embed)  # every decoder keeps its word vectors in `embed`
        found = load_glove(embed, vocab, config.decoder.glove)
        print(f"GloVe: initialised {found:,} of {len(vocab):,} word vectors from {config.decoder.glove}")
    if config.encoder.finetune > 0 and store is None:
        model.encoder.set_trainable(config.encoder.finetune)
        model.encoder_finetuned = True
    else:
        model.encoder.set_trainable(0.0)

    source = Source(config, data.root, model, store)
    scst = None
    if tc.scst:
        references = [[tokenize(c) for c in ex.captions] for ex in train_examples]
        scst = SelfCritical(model, CiderD(references), tc.scst_samples, tc.scst_baseline)
        pairs = source.images(train_examples)
    else:
        pairs = source.pairs(train_examples, vocab, train=True)
    step_module: nn.Module = TrainingStep(model, source, tc.label_smoothing, scst)
    if ddp.world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module)
    groups: list[dict[str, Any]] = [{"params": [p for p in model.decoder.parameters()], "lr": tc.lr}]
    if model.encoder_finetuned:
        groups.append(
            {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": config.encoder.lr}
        )
    optimizer = torch.optim.Adam(groups, weight_decay=tc.weight_decay)
    scheduler = _scheduler(optimizer, tc)
    steps_per_epoch = math.ceil(len(pairs) / tc.batch_size) // ddp.world
    if ddp.main:
        scorer = CaptionScorer({str(i): list(ex.captions) for i, ex in enumerate(val_examples)})
        val_features = source.features(val_examples) if store is not None else None

    state: dict[str, Any] = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best_cider": -1.0,
        "bad_epochs": 0,
    }
    if resume and (last / STATE_FILE).exists():
        state = _load_state(last, model, optimizer, scheduler)
        if ddp.main:
            where = f"epoch {state['epoch'] + 1}, step {state['step_in_epoch']} of the epoch"
            print(f"resuming from {last}: {where}")
    if ddp.main:
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        log = MetricsLog(out)

    def save(where: Path, scores: dict | None = None) -> None:
        if not ddp.main:
            return
        dtype = getattr(torch, tc.save_dtype)

        def extra(tmp: Path) -> None:
            (tmp / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            if scores is not None:
                (tmp / "val_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
            if where == last:
                torch.save(_training_state(state, optimizer, scheduler), tmp / STATE_FILE)

        model.save_pretrained(where, dtype=torch.float32 if where == last else dtype, extra=extra)

    stop = False
    while state["epoch"] < tc.epochs and not stop:
        epoch = state["epoch"]
        # The epoch's order and the loader's worker seeds come from their own generator, never from the
        # global one that dropout draws from, so a resumed run repeats the interrupted one exactly.
        epoch_rng = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
        batches = epoch_batches(pairs.captions, tc.batch_size, epoch_rng)
        batches = batches[: steps_per_epoch * ddp.world][ddp.rank :: ddp.world]  # this process's share
        loader = DataLoader(
            pairs,
            batch_sampler=batches[state["step_in_epoch"] :],
            collate_fn=collate,
            num_workers=tc.num_workers,
            generator=epoch_rng,
        )
        model.train()
        model.encoder.eval()  # batch norm keeps its ImageNet statistics, even when fine-tuning
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            initial=state["step_in_epoch"],
            disable=not progress,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            unit="batch",
        )
        started, seen, loss_sum, reward_sum, batches_seen = time.perf_counter(), 0, 0.0, 0.0, 0
        for first, grid, tokens in bar:
            loss, reward = step_module(first, grid, tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], tc.grad_clip)
            optimizer.step()
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            seen, loss_sum, batches_seen = seen + tokens.shape[0], loss_sum + loss.item(), batches_seen + 1
            reward_sum += reward or 0.0
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if ddp.main and state["global_step"] % tc.log_every == 0:  # mean loss since the last line
                rate = seen / max(time.perf_counter() - started, 1e-9)
                lr = optimizer.param_groups[0]["lr"]
                mean_reward = 100 * reward_sum / batches_seen if scst else None  # CIDEr-D, 0-100 like val
                log.write(
                    "train",
                    state,
                    loss=loss_sum / batches_seen,
                    lr=lr,
                    captions_per_s=rate,
                    reward=mean_reward,
                )
                started, seen, loss_sum, reward_sum, batches_seen = time.perf_counter(), 0, 0.0, 0.0, 0
            if tc.save_every_steps and state["global_step"] % tc.save_every_steps == 0:
                save(last)
            if tc.max_steps and state["global_step"] >= tc.max_steps:
                stop = True
                break
        bar.close()
        finished_epoch = state["step_in_epoch"] >= steps_per_epoch
        if finished_epoch:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        scores = {"CIDEr": 0.0}
        if ddp.main:
            scores = validate(model, source, val_examples, val_features, scorer, tc.val_beam_size)
            log.write("val", state, **scores)
            print(f"epoch {epoch + 1}: validation " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        # Every rank takes the same decisions (best, schedule, early stop) from rank 0's score.
        scores["CIDEr"], stop_now = distributed.broadcast([scores["CIDEr"], float(stop)], ddp)
        stop = bool(stop_now)
        if scores["CIDEr"] > state["best_cider"]:
            state["best_cider"], state["bad_epochs"] = scores["CIDEr"], 0
            save(best, scores)
        elif finished_epoch:
            state["bad_epochs"] += 1
        if finished_epoch:
            _step_scheduler(scheduler, tc, scores["CIDEr"])
        save(last, scores)
        if ddp.main:
            log.plot()
        if state["bad_epochs"] >= tc.patience:
            if ddp.main:
                print(f"early stop: no better validation CIDEr for {tc.patience} epochs")
            stop = True
        distributed.barrier(ddp)  # the others wait while rank 0 validates and saves
    if ddp.world > 1:
        sums = distributed.checksums(model.decoder, ddp)
        if ddp.main:
            check = {"processes": ddp.world, "identical_weights": len(set(sums)) == 1, "checksums": sums}
            (out / "distributed.json").write_text(json.dumps(check, indent=2) + "\n")
    if ddp.main:
        log.close()
    distributed.cleanup(ddp)
    return best


def _start_checkpoint(config: Config) -> tuple[Path, dict]:
    """The checkpoint `train.init_from` names, and its config.json; its decoder settings replace the
    config's (they must match its weights), and its encoder must be the configured one."""
    path = resolve_model(config.train.init_from)
    saved = json.loads((path / "config.json").read_text())
    if saved["encoder"]["name"] != config.encoder.name:
        raise ValueError(
            f"train.init_from: {path} was trained on {saved['encoder']['name']} features, "
            f"but encoder.name is {config.encoder.name}"
        )
    config.decoder = dataclasses.replace(config.decoder, **saved["decoder"])
    return path, saved


def epoch_batches(
    captions: Sequence[list[int]], batch_size: int, rng: torch.Generator, bucket: int = 50
) -> list[list[int]]:
    """Shuffled batches of similar caption lengths.

    The decoders run as many LSTM steps as the longest caption in a batch; grouping similar lengths
    (sorting within random chunks of `bucket` batches, then shuffling the batches) cuts the padding steps
    by about a third without making the order predictable.
    """
    order = torch.randperm(len(captions), generator=rng).tolist()
    chunk = batch_size * bucket
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(captions[i]))
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=rng).tolist()]


@torch.no_grad()
def validate(
    model: Captioner,
    source: Source,
    examples: Sequence[Example],
    features,
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
        for j, hyps in enumerate(model.generate(pooled, grid, beam_size=beam_size)):
            captions[str(start + j)] = (
                model.vocab.decode(hyps[0].tokens) or model.vocab.words[model.vocab.unk_id]
            )
    model.train()
    model.encoder.eval()
    scores = scorer.score(captions, metrics=("BLEU-4", "CIDEr"))
    return {k: float(v) for k, v in scores.items()}


def load_glove(embedding: nn.Embedding, vocab: Vocabulary, path: str | Path) -> int:
    """Copy GloVe vectors (text format: `word v1 v2 ...`) into `embedding` for the words it knows."""
    found = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            word, *values = line.rstrip().split(" ")
            if word not in vocab.index:
                continue
            if len(values) != embedding.embedding_dim:
                raise ValueError(
                    f"{path}, line {number}: {len(values)} numbers, but decoder.embed_dim is "
                    f"{embedding.embedding_dim}"
                )
            with torch.no_grad():
                embedding.weight[vocab.index[word]] = torch.tensor([float(v) for v in values])
            found += 1
    return found


# --- schedules, state, seeds ---


def _scheduler(optimizer: torch.optim.Optimizer, tc) -> torch.optim.lr_scheduler.LRScheduler | None:
    if tc.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=tc.lr_decay, patience=max(0, tc.lr_patience - 1)
        )
    if tc.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(tc.epochs, 1))
    if tc.schedule == "constant":
        return None
    raise ValueError(f"train.schedule: unknown schedule {tc.schedule!r} (plateau, cosine or constant)")


def _step_scheduler(scheduler, tc, cider: float) -> None:
    if scheduler is None:
        return
    if tc.schedule == "plateau":
        scheduler.step(cider)
    else:
        scheduler.step()


def _training_state(state: dict, optimizer, scheduler) -> dict:
    return {
        "state": dict(state),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }


def _load_state(last: Path, model: Captioner, optimizer, scheduler) -> dict:
    saved = torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_weights(last / "model.safetensors")
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(_as_tuple(saved["python_rng"]))
    return dict(saved["state"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class MetricsLog:
    """metrics.csv (append-only, survives resumes), TensorBoard events and a loss-curve PNG."""

    FIELDS = ("kind", "epoch", "step", "loss", "lr", "captions_per_s", "reward", "BLEU-4", "CIDEr", "time")

    def __init__(self, out: Path):
        self.out = out
        self.path = out / "metrics.csv"
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        if new:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb: object | None = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def write(self, kind: str, state: dict, **values) -> None:
        row = {
            "kind": kind,
            "epoch": state["epoch"],
            "step": state["global_step"],
            "time": round(time.time(), 1),
        }
        row.update(
            {k: (round(v, 5) if isinstance(v, float) else v) for k, v in values.items() if v is not None}
        )
        self.csv.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(f"{kind}/{k}", v, state["global_step"])  # type: ignore[attr-defined]

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        # Self-critical runs log the samples' mean reward: their loss (advantage-weighted) says little.
        column = "reward" if any(r.get("reward") for r in rows) else "loss"
        label = "training reward (CIDEr-D of samples)" if column == "reward" else "training loss"
        train = [(int(r["step"]), float(r[column])) for r in rows if r["kind"] == "train" and r[column]]
        val = [(int(r["step"]), float(r["CIDEr"])) for r in rows if r["kind"] == "val" and r["CIDEr"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), color="tab:blue", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(label if column == "reward" else "cross-entropy loss")
        if val:
            ax2 = ax.twinx()
            ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation CIDEr")
            ax2.set_ylabel("validation CIDEr")
        fig.legend(loc="upper center", ncol=2)
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()  # type: ignore[attr-defined]
