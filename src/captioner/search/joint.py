"""A learned joint embedding of photos and sentences, for search (Kiros et al. 2014; Faghri et al. 2018).

Searching through generated captions keeps ten words per photo; this maps the encoder's features and a
sentence into one space where a photo and its descriptions lie close:

    photo    pooled features + attention-pooled grid (the captioner's encoder, no second pass)
             -> MLP with a linear shortcut -> L2-normalised vector
    sentence MiniLM sentence embedding (frozen, `embedder.embed`)
             + mean of learned word vectors of its words (optional: the training captions' words)
             -> MLP with a linear shortcut -> same

Both towers are small, so training on cached features takes minutes on a CPU (`captioner train` with
`train.task: search`, `captioner.search.train_joint`), and the checkpoint is a few MB: safetensors +
config.json, like the captioners. The MiniLM side is frozen: its vectors of the training captions are
computed once, and the index already embeds every query with it. The learned word vectors (Kiros et al.'s
and VSE++'s sentence side is trained from scratch on the captions) add what a general sentence model does
not weigh as the captions do ("black" against "brown" dog): +4 dev R-sum (docs/experiments.md section 14).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from captioner import __version__
from captioner.checkpoint import CONFIG_FILE, WEIGHTS_FILE, atomic_directory
from captioner.errors import CheckpointError
from captioner.images import Preprocess
from captioner.search.embedder import EMBEDDER
from captioner.vocab import tokenize

KIND = "joint-embedding"  # config.json's "kind": tells this checkpoint from a captioner's
WORDS_FILE = "words.json"  # the word list of the learned word vectors (index 0 pads, 1 is any other word)
MAX_WORDS = 32  # words of a sentence the word vectors read (Flickr8k captions: 95% have at most 18)
BUNDLED = Path(__file__).parent.parent / "bundled"


@dataclass(frozen=True)
class JointConfig:
    encoder: str  # the image encoder whose features the photo side reads
    preprocess: dict  # and its preprocessing: features of another pipeline are refused
    feature_dim: int = 1280
    text_model: str = EMBEDDER
    text_dim: int = 384
    embed_dim: int = 256
    hidden_dim: int = 1024
    grid: bool = True  # attention-pool the grid too (else the pooled vector alone)
    dropout: float = 0.1
    word_dim: int = 0  # > 0: learned word vectors of this size beside the MiniLM vector (words.json)


class Tower(nn.Module):
    """MLP with a linear shortcut: the shortcut alone is CCA-like, the MLP adds what is not linear."""

    def __init__(self, inputs: int, hidden: int, out: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(inputs, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out)
        )
        self.shortcut = nn.Linear(inputs, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x) + self.shortcut(x), dim=-1)


class JointEmbedding(nn.Module):
    def __init__(self, config: JointConfig, words: list[str] | None = None):
        super().__init__()
        self.config = c = config
        self.attend = nn.Linear(c.feature_dim, 1) if c.grid else None  # one attention score per cell
        inputs = c.feature_dim * (2 if c.grid else 1)
        self.image = Tower(inputs, c.hidden_dim, c.embed_dim, c.dropout)
        self.words = list(words or [])
        if c.word_dim and len(self.words) < 2:
            raise ValueError("word_dim > 0 needs a word list (index 0 pads, 1 is any other word)")
        self.word_index = {w: i for i, w in enumerate(self.words)}
        self.word_vectors = nn.Embedding(len(self.words), c.word_dim, padding_idx=0) if c.word_dim else None
        if self.word_vectors is not None:
            nn.init.normal_(self.word_vectors.weight, std=0.02)
            with torch.no_grad():
                self.word_vectors.weight[0].zero_()
        self.text = Tower(c.text_dim + c.word_dim, c.hidden_dim, c.embed_dim, c.dropout)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))  # contrastive temperature

    def embed_images(self, pooled: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, D] pooled (and [B, cells, D] grid) features -> [B, embed_dim], unit length."""
        x = pooled
        if self.attend is not None:
            if grid is None:
                raise ValueError("this embedding reads the encoder's grid too: pass grid")
            weights = self.attend(grid).softmax(dim=1)  # [B, cells, 1]
            x = torch.cat([pooled, (weights * grid).sum(1)], dim=-1)
        return self.image(x)

    def word_ids(self, sentences: list[str]) -> torch.Tensor:
        """Sentences -> [B, MAX_WORDS] ids into the word list (0 pads, 1 for a word not in it)."""
        out = torch.zeros(len(sentences), MAX_WORDS, dtype=torch.long)
        for row, sentence in enumerate(sentences):
            ids = [self.word_index.get(w, 1) for w in tokenize(sentence)][:MAX_WORDS]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def embed_texts(
        self, sentence_vectors: torch.Tensor, word_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, text_dim] MiniLM sentence vectors (and, with word vectors, [B, MAX_WORDS] `word_ids`) ->
        [B, embed_dim], unit length."""
        if self.word_vectors is None:
            return self.text(sentence_vectors)
        if word_ids is None:
            raise ValueError("this embedding reads the sentence's words too: pass word_ids")
        mask = (word_ids > 0).unsqueeze(-1).float()
        bag = (self.word_vectors(word_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.text(torch.cat([sentence_vectors, bag], dim=-1))

    @torch.inference_mode()
    def images(self, pooled: np.ndarray, grid: np.ndarray | None = None, batch: int = 256) -> np.ndarray:
        """numpy in, float32 numpy out, in batches (evaluation and the index)."""
        self.eval()
        out = []
        for i in range(0, len(pooled), batch):
            p = torch.as_tensor(np.asarray(pooled[i : i + batch], dtype=np.float32))
            g = None if grid is None else torch.as_tensor(np.asarray(grid[i : i + batch], dtype=np.float32))
            out.append(self.embed_images(p, g).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    @torch.inference_mode()
    def texts(self, sentence_vectors: np.ndarray, sentences: list[str], batch: int = 1024) -> np.ndarray:
        """The sentences' MiniLM vectors [B, text_dim] and the sentences themselves -> [B, embed_dim]."""
        self.eval()
        if len(sentences) != len(sentence_vectors):
            raise ValueError(f"{len(sentences)} sentences for {len(sentence_vectors)} vectors")
        out = []
        for i in range(0, len(sentences), batch):
            vectors = torch.as_tensor(np.asarray(sentence_vectors[i : i + batch], dtype=np.float32))
            ids = self.word_ids(sentences[i : i + batch]) if self.word_vectors is not None else None
            out.append(self.embed_texts(vectors, ids).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    def check_features(self, encoder: str, preprocess: Preprocess) -> None:
        want = (self.config.encoder, Preprocess.from_dict(self.config.preprocess))
        if want != (encoder, preprocess):
            raise CheckpointError(
                f"this search embedding reads features of {want[0]} ({want[1]}), not of {encoder} "
                f"({preprocess}): index with a captioner of that encoder, or train an embedding for it"
            )

    def save_pretrained(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        """config.json + model.safetensors, written atomically (the folder is whole or untouched)."""
        with atomic_directory(folder) as tmp:
            self.write(tmp, dtype)

    def write(self, folder: Path, dtype: torch.dtype = torch.float32) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE)
        config = {"kind": KIND, "captioner_version": __version__, **asdict(self.config)}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if self.word_vectors is not None:
            (folder / WORDS_FILE).write_text(json.dumps(self.words) + "\n")

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike) -> JointEmbedding:
        """A checkpoint folder, or the name of a bundled one (e.g. "flickr8k-search")."""
        from safetensors.torch import load_file

        folder = Path(name)
        if not folder.is_dir() and (BUNDLED / str(name)).is_dir():
            folder = BUNDLED / str(name)
        file = folder / CONFIG_FILE
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: not a search embedding (no {CONFIG_FILE})") from None
        except ValueError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("kind") != KIND:
            raise CheckpointError(f"{file}: not a search embedding (kind is not {KIND!r})")
        fields = {k: v for k, v in raw.items() if k not in ("kind", "captioner_version")}
        try:
            config = JointConfig(**fields)
        except TypeError as e:
            raise CheckpointError(f"{file}: {e}") from None
        words = None
        if config.word_dim:
            try:
                words = json.loads((folder / WORDS_FILE).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise CheckpointError(
                    f"{folder}: word_dim is {config.word_dim} but {WORDS_FILE} is missing"
                ) from None
            except ValueError as e:
                raise CheckpointError(f"{folder / WORDS_FILE}: not valid JSON ({e})") from None
            if not isinstance(words, list) or len(words) < 2 or not all(isinstance(w, str) for w in words):
                raise CheckpointError(f"{folder / WORDS_FILE}: not a list of at least two words")
        model = cls(config, words)
        state = {k: v.float() for k, v in load_file(folder / WEIGHTS_FILE).items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: does not fit {file} ({e})") from None
        return model.eval()


def contrastive_loss(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, hard: float = 0.0):
    """Symmetric InfoNCE over a batch of matching (photo, caption) pairs (row i matches row i).

    `hard` > 0 adds VSE++'s max-of-hinges: each pair against its single hardest negative in the batch, in
    both directions, with margin `hard` (Faghri et al. 2018)."""
    sim = images @ texts.T
    target = torch.arange(len(sim), device=sim.device)
    logits = sim * scale.exp().clamp(max=100.0)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    if hard > 0:
        positive = sim.diag()
        masked = sim - 4.0 * torch.eye(len(sim), device=sim.device)  # the pair itself is never a negative
        to_text = (hard + masked.max(1).values - positive).clamp(min=0)
        to_image = (hard + masked.max(0).values - positive).clamp(min=0)
        loss = loss + (to_text + to_image).mean()
    return loss


def recall_at(similarity: np.ndarray, truth: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Text-to-image retrieval metrics: `similarity` [queries, photos], `truth[q]` the photo of query q.

    recall@k: share of queries whose photo is among the k most similar (0-100); median and mean rank
    (1 = first)."""
    own = similarity[np.arange(len(truth)), truth]
    ranks = 1 + (similarity > own[:, None]).sum(1)  # ties count in the query's favour
    out = {f"R@{k}": float(100 * (ranks <= k).mean()) for k in ks}
    out["median rank"] = float(np.median(ranks))
    out["mean rank"] = float(ranks.mean())
    return out
