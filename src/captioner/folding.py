"""An inference copy of a CNN backbone: batch norms folded into the convolutions before them, and
TensorFlow "same" padding done by the convolution itself wherever it is symmetric.

In eval mode a batch norm is a per-channel scale and shift, so it can be multiplied into the weights and
bias of the convolution that feeds it: one pass over the activations fewer per layer. TF-ported
EfficientNets pad "same" with an explicit zero-filled copy of the input before every k > 1 convolution
(timm's Conv2dSame); when the padding is equal on both sides, the convolution can pad by itself for free.
The outputs equal the original's up to float rounding (tests check 1e-4). The copy is for inference only:
``Encoder`` builds it on its first no-grad eval call and drops it whenever weights or mode change.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def fold_for_inference(backbone: nn.Module) -> nn.Module:
    """A folded, eval-mode deep copy of `backbone`; the original is untouched."""
    model = copy.deepcopy(backbone).eval().requires_grad_(False)
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            # Registration order is data-flow order in timm's and torchvision's blocks (conv, then its norm).
            if _foldable(conv, bn):
                _fold(conv, bn)  # type: ignore[arg-type]
                setattr(parent, bn_name, _after_norm(bn))  # type: ignore[arg-type]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_same_pad_conv(child):
                setattr(parent, name, _SamePadConv(child))  # type: ignore[arg-type]
    return model


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.num_features == conv.out_channels
        and bn.running_mean is not None
        and bn.running_var is not None
    )


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a norm layer once folded: timm's BatchNormAct2d keeps its dropout and activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    rest = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _is_same_pad_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and type(module).__name__ == "Conv2dSame"  # timm.layers


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same": total padding so that out = ceil(size / stride), the odd pixel on the right."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _SamePadConv(nn.Module):
    """timm's Conv2dSame, but padding inside the convolution when the padding is symmetric."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self._pads: dict[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        key = (x.shape[-2], x.shape[-1])
        if key not in self._pads:
            self._pads[key] = (
                _same_pad(key[0], c.kernel_size[0], c.stride[0], c.dilation[0]),
                _same_pad(key[1], c.kernel_size[1], c.stride[1], c.dilation[1]),
            )
        (top, bottom), (left, right) = self._pads[key]
        if top == bottom and left == right:
            return F.conv2d(x, c.weight, c.bias, c.stride, (top, left), c.dilation, c.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, c.weight, c.bias, c.stride, 0, c.dilation, c.groups)
