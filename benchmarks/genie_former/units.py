"""Genie-M's reconstruction units (BRECQ, Li et al., ICLR 2021, Sec. 3.2 / 4.1), their order and inputs.

Residual blocks are reconstructed as one unit, every other quantized layer on its own. A module is a
block when its class name is one the Genie release lists (:data:`BLOCK_CLASS_NAMES`) or, ours for
hand-written models, when it is a child of an ``nn.Sequential`` holding at least two quantized
layers. Units run in the model's execution order; a unit's input and (float) output are captured
by hooks that stop the forward pass as soon as they have them.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from dfquant.errors import DfquantError
from dfquant.graph import replace_module
from dfquant.qmodules import QUANT_LAYERS

#: Class names whose modules are reconstructed as one unit (the release's list in ``main.py``).
BLOCK_CLASS_NAMES = ("BasicBlock", "Bottleneck", "ResBottleneckBlock", "DwsConvBlock", "ConvBlock", "InvertedResidual")

Units = List[Tuple[str, List[str]]]


def _quant_layer_names(module: nn.Module, prefix: str) -> List[str]:
    return [f"{prefix}.{n}" if n else prefix for n, m in module.named_modules() if isinstance(m, QUANT_LAYERS)]


def find_units(qmodel: nn.Module) -> List[Tuple[str, List[str]]]:
    """The reconstruction units of a quantized model: ``(module name, [quantized layer names])``.

    Blocks (class name in :data:`BLOCK_CLASS_NAMES`, or a non-container child of an
    ``nn.Sequential`` holding >= 2 quantized layers) form one unit; every other quantized layer is
    its own unit. Returned in registration order (``reconstruct_model`` sorts by execution order).
    """
    units: List[Tuple[str, List[str]]] = []
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, QUANT_LAYERS):
                units.append((full, [full]))
                continue
            layers = _quant_layer_names(child, full)
            if not layers:
                continue
            is_block = type(child).__name__ in BLOCK_CLASS_NAMES or (
                isinstance(module, nn.Sequential) and len(layers) >= 2 and not isinstance(child, containers)
            )
            if is_block:
                units.append((full, layers))
            else:
                visit(full, child)

    if isinstance(qmodel, QUANT_LAYERS):
        return [("", [""])]
    visit("", qmodel)
    return units


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted tensor is captured."""


def chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def capture(net: nn.Module, module: nn.Module, data: torch.Tensor, chunk: int, device, want_output: bool):
    """Input (and output) of ``module`` when ``net`` runs on ``data`` (in chunks); stops early."""
    xs: List[torch.Tensor] = []
    ys: List[torch.Tensor] = []

    def pre(mod, args):
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise DfquantError(f"Genie-M units must take one tensor input; {type(mod).__name__} gets {len(args)} arguments")
        xs.append(args[0].detach().clone())  # a copy: a unit may add to its input in place (x += ...)
        if not want_output:
            raise _Stop

    def post(mod, args, out):
        if not isinstance(out, torch.Tensor):
            raise DfquantError(f"Genie-M units must return one tensor; {type(mod).__name__} returns {type(out).__name__}")
        ys.append(out.detach())
        raise _Stop

    h1 = module.register_forward_pre_hook(pre)
    h2 = module.register_forward_hook(post) if want_output else None
    try:
        for sl in chunks(data.shape[0], chunk):
            try:
                net(data[sl].to(device))
            except _Stop:
                pass
    finally:
        h1.remove()
        if h2 is not None:
            h2.remove()
    if len(xs) != math.ceil(data.shape[0] / chunk):
        raise DfquantError("a reconstruction unit was not reached by the forward pass")
    return torch.cat(xs), (torch.cat(ys) if want_output else None)


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root if name == "" else root.get_submodule(name)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    if name == "":
        raise DfquantError("the model itself is a single quantized layer: nothing to reconstruct around it")
    replace_module(root, name, module)


@torch.no_grad()
def execution_order(qmodel: nn.Module, x: torch.Tensor) -> Dict[str, Tuple[int, int]]:
    """name -> (first call index, number of calls) of every quantized layer in one forward pass."""
    seen: Dict[str, List[int]] = {}
    counter = [0]
    handles = []
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_LAYERS):

            def hook(mod, args, _n=name):
                if _n not in seen:
                    seen[_n] = [counter[0], 0]
                    counter[0] += 1
                seen[_n][1] += 1

            handles.append(m.register_forward_pre_hook(hook))
    try:
        qmodel(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (v[0], v[1]) for n, v in seen.items()}


def ordered_units(qmodel: nn.Module, ref: nn.Module, x: torch.Tensor) -> Tuple[Units, Units]:
    """``(units in execution order, units the forward pass does not reach)``; each unit's layers sorted too.

    Refused: a layer run more than once per forward pass, and a float model whose layer does not
    match the quantized one."""
    units = find_units(qmodel)
    order = execution_order(qmodel, x)
    for _, layers in units:
        for name in layers:
            if order.get(name, (None, 0))[1] > 1:
                raise DfquantError(f"layer {name} runs {order[name][1]} times per forward pass; Genie-M needs each layer used once")
            ref_layer, q_layer = get_module(ref, name), get_module(qmodel, name)
            if not isinstance(ref_layer, (nn.Conv2d, nn.Linear)) or tuple(ref_layer.weight.shape) != tuple(q_layer.weight_int.shape):
                raise DfquantError(f"the float model's {name!r} does not match the quantized layer")
    skipped = [(u, ls) for u, ls in units if any(n not in order for n in ls)]
    units = [(u, ls) for u, ls in units if all(n in order for n in ls)]
    units.sort(key=lambda u: min(order[n][0] for n in u[1]))
    for _, layers in units:
        layers.sort(key=lambda n: order[n][0])
    return units, skipped
