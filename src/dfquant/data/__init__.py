"""Evaluation data. dfquant never uses data to quantize; these sets only measure accuracy.

- ``digits``: scikit-learn's embedded 8x8 digits (no download), held-out 20 % split.
- ``cifar10``: an ``.npz`` with ``images`` uint8 (N, 3, 32, 32) and ``labels`` (N,).
- ``imagenet``: a folder of images in class sub-folders (resize 256, center crop 224), or an
  ``.npz`` of already cropped uint8 images and labels (:func:`~dfquant.data.imagenet.load_imagenet_npz`).

Pixels become model inputs by the *model's* preprocessing (:class:`Preprocessing`, carried by every
registry entry; pass ``preprocessing=`` to :func:`load_eval_data`), not the dataset's: two ImageNet
models may scale their input differently. The dataset-level functions :func:`input_normalization`
and :func:`input_range` give the usual scaling of a dataset's models (torchvision's for ImageNet).
"""
from __future__ import annotations

from .cifar import CIFAR_PREPROCESSING, load_cifar10_npz
from .digits import DIGITS_PREPROCESSING, digits_model, load_digits_split
from .preprocessing import TF_INCEPTION, TORCHVISION_IMAGENET, UNIT_RANGE, Preprocessing

__all__ = [
    "load_cifar10_npz", "load_digits_split", "digits_model", "load_eval_data", "check_limit", "input_normalization",
    "input_range", "dataset_preprocessing", "Preprocessing", "TORCHVISION_IMAGENET", "TF_INCEPTION", "UNIT_RANGE",
]

_DATASET_PREPROCESSING = {"digits": DIGITS_PREPROCESSING, "cifar10": CIFAR_PREPROCESSING, "imagenet": TORCHVISION_IMAGENET}


def dataset_preprocessing(dataset: str) -> Preprocessing:
    """The usual input scaling of a dataset's models (ImageNet: torchvision's mean and std); a
    model's own may differ (:func:`dfquant.models.preprocessing_of`)."""
    from ..errors import DfquantError

    if dataset not in _DATASET_PREPROCESSING:
        raise DfquantError(f"no input normalization known for dataset {dataset!r}; choose {', '.join(_DATASET_PREPROCESSING)}")
    return _DATASET_PREPROCESSING[dataset]


def input_normalization(dataset: str):
    """(mean, std) per channel that a dataset's images are normalised with, after scaling pixels to
    [0, 1]. The dataset's usual scaling; for a given model use :func:`dfquant.models.preprocessing_of`."""
    pre = dataset_preprocessing(dataset)
    return pre.mean, pre.std


def input_range(dataset: str):
    """The per-tensor range ``(lo, hi)`` of a dataset's normalised model input, known without any
    image: pixels in [0, 1] map to ``[(0 - mean_c) / std_c, (1 - mean_c) / std_c]`` per channel, and
    the tensor's range spans all channels. Used to quantize the image input data-free. The dataset's
    usual scaling; for a given model use :func:`dfquant.models.input_range_of`."""
    return dataset_preprocessing(dataset).input_range()


def check_limit(limit) -> "int | None":
    """``limit`` (keep the first N images) must be None or a positive integer."""
    from ..errors import DfquantError

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DfquantError(f"limit must be a positive integer, got {limit!r}")
    return limit


def load_eval_data(name: str, path: "str | None" = None, limit: "int | None" = None, preprocessing=None, batch_size: int = 64):
    """Load an evaluation set by name; returns a (images, labels) pair or a DataLoader of batches.

    ``limit`` keeps the first N images; it must be a positive integer for every dataset (a
    negative one would silently slice off the *last* images instead). ``preprocessing``: how the
    model scales its input -- a :class:`Preprocessing`, a registry model name, or a model built by
    :func:`dfquant.create_model`; default: the dataset's usual scaling. ``imagenet`` reads a folder
    of class sub-folders or an ``.npz`` file (``batch_size`` images per batch).
    """
    from pathlib import Path

    from ..errors import DfquantError

    check_limit(limit)
    if preprocessing is not None:
        from ..models import preprocessing_of

        preprocessing = preprocessing_of(preprocessing)
    if name == "digits":
        _, test = load_digits_split(preprocessing)
        x, y = test
    elif name == "cifar10":
        x, y = load_cifar10_npz(path, preprocessing=preprocessing)
    elif name == "imagenet":
        from .imagenet import imagenet_folder_loader, load_imagenet_npz

        if path is None:
            from ..assets import IMAGENET_NPZ, asset_path

            path = asset_path(IMAGENET_NPZ)
        if path is None:
            raise DfquantError(
                "--data PATH is required for imagenet evaluation (a folder of class sub-folders, or an .npz of images and labels; "
                "--eval none to skip evaluation)"
            )
        if Path(path).is_file() or str(path).lower().endswith(".npz"):
            return load_imagenet_npz(path, limit=limit, preprocessing=preprocessing, batch_size=batch_size)
        return imagenet_folder_loader(path, limit=limit, batch_size=batch_size, preprocessing=preprocessing)
    else:
        raise DfquantError(f"unknown evaluation data {name!r}; choose digits, cifar10 or imagenet")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


#: What output index i of a registry model's classifier means, per data set (exported with ONNX files).
LABEL_ORDER = {
    "digits": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "imagenet": "ImageNet-1k's 1000 classes in the order of their sorted WordNet IDs (0 = n01440764 tench ... 999 = n15075141 toilet tissue)",
}
