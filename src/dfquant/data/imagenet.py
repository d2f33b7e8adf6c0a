"""ImageNet-style evaluation folders: one sub-folder per class, read with PIL and torch only.

The order and labels follow torchvision's ``ImageFolder`` (sorted class names give the label
indices; files are walked in sorted order), and the preprocessing is the standard evaluation one
(resize the shorter side to 256 bilinear, center crop 224, scale to [0, 1], normalise with the
ImageNet mean and std), so accuracies match those published for torchvision checkpoints.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import DfquantError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
RESIZE = 256
CROP = 224


def find_images(path: "str | os.PathLike[str]") -> Tuple[List[str], List[Tuple[Path, int]]]:
    """Class names (sorted) and the (file, label) samples under ``path``, in ImageFolder order."""
    root = Path(path)
    if not root.exists():
        raise DfquantError(f"ImageNet data folder not found: {root}")
    if not root.is_dir():
        raise DfquantError(f"ImageNet data path is not a folder: {root} (expected one sub-folder per class)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DfquantError(f"no class sub-folders in {root}: expected one sub-folder of images per class")
    samples: List[Tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((Path(dirpath) / fname, label))
    if not samples:
        raise DfquantError(
            f"no images found under {root} ({len(classes)} class folders; looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, samples


def preprocess(image: Image.Image) -> torch.Tensor:
    """Standard eval transform: shorter side to 256 (bilinear), center crop 224, [0, 1], normalise.

    Same arithmetic as torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize on PIL.
    """
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        size = (RESIZE, int(RESIZE * h / w))
    else:
        size = (int(RESIZE * w / h), RESIZE)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    top = int(round((h - CROP) / 2.0))
    left = int(round((w - CROP) / 2.0))
    image = image.crop((left, top, left + CROP, top + CROP))
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


class ImageFolderDataset(Dataset):
    """(image tensor (3, 224, 224), label) pairs from an ImageNet-style folder."""

    def __init__(self, path: "str | os.PathLike[str]", limit: Optional[int] = None):
        self.root = Path(path)
        self.classes, samples = find_images(path)
        self.samples = samples if limit is None else samples[:limit]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        file, label = self.samples[index]
        try:
            with Image.open(file) as img:
                x = preprocess(img)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            # OSError: unreadable or truncated files; ValueError: oversized PNG text chunks;
            # DecompressionBombError: an image whose header claims more pixels than PIL will decode
            raise DfquantError(f"cannot read image {file}: {exc}") from None
        return x, label


def imagenet_folder_loader(
    path: "str | os.PathLike[str]", limit: Optional[int] = None, batch_size: int = 64, num_workers: int = 0
) -> DataLoader:
    """A DataLoader of normalised (N, 3, 224, 224) batches and int64 labels, in sorted file order.

    ``limit`` keeps the first ``limit`` files (sorted by class, then name), for quick evaluations.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DfquantError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DfquantError(f"batch_size must be a positive integer, got {batch_size!r}")
    dataset = ImageFolderDataset(path, limit)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
