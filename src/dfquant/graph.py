"""Model-graph utilities: which layers to quantize, in execution order; which BN follows which
conv; BN folding. The graph comes from ``torch.fx`` symbolic tracing; models fx cannot trace fall
back to module registration order (documented in the report).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .modelcheck import check_plain_module, copy_model

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


def call_counts(gm: fx.GraphModule) -> Dict[str, int]:
    """How often each module runs in one forward (a shared module more than once)."""
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def first_input(node: fx.Node):
    """A node's first input, whether passed by position or by keyword (``bn(input=x)``)."""
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def aliases(root: nn.Module, module: nn.Module) -> List[str]:
    """Every name under which ``module`` is registered in ``root`` (a module can be reached twice)."""
    return [n for n, m in root.named_modules(remove_duplicate=False) if m is module and n]


def alias_map(root: nn.Module) -> Dict[int, List[str]]:
    """Every module's names in ``root``, by ``id``: :func:`aliases` of all modules in one walk."""
    found: Dict[int, List[str]] = {}
    for n, m in root.named_modules(remove_duplicate=False):
        if n:
            found.setdefault(id(m), []).append(n)
    return found


def replace_module(root: nn.Module, name: str, new: nn.Module, names: Optional[Dict[int, List[str]]] = None) -> None:
    """Put ``new`` where ``name`` is, and under every other name of the same module: a layer also
    registered as ``self.last = self.features[3]`` must not keep running in float under the alias.
    ``names``: :func:`alias_map` of ``root``, when replacing many layers (one walk, not one per layer)."""
    old = root.get_submodule(name)
    paths = names.get(id(old)) if names is not None else aliases(root, old)
    for path in paths or [name]:
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


class _ShapeRecorder(fx.Interpreter):
    """Runs a traced graph and keeps each node's output shape (tensor outputs only)."""

    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__(root, graph=graph)
        self.shapes: Dict[str, torch.Size] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = out.shape
        return out


@torch.no_grad()
def traced_shapes(gm: fx.GraphModule, input_size: Tuple[int, ...]) -> Dict[str, torch.Size]:
    """Every node's output shape on one all-zero input of ``input_size`` (batch 1), by node name.
    Raises what the forward raises. One plain forward through the graph (``torch.fx``'s ShapeProp
    would do the same but imports sympy on its first run, most of a first quantize call)."""
    rec = _ShapeRecorder(gm, gm.graph)
    rec.run(torch.zeros(1, *input_size))
    return rec.shapes


def rebind(graph: ModelGraph, model: nn.Module) -> ModelGraph:
    """``graph`` (:func:`analyse` of a model) for ``model``, a copy of that model with the same
    modules under the same names (weights may differ): its traced graph over ``model``'s modules,
    without tracing again (the two GraphModules share one read-only ``fx.Graph``)."""
    modules = dict(model.named_modules())
    traced = None if graph.traced is None else fx.GraphModule(model, graph.traced.graph, type(model).__name__)
    layers = [LayerInfo(l.name, modules[l.name], l.order) for l in graph.layers]
    return ModelGraph(layers, list(graph.unsupported), traced, dict(graph.conv_bn), graph.note)


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
    calls = call_counts(gm)
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

    ``w' = w * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``,
    computed in float64 and cast back, so the folded weights (and the codes chosen from them) do
    not depend on the CPU's float32 kernels. The given model is not modified.
    """
    graph = graph or analyse(model)
    return fold_bn_in_place(copy_model(model), graph)


def fold_bn_in_place(model: nn.Module, graph: ModelGraph) -> nn.Module:
    """:func:`fold_bn` on ``model`` itself (a copy the caller owns), returned; ``graph``: its analysis."""
    folded = model
    names = alias_map(folded)
    for conv_name, bn_name in graph.conv_bn.items():
        conv = folded.get_submodule(conv_name)
        bn = folded.get_submodule(bn_name)
        with torch.no_grad():
            gamma, beta = (t.double() for t in bn_affine(bn))
            inv = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
            conv.weight.copy_(conv.weight.double() * inv.reshape(-1, 1, 1, 1))
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv)
            new_bias = beta + (bias - bn.running_mean.double()) * inv
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
        ident = nn.Identity()
        ident._dfquant_folded = True  # type: ignore[attr-defined]  # remembered when saving
        replace_module(folded, bn_name, ident, names)
    return folded


#: Residual adds, as fx records ``a + b``, ``a += b``, ``torch.add(a, b)`` and ``a.add(b)``.
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
#: Ops a shortcut may apply to the block input that commute with an elementwise quantizer whose
#: zero is exact: slicing (option-A subsampling), zero padding, reshapes.
_SHAPE_FUNCTIONS = (operator.getitem, torch.nn.functional.pad, torch.flatten)
_SHAPE_METHODS = ("view", "reshape", "flatten", "contiguous")


@dataclass
class Shortcuts:
    """Where the Genie release's protocol quantizes residual shortcuts (:func:`residual_shortcuts`)."""

    modules: Dict[str, str] = field(default_factory=dict)  # shortcut module -> the layer whose input quantizer it takes
    shared: Dict[str, str] = field(default_factory=dict)  # layer -> an earlier layer reading the same tensor
    bare: List[str] = field(default_factory=list)  # adds that take a layer's input with no module between
    unquantized: List[str] = field(default_factory=list)  # shortcut modules whose input feeds no quantized layer


