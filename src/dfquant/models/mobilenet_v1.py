"""MobileNetV1 (Howard et al. 2017, arXiv 1704.04861) in the layout of Keras' ``keras.applications.mobilenet``.

Layout (Keras ``MobileNet``: ``_conv_block`` then 13 ``_depthwise_conv_block``): a 3x3 stride-2
stem conv (no bias) + BN + ReLU6; 13 depthwise-separable blocks, each a depthwise 3x3 conv (no
bias) + BN + ReLU6 and a pointwise 1x1 conv (no bias) + BN + ReLU6, with the depthwise stride 2 in
blocks 1, 3, 5 and 11; global average pooling and a classifier (Keras' 1x1 conv with bias on the
pooled 1x1 map, here the equal ``nn.Linear``; Keras' ``Dropout(1e-3)`` before it is the identity in
evaluation and left out). Channel counts are ``int(base * width)`` for the bases 32 (stem) and 64,
128, 128, 256, 256, 512 x 6, 1024, 1024 (the blocks' pointwise outputs), as Keras computes them.

Numerics that the weights depend on (Keras/TF, not PyTorch defaults): BatchNorm eps 1e-3 (Keras'
default), ReLU6, and Keras' padding of every stride-2 3x3 conv: ``ZeroPadding2D(((0, 1), (0, 1)))``
then a ``"valid"`` conv -- one row and column of zeros at the bottom and right only, which is
TensorFlow's ``"same"`` padding for even input sizes. It is written as ``F.pad(x, (0, 1, 0, 1))``
in the forward, before a conv with padding 0: ``torch.fx`` records it as one ``pad`` call, so BN
folding still pairs each conv with its BN, dfquant's quantized conv (padding 0, like the float
one) replaces the conv while the pad stays, BN statistics pass through the zero padding to the
conv's input range, and the ONNX export writes a Pad node. Stride-1 depthwise convs use ``"same"``
padding, which for a 3x3 kernel at stride 1 is the symmetric padding 1.

State-dict keys are those of the shared converted Keras weights:
``stem``, ``stem_bn``, ``blocks.{0..12}.{dw, dw_bn, pw, pw_bn}``, ``classifier``.

A model built without weights has width 0.75 (``width=``, default :data:`DEFAULT_WIDTH`, the width
of the shared ImageNet checkpoint); one built with :func:`dfquant.models.create_model`'s
``weights`` takes its channel counts from the file's tensor shapes, so any width of this layout
loads (checked key by key and shape by shape).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.preprocessing import TF_INCEPTION
from ..errors import DfquantError
from . import register_model

BN_EPS = 1e-3  # Keras BatchNormalization's default epsilon
TF_STRIDE2_PAD = (0, 1, 0, 1)  # F.pad order (left, right, top, bottom): Keras' ZeroPadding2D(((0, 1), (0, 1)))
DEFAULT_WIDTH = 0.75
STEM_CHANNELS = 32
# (pointwise output channels at width 1, depthwise stride) of the 13 blocks (Keras' MobileNet)
BLOCKS: Tuple[Tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def channels_for_width(width: float) -> Tuple[int, ...]:
    """Stem and block output channels at a width multiplier, as Keras rounds them: ``int(base * width)``."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise DfquantError(f"mobilenet_v1 width must be a positive number (the width multiplier alpha), got {width!r}")
    channels = tuple(int(base * width) for base in (STEM_CHANNELS,) + tuple(c for c, _ in BLOCKS))
    if min(channels) < 1:
        raise DfquantError(f"mobilenet_v1 width {width} leaves a layer without channels")
    return channels


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv + BN + ReLU6, pointwise 1x1 conv + BN + ReLU6 (Keras' ``_depthwise_conv_block``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.dw = nn.Conv2d(in_channels, in_channels, 3, stride, 0 if stride == 2 else 1, groups=in_channels, bias=False)
        self.dw_bn = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.dw_relu = nn.ReLU6()
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.pw_relu = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:  # a Python int fixed at build time: fx traces one branch
            x = F.pad(x, TF_STRIDE2_PAD)
        x = self.dw_relu(self.dw_bn(self.dw(x)))
        return self.pw_relu(self.pw_bn(self.pw(x)))


class MobileNetV1(nn.Module):
    """MobileNetV1 with Keras' layout and numerics; ``channels``: stem then the 13 blocks' outputs."""

    def __init__(self, channels: Sequence[int], num_classes: int = 1000):
        super().__init__()
        channels = tuple(channels)
        if len(channels) != 1 + len(BLOCKS) or not all(isinstance(c, int) and c > 0 for c in channels):
            raise DfquantError(f"mobilenet_v1 needs {1 + len(BLOCKS)} positive channel counts (stem and 13 blocks), got {channels!r}")
        self.channels = channels
        self.stem = nn.Conv2d(3, channels[0], 3, 2, 0, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels[0], eps=BN_EPS)
        self.stem_relu = nn.ReLU6()
        self.blocks = nn.Sequential(
            *(DepthwiseSeparable(cin, cout, stride) for cin, cout, (_, stride) in zip(channels[:-1], channels[1:], BLOCKS))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels[-1], num_classes)
        for m in self.modules():  # torchvision's MobileNet initialisation: finite, sensible random models
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(F.pad(x, TF_STRIDE2_PAD))))
        x = self.blocks(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


def channels_from_state(state: Dict[str, torch.Tensor]) -> Optional[Dict[str, Tuple[int, ...]]]:
    """``{"channels": ...}`` read from a state dict of this layout (the output count of ``stem`` and
    of each block's ``pw``), or None when its keys are not this layout's (the strict load then
    names what is missing and what is unexpected)."""
    keys = ["stem.weight"] + [f"blocks.{i}.pw.weight" for i in range(len(BLOCKS))]
    if not all(k in state and state[k].dim() == 4 for k in keys):
        return None
    return {"channels": tuple(int(state[k].shape[0]) for k in keys)}


@register_model("mobilenet_v1", (3, 224, 224), 1000, "imagenet", preprocessing=TF_INCEPTION, arch_from_state=channels_from_state)
def mobilenet_v1(num_classes: int = 1000, width: float = DEFAULT_WIDTH, channels: Optional[Sequence[int]] = None) -> MobileNetV1:
    """MobileNetV1 in Keras' layout; ``width`` the multiplier (default 0.75), or explicit ``channels``."""
    return MobileNetV1(channels_for_width(width) if channels is None else channels, num_classes)
