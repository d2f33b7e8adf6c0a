"""Loading user checkpoints into our model definitions, with clear errors."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn

from ..assets import require_file
from ..errors import DfquantError


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
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise DfquantError(f"cannot read weights file {p}: not a PyTorch checkpoint ({type(exc).__name__})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DfquantError(f"weights file {p} holds no state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: "str | Path") -> nn.Module:
    """Load a checkpoint into ``model``; names any missing, unexpected or mis-shaped key."""
    state = read_state_dict(path)
    own = model.state_dict()
    # BatchNorm's batch counter is bookkeeping only; old checkpoints lack it.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:2]}{'...' if len(wrong) > 2 else ''}")
        raise DfquantError(f"weights file {path} does not fit model {type(model).__name__}: " + "; ".join(parts))
    for k in own:
        if k not in state:
            state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return model
