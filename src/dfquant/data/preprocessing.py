"""A model's input scaling: how pixels become the tensor it was trained on, and the range they span.

Every registry model carries one (:attr:`dfquant.models.ModelSpec.preprocessing`, and the
``preprocessing`` attribute of a model built by :func:`dfquant.models.create_model`), because
models trained on the same dataset need not share it: torchvision's ImageNet models use the
ImageNet mean and std, Keras' MobileNet ``x / 127.5 - 1``, darknet ``x / 255``.

The rule is always the per-channel affine map of pixels scaled to [0, 1] (uint8 pixels are divided
by 255 first): ``input_c = (pixel_c - mean_c) / std_c``. ``x / 127.5 - 1`` is mean 0.5, std 0.5;
``x / 255`` is mean 0, std 1. The images a model can see are then exactly the box
``[(0 - mean_c) / std_c, (1 - mean_c) / std_c]`` per channel: :meth:`Preprocessing.input_range`
gives its per-tensor span, which is what quantizing the image input without data needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..errors import DfquantError

Pixels = Union[torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class Preprocessing:
    """``input_c = (pixel_c - mean_c) / std_c`` on pixels in [0, 1] (uint8 pixels: ``/ 255`` first).

    ``mean`` and ``std`` hold one value per input channel (one value: every channel alike);
    ``description`` says the rule in the model's own terms (``"x / 127.5 - 1"``)."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    description: str = ""

    def __post_init__(self) -> None:
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if not mean or len(mean) != len(std):
            raise DfquantError(f"preprocessing needs one mean and one std per channel, got {len(mean)} means and {len(std)} stds")
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
            raise DfquantError(f"preprocessing mean must be finite and std positive and finite, got mean {mean}, std {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _view(self, values: Tuple[float, ...], c: int) -> torch.Tensor:
        if len(values) not in (1, c):
            raise DfquantError(f"images have {c} channels, the model's preprocessing ({self}) has {len(values)}")
        return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)

    def normalize(self, pixels: Pixels) -> torch.Tensor:
        """The model input (float32) for images (N, C, H, W) or (C, H, W): uint8 pixels (0..255), or
        floats already in [0, 1]. Channel-first; channel ``c`` gets ``(pixel - mean_c) / std_c``."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
        if not isinstance(x, torch.Tensor):
            raise DfquantError(f"images must be a torch tensor or a numpy array, got {type(pixels).__name__}")
        if x.dim() not in (3, 4):
            raise DfquantError(f"images must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif x.is_floating_point():
            x = x.float()
        else:
            raise DfquantError(f"images must be uint8 pixels (0..255) or floats in [0, 1], got {str(x.dtype).replace('torch.', '')}")
        c = x.shape[-3]
        return (x - self._view(self.mean, c)) / self._view(self.std, c)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs back to pixels in [0, 1] (not clipped): the inverse of :meth:`normalize`."""
        c = x.shape[-3]
        return x * self._view(self.std, c) + self._view(self.mean, c)

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs (..., C, H, W) clipped, per channel, to what black and white pixels map to:
        the nearest valid image (for synthetic images that drift out of the pixel box)."""
        c = x.shape[-3]
        lo = self._view(tuple(lo for lo, _ in self.channel_ranges()), c).to(x)
        hi = self._view(tuple(hi for _, hi in self.channel_ranges()), c).to(x)
        return torch.maximum(torch.minimum(x, hi), lo)

    def from_standardized(self, usual: "Preprocessing", channels: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(scale, shift)``, each (C, 1, 1), with ``input = scale * z + shift`` for ``z`` an image
        as a model with the ``usual`` preprocessing sees it (pixels standardized by the dataset's
        mean and std), or None when this preprocessing is that one: the same pixels, in this
        model's input space (``pixels = z * usual.std + usual.mean``, then :meth:`normalize`)."""
        if (self.mean, self.std) == (usual.mean, usual.std):
            return None
        m, s = self._view(self.mean, channels), self._view(self.std, channels)
        um, us = usual._view(usual.mean, channels), usual._view(usual.std, channels)
        return us / s * torch.ones(channels, 1, 1), (um - m) / s * torch.ones(channels, 1, 1)

    def channel_ranges(self) -> Tuple[Tuple[float, float], ...]:
        """Per channel, the ``(lo, hi)`` that black (0) and white (1) pixels map to."""
        return tuple(((0.0 - m) / s, (1.0 - m) / s) for m, s in zip(self.mean, self.std))

    def input_range(self) -> Tuple[float, float]:
        """The per-tensor range ``(lo, hi)`` of every valid image's model input: the lowest and the
        highest value any channel can take. What the image input's quantizer covers
        (``quantize_first_input``) and what synthetic images are meant to stay within."""
        ranges = self.channel_ranges()
        return float(min(lo for lo, _ in ranges)), float(max(hi for _, hi in ranges))

    def __str__(self) -> str:
        return self.description or f"(x/255 - {self.mean}) / {self.std}"


#: torchvision's ImageNet models: ToTensor then Normalize(mean, std).
TORCHVISION_IMAGENET = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "(x/255 - ImageNet mean) / ImageNet std (torchvision)")
#: Keras / TF-slim "inception" preprocessing of MobileNet: ``x / 127.5 - 1``, inputs in [-1, 1].
TF_INCEPTION = Preprocessing((0.5,) * 3, (0.5,) * 3, "x / 127.5 - 1 (Keras/TF MobileNet)")
#: darknet: pixels scaled to [0, 1], nothing else.
UNIT_RANGE = Preprocessing((0.0,) * 3, (1.0,) * 3, "x / 255 (darknet)")
