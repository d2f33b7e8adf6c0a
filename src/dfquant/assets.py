"""Where real assets (pretrained weights, evaluation data) and the user cache live.

Real assets are never shipped with dfquant: they are read from a folder given by a path option or
by the environment variable ``DFQUANT_ASSETS`` (default: ``../shared`` next to the project, when it
exists). The cache holds what dfquant makes itself (the digits CNN trained on first use).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import DfquantError

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def assets_dir() -> Optional[Path]:
    """The assets folder: $DFQUANT_ASSETS, else ../shared beside the project, else None."""
    env = os.environ.get("DFQUANT_ASSETS")
    if env:
        return Path(env)
    for cand in (_PROJECT_ROOT.parent / "shared", Path.cwd().parent / "shared"):
        if cand.is_dir():
            return cand
    return None


def asset_path(relative: str) -> Optional[Path]:
    """Path of an asset under the assets folder, or None when the folder or the file is absent."""
    root = assets_dir()
    if root is None:
        return None
    p = root / relative
    return p if p.exists() else None


def require_file(path: "str | os.PathLike[str]", what: str) -> Path:
    """Return ``path`` as a Path, raising a clear error if it is not an existing file."""
    p = Path(path)
    if not p.exists():
        raise DfquantError(f"{what} not found: {p}")
    if not p.is_file():
        raise DfquantError(f"{what} is not a file: {p}")
    return p


def cache_dir() -> Path:
    """User cache for dfquant: $DFQUANT_CACHE, else $XDG_CACHE_HOME/dfquant, else ~/.cache/dfquant."""
    env = os.environ.get("DFQUANT_CACHE")
    if env:
        d = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        d = Path(base) / "dfquant"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DfquantError(f"cannot use {d} as dfquant's cache folder ({exc.strerror}): set DFQUANT_CACHE to a writable folder") from None
    return d


CIFAR_RESNET_WEIGHTS = {
    "resnet20": "models/cifar10/resnet20-12fca82f.th",
    "resnet56": "models/cifar10/resnet56-4bfd9763.th",
}
CIFAR10_TEST_NPZ = "data/cifar10-test-first846.npz"
#: Registry models whose pretrained weights the assets folder holds (used when no --weights is given).
MODEL_WEIGHTS = dict(
    CIFAR_RESNET_WEIGHTS,
    mobilenet_v1="models/imagenet/mobilenet_v1_075_224.safetensors",
    tiny_darknet="models/imagenet/tiny_darknet_224.safetensors",
)
#: 1000 labelled photos in ImageNet-1k's classes (no model here trained on them).
IMAGENET_NPZ = "data/imagenet-nips17dev-1000-224.npz"
