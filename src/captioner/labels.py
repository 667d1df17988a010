"""Visual labels: what the encoder's own ImageNet classifier sees, in everyday words.

The encoders are ImageNet classifiers with the last layer cut off; that layer (one linear map on the
pooled features the decoder already gets) still knows a refrigerator, a pizza or a space shuttle that the
Flickr8k-trained decoder has never heard of. `LabelHead` runs it on the pooled features (no second encoder
pass) and sums the 1,000 class probabilities per plain word with the committed table `imagenet_words.tsv`
(the 120 dog breeds -> "dog", tabby / tiger cat -> "cat", espresso -> "coffee").

The head's weights come from the encoder's pretrained source, never from a captioning checkpoint, so a
decoder-only checkpoint has labels for free. A fine-tuned encoder has moved its features away from the
head, and an encoder without an ImageNet linear head has none: both give no labels, and say why.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

TABLE = Path(__file__).with_name("imagenet_words.tsv")
HOSTS = Path(__file__).with_name("label_hosts.tsv")  # made by scripts/label_hosts.py
PROBES = Path(__file__).with_name("probes")  # <encoder>.safetensors: probes for words ImageNet lacks
TOP_K = 5  # labels reported per image
MIN_P = 0.02  # a label below this probability is noise, not something seen


@dataclass(frozen=True)
class Label:
    label: str  # an everyday word ("dog", "refrigerator", "space shuttle")
    p: float  # the classifier's probability summed over the ImageNet classes with this word

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "p": round(self.p, 4)}


@cache
def imagenet_words() -> tuple[list[str], list[str]]:
    """(class names, word per class) in ImageNet-1k index order, from the committed table."""
    names: list[str] = []
    words: list[str] = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        index, name, word = line.split("\t")
        if int(index) != len(names):
            raise ValueError(f"{TABLE}: class {index} out of order")
        names.append(name)
        words.append(word)
    return names, words


@cache
def label_hosts() -> dict[str, tuple[str, ...]]:
    """Label word -> one-word label words nearest in meaning, nearest first (for grounded decoding)."""
    table: dict[str, tuple[str, ...]] = {}
    for line in HOSTS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            word, near = line.split("\t")
            table[word] = tuple(near.split(","))
    return table


class LabelHead:
    """ImageNet logits from pooled features -> probabilities per everyday word [B, W].

    Not an nn.Module on purpose: the classifier stays the backbone's own layer (it moves with the
    encoder), and a checkpoint's weights never gain a copy of it."""

    def __init__(self, classifier: nn.Linear, probes: dict[str, nn.Linear] | None = None):
        names, words = imagenet_words()
        if classifier.out_features != len(names):
            raise ValueError(f"an ImageNet head has {len(names)} classes, not {classifier.out_features}")
        self.words = sorted(set(words))
        column = {w: i for i, w in enumerate(self.words)}
        # [1000, W] 0/1 matrix: probability mass of each class goes to its word
        fold = torch.zeros(len(names), len(self.words))
        fold[torch.arange(len(names)), torch.tensor([column[w] for w in words])] = 1.0
        self.classifier, self.fold = classifier, fold
        # words ImageNet has no class for ("person") or rules out too seldom ("bird"): one logistic probe
        # each, columns after the table's (a probed word may also be a table word: `probe_index`)
        self.probes = dict(probes or {})
        self.table_size = len(self.words)
        self.words += list(self.probes)

    @torch.no_grad()
    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        weight = self.classifier.weight
        x = pooled.to(weight.device, weight.dtype)
        probs = self.classifier(x).softmax(-1)
        if self.fold.device != probs.device:
            self.fold = self.fold.to(probs.device)
        folded = probs @ self.fold
        if not self.probes:
            return folded
        for word, probe in self.probes.items():  # not a module: the probes do not move with the model
            if probe.weight.device != x.device:
                self.probes[word] = probe.to(x.device)
        return torch.cat([folded, *(probe(x).sigmoid() for probe in self.probes.values())], dim=1)

    def word_index(self, word: str) -> int | None:
        """The word's column: the ImageNet table's where it has one, else its probe's."""
        try:
            return self.words.index(word)
        except ValueError:
            return None

    def probe_index(self, word: str) -> int | None:
        """The column of the word's probe, if it has one."""
        names = list(self.probes)
        return self.table_size + names.index(word) if word in names else None

    def top(self, word_probs: torch.Tensor, k: int = TOP_K, min_p: float = MIN_P) -> list[list[Label]]:
        """The k most probable words of each image, at least `min_p` each, most probable first. Only the
        ImageNet words: a probe's probability is for grounding's vetoes (a low one is informative), and
        away from its training photos it can be high for nothing (the person probe gives a cat 0.99)."""
        table = word_probs[:, : self.table_size]
        values, index = table.float().cpu().topk(min(k, table.shape[1]), dim=1)
        return [
            [
                Label(self.words[i], float(p))
                for p, i in zip(vs.tolist(), ix.tolist(), strict=True)
                if p >= min_p
            ]
            for vs, ix in zip(values, index, strict=True)
        ]


def find_classifier(backbone: nn.Module) -> nn.Linear | None:
    """The backbone's ImageNet classifier when it is one linear layer on the mean-pooled feature map (the
    pooled features of `Encoder.forward`); None otherwise (e.g. VGG's convolutional pre-logits)."""
    get = getattr(backbone, "get_classifier", None)  # timm models
    head = get() if callable(get) else getattr(backbone, "classifier", None)
    if isinstance(head, nn.Sequential):  # torchvision's MobileNetV2: Dropout, Linear
        linear = [m for m in head if isinstance(m, nn.Linear)]
        head = linear[0] if len(linear) == 1 else None
    if not isinstance(head, nn.Linear) or head.out_features != 1000:
        return None
    if getattr(backbone, "pre_logits", None) is not None and not isinstance(backbone.pre_logits, nn.Identity):
        return None  # timm's VGG: a conv MLP sits between the pooled map and the linear layer
    return head


def label_head(encoder: Any, finetuned: bool) -> tuple[LabelHead | None, str | None]:
    """The encoder's label head, or None and the reason there is none."""
    if finetuned:
        return None, "the encoder was fine-tuned, so its ImageNet classifier no longer fits its features"
    if not getattr(encoder, "pretrained", False):
        return None, "the encoder has no pretrained ImageNet weights"
    classifier = find_classifier(encoder.backbone)
    if classifier is None:
        return None, f"encoder {encoder.name!r} has no ImageNet classifier on its pooled features"
    return LabelHead(classifier, load_probes(encoder)), None


def load_probes(encoder: Any) -> dict[str, nn.Linear]:
    """The encoder's word probes (scripts/train_label_probe.py), if any were trained for its name and
    preprocessing; the probe for a word reads the pooled features and gives P(word applies)."""
    path = PROBES / f"{encoder.name}.safetensors"
    if not path.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        pre = encoder.preprocess
        if meta.get("resize") != pre.resize or meta.get("size") != str(pre.size):
            return {}  # trained on differently prepared images: its features are not the probe's
        probes = {}
        for word in meta.get("words", "").split(","):
            weight = f.get_tensor(f"{word}.weight")
            linear = nn.Linear(weight.shape[1], weight.shape[0])
            linear.load_state_dict({"weight": weight, "bias": f.get_tensor(f"{word}.bias")})
            probes[word] = linear.eval()
    return probes
