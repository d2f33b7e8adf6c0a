"""Model-graph utilities: which layers to quantize, in execution order; which BN follows which
conv; BN folding. The graph comes from ``torch.fx`` symbolic tracing; models fx cannot trace fall
back to module registration order (documented in the report).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import DfquantError

SUPPORTED = (nn.Conv2d, nn.Linear)
# Modules with weights that dfquant leaves in float and lists in the report.
_NORM_OR_CONTAINER = (nn.BatchNorm2d, nn.BatchNorm1d)


def is_supported(module: nn.Module) -> bool:
    """A layer dfquant quantizes: Linear, or Conv2d with zero padding (the padding integer
    kernels and the ONNX export assume); a reflect/replicate/circular-padded conv stays float, and so
    does a subclass with a ``forward`` of its own (weight standardization and the like: replacing it
    by a plain quantized conv would drop what its forward does)."""
    if not isinstance(module, SUPPORTED) or getattr(module, "padding_mode", "zeros") != "zeros":
        return False
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    return type(module).forward is base.forward


class _Tracer(fx.Tracer):
    """fx's tracer, with every quantizable layer and every BN kept as one node, subclasses included
    (fx's default traces into modules defined outside torch.nn, so a ``class MyConv(nn.Conv2d)``
    would vanish from the graph)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_supported(m) or isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, qualname)


def first_input(node: fx.Node):
    """A node's first input, whether passed by position or by keyword (``bn(input=x)``)."""
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def aliases(root: nn.Module, module: nn.Module) -> List[str]:
    """Every name under which ``module`` is registered in ``root`` (a module can be reached twice)."""
    return [n for n, m in root.named_modules(remove_duplicate=False) if m is module and n]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is, and under every other name of the same module: a layer also
    registered as ``self.last = self.features[3]`` must not keep running in float under the alias."""
    for path in aliases(root, root.get_submodule(name)) or [name]:
        root.set_submodule(path, new)


@dataclass
class LayerInfo:
    name: str
    module: nn.Module
    order: int


@dataclass
class ModelGraph:
    layers: List[LayerInfo]  # supported layers in execution order
    unsupported: List[str]  # names of weight-bearing modules left in float
    traced: Optional[fx.GraphModule]
    conv_bn: Dict[str, str] = field(default_factory=dict)  # conv name -> BN name that directly follows it
    note: str = ""


def trace(model: nn.Module) -> Optional[fx.GraphModule]:
    """fx-trace the model, or None when it is not symbolically traceable."""
    try:
        return fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception:
        return None


def analyse(model: nn.Module) -> ModelGraph:
    """Find supported layers (Conv2d, Linear) in execution order, unsupported ones, and conv->BN pairs."""
    check_plain_module(model)
    gm = trace(model)
    modules = dict(model.named_modules())
    unsupported = [
        n or "(the model's own parameters)"
        for n, m in modules.items()
        if not (is_supported(m) or isinstance(m, _NORM_OR_CONTAINER))
        and "parametrizations" not in n.split(".")  # a parametrized layer's weight is read through it
        and any(True for _ in m.parameters(recurse=False))
    ]
    if gm is None:
        layers = [LayerInfo(n, m, i) for i, (n, m) in enumerate((n, m) for n, m in modules.items() if is_supported(m))]
        return ModelGraph(layers, unsupported, None, {}, "model is not fx-traceable: layer order is registration order, no BN pairing")
    order: List[str] = []
    conv_bn: Dict[str, str] = {}
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules.get(node.target)
        if mod is not None and is_supported(mod) and node.target not in order:
            order.append(node.target)
        if isinstance(mod, nn.BatchNorm2d) and mod.running_var is not None:  # batch-statistics BN: not foldable
            src = first_input(node)
            if (
                isinstance(src, fx.Node)
                and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d)
                and len(src.users) == 1
                and calls[src.target] == calls[node.target] == 1  # a shared conv or BN cannot take the fold
            ):
                conv_bn[src.target] = node.target
    layers = [LayerInfo(n, modules[n], i) for i, n in enumerate(order)]
    return ModelGraph(layers, unsupported, gm, conv_bn)


def check_plain_module(model: Any) -> None:
    """Refuse what dfquant cannot rebuild layer by layer, with the way out."""
    if isinstance(model, torch.jit.ScriptModule):
        raise DfquantError("TorchScript modules (torch.jit.script/trace) cannot be quantized: give the original nn.Module")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise DfquantError(f"the model is wrapped in {type(model).__name__}: quantize the wrapped model (model.module)")
    if not isinstance(model, nn.Module):
        raise DfquantError(f"expected a torch.nn.Module, got {type(model).__name__}")


def bn_affine(bn: nn.BatchNorm2d):
    """``(gamma, beta)`` of a BN; an affine-free BN (``affine=False``) has gamma 1 and beta 0."""
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(bn.num_features)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(bn.num_features)
    return gamma, beta


def bn_fold_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per channel, the factor folding ``bn`` multiplies the preceding conv's weight by: gamma / sqrt(var + eps)."""
    return bn_affine(bn)[0] / torch.sqrt(bn.running_var + bn.eps)


def fold_bn(model: nn.Module, graph: Optional[ModelGraph] = None) -> nn.Module:
    """Return a copy with every BN that directly follows a conv folded into it (BN -> Identity).

    ``w' = w * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``.
    The given model is not modified.
    """
    graph = graph or analyse(model)
    folded = copy.deepcopy(model)
    for conv_name, bn_name in graph.conv_bn.items():
        conv = folded.get_submodule(conv_name)
        bn = folded.get_submodule(bn_name)
        with torch.no_grad():
            inv = bn_fold_scale(bn)
            conv.weight.mul_(inv.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new_bias = bn_affine(bn)[1] + (bias - bn.running_mean) * inv
            conv.bias = nn.Parameter(new_bias.detach().clone())
        ident = nn.Identity()
        ident._dfquant_folded = True  # type: ignore[attr-defined]  # remembered when saving
        replace_module(folded, bn_name, ident)
    return folded


def float32_eval_cpu(model: Any) -> Tuple[nn.Module, list]:
    """The model quantize works from, and notes for the report: ``model`` itself when it is an
    eval-mode float32 model on the CPU, else such a copy. The caller's model is never changed (in
    training mode the graph pass that carries BN statistics would update its running statistics)."""
    check_plain_module(model)
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        raise DfquantError("the model's tensors are on the meta device (they have no values): load its weights first")
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
