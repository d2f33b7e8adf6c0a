"""Evaluation data. dfquant never uses data to quantize; these sets only measure accuracy.

- ``digits``: scikit-learn's embedded 8x8 digits (no download), held-out 20 % split.
- ``cifar10``: an ``.npz`` with ``images`` uint8 (N, 3, 32, 32) and ``labels`` (N,).
- ``imagenet``: a folder of JPEGs in class sub-folders, standard 256/224 preprocessing.
"""
from __future__ import annotations

from .cifar import load_cifar10_npz
from .digits import digits_model, load_digits_split

__all__ = ["load_cifar10_npz", "load_digits_split", "digits_model", "load_eval_data", "check_limit", "input_normalization", "input_range"]


def input_normalization(dataset: str):
    """(mean, std) per channel that a dataset's images are normalised with, after scaling pixels to [0, 1]."""
    from ..errors import DfquantError
    from .cifar import CIFAR_MEAN, CIFAR_STD
    from .digits import DIGITS_MEAN, DIGITS_STD
    from .imagenet import IMAGENET_MEAN, IMAGENET_STD

    table = {"digits": (DIGITS_MEAN, DIGITS_STD), "cifar10": (CIFAR_MEAN, CIFAR_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
    if dataset not in table:
        raise DfquantError(f"no input normalization known for dataset {dataset!r}; choose {', '.join(table)}")
    return table[dataset]


def input_range(dataset: str):
    """The per-tensor range ``(lo, hi)`` of a dataset's normalised model input, known without any
    image: pixels in [0, 1] map to ``[(0 - mean_c) / std_c, (1 - mean_c) / std_c]`` per channel, and
    the tensor's range spans all channels. Used to quantize the image input data-free."""
    mean, std = input_normalization(dataset)
    lo = min((0.0 - m) / s for m, s in zip(mean, std))
    hi = max((1.0 - m) / s for m, s in zip(mean, std))
    return float(lo), float(hi)


def check_limit(limit) -> "int | None":
    """``limit`` (keep the first N images) must be None or a positive integer."""
    from ..errors import DfquantError

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DfquantError(f"limit must be a positive integer, got {limit!r}")
    return limit


def load_eval_data(name: str, path: "str | None" = None, limit: "int | None" = None):
    """Load an evaluation set by name; returns a (images, labels) pair or a DataLoader.

    ``limit`` keeps the first N images; it must be a positive integer for every dataset (a
    negative one would silently slice off the *last* images instead).
    """
    from ..errors import DfquantError

    check_limit(limit)
    if name == "digits":
        _, test = load_digits_split()
        x, y = test
    elif name == "cifar10":
        x, y = load_cifar10_npz(path)
    elif name == "imagenet":
        from .imagenet import imagenet_folder_loader

        if path is None:
            raise DfquantError("--data PATH is required for imagenet evaluation (a folder of class sub-folders; --eval none to skip evaluation)")
        return imagenet_folder_loader(path, limit=limit)
    else:
        raise DfquantError(f"unknown evaluation data {name!r}; choose digits, cifar10 or imagenet")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y
