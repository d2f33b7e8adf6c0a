"""The embedded default: scikit-learn's 8x8 digits and a small BN CNN trained on first use.

Training is deterministic (fixed seed, single thread for the reductions that matter) and takes a few
seconds; the weights are cached under the user's cache dir so later runs just load them.
"""
from __future__ import annotations

import sys
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn

from ..assets import cache_dir
from ..errors import DfquantError
from ..io.files import atomic_write
from .preprocessing import Preprocessing

Split = Tuple[torch.Tensor, torch.Tensor]
# pixels (0..16) / 16, then normalised with this mean and std: the model's input lies in [-1, 1]
DIGITS_MEAN, DIGITS_STD = (0.5,), (0.5,)
DIGITS_PREPROCESSING = Preprocessing(DIGITS_MEAN, DIGITS_STD, "pixels (0..16) / 16, then (x - 0.5) / 0.5 (the digits CNN)")
_CACHE_NAME = "digits_cnn-v1.pt"


def load_digits_split(preprocessing: "Preprocessing | None" = None) -> Tuple[Split, Split]:
    """(train, test) splits of sklearn's digits: 80/20, stratified, fixed seed; pixels (0..16)
    scaled to [0, 1] by / 16, then by ``preprocessing`` (default: the digits CNN's, to [-1, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    pre = preprocessing or DIGITS_PREPROCESSING
    if pre.channels != 1:
        raise DfquantError(f"the digits are grayscale (1 channel), the preprocessing {pre} has {pre.channels}")
    x = (d.images.astype(np.float32) / 16.0 - pre.mean[0]) / pre.std[0]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return (t(xtr).unsqueeze(1), t(ytr)), (t(xte).unsqueeze(1), t(yte))


def train_digits_cnn(epochs: int = 30, seed: int = 0, progress: bool = False) -> nn.Module:
    """Train the digits CNN from scratch on the training split (deterministic for a seed)."""
    from ..models import create_model
    from ..progress import progress_bar

    (xtr, ytr), _ = load_digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float reductions differ with the thread count: fix it, same model everywhere
    try:
        return _train(create_model, xtr, ytr, epochs, seed, progress, progress_bar)
    finally:
        torch.set_num_threads(threads)


def _train(create_model, xtr, ytr, epochs: int, seed: int, progress: bool, progress_bar) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model("digits_cnn").train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    for _ in progress_bar(range(epochs), desc="training digits CNN", enable=progress):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def digits_model(progress: bool = False, retrain: bool = False) -> nn.Module:
    """The trained digits CNN: loaded from the cache, or trained now and cached."""
    from ..models import create_model

    path = cache_dir() / _CACHE_NAME
    if path.exists() and not retrain:
        model = create_model("digits_cnn")
        try:
            model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:
            pass  # a stale or corrupt cache entry: train again
    model = train_digits_cnn(progress=progress)
    try:  # a per-process temporary name: two processes filling the cache at once both succeed
        atomic_write(path, lambda tmp: torch.save(model.state_dict(), str(tmp)))
    except (OSError, RuntimeError) as exc:  # torch.save reports an unwritable file as a RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"dfquant: note: the trained digits CNN could not be cached in {path.parent} ({first}); it is used uncached", file=sys.stderr)
    return model
