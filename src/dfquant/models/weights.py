"""Loading user checkpoints into our model definitions, with clear errors."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ..assets import require_file
from ..errors import DfquantError
from ..modelcheck import non_finite


def read_state_dict(path: "str | Path") -> Dict[str, torch.Tensor]:
    """Read a state dict from a .pth/.th/.pt (safe loading only) or .safetensors file.

    Accepts a bare state dict or one wrapped as {"state_dict": ...} / {"model": ...}, and strips a
    ``module.`` prefix left by DataParallel.
    """
    p = require_file(path, "weights file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for a corrupt or foreign file
        kind = "a safetensors file" if p.suffix == ".safetensors" else "a PyTorch checkpoint (torch.save) that safe loading accepts"
        raise DfquantError(f"cannot read weights file {p}: not {kind}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DfquantError(f"weights file {p} holds no state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def describe_state_mismatch(
    expected: Dict[str, torch.Tensor],
    state: Dict[str, torch.Tensor],
    optional: Callable[[str], bool] = lambda key: False,
    extra: Optional[Dict[str, List[str]]] = None,
) -> str:
    """What keeps ``state`` from loading into a module whose state dict is ``expected``: its
    missing (unless ``optional``), unexpected and wrong-shape keys, the first few of each, plus any
    ``extra`` problems by heading; '' when it fits."""

    def listing(items: List[str], k: int = 4) -> str:
        return ", ".join(items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")

    found = {
        "missing keys": [k for k in expected if k not in state and not optional(k)],
        "unexpected keys": [k for k in state if k not in expected],
        "wrong shapes": [
            f"{k} {tuple(state[k].shape)} (the model needs {tuple(expected[k].shape)})"
            for k in expected
            if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
        ],
    }
    found.update(extra or {})
    return "; ".join(f"{heading}: {listing(items)}" for heading, items in found.items() if items)


def load_weights(model: nn.Module, path: "str | Path") -> nn.Module:
    """Load a checkpoint into ``model``; names any missing, unexpected or mis-shaped key."""
    return load_state(model, read_state_dict(path), path)


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], path: "str | Path") -> nn.Module:
    """Load a state dict read from ``path`` into ``model`` strictly: every key of the model present
    (but BN batch counters), none more, every shape equal, every value finite."""
    state = dict(state)
    own = model.state_dict()
    # BatchNorm's batch counter is bookkeeping only; old checkpoints lack it.
    problem = describe_state_mismatch(own, state, optional=lambda k: k.endswith("num_batches_tracked"))
    if problem:
        raise DfquantError(f"weights file {path} does not fit model {type(model).__name__}: {problem}")
    bad = non_finite(state.items())
    if bad:
        raise DfquantError(f"weights file {path} has NaN or inf values in {bad}")
    for k in own:
        if k not in state:
            state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return model
