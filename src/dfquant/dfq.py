"""DFQ baselines (Nagel et al., ICCV 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction", arXiv 1906.04721): cross-layer range equalization and analytic bias correction.

**Cross-layer equalization** (paper Sec. 4, "cross-layer range equalization"; the optimum in App. A,
"Optimal range equalization of two layers"). For ``conv1 -> [BN] -> ReLU -> [pooling] -> conv2``
the ReLU is positively scale-equivariant, ``relu(x / s) = relu(x) / s`` for ``s > 0`` (and so are
max/average pooling), so dividing channel ``i`` of conv1's (BN-folded) output by ``s_i`` and
multiplying conv2's input channel ``i`` by ``s_i`` leaves the network's function unchanged. With
``r1_i`` the range of conv1's output channel ``i`` and ``r2_i`` the range of conv2's input channel
``i`` (both weights with their following BN folded in, as the paper folds BN first), ``s_i = sqrt(r1_i / r2_i)`` (= ``(1 / r2_i) sqrt(r1_i r2_i)``) makes both ranges
``sqrt(r1_i r2_i)``, the optimum of the paper's summed per-channel precision. Chains (a conv that is
the second layer of one pair and the first of the next) are equalized by repeated passes until the
scales settle, as the paper does. Ranges are max - min (dfquant's weight grids are asymmetric).
The scaling goes into BN's gamma and beta when a BN follows conv1 (equivalent to scaling the folded
weight, and it keeps the BN statistics, which set the activation ranges, consistent), else into
conv1's weight and bias. Depthwise convolutions (``groups == in_channels == out_channels``, the
depthwise-separable layers the paper equalizes in MobileNets) take part on either side: output
channel ``i`` of a depthwise conv reads input channel ``i`` only, so its input-channel range is
the range of kernel ``i`` and scaling input channel ``i`` scales kernel ``i``; in MobileNetV2 that
gives the pairs expand -> depthwise and depthwise -> project of every inverted residual. Other
grouped convolutions are skipped (a group mixes several channels).

ReLU6 is not scale-equivariant (``min(relu(x / s), 6) != min(relu(x), 6) / s``), so pairs through it
are skipped and listed. The paper replaces ReLU6 by ReLU in MobileNetV2 before equalizing (Sec. 5,
where it reports the float model barely changes); :func:`replace_relu6` does that when asked
(``relu6_to_relu=True``): it changes the model, so it is never done by default and the report
says so. Not done: "absorbing high biases" (it serves per-tensor activation ranges set from data;
dfquant's BN ranges are per-channel Gaussians).

**Bias correction** (paper Sec. 4, "quantization bias correction"; convolutions in App. B,
"Bias correction for convolutional layers"; the expected input of a ReLU after BN from the clipped
normal, App. C). Quantizing a weight ``W`` to ``W + eps`` shifts the layer's expected output by
``eps E[x]``; subtracting it from the bias removes the shift. ``E[x]`` per input channel is the
mean of the BN-implied (clipped, summed over residual branches) Gaussian that dfquant already
carries to every layer input for the activation ranges (:mod:`dfquant.activation_ranges`); for a
convolution ``E[x]`` is taken as spatially constant, so the correction is exact away from the
zero-padded border (as in App. B). Layers whose input no BN statistic reaches (the image) are not
corrected and are listed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import DfquantError
from .graph import ModelGraph, analyse, bn_fold_scale, call_counts, replace_module
from .modelcheck import copy_model

_RELU = (nn.ReLU,)
_POOL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_RELU_FUNCS = {F.relu, torch.relu}
_POOL_FUNCS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
# A first-layer channel whose (BN-folded) weight range is below this share of the layer's largest
# -- less than one step of a 16-bit per-tensor grid -- is "dead": weights that decayed to ~0, whose
# BN then saw a running variance of ~0 too (down to 1e-36 in real ImageNet models). Its output is
# the constant BN beta; the equalizing scale sqrt(r1 / r2) -> 0 would multiply that constant and
# the BN's gamma by 1 / s (up to 1e7 there), and so the next activation range, for no precision
# gained. Dead channels are found once, on the model as given, and never scaled.
DEAD_CHANNEL_RANGE = 2.0**-16


@dataclass
class EqualizationPair:
    """One ``first -> [bn] -> ReLU -> second`` pair and the scales applied to it."""

    first: str
    bn: Optional[str]
    second: str
    second_bn: Optional[str] = None  # the BN right after ``second``, folded into it for its ranges
    scales: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]


@dataclass
class EqualizationRecord:
    pairs: List[EqualizationPair]
    skipped: List[Tuple[str, str]]  # (first conv, why it has no partner)
    passes: int

    def summary(self) -> str:
        if not self.pairs:
            return "cross-layer equalization: no conv -> [BN] -> ReLU -> conv pair found"
        s = torch.cat([p.scales.log().abs() for p in self.pairs])
        return (
            f"cross-layer equalization: {len(self.pairs)} pairs in {self.passes} passes, "
            f"scales from {math.exp(-s.max().item()):.3g} to {math.exp(s.max().item()):.3g}"
            + (f"; {len(self.skipped)} convs without a partner (see the report)" if self.skipped else "")
        )


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is(node: fx.Node, modules: Dict[str, nn.Module], kinds, funcs) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), kinds)
    if node.op == "call_function":
        return node.target in funcs
    if node.op == "call_method":
        return any(getattr(f, "__name__", None) == node.target for f in funcs)
    return False


def is_depthwise(conv: nn.Module) -> bool:
    """A depthwise convolution: one group per channel, each output channel reading its own input channel."""
    return isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _equalizable(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and (conv.groups == 1 or is_depthwise(conv))


def replace_relu6(model: nn.Module) -> Tuple[nn.Module, List[str]]:
    """A copy of ``model`` with every ``nn.ReLU6`` module replaced by ``nn.ReLU`` (DFQ, Sec. 5, for
    MobileNetV2), and the names replaced. This changes the model's function (activations above 6 are
    no longer clipped); functional ``F.relu6`` calls are not replaced."""
    out = copy_model(model)
    names = [name for name, m in out.named_modules() if isinstance(m, nn.ReLU6)]
    for name in names:
        relu = nn.ReLU(inplace=out.get_submodule(name).inplace)
        relu._dfquant_from_relu6 = True  # saved with the quantized model, redone when it is loaded
        replace_module(out, name, relu)
    return out, names


def equalization_pairs(model: nn.Module, graph: Optional[ModelGraph] = None) -> Tuple[List[EqualizationPair], List[Tuple[str, str]]]:
    """Pairs ``conv -> [BatchNorm2d] -> ReLU -> [pooling]* -> conv`` in the fx graph, each link
    with a single user (so the scaled channel reaches nothing else), each conv called once and
    either ungrouped or depthwise (another grouped conv's channels are tied to its groups).
    Returns (pairs, skipped). ``graph``: :func:`dfquant.graph.analyse` of ``model``, or of a model
    with the same graph and module names (a copy), when the caller has it."""
    graph = graph or analyse(model)
    gm = graph.traced
    if gm is None:
        raise DfquantError("cross-layer equalization needs an fx-traceable model")
    modules = dict(model.named_modules())
    conv_bn = graph.conv_bn
    calls = call_counts(gm)
    pairs, skipped, seen = [], [], set()
    for node in gm.graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or node.target in seen:
            continue
        seen.add(node.target)
        why = None
        nxt = _single_user(node)
        bn = None
        if not _equalizable(conv) or calls[node.target] != 1:
            why = "grouped (not depthwise) or called more than once"
        elif nxt is not None and nxt.op == "call_module" and isinstance(modules.get(nxt.target), nn.BatchNorm2d):
            bn = nxt.target
            if modules[bn].weight is None or modules[bn].running_var is None or calls[bn] != 1:
                why = "its BatchNorm has no affine parameters or running statistics to rescale, or is shared"
            nxt = _single_user(nxt)
        if why is None and (nxt is None or not _is(nxt, modules, _RELU, _RELU_FUNCS)):
            act = nxt.target if nxt is not None else None
            why = "not followed by ReLU alone" + (
                " (ReLU6 is not scale-equivariant; relu6_to_relu=True / --relu6-to-relu replaces it, as DFQ does)"
                if isinstance(modules.get(act), nn.ReLU6) or act is F.relu6
                else ""
            )
        if why is None:
            nxt = _single_user(nxt)
            while nxt is not None and _is(nxt, modules, _POOL, _POOL_FUNCS):
                nxt = _single_user(nxt)
            second = modules.get(nxt.target) if nxt is not None and nxt.op == "call_module" else None
            if not _equalizable(second) or calls[nxt.target] != 1 or second.in_channels != conv.out_channels:
                why = "its ReLU output does not feed exactly one ungrouped or depthwise conv"
            else:
                pairs.append(EqualizationPair(node.target, bn, nxt.target, conv_bn.get(nxt.target)))
        if why is not None:
            skipped.append((node.target, why))
    return pairs, skipped


def _folded_weight(model: nn.Module, conv: str, bn: Optional[str]) -> torch.Tensor:
    """The conv's weight with the BN that follows it folded in (the weight itself without one)."""
    w = model.get_submodule(conv).weight.detach()
    if bn is None:
        return w
    return w * bn_fold_scale(model.get_submodule(bn)).reshape(-1, 1, 1, 1)


def _input_channel_dim(conv: nn.Module) -> int:
    """The weight dimension indexed by input channel: 1, or 0 for a depthwise conv (kernel i reads channel i)."""
    return 0 if is_depthwise(conv) else 1


def _channel_ranges(w: torch.Tensor, dim: int) -> torch.Tensor:
    """max - min of ``w`` over every dimension but ``dim``."""
    flat = w.transpose(0, dim).reshape(w.shape[dim], -1)
    return flat.max(dim=1).values - flat.min(dim=1).values


@torch.no_grad()
def equalize_cross_layer(model: nn.Module, max_passes: int = 20, tol: float = 1e-4, graph: Optional[ModelGraph] = None) -> Tuple[nn.Module, EqualizationRecord]:
    """A copy of ``model`` with every equalization pair's ranges equalized (same function).

    Passes repeat until no scale moves by more than ``tol`` (relative) or ``max_passes``. The
    original model is not modified. ``graph``: :func:`dfquant.graph.analyse` of ``model``, when the
    caller has it (the copy is not traced again).
    """
    eq = copy_model(model).eval().double()  # scales in float64, cast back at the end: CPU-independent
    pairs, skipped = equalization_pairs(eq, graph)
    total = {id(p): torch.ones(eq.get_submodule(p.first).out_channels, dtype=torch.float64) for p in pairs}
    dead = {}
    for p in pairs:  # on the given weights: scaling in later passes must not move a channel in or out
        r1 = _channel_ranges(_folded_weight(eq, p.first, p.bn), 0)
        dead[id(p)] = r1 <= r1.max() * DEAD_CHANNEL_RANGE
    passes = 0
    for passes in range(1, max_passes + 1):  # noqa: B007 - read after the loop
        worst = 0.0
        for p in pairs:
            first, second = eq.get_submodule(p.first), eq.get_submodule(p.second)
            r1 = _channel_ranges(_folded_weight(eq, p.first, p.bn), 0)
            r2 = _channel_ranges(_folded_weight(eq, p.second, p.second_bn), _input_channel_dim(second))
            s = torch.sqrt(r1 / r2)
            s = torch.where(torch.isfinite(s) & (s > 0) & ~dead[id(p)], s, torch.ones_like(s))  # dead channels stay as they are
            if p.bn is not None:
                bn = eq.get_submodule(p.bn)
                bn.weight.div_(s)
                bn.bias.div_(s)
            else:
                first.weight.div_(s.reshape(-1, 1, 1, 1))
                if first.bias is not None:
                    first.bias.div_(s)
            second.weight.mul_(s.reshape(-1, 1, 1, 1) if is_depthwise(second) else s.reshape(1, -1, 1, 1))
            total[id(p)] *= s
            worst = max(worst, float((s - 1).abs().max()) if s.numel() else 0.0)
        if worst < tol:
            break
    for p in pairs:
        p.scales = total[id(p)].float()
    return eq.float(), EqualizationRecord(pairs, skipped, passes if pairs else 0)


def bias_correction(weight_error: torch.Tensor, input_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The bias change ``-eps E[x]`` that cancels the expected output shift of a quantized layer
    (summed in float64, so it does not depend on the CPU's float32 reductions).

    ``weight_error``: ``W_q - W``, shape (out, in/groups, kh, kw) or (out, in); ``input_mean``:
    ``E[x]`` per input channel (in,). For a convolution the kernel's spatial taps all see the same
    channel mean, so they sum (App. B).
    """
    dtype = weight_error.dtype
    eps = weight_error.double().reshape(weight_error.shape[0], weight_error.shape[1], -1).sum(dim=2)  # (out, in/groups), float64
    out, per_group = eps.shape
    if input_mean.numel() != per_group * groups:
        raise DfquantError(f"input mean has {input_mean.numel()} channels, the layer expects {per_group * groups}")
    mean_per_out = input_mean.reshape(groups, per_group).repeat_interleave(out // groups, dim=0)  # (out, in/groups)
    return (-(eps * mean_per_out.double()).sum(dim=1)).to(dtype)
