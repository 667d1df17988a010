"""Training the search embedding (`captioner train` with `train.task: search`) on a feature cache.

One epoch shows every training photo once, with one of its captions drawn at random, in batches of
`train.batch_size` photos: each batch's other captions are its negatives (InfoNCE, plus VSE++'s hardest
negative when `embedding.hard_margin` > 0). A photo appears once per batch, so no negative is secretly a
positive. The MiniLM vectors of all captions are computed once and cached beside the run. Validation is the
retrieval metric itself: every validation caption searches the validation photos, and the sum of
recall@1, 5 and 10 picks OUT/best; OUT/last has the optimiser state for --resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from captioner.checkpoint import atomic_directory
from captioner.config import Config
from captioner.data import Example, load_dataset
from captioner.errors import ConfigError, TrainingRunError
from captioner.features import FeatureStore, image_key
from captioner.search.embedder import embed
from captioner.search.joint import JointConfig, JointEmbedding, contrastive_loss, recall_at
from captioner.vocab import tokenize

STATE_FILE = "training_state.pt"


@dataclasses.dataclass
class Split:
    """A split as rows of the feature cache and its captions (caption i describes photo `photo[i]`)."""

    rows: np.ndarray  # [photos] rows of the cache
    photo: np.ndarray  # [captions] index into rows
    captions: list[str]


def split_table(examples: list[Example], store: FeatureStore, root: Path) -> Split:
    row_of = store.row_of()
    rows: list[int] = []
    photo: list[int] = []
    captions: list[str] = []
    for ex in examples:
        key = image_key(ex.image, root)
        if key not in row_of:
            continue  # failed or not in this cache: the caption loader says which
        for caption in ex.captions:
            photo.append(len(rows))
            captions.append(caption)
        rows.append(row_of[key])
    if not rows:
        raise TrainingRunError(f"{store.root}: holds none of the split's photos")
    return Split(np.array(rows), np.array(photo), captions)


def sentence_vectors(captions: list[str], cache_dir: Path) -> np.ndarray:
    """MiniLM vectors of `captions`, cached in `cache_dir` under a hash of the texts."""
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    file = cache_dir / f"sentences-{digest}.npy"
    if file.exists():
        return np.load(file)
    vectors = embed(captions)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(file)
    return vectors


def evaluate(model: JointEmbedding, store: FeatureStore, split: Split, text: np.ndarray) -> dict:
    grid = store.grid[split.rows] if model.config.grid else None
    photos = model.images(store.pooled[split.rows], grid)
    return recall_at(model.texts(text, split.captions) @ photos.T, split.photo)


def word_list(captions: list[str], min_count: int) -> list[str]:
    """The word vectors' words: in at least `min_count` captions, most frequent first (ties alphabetical);
    index 0 pads and 1 stands for any other word."""
    counts = Counter(w for caption in captions for w in set(tokenize(caption)))
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return ["<pad>", "<unk>", *kept]


def train_joint(config: Config, resume: bool = False) -> Path:
    """Train, validate each epoch, keep OUT/best and OUT/last; returns OUT/best."""
    tc, ec, dc = config.train, config.embedding, config.data
    if dc.features is None:
        raise ConfigError("train.task search trains on a feature cache: set data.features")
    out = Path(tc.out_dir)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    store = FeatureStore.open(dc.features, in_memory=True)
    data = load_dataset(dc.root, split_file=dc.split_file, skip_missing=dc.skip_missing)
    train = split_table(data.split(dc.train_split), store, data.root)
    val = split_table(data.split(dc.val_split), store, data.root)
    text_train = sentence_vectors(train.captions, out / "cache")
    text_val = sentence_vectors(val.captions, out / "cache")
    joint = JointConfig(
        encoder=store.encoder,
        preprocess=store.meta["preprocess"],
        feature_dim=int(store.meta["feature_dim"]),
        text_dim=int(text_train.shape[1]),
        embed_dim=ec.embed_dim,
        hidden_dim=ec.hidden_dim,
        grid=ec.grid,
        dropout=ec.dropout,
        word_dim=ec.word_dim,
    )
    model = JointEmbedding(joint, word_list(train.captions, ec.word_min_count) if ec.word_dim else None)
    word_ids = model.word_ids(train.captions) if ec.word_dim else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(len(train.rows) / tc.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine to zero over the run, after a short warm-up
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / steps_per_epoch)
            * 0.5
            * (1 + math.cos(math.pi * min(1.0, s / max(1, tc.epochs * steps_per_epoch))))
        ),
    )
    by_photo = [np.flatnonzero(train.photo == i) for i in range(len(train.rows))]
    epoch, best, bad = 0, -1.0, 0
    if resume and (out / "last" / STATE_FILE).exists():
        saved = torch.load(out / "last" / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(JointEmbedding.from_pretrained(out / "last").state_dict())
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        epoch, best, bad = saved["epoch"], saved["best"], saved["bad"]
        torch.set_rng_state(saved["torch_rng"])
        print(f"resuming {out} after epoch {epoch} (best validation R-sum {best:.1f})")
    elif resume:
        raise TrainingRunError(f"{out}: nothing to resume (no last/{STATE_FILE})")
    pooled, grid = store.pooled, store.grid
    while epoch < tc.epochs and bad < tc.patience:
        start = time.perf_counter()
        model.train()
        order = np.random.default_rng(tc.seed + epoch).permutation(len(train.rows))
        rng = np.random.default_rng(tc.seed * 1000 + epoch)
        total = 0.0
        for b in range(steps_per_epoch):
            photos = order[b * tc.batch_size : (b + 1) * tc.batch_size]
            picks = np.array([rng.choice(by_photo[i]) for i in photos])
            rows = train.rows[photos]
            p = torch.from_numpy(np.asarray(pooled[rows], dtype=np.float32))
            g = torch.from_numpy(np.asarray(grid[rows], dtype=np.float32)) if joint.grid else None
            t = torch.from_numpy(text_train[picks])
            ids = word_ids[picks] if word_ids is not None else None
            if ids is not None and ec.word_dropout > 0:  # lean on MiniLM too, as for words the list lacks
                ids = ids.masked_fill(torch.rand(ids.shape) < ec.word_dropout, 0)
            loss = contrastive_loss(
                model.embed_images(p, g), model.embed_texts(t, ids), model.log_scale, ec.hard_margin
            )
            optimizer.zero_grad()
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            schedule.step()
            total += loss.item()
        epoch += 1
        scores = evaluate(model, store, val, text_val)
        rsum = scores["R@1"] + scores["R@5"] + scores["R@10"]
        improved = rsum > best
        best, bad = (rsum, 0) if improved else (best, bad + 1)
        print(
            f"epoch {epoch}: loss {total / steps_per_epoch:.3f}, {dc.val_split} "
            + ", ".join(f"{k} {v:.1f}" for k, v in scores.items())
            + f", {time.perf_counter() - start:.0f} s"
            + (" (best)" if improved else "")
        )
        dtype = torch.float16 if tc.save_dtype == "float16" else torch.float32
        if improved:
            model.save_pretrained(out / "best", dtype)
            (out / "best" / "scores.json").write_text(
                json.dumps({"epoch": epoch, dc.val_split: scores}) + "\n"
            )
        with atomic_directory(out / "last") as tmp:
            model.write(tmp)
            state = {
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "epoch": epoch,
                "best": best,
                "bad": bad,
                "torch_rng": torch.get_rng_state(),  # dropout: a resumed run continues exactly
            }
            torch.save(state, tmp / STATE_FILE)
    print(f"best validation R-sum {best:.1f}: {out / 'best'}")
    return out / "best"
