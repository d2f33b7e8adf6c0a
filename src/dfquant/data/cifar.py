"""CIFAR-10 evaluation images from an .npz file (``images`` uint8 N x 3 x 32 x 32, ``labels``
integer class indices 0..9, N of them)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..assets import CIFAR10_TEST_NPZ, asset_path, require_file
from ..errors import DfquantError, note
from .preprocessing import Preprocessing

# The normalisation the shared checkpoints were trained with (ImageNet's mean and std).
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
CIFAR_PREPROCESSING = Preprocessing(CIFAR_MEAN, CIFAR_STD, "(x/255 - mean) / std, ImageNet's mean and std (the CIFAR ResNets)")
CIFAR10_CLASSES = 10


def normalize_cifar(images_uint8: torch.Tensor, preprocessing: Optional[Preprocessing] = None) -> torch.Tensor:
    """uint8 images (N, 3, H, W) to the model input (default: the CIFAR ResNets' normalisation)."""
    return (preprocessing or CIFAR_PREPROCESSING).normalize(images_uint8)


def load_cifar10_npz(
    path: "str | Path | None" = None, num_classes: int = CIFAR10_CLASSES, preprocessing: Optional[Preprocessing] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, 3, 32, 32) float32 and labels (N,) int64.

    ``path`` defaults to the shared asset ``data/cifar10-test-first846.npz`` (via DFQUANT_ASSETS).
    ``preprocessing``: the model's input scaling (default: the CIFAR ResNets' mean and std).
    The labels must be stored as integers in ``0..num_classes-1``: float labels would be truncated
    and out-of-range ones never match a prediction, so either is refused rather than scored.
    """
    if path is None:
        found: Optional[Path] = asset_path(CIFAR10_TEST_NPZ)
        if found is None:
            raise DfquantError(
                "no CIFAR-10 data: pass --data PATH.npz or set DFQUANT_ASSETS to a folder holding " + CIFAR10_TEST_NPZ
            )
        path = found
    p = require_file(path, "CIFAR-10 data file")
    try:
        with np.load(str(p), allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise DfquantError(f"{p} must hold arrays 'images' and 'labels', found {sorted(z.files)}")
            images, labels = z["images"], z["labels"]
    except DfquantError:
        raise
    except Exception as exc:
        raise DfquantError(f"cannot read {p} as an .npz file ({type(exc).__name__})") from None
    if images.ndim == 4 and images.shape[1:] == (32, 32, 3):  # channel-last: unambiguous at 32 x 32
        note(f"{p}: 'images' are stored channel-last (N, 32, 32, 3); read as such")
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise DfquantError(f"{p}: 'images' must have shape (N, 3, 32, 32) (or (N, 32, 32, 3)), got {images.shape}")
    if images.dtype != np.uint8:
        raise DfquantError(f"{p}: 'images' must be uint8 pixels, got {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise DfquantError(f"{p}: 'labels' must have shape ({images.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DfquantError(f"{p}: 'labels' must be integer class indices, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DfquantError(
            f"{p}: 'labels' must be class indices in 0..{num_classes - 1}, found values {int(labels.min())}..{int(labels.max())}"
        )
    return normalize_cifar(torch.from_numpy(images), preprocessing), torch.from_numpy(labels.astype(np.int64))
