"""Synthetic image files: a safetensors file of images (key ``"images"``) and a PNG grid to look at.

:func:`save_images` writes ``NAME.safetensors`` (a name already ending in ``.safetensors`` is used as
given; any other gets the suffix appended, so ``syn_seed0.5`` keeps its dot); the grid of
:func:`save_image_grid` goes beside it as ``NAME.png`` (:func:`grid_path`). Neither creates folders:
a missing output folder is refused, so a typo cannot create a directory tree. Metadata is stored
with sorted keys, so two identical runs write byte-identical files; writes are atomic.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..errors import DfquantError
from .files import atomic_write, check_writable

__all__ = ["save_images", "images_path", "grid_path", "load_images", "load_image_files", "images_metadata", "save_image_grid"]


def images_path(path) -> Path:
    """The file :func:`save_images` writes for ``path``: ``x.safetensors`` as given, ``x`` or
    ``x.v1`` with ``.safetensors`` appended (the name is never cut at a dot). A ``.png`` name is
    refused: the images go to a ``.safetensors`` file and the grid is written beside it."""
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise DfquantError(f"{path!r} names a folder: give a .safetensors file name for the synthetic images")
    p = Path(path)
    if p.name in ("", ".", "..", ".safetensors"):
        raise DfquantError(f"not a file name to save synthetic images under: {str(path)!r}")
    if p.name.lower().endswith(".png"):
        raise DfquantError(f"{p}: give a .safetensors name for the synthetic images; the .png grid is written beside it")
    return p if p.name.endswith(".safetensors") else p.with_name(p.name + ".safetensors")


def grid_path(path) -> Path:
    """The PNG grid beside an images file: ``x.safetensors`` -> ``x.png``, ``x.v1`` -> ``x.v1.png``."""
    p = images_path(path)
    return p.with_name(p.name[: -len(".safetensors")] + ".png")


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted.

    The writer keeps metadata in a hash map whose order changes from run to run, so two identical
    runs would differ in bytes. Sorting does not change the header's length (same keys, same
    compact JSON), so the header is overwritten in place, padded with spaces as the format allows.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted((header.get("__metadata__") or {}).items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) <= n:
            f.seek(8)
            f.write(new + b" " * (n - len(new)))
            return
        f.seek(8 + n)  # (not expected) a longer encoding: rewrite the whole file
        rest = f.read()
        new += b" " * (-(8 + len(new)) % 8)
        f.seek(0)
        f.write(len(new).to_bytes(8, "little") + new + rest)
        f.truncate()


def save_images(images: torch.Tensor, path, metadata: Optional[Dict[str, object]] = None) -> Path:
    """Save images to a safetensors file (key ``"images"``), atomically; returns the file written.

    ``path`` is named as :func:`images_path` says (``.safetensors`` appended unless present; a
    ``.png`` name is refused). Its folder must exist (it is not created). The file is written next
    to the target under a temporary name and renamed over it only when complete, so an interrupted
    run never leaves a half-written file. ``metadata`` values are stored as strings together with
    the shape and dtype, with sorted keys (identical runs give identical bytes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise DfquantError("images must be a (N, C, H, W) tensor")
    path = images_path(path)
    check_writable(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", "dfquant-synthetic-images")
    meta["shape"] = "x".join(str(s) for s in images.shape)
    meta["dtype"] = str(images.dtype).replace("torch.", "")
    meta = dict(sorted(meta.items()))
    data = {"images": images.detach().cpu().contiguous()}

    def write(p: Path) -> None:
        save_file(data, str(p), metadata=meta)
        _sort_metadata(p)

    try:
        atomic_write(path, write)
    except OSError as exc:
        raise DfquantError(f"cannot write {path}: {exc.strerror or exc}") from None
    except SafetensorError as exc:  # the writer's own I/O errors (a full disk, ...)
        raise DfquantError(f"cannot write {path}: {str(exc).splitlines()[0]}") from None
    return path


def _open_images_file(path: Path, read_images: bool):
    from safetensors import safe_open

    if not path.is_file():
        raise DfquantError(f"synthetic images file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "images" not in f.keys():
                raise DfquantError(f"{path} holds no 'images' tensor")
            images = f.get_tensor("images") if read_images else None
            meta = dict(f.metadata() or {})
    except DfquantError:
        raise
    except Exception as exc:  # corrupt or foreign file
        raise DfquantError(f"cannot read synthetic images from {path}: {exc}") from None
    return images, meta


def load_images(path, with_metadata: bool = False):
    """Load images saved by :func:`save_images` (and, if asked, their metadata dict)."""
    images, meta = _open_images_file(Path(path), read_images=True)
    return (images, meta) if with_metadata else images


def images_metadata(path) -> Dict[str, str]:
    """The metadata of an images file from :func:`save_images` (model, method, seed, shape, ...),
    without reading the images; a clear error if the file is missing or not such a file."""
    return _open_images_file(Path(path), read_images=False)[1]


def load_image_files(paths: Sequence) -> Tuple[torch.Tensor, List[Dict[str, str]]]:
    """Load several image files and concatenate them, in the order given, with their metadata.

    For a synthetic set made in parts, e.g. 1024 images as four parallel ``dfquant synthesize -n
    256 --seed i`` runs (each part is an independent synthesis with its own seed). Fails with a
    clear error when the files' per-image shapes differ or when two files hold the same images
    (the same part given twice would silently weight those images double).
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise DfquantError("no synthetic images files given")
    sets = [load_images(p, with_metadata=True) for p in paths]
    first_shape = tuple(sets[0][0].shape[1:])
    for p, (x, _) in zip(paths[1:], sets[1:]):
        if tuple(x.shape[1:]) != first_shape:
            raise DfquantError(
                f"synthetic images in {p} have shape {tuple(x.shape[1:])} per image, but those in {paths[0]} have {first_shape}"
            )
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            if sets[i][0].shape == sets[j][0].shape and torch.equal(sets[i][0], sets[j][0]):
                raise DfquantError(f"{paths[i]} and {paths[j]} hold the same images; give each part once")
    images = torch.cat([x for x, _ in sets]) if len(sets) > 1 else sets[0][0]
    return images, [m for _, m in sets]


def save_image_grid(
    images: torch.Tensor,
    png_path,
    nrow: int = 8,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    scale: Optional[int] = None,
) -> Path:
    """Write the first (up to) 64 images as a PNG grid, for a person to look at.

    With ``mean``/``std`` (the model's input normalization) the images are de-normalized
    (``x * std + mean``) and clipped to [0, 1]; otherwise each image is min-max scaled on its own.
    One-channel images are written in grey. Small images are enlarged by an integer factor
    (nearest neighbour) so the grid is legible: ``scale`` sets it, default so that a side is at
    least 64 pixels. The PNG is written atomically; its folder must exist (see :func:`grid_path`
    for the name beside an images file).
    """
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise DfquantError("images must be a non-empty (N, C, H, W) tensor")
    nrow = check_int(nrow, "nrow", 1)
    x = images[:64].detach().cpu().float()
    c = x.shape[1]
    if c not in (1, 3):
        raise DfquantError(f"can only draw 1- or 3-channel images, got {c} channels")
    if mean is not None or std is not None:
        m = torch.tensor(list(mean) if mean is not None else [0.0] * c, dtype=torch.float32)
        s = torch.tensor(list(std) if std is not None else [1.0] * c, dtype=torch.float32)
        if m.numel() == 1:
            m = m.expand(c)
        if s.numel() == 1:
            s = s.expand(c)
        if m.numel() != c or s.numel() != c:
            raise DfquantError(f"mean/std must have 1 or {c} values")
        x = (x * s.view(1, c, 1, 1) + m.view(1, c, 1, 1)).clamp(0, 1)
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    h, w = x.shape[-2:]
    if scale is None:
        scale = max(1, math.ceil(64 / max(h, w)))
    scale = check_int(scale, "scale", 1)
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
        h, w = h * scale, w * scale
    k = x.shape[0]
    cols = min(nrow, k)
    rows = math.ceil(k / cols)
    pad = 2
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(k):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    arr = (grid * 255).round().clamp(0, 255).to(torch.uint8)
    if c == 1:
        img = Image.fromarray(arr[0].numpy())  # uint8 2-D -> mode "L"
    else:
        img = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())
    png_path = Path(png_path)
    check_writable(png_path)
    try:
        atomic_write(png_path, lambda p: img.save(str(p), format="PNG"))
    except OSError as exc:
        raise DfquantError(f"cannot write {png_path}: {exc.strerror or exc}") from None
    return png_path
