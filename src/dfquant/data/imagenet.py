"""ImageNet evaluation images: a folder of class sub-folders, or an ``.npz`` of preprocessed images.

Folders: the order and labels follow torchvision's ``ImageFolder`` (sorted class names give the
label indices; files are walked in sorted order), and the geometry is the standard evaluation one
(resize the shorter side to 256 bilinear, center crop 224), so accuracies match those published
for torchvision checkpoints. Pixels are then scaled to [0, 1] and mapped to the model's input by
its :class:`~dfquant.data.preprocessing.Preprocessing` (default: the ImageNet mean and std of
torchvision's models; Keras' MobileNet and darknet scale differently).

``.npz`` files (like the shared ``imagenet-nips17dev-1000-224.npz``): ``images`` uint8, already
resized and cropped, channel-first (N, 3, H, W) or channel-last (N, H, W, 3) -- read as
channel-last only when the layout is unambiguous (the last axis has 3 entries and the second does
not); ``labels`` integer class indices (N,); an optional ``files`` array is kept as the images'
names. Only the model's scaling is applied (no resize or crop).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from ..assets import require_file
from ..errors import DfquantError, note
from .preprocessing import TORCHVISION_IMAGENET, Preprocessing

IMAGENET_MEAN = TORCHVISION_IMAGENET.mean
IMAGENET_STD = TORCHVISION_IMAGENET.std
IMAGENET_CLASSES = 1000
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


def preprocess(image: Image.Image, preprocessing: Optional[Preprocessing] = None) -> torch.Tensor:
    """Standard eval transform: shorter side to 256 (bilinear), center crop 224, [0, 1], normalise
    with ``preprocessing`` (default: torchvision's ImageNet mean and std).

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
    return (preprocessing or TORCHVISION_IMAGENET).normalize(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))


class ImageFolderDataset(Dataset):
    """(image tensor (3, 224, 224), label) pairs from an ImageNet-style folder."""

    def __init__(self, path: "str | os.PathLike[str]", limit: Optional[int] = None, preprocessing: Optional[Preprocessing] = None):
        self.root = Path(path)
        self.classes, samples = find_images(path)
        self.samples = samples if limit is None else samples[:limit]
        self.preprocessing = preprocessing or TORCHVISION_IMAGENET

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        file, label = self.samples[index]
        try:
            with Image.open(file) as img:
                x = preprocess(img, self.preprocessing)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            # OSError: unreadable or truncated files; ValueError: oversized PNG text chunks;
            # DecompressionBombError: an image whose header claims more pixels than PIL will decode
            raise DfquantError(f"cannot read image {file}: {exc}") from None
        return x, label


def _check_loader_args(limit, batch_size) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DfquantError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DfquantError(f"batch_size must be a positive integer, got {batch_size!r}")


def imagenet_folder_loader(
    path: "str | os.PathLike[str]",
    limit: Optional[int] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    preprocessing: Optional[Preprocessing] = None,
) -> DataLoader:
    """A DataLoader of normalised (N, 3, 224, 224) batches and int64 labels, in sorted file order.

    ``limit`` keeps the first ``limit`` files (sorted by class, then name), for quick evaluations.
    ``preprocessing``: the model's input scaling (default: torchvision's ImageNet mean and std).
    """
    _check_loader_args(limit, batch_size)
    dataset = ImageFolderDataset(path, limit, preprocessing)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


class ImageArrayDataset(Dataset):
    """Preprocessed uint8 images (N, C, H, W) and labels in memory, scaled to the model's input a
    batch at a time: indexed by a list of positions it returns a whole (images, labels) batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocessing: Preprocessing, files: Optional[Sequence[str]] = None):
        self.images, self.labels, self.preprocessing = images, labels, preprocessing
        self.files = None if files is None else [str(f) for f in files]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: Union[int, Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocessing.normalize(np.ascontiguousarray(self.images[index]))
        return x, torch.from_numpy(np.asarray(self.labels[index], dtype=np.int64))


def image_layout(shape: Tuple[int, ...], channels: int = 3) -> str:
    """"CHW" or "HWC" for an (N, ...) image array shape, or a DfquantError when it is neither or
    both could be meant (an image 3 pixels high or wide)."""
    if len(shape) != 4:
        raise DfquantError(f"'images' must be 4-D, (N, {channels}, H, W) or (N, H, W, {channels}), got shape {shape}")
    first, last = shape[1] == channels, shape[3] == channels
    if first and last:
        raise DfquantError(
            f"'images' of shape {shape} could be channel-first or channel-last; store them as (N, {channels}, H, W)"
        )
    if first:
        return "CHW"
    if last:
        return "HWC"
    raise DfquantError(f"'images' must be (N, {channels}, H, W) or (N, H, W, {channels}) RGB pixels, got shape {shape}")


def load_imagenet_npz(
    path: "str | os.PathLike[str]",
    limit: Optional[int] = None,
    preprocessing: Optional[Preprocessing] = None,
    batch_size: int = 64,
    num_classes: int = IMAGENET_CLASSES,
) -> DataLoader:
    """A DataLoader of model-input batches (B, 3, H, W) float32 and int64 labels from an ``.npz``
    of preprocessed uint8 images; see the module docstring for the layout. ``limit`` keeps the
    first N images; ``preprocessing`` is the model's input scaling (default: torchvision's)."""
    _check_loader_args(limit, batch_size)
    p = require_file(path, "ImageNet data file")
    try:
        with np.load(str(p), allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise DfquantError(f"{p} must hold arrays 'images' and 'labels', found {sorted(z.files)}")
            images, labels = z["images"], z["labels"]
            files = z["files"] if "files" in z else None
    except DfquantError:
        raise
    except Exception as exc:
        raise DfquantError(f"cannot read {p} as an .npz file of images and labels ({type(exc).__name__})") from None
    pre = preprocessing or TORCHVISION_IMAGENET
    channels = 3 if pre.channels == 1 else pre.channels
    try:
        layout = image_layout(tuple(images.shape), channels)
    except DfquantError as exc:
        raise DfquantError(f"{p}: {exc}") from None
    if images.dtype != np.uint8:
        raise DfquantError(f"{p}: 'images' must be uint8 pixels (0..255), got {images.dtype}")
    n = images.shape[0]
    if labels.shape != (n,):
        raise DfquantError(f"{p}: 'labels' must have shape ({n},), one per image, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DfquantError(f"{p}: 'labels' must be integer class indices, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DfquantError(
            f"{p}: 'labels' must be class indices in 0..{num_classes - 1}, found values {int(labels.min())}..{int(labels.max())}"
        )
    if files is not None and files.shape != (n,):
        raise DfquantError(f"{p}: 'files' must hold one name per image, shape ({n},), got {files.shape}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
        files = None if files is None else files[:limit]
    if layout == "HWC":
        note(f"{p}: 'images' are stored channel-last (N, H, W, {channels}); read as such")
        images = images.transpose(0, 3, 1, 2)  # a view; each batch is made contiguous when it is read
    dataset = ImageArrayDataset(images, labels, pre, files)
    sampler = BatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=False)
    return DataLoader(dataset, batch_size=None, sampler=sampler)
