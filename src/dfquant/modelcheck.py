"""Checks and copies of the caller's model before any method runs: dfquant never changes the model it
is given, and what it cannot work on is a clear error here rather than a failure deep inside."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from .errors import DfquantError


def check_plain_module(model: Any) -> None:
    """Refuse what dfquant cannot rebuild layer by layer, with the way out."""
    if isinstance(model, torch.jit.ScriptModule):
        raise DfquantError("TorchScript modules (torch.jit.script/trace) cannot be quantized: give the original nn.Module")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise DfquantError(f"the model is wrapped in {type(model).__name__}: quantize the wrapped model (model.module)")
    if not isinstance(model, nn.Module):
        raise DfquantError(f"expected a torch.nn.Module, got {type(model).__name__}")


def non_finite(named: Iterable[Tuple[str, Any]]) -> str:
    """The names (the first five) of the floating-point tensors holding NaN or inf, or ""."""
    bad = [n for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]
    return ", ".join(bad[:5]) + (" …" if len(bad) > 5 else "")


def float32_eval_cpu(model: Any) -> Tuple[nn.Module, list]:
    """The model quantize works from, and notes for the report: ``model`` itself when it is an
    eval-mode float32 model on the CPU, else such a copy. The caller's model is never changed (in
    training mode the graph pass that carries BN statistics would update its running statistics)."""
    check_plain_module(model)
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        raise DfquantError("the model's tensors are on the meta device (they have no values): load its weights first")
    bad = non_finite(list(model.named_parameters()) + list(model.named_buffers()))
    if bad:
        raise DfquantError(f"the model has NaN or inf values in {bad}: nothing sensible can be quantized from them")
    other_dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.is_floating_point() and t.dtype != torch.float32})
    devices = sorted({t.device.type for t in tensors if t.device.type != "cpu"})
    if not (model.training or other_dtypes or devices):
        return model, []
    notes = []
    model = copy_model(model)
    if model.training:
        notes.append("the model was in training mode: its eval-mode function was quantized (BN running statistics); the given model is unchanged")
    if devices:
        notes.append(f"the model's {'/'.join(devices)} tensors were copied to the CPU to quantize (genie/zeroq: device= picks where they train)")
    if other_dtypes:
        notes.append(f"the model's {'/'.join(other_dtypes)} tensors were converted to float32 to quantize; the quantized model computes in float32")
    return model.cpu().float().eval(), notes


def check_input_size(input_size: Any) -> Optional[Tuple[int, ...]]:
    """``input_size`` as a tuple of positive ints (channels, height, width), or None; else a clear error."""
    if input_size is None:
        return None
    if isinstance(input_size, (str, bytes, torch.Tensor)) or not hasattr(input_size, "__iter__"):
        raise DfquantError(f"input_size must be a tuple of positive integers such as (3, 32, 32), got {input_size!r}")
    size = tuple(input_size)
    if not size or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size):
        raise DfquantError(f"input_size must be a tuple of positive integers such as (3, 32, 32), got {input_size!r}")
    return size


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, or a clear error naming why the model cannot be copied."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - deepcopy fails deep inside torch for some legacy hooks
        hint = " (legacy torch.nn.utils.weight_norm: call remove_weight_norm, or use torch.nn.utils.parametrizations.weight_norm)" if "deepcopy" in str(exc) else ""
        raise DfquantError(f"the model cannot be copied, and dfquant never changes the given model: {str(exc).splitlines()[0]}{hint}") from None


def check_runs(model: nn.Module, input_size: Tuple[int, ...]) -> None:
    """One all-zero input through the model: a wrong input_size is a clear error, not a half-analysed graph."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    except Exception as exc:  # noqa: BLE001 - any failure here means the size does not fit the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DfquantError(f"the model cannot run on an input of size {tuple(input_size)} (input_size): {first}") from None