def _is_shortcut_step(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """A node a shortcut may pass through: an ``nn.Identity`` or a module of the model's own code
    without weights or buffers (an option-A shortcut), or a slicing / padding / reshaping op. torch's
    own activations and pools are not: a quantizer before them is not one after them."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if mod is None or is_supported(mod) or next(mod.parameters(), None) is not None or next(mod.buffers(), None) is not None:
            return False
        return type(mod) is nn.Identity or not type(mod).__module__.startswith("torch.")
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def _shortcut_module(node: fx.Node, outer: set, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The module a shortcut step belongs to below the add's own module: the step itself for a
    call_module, else the outermost module of its ``nn_module_stack`` that the add is not inside
    (fx traces into an option-A shortcut's forward), if it holds no weights or buffers."""
    if node.op == "call_module":
        return node.target
    inner = [k for k in node.meta.get("nn_module_stack", {}) if k not in outer]
    if inner and inner[0] in modules and next(modules[inner[0]].parameters(), None) is None and next(modules[inner[0]].buffers(), None) is None:
        return inner[0]
    return None


def residual_shortcuts(model: nn.Module, gm: fx.GraphModule, layers: List[str]) -> Shortcuts:
    """The residual shortcuts of a float ``model`` (traced: ``gm``) and the tensors its ``layers`` share.

    A residual add's operand is a shortcut when, walking back through :func:`_is_shortcut_step`
    nodes, it reaches a tensor that one of ``layers`` reads (the block input). Its quantizer goes on
    the first module of that walk seen from the block input (``modules``); an add that takes the
    tensor with no module between is listed in ``bare`` (there is nothing to hold its quantizer:
    the Genie release's models add an ``nn.Identity`` for it). A downsample conv is one of
    ``layers`` and reads the block input itself: it is in ``shared``, with every other layer that
    reads a tensor an earlier layer reads (execution order).
    """
    modules = dict(model.named_modules())  # the traced copy lacks modules fx traced into
    wanted = set(layers)
    readers: Dict[fx.Node, str] = {}
    out = Shortcuts()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in wanted:
            src = first_input(node)
            if src in readers and readers[src] != node.target:
                out.shared.setdefault(node.target, readers[src])
            readers.setdefault(src, node.target)
    for node in gm.graph.nodes:
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (node.op == "call_method" and node.target in ("add", "add_"))
        if not is_add:
            continue
        outer = set(node.meta.get("nn_module_stack", {}))
        for arg in node.args[:2]:
            cur, first_module = arg, None
            while isinstance(cur, fx.Node) and cur not in readers and _is_shortcut_step(cur, modules):
                first_module = _shortcut_module(cur, outer, modules) or first_module
                cur = first_input(cur)
            if not isinstance(cur, fx.Node):
                continue
            if cur in readers and first_module is not None:
                out.modules.setdefault(first_module, readers[cur])
            elif cur in readers:
                out.bare.append(node.name)
            elif first_module is not None and cur is not arg:
                out.unquantized.append(first_module)
    return out
