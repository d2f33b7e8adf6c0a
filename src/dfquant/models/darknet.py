"""Tiny Darknet (Redmon, darknet's ``cfg/tiny.cfg``, https://pjreddie.com/darknet/tiny-darknet/).

Layout (``tiny.cfg``): 15 convolutional layers, each a conv of stride 1 (no bias; darknet's
``batch_normalize=1`` layers carry no conv bias), BatchNorm and LeakyReLU with slope 0.1 (darknet's
``leaky``: ``x > 0 ? x : 0.1 x``); a 2x2 stride-2 max-pool after convs 0, 1, 5 and 9; then
``tiny.cfg``'s last layer, a linear 1x1 conv to the 1000 classes with a bias, and a global average
pool. Pooling first and applying the 1x1 conv as an ``nn.Linear`` (``classifier``) is the same
function (both are linear), and is the layout of the shared converted weights. Kernel sizes are 3
(padding 1, darknet's ``pad=1``) or 1: :data:`LAYERS` are ``tiny.cfg``'s, and a model loaded with
weights takes every conv's channel count and kernel size from the file's tensor shapes.

Darknet's 2x2 stride-2 max-pool pads by ``size - 1`` at the bottom/right, which on the even feature
maps of a 224 input (224, 112, 56, 28) reads no padded value: it equals ``nn.MaxPool2d(2, 2)``.
BatchNorm eps is 1e-3, that of the (Keras) conversion the shared weights come from.

State-dict keys: ``conv{0..14}``, ``bn{0..14}``, ``classifier``. Input: RGB, ``x / 255``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..data.preprocessing import UNIT_RANGE
from ..errors import DfquantError
from . import register_model

BN_EPS = 1e-3
LEAKY_SLOPE = 0.1
# (filters, size) of tiny.cfg's 15 batch-normalised convolutional layers
LAYERS: Tuple[Tuple[int, int], ...] = (
    (16, 3), (32, 3), (16, 1), (128, 3), (16, 1), (128, 3), (32, 1), (256, 3),
    (32, 1), (256, 3), (64, 1), (512, 3), (64, 1), (512, 3), (128, 1),
)
POOL_AFTER = (0, 1, 5, 9)


class TinyDarknet(nn.Module):
    """``layers``: (output channels, odd kernel size) of each of the 15 convs."""

    def __init__(self, layers: Sequence[Tuple[int, int]] = LAYERS, num_classes: int = 1000):
        super().__init__()
        layers = tuple((int(c), int(k)) for c, k in layers)
        if len(layers) != len(LAYERS) or not all(c > 0 and k > 0 and k % 2 == 1 for c, k in layers):
            raise DfquantError(f"tiny_darknet needs {len(LAYERS)} (channels, odd kernel size) pairs, got {layers!r}")
        self.layers = layers
        cin = 3
        for i, (cout, k) in enumerate(layers):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, k, 1, k // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout, eps=BN_EPS))
            setattr(self, f"act{i}", nn.LeakyReLU(LEAKY_SLOPE))
            if i in POOL_AFTER:
                setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
            cin = cout
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.layers)):  # unrolled by fx: one call per module
            x = getattr(self, f"act{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i in POOL_AFTER:
                x = getattr(self, f"pool{i}")(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


def layers_from_state(state: Dict[str, torch.Tensor]) -> Optional[Dict[str, Tuple[Tuple[int, int], ...]]]:
    """``{"layers": ...}``: each conv's (output channels, kernel size) from a state dict of this
    layout, or None when the keys or shapes are not this layout's (the strict load says why)."""
    layers = []
    for i in range(len(LAYERS)):
        w = state.get(f"conv{i}.weight")
        if w is None or w.dim() != 4 or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
            return None
        layers.append((int(w.shape[0]), int(w.shape[2])))
    return {"layers": tuple(layers)}


@register_model("tiny_darknet", (3, 224, 224), 1000, "imagenet", preprocessing=UNIT_RANGE, arch_from_state=layers_from_state)
def tiny_darknet(num_classes: int = 1000, layers: Sequence[Tuple[int, int]] = LAYERS) -> TinyDarknet:
    """Tiny Darknet (``tiny.cfg``); ``layers`` overrides the (channels, kernel) of the 15 convs."""
    return TinyDarknet(layers, num_classes)
