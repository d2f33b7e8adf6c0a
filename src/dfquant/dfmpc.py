"""DF-MPC: data-free mixed-precision compensation (Chen et al., "Data-free quantization via
mixed-precision compensation without fine-tuning", Pattern Recognition 143, 2023, 109780).

Layers come in pairs (Sec. 3, Fig. 2): layer l at a low bit-width, its BN, ReLU (or nothing), then
layer l+1 at the high one. The error of l is compensated by one coefficient c_j >= 0 per output
channel j of l (Eq. 7), folded into l's BN (Sec. 4.3: gamma_j, beta_j <- c_j gamma_j, c_j beta_j;
with BN folded into the conv, the conv's per-channel scale and bias <- c_j times them), which
equals scaling l+1's input channel j because ReLU(c z) = c ReLU(z). Codes never change and l+1's
weights are never scaled. c is Eq. 27's closed form, the per-channel scalar minimising Eq. 20-22
(the paper prints a matrix form whose dimensions do not match; Sec. 4.3 says channels do not
interact), computed in float64. Quantizers: :func:`paper_weights` (TWN at 2 bits, DoReFa above).

Our choices where the paper is silent: pairs are taken from the *end* of each conv->BN->ReLU->layer
chain (basic block: conv1 low, conv2 high; bottleneck: 3x3 low, last 1x1 high); the stem and the
classifier are never low; LeakyReLU, pooling, dropout and flatten may sit on the path (they commute
with a positive per-channel scale); ReLU6 may not (listed: relu6_to_relu). BN re-calibration
(mu_hat, sigma_hat; "re-calibrated" with no formula in the paper) is ``bn_recal``: "none" (the
literal mu_hat = mu, sigma_hat = sigma), "moments" (the mean shift sum (w_hat - w) E[A] and the
variance ratio sum w_hat^2 Var[A] / sum w^2 Var[A] from the BN statistics carried to l's input;
the ratio scales running_var, eps is added after, as BN does) or "synthetic" (the float statistics
corrected by the quantized-minus-float difference measured on synthetic images, which cancels the
images' own mismatch with the BN statistics). Not in the paper: ``compensation="fitted"``, c by
non-negative least squares of l+1's output against the float model's on synthetic images, pairs
in execution order, l's input from the partly compensated quantized model; and
``compensation="none"`` (c = 1): the pairs' mixed precision alone (the paper's "without
compensation" column) or, with ``bn_recal``, the re-calibration without any c.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .activation_ranges import ChannelStats, InputRange, propagate_bn_stats
from .checks import check_bits, check_choice, check_float, fail, option
from .graph import ModelGraph, analyse, bn_affine, call_counts, first_input, is_supported, trace
from .qmodules import QuantConv2d
from .quantizer import QParams, grid_codes, grid_for_bits, grid_params

#: dfmpc: Eq. 27's closed form; fitted: NNLS on synthetic images (ours); none: c = 1 (re-calibration only, or nothing).
COMPENSATIONS = ("dfmpc", "fitted", "none")
BN_RECALS = ("none", "moments", "synthetic")


@dataclass(frozen=True)
class DfmpcConfig:
    """DF-MPC's settings. The high layers (and the stem and classifier) use the run's ``w_bits``."""

    low_bits: Optional[int] = option(None, help="bit-width of the low layer of each pair (None: w_bits, uniform precision)")
    lambda1: float = option(0.5, help="weight of the bias term in Eq. 20 (paper: 0.5)")
    lambda2: float = option(0.0, help="ridge weight on c in Eq. 20 (paper: 0)")
    compensation: str = option(
        "dfmpc", help="c per channel: dfmpc (Eq. 27's closed form), fitted (NNLS on synthetic images, ours) or none (c = 1: bn_recal alone)",
        flag="--compensate", choices=COMPENSATIONS,
    )
    bn_recal: str = option("none", help="mu_hat, sigma_hat of the low layer's BN: none (literal), moments, synthetic", choices=BN_RECALS)

    def validate(self) -> "DfmpcConfig":
        low = None if self.low_bits is None else check_bits(self.low_bits, "low_bits")
        return dataclasses.replace(
            self,
            low_bits=low,
            lambda1=check_float(self.lambda1, "lambda1", 0.0),
            lambda2=check_float(self.lambda2, "lambda2", 0.0),
            compensation=check_choice(self.compensation, "compensation", COMPENSATIONS),
            bn_recal=check_choice(self.bn_recal, "bn_recal", BN_RECALS),
        )

    @property
    def needs_images(self) -> bool:
        return self.compensation == "fitted" or self.bn_recal == "synthetic"

    def to_dict(self) -> Dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


DFMPC_FIELDS = tuple(f.name for f in dataclasses.fields(DfmpcConfig))


def check_low_bits(low_bits: Optional[int], w_bits: int) -> Optional[int]:
    """``low_bits`` must lie below the run's ``w_bits`` (None: the pairs stay at ``w_bits``)."""
    if low_bits is not None and check_bits(low_bits, "low_bits") >= w_bits:
        raise fail("low_bits", f"low_bits must be below w_bits ({w_bits}), got {low_bits}; low_bits=None keeps the pairs at w_bits")
    return low_bits


def paper_weights(w: torch.Tensor, bits: int) -> Tuple[torch.Tensor, QParams]:
    """The paper's per-tensor quantizers (Sec. 3.1, 5.2): TWN at 2 bits (Eq. 3-4), DoReFa above
    (Eq. 6). Returns (integer codes, QParams)."""
    grid = grid_for_bits("paper", bits)
    qp = grid_params(w, bits, grid)
    return grid_codes(w, qp, grid), qp


# ------------------------------------------------------------------------------------------
# Pairing (Fig. 2, Alg. 1)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DfmpcPair:
    low: str  # layer l (low bit-width)
    bn: str  # its BatchNorm2d, which takes c
    high: str  # layer l+1 (high bit-width)
    activation: str  # the ops between the BN and l+1: "relu", "none", "relu+max_pool2d", ...
    high_bn: Optional[str] = None  # the BN right after l+1, if any (folded into it with fold_bn)


@dataclass
class DfmpcPlan:
    pairs: List[DfmpcPair]  # in execution order of the low layers
    unpaired: List[Tuple[str, str]]  # every quantizable layer in no pair, and why

    @property
    def low_layers(self) -> List[str]:
        return [p.low for p in self.pairs]

    @property
    def high_layers(self) -> List[str]:
        return [p.high for p in self.pairs]


_HOMOGENEOUS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu"}
_HOMOGENEOUS_FN = {F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", "relu": "relu", "relu_": "relu"}
_PASS = {
    nn.MaxPool2d: "max_pool2d", nn.AvgPool2d: "avg_pool2d", nn.AdaptiveAvgPool2d: "avg_pool2d", nn.AdaptiveMaxPool2d: "max_pool2d",
    nn.Identity: None, nn.Dropout: None, nn.Dropout2d: None,
}
_PASS_FN = {
    F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d", F.adaptive_avg_pool2d: "avg_pool2d", F.adaptive_max_pool2d: "max_pool2d",
    F.dropout: None, "contiguous": None,
}
_FLATTEN_FN = {torch.flatten, "flatten", "view", "reshape"}
_RELU6_MSG = "ReLU6 is not positively homogeneous; use relu6_to_relu"


def _describe(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.target in (operator.add, operator.iadd, torch.add, "add", "add_"):
        return "a residual addition"
    if node.target is torch.cat:
        return "a concatenation"
    return getattr(node.target, "__name__", str(node.target))


def _link(node: fx.Node, modules, calls) -> Tuple[Optional[Tuple[str, str, str]], str]:
    """Follow conv ``node`` -> BN -> [ReLU / pass-through ops] -> next layer; returns
    ((bn, next layer, activation), "") or (None, why not)."""
    conv = modules[node.target]
    if not isinstance(conv, nn.Conv2d):
        return None, "not a Conv2d followed by BatchNorm2d"
    if calls[node.target] != 1:
        return None, f"called {calls[node.target]} times (shared weights)"
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or not isinstance(modules.get(users[0].target), nn.BatchNorm2d):
        return None, "its output does not go to a BatchNorm2d alone"
    bn_node = users[0]
    bn = modules[bn_node.target]
    if calls[bn_node.target] != 1 or bn.running_var is None or bn.weight is None or first_input(bn_node) is not node:
        return None, f"its BatchNorm {bn_node.target} is shared, has no running statistics or no affine parameters to take c"
    ops: List[str] = []
    flattened = False
    cur = bn_node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            what = ", ".join(_describe(u, modules) for u in users) or "nothing"
            return None, f"the output of {cur.target if cur.op == 'call_module' else cur.name} is used {len(users)} times ({what})"
        nxt = users[0]
        mod = modules.get(nxt.target) if nxt.op == "call_module" else None
        target = type(mod) if mod is not None else (nxt.target if nxt.op in ("call_function", "call_method") else None)
        if mod is not None and is_supported(mod):
            if first_input(nxt) is not cur:
                return None, f"reaches {nxt.target} as an input other than its first"
            break
        if isinstance(mod, nn.ReLU6) or target in (F.relu6, "relu6"):
            return None, f"{_RELU6_MSG} (ReLU6 between it and the next layer)"
        if target in _HOMOGENEOUS or target in _HOMOGENEOUS_FN:
            ops.append(_HOMOGENEOUS.get(target) or _HOMOGENEOUS_FN[target])
        elif target in _PASS or target in _PASS_FN:
            name = _PASS.get(target) if target in _PASS else _PASS_FN[target]
            if name:
                ops.append(name)
        elif target is nn.Flatten or target in _FLATTEN_FN:
            flattened = True
        else:
            return None, f"reaches {_describe(nxt, modules)} before the next layer (only ReLU, LeakyReLU, pooling, dropout and flatten may lie between)"
        if first_input(nxt) is not cur:
            return None, f"reaches {_describe(nxt, modules)} as an input other than its first"
        cur = nxt
    high = modules[nxt.target]
    if calls[nxt.target] != 1:
        return None, f"its next layer {nxt.target} is called {calls[nxt.target]} times (shared weights)"
    fits = (
        isinstance(high, nn.Linear) and high.in_features % conv.out_channels == 0
        if flattened or isinstance(high, nn.Linear)
        else high.in_channels == conv.out_channels
    )
    if not fits:
        return None, f"its next layer {nxt.target} does not read its {conv.out_channels} channels as its input channels"
    return (bn_node.target, nxt.target, "+".join(ops) or "none"), ""


def plan_pairs(model: nn.Module, graph: Optional[ModelGraph] = None) -> DfmpcPlan:
    """Pair the layers of ``model`` (the float model, BN not folded) from its fx graph.

    A link is l -> its BN -> ReLU / LeakyReLU / pooling / dropout / flatten or nothing -> exactly one
    conv or linear l+1, each node on the way used once, both layers and the BN called once. Links
    form chains, paired from each chain's end: [a, b] -> (a, b); [a, b, c] -> (b, c) and a without
    a partner; [a, b, c, d] -> (a, b), (c, d). The first layer (stem) and the last (classifier) are
    never low. ``graph``: :func:`dfquant.graph.analyse` of ``model``, when the caller has it."""
    graph = graph or analyse(model)
    gm = graph.traced
    if gm is None:
        raise fail("method", "method dfmpc pairs layers from the model's graph, but torch.fx cannot trace this model's forward")
    modules = dict(gm.named_modules())
    calls = call_counts(gm)
    order = [l.name for l in graph.layers]
    first, last = order[0], order[-1]
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in set(order)}
    links: Dict[str, Tuple[str, str, str]] = {}
    why: Dict[str, str] = {}
    for name in order:
        link, reason = _link(nodes[name], modules, calls) if name in nodes else (None, "not reached in the traced graph")
        if link is not None:
            links[name] = link
        else:
            why[name] = reason
    incoming = {high for _, high, _ in links.values()}
    pairs, unpaired = [], []
    paired = set()
    for start in order:
        if start in incoming or start not in links:
            continue
        chain = [start]
        while chain[-1] in links:
            chain.append(links[chain[-1]][1])
        for i in range(len(chain) - 1, 0, -2):
            low, high = chain[i - 1], chain[i]
            if low in (first, last):
                own = f"; as a low layer: {why[high]}" if high in why else ""
                why[high] = f"its low partner would be the {'stem' if low == first else 'classifier'} {low}, which stays at the high bit-width{own}"
                continue
            bn, _, act = links[low]
            pairs.append(DfmpcPair(low, bn, high, act, graph.conv_bn.get(high)))
            paired |= {low, high}
        for name in chain:
            if name not in paired and name not in (first, last) and name not in why:
                why[name] = f"high bit-width without a partner: its chain {' -> '.join(chain)} is paired from its end"
    pos = {n: i for i, n in enumerate(order)}
    pairs.sort(key=lambda p: pos[p.low])
    for name in order:
        if name in paired:
            continue
        if name == first:
            reason = "first layer (stem): kept at the high bit-width, uncompensated"
        elif name == last:
            reason = "last layer (classifier): kept at the high bit-width, uncompensated"
        else:
            reason = why.get(name, "no partner")
        unpaired.append((name, reason))
    return DfmpcPlan(pairs, unpaired)


# ------------------------------------------------------------------------------------------
# Closed form (Eq. 20-27) and NNLS
# ------------------------------------------------------------------------------------------


def closed_form_c(x_hat: torch.Tensor, x: torch.Tensor, y_hat: torch.Tensor, y: torch.Tensor, lambda1: float = 0.5, lambda2: float = 0.0) -> torch.Tensor:
    """Eq. 27 per output channel j, in float64: the c_j >= 0 minimising Eq. 20-22,
    ``L_j = |c x_hat_j - x_j|^2 + lambda1 (c y_hat_j - y_j)^2 + lambda2 c^2``:
    ``c_j = (x_hat_j . x_j + lambda1 y_hat_j y_j) / (x_hat_j . x_hat_j + lambda1 y_hat_j^2 + lambda2)``,
    clamped at 0 (Lemma 2 needs c >= 0); a zero (or non-finite) denominator gives c_j = 1.

    ``x_hat``, ``x``: (C, K) effective weights (gamma w / sigma, or the BN-folded weights);
    ``y_hat``, ``y``: (C,) effective biases (beta - gamma mu / sigma, or the folded biases)."""
    xh, xx = x_hat.double().flatten(1), x.double().flatten(1)
    yh, yy = y_hat.double(), y.double()
    num = (xh * xx).sum(1) + lambda1 * yh * yy
    den = (xh * xh).sum(1) + lambda1 * yh * yh + lambda2
    c = num / den
    ok = (den > 0) & torch.isfinite(c)
    return torch.where(ok, c.clamp_min(0.0), torch.ones_like(c))


def nnls(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Non-negative least squares on normal equations: argmin_{c >= 0} c'Gc/2 - rhs'c (Lawson and
    Hanson's active set, in float64; at most 3n outer steps). Variables whose diagonal is 0 (no
    effect on the output: a dead channel) get 1, so that channel stays as it is."""
    G, g = gram.double(), rhs.double()
    n = g.numel()
    live = torch.diagonal(G) > 0
    c = torch.zeros(n, dtype=torch.float64)
    tol = 1e-10 * float(g.abs().max().clamp_min(1e-300)) if n else 0.0
    free = torch.zeros(n, dtype=torch.bool)

    def solve(mask: torch.Tensor) -> torch.Tensor:
        s = torch.zeros_like(c)
        idx = mask.nonzero().flatten()
        s[idx] = torch.linalg.lstsq(G[idx][:, idx], g[idx].unsqueeze(1), driver="gelsd").solution.flatten()
        return s

    for _ in range(3 * n):
        w = g - G @ c
        cand = live & ~free & (w > tol)
        if not cand.any():
            break
        free[torch.where(cand, w, torch.full_like(w, -math.inf)).argmax()] = True
        for _ in range(3 * n):
            s = solve(free)
            bad = free & (s <= 0)
            if not bad.any():
                c = s
                break
            alpha = (c[bad] / (c[bad] - s[bad])).min()
            c = c + alpha * (s - c)
            free &= c > 1e-15
            c = torch.where(free, c, torch.zeros_like(c))
    return torch.where(live, c, torch.ones_like(c))


def _gram(high: nn.Module, x: torch.Tensor, t: torch.Tensor, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normal equations of ``|high(c * x) - t|^2`` in c (``t``: target minus high's bias), float64:
    G_ij = <z_i, z_j>, g_i = <z_i, t> with z_i high's output from input channel i alone."""
    w, x, t = high.weight.detach().double(), x.double(), t.double()
    n, out = x.shape[0], w.shape[0]
    if w.dim() == 2:  # a Linear: C blocks of features (a flattened C-channel map)
        z = torch.einsum("ncs,ocs->nco", x.reshape(n, channels, -1), w.reshape(out, channels, -1))
        return torch.einsum("nio,njo->ij", z, z), torch.einsum("nio,no->i", z, t.reshape(n, out))
    t = t.reshape(n, out, -1)
    if high.groups == 1 and w.shape[2:] == (1, 1) and tuple(high.padding) == (0, 0):  # 1x1: G = (W'W) * (XX')
        xs = x[:, :, :: high.stride[0], :: high.stride[1]].reshape(n, channels, -1)
        w2 = w.reshape(out, channels)
        return (w2.T @ w2) * torch.einsum("nip,njp->ij", xs, xs), torch.einsum("nip,oi,nop->i", xs, w2, t)
    g, cpg, opg = high.groups, w.shape[1], out // high.groups
    cols = F.unfold(x, w.shape[2:], high.dilation, high.padding, high.stride)  # (N, C * taps, P)
    taps = cols.shape[1] // channels
    cols = cols.reshape(n, channels, taps, -1).permute(1, 2, 0, 3).reshape(channels, taps, -1)  # (C, taps, N P)
    w_in = w.reshape(g, opg, cpg, taps).permute(0, 2, 1, 3).reshape(channels, opg, taps)  # channel j's kernels
    z = torch.bmm(w_in, cols).reshape(g, cpg, -1)  # (groups, C / groups, opg N P): channel j alone, on its group's outputs
    tb = t.reshape(n, g, opg, -1).permute(1, 2, 0, 3).reshape(g, -1, 1)  # output channel k * opg + o is in group k
    blocks, rhs = torch.bmm(z, z.transpose(1, 2)), torch.bmm(z, tb)
    G = torch.zeros(g, cpg, g, cpg, dtype=torch.float64)
    idx = torch.arange(g)
    G[idx, :, idx, :] = blocks  # an input channel reaches its own group's outputs only
    return G.reshape(channels, channels), rhs.reshape(channels)


def fitted_c(high: nn.Module, x: torch.Tensor, target: torch.Tensor, channels: int, chunk_bytes: float = 64e6) -> torch.Tensor:
    """The c >= 0 (one per input channel of ``high``) minimising ``|high(c * x) - target|^2``,
    ``x`` being high's input with c = 1 (channels ``channels``; a Linear after flatten reads them as
    C blocks of features): high's output is linear in c (bias aside), so this is NNLS on the C x C
    Gram matrix of the per-channel contributions, accumulated over image chunks, in float64."""
    bias = getattr(high, "bias", None)
    shape = (1, -1) + (1,) * (target.dim() - 2)
    t = target if bias is None else target - bias.detach().reshape(shape)
    per_image = 8 * channels * target[0].numel() / (getattr(high, "groups", 1) if high.weight.dim() > 2 else 1)  # the contributions' float64 bytes
    step = max(1, int(chunk_bytes // per_image))
    G = torch.zeros(channels, channels, dtype=torch.float64)
    g = torch.zeros(channels, dtype=torch.float64)
    for i in range(0, x.shape[0], step):
        dG, dg = _gram(high, x[i : i + step], t[i : i + step], channels)
        G += dG
        g += dg
    return nnls(G, g)


# ------------------------------------------------------------------------------------------
# Compensation: re-calibration, c, fold (Sec. 4.3)
# ------------------------------------------------------------------------------------------


@dataclass
class PairRecord:
    low: str
    bn: str
    high: str
    activation: str
    low_bits: int
    high_bits: Optional[int]  # None: l+1 is not quantized
    c_min: float
    c_mean: float
    c_max: float
    recal: str  # the re-calibration used (and why it fell back, if it did)
    c: torch.Tensor = field(repr=False)


@dataclass
class DfmpcRecord:
    """What :func:`compensate` did: per pair the bits, c and the re-calibration; the layers left
    uncompensated and why."""

    compensation: str
    bn_recal: str
    lambda1: float
    lambda2: float
    folded: bool
    pairs: List[PairRecord] = field(default_factory=list)
    uncompensated: List[Tuple[str, str]] = field(default_factory=list)
    time_s: float = 0.0

    def summary(self) -> str:
        if not self.pairs:
            return "dfmpc: no pair compensated"
        c = torch.cat([p.c for p in self.pairs])
        how = {"dfmpc": f"Eq. 27, lambda1={self.lambda1:g}, lambda2={self.lambda2:g}", "fitted": "fitted on synthetic images", "none": "none: c = 1"}
        return (
            f"dfmpc: {len(self.pairs)} pairs (c {how[self.compensation]}; bn_recal={self.bn_recal}), c from {float(c.min()):.3g} to "
            f"{float(c.max()):.3g} (mean {float(c.mean()):.3g}); {len(self.uncompensated)} layers uncompensated; {self.time_s * 1000:.1f} ms"
        )

    def to_dict(self) -> Dict[str, object]:
        """The record without the c tensors (for a report's config): per pair its layers, bits and c range."""
        pairs = [{k: v for k, v in dataclasses.asdict(p).items() if k != "c"} for p in self.pairs]
        keys = ("compensation", "bn_recal", "lambda1", "lambda2", "folded")
        return dict({k: getattr(self, k) for k in keys}, pairs=pairs, uncompensated=[list(u) for u in self.uncompensated], time_s=self.time_s)

    def lines(self) -> List[str]:
        """The summary, one line per pair and one per uncompensated layer (for a report's notes)."""
        out = [self.summary()]
        out += [
            f"  {p.low} (W{p.low_bits}) -> {p.bn} -> {p.activation} -> {p.high} (W{p.high_bits or 'fp'}): "
            f"c {p.c_min:.3g} / {p.c_mean:.3g} / {p.c_max:.3g} (min / mean / max), recal {p.recal}"
            for p in self.pairs
        ]
        return out + [f"  uncompensated: {name}: {why}" for name, why in self.uncompensated]


def _tap_sum(t: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Per output channel j, sum over input channels m and taps k of t[j, m, k] * v[m] (grouped
    and depthwise convs: m runs over j's group)."""
    per = t.reshape(t.shape[0], t.shape[1], -1).sum(2)
    vv = v.double().reshape(groups, t.shape[1]).repeat_interleave(t.shape[0] // groups, dim=0)
    return (per * vv).sum(1)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    r = num / den
    return torch.where((den > 0) & torch.isfinite(r), r, torch.ones_like(r))


class _Pair:
    """One pair's float reference and quantized layers. ``x``, ``y`` (float, effective: gamma w /
    sigma and beta + gamma (b - mu) / sigma) and, for re-calibration, the float layer's weight and
    bias in the units the quantized layer works in (pre-BN; BN-folded when ``folded``)."""

    def __init__(self, p: DfmpcPair, float_model: nn.Module, qmodel: nn.Module, folded: bool):
        self.p, self.folded = p, folded
        low_f, bn_f = float_model.get_submodule(p.low), float_model.get_submodule(p.bn)
        self.low_q, self.bn_q = qmodel.get_submodule(p.low), qmodel.get_submodule(p.bn)
        gamma, beta = (t.double() for t in bn_affine(bn_f))
        self.beta, self.mu, self.var, self.eps = beta, bn_f.running_mean.double(), bn_f.running_var.double(), bn_f.eps
        self.sigma = torch.sqrt(self.var + self.eps)
        s = gamma / self.sigma
        w = low_f.weight.detach().double()
        b = low_f.bias.detach().double() if low_f.bias is not None else torch.zeros_like(beta)
        self.x = (s.reshape(-1, 1, 1, 1) * w).flatten(1)
        self.y = beta + s * (b - self.mu)
        self.ref_w, self.ref_b = (self.x.reshape(w.shape), self.y) if folded else (w, b)
        self.recal = "none"
        self.c = torch.ones_like(beta)

    def q_weight_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        w = self.low_q.weight.detach().double()
        b = self.low_q.bias.detach().double() if self.low_q.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        return w, b

    def moments_recal(self, mean_in: torch.Tensor, var_in: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean shift, variance ratio) of the quantized layer's output from its input's moments."""
        wq, bq = self.q_weight_bias()
        g = self.low_q.groups
        shift = _tap_sum(wq - self.ref_w, mean_in, g) + (bq - self.ref_b)
        return shift, _ratio(_tap_sum(wq * wq, var_in, g), _tap_sum(self.ref_w**2, var_in, g))

    def apply_recal(self, shift: torch.Tensor, ratio: torch.Tensor) -> None:
        """mu_hat = mu + shift, running_var_hat = running_var * ratio; folded: the same per-channel
        affine map of the conv's output, ``r (z - shift) + (1 - r) beta`` with r = sigma / sigma_hat."""
        var_hat = (self.var * ratio).clamp(0.0, torch.finfo(torch.float32).max)
        if not self.folded:
            mean_hat = self.mu + shift
            self.bn_q.running_mean.copy_(torch.where(torch.isfinite(mean_hat), mean_hat, self.mu))
            self.bn_q.running_var.copy_(var_hat)
            return
        r = self.sigma / torch.sqrt(var_hat + self.eps)
        _, bq = self.q_weight_bias()
        _set_scale_bias(self.low_q, r, r * (bq - shift) + (1 - r) * self.beta)

    def effective(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, y_hat) of the quantized layer as it is now (Eq. 21-22)."""
        wq, bq = self.q_weight_bias()
        if self.folded:
            return wq.flatten(1), bq
        gamma, beta = (t.double() for t in bn_affine(self.bn_q))
        s = gamma / torch.sqrt(self.bn_q.running_var.double() + self.bn_q.eps)
        return s.reshape(-1, 1) * wq.flatten(1), beta + s * (bq - self.bn_q.running_mean.double())

    def apply_c(self, c: torch.Tensor) -> None:
        """Fold c into the BN (gamma, beta <- c gamma, c beta), or into the folded conv's scale and bias."""
        if self.folded:
            _, bq = self.q_weight_bias()
            _set_scale_bias(self.low_q, c, c * bq)
        else:
            self.bn_q.weight.mul_(c.to(self.bn_q.weight.dtype))
            self.bn_q.bias.mul_(c.to(self.bn_q.bias.dtype))


def _set_scale_bias(layer: QuantConv2d, factor: torch.Tensor, bias: torch.Tensor) -> None:
    """Multiply a quantized conv's per-channel weight scale by ``factor`` (a per-tensor scale becomes
    per channel) and set its bias; the integer codes stay as they are."""
    out = layer.weight_int.shape[0]
    layer.weight_scale = (layer.weight_scale.double().expand(out) * factor).float().contiguous()
    layer.weight_zero_point = layer.weight_zero_point.expand(out).clone()
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.float(), requires_grad=False)
    else:
        layer.bias.data = bias.to(layer.bias.dtype).clone()


def _check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point() or images.shape[0] < 1:
        raise fail("images", f"images must be a float tensor (N, C, H, W) of synthetic images, got {getattr(images, 'shape', type(images).__name__)}")
    if not torch.isfinite(images).all():
        raise fail("images", "images hold NaN or inf values")
    return images.float()


def _stats_of(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    t = t.double().transpose(0, 1).reshape(t.shape[1], -1)
    return t.mean(1), t.var(1, unbiased=False)


def compensate(
    float_model: nn.Module,
    qmodel: nn.Module,
    plan: DfmpcPlan,
    cfg: DfmpcConfig,
    *,
    folded: bool,
    stats=None,
    images: Optional[torch.Tensor] = None,
) -> DfmpcRecord:
    """Compensate every pair of ``plan`` in ``qmodel`` in place; returns the record.

    ``float_model``: the float model ``qmodel`` was quantized from, BN not folded (the plan's names);
    ``qmodel``: its copy with the low layers as :class:`QuantConv2d` (and BN folded into the convs
    when ``folded``). ``stats``: :func:`dfquant.activation_ranges.propagate_bn_stats` of the float
    model's graph, for ``bn_recal="moments"`` (computed when None). ``images``: synthetic images
    (N, C, H, W), for ``compensation="fitted"`` and ``bn_recal="synthetic"``; they go through both
    models in one batch. Call it once per quantized model."""
    return _compensate(float_model, qmodel, plan, cfg, folded, stats, images, raw_synthetic=False)


@torch.no_grad()
def _compensate(float_model, qmodel, plan, cfg, folded, stats, images, raw_synthetic: bool) -> DfmpcRecord:
    t0 = time.perf_counter()
    cfg = cfg.validate()
    if cfg.needs_images:
        if images is None:
            need = "compensation='fitted'" if cfg.compensation == "fitted" else "bn_recal='synthetic'"
            raise fail("images", f"{need} needs synthetic images (images=...; see dfquant.synthesize)")
        images = _check_images(images)
    rec = DfmpcRecord(cfg.compensation, cfg.bn_recal, cfg.lambda1, cfg.lambda2, bool(folded), uncompensated=list(plan.unpaired))
    work: List[_Pair] = []
    for p in plan.pairs:
        low_q, bn_q = qmodel.get_submodule(p.low), qmodel.get_submodule(p.bn)
        if not isinstance(low_q, QuantConv2d):
            rec.uncompensated.append((p.low, f"low layer of the pair with {p.high}, but not quantized (skipped or float)"))
            continue
        if folded == isinstance(bn_q, nn.BatchNorm2d):
            state = "still a BatchNorm2d" if folded else "not a BatchNorm2d (folded?)"
            raise fail("fold_bn", f"folded={folded} but {p.bn} is {state} in the quantized model; pass folded as the model was built")
        work.append(_Pair(p, float_model, qmodel, folded))
    if cfg.bn_recal == "moments":
        if stats is None:
            gm = trace(float_model)
            stats = propagate_bn_stats(gm) if gm is not None else {}
        for w in work:
            found = stats.get(w.p.low)
            if found is None or found.stats is None:
                w.recal = f"none (moments fell back: {found.reason if found is not None else 'no BN statistics reach its input'})"
                continue
            w.apply_recal(*w.moments_recal(*found.stats.moments()))
            w.recal = "moments"
    if not cfg.needs_images:
        for w in work:
            if cfg.compensation == "dfmpc":
                _closed_form_pair(w, cfg)
    else:
        _with_images(float_model, qmodel, work, cfg, images, raw_synthetic)
    for w in work:
        c = w.c.float()
        high = qmodel.get_submodule(w.p.high)
        rec.pairs.append(
            PairRecord(w.p.low, w.p.bn, w.p.high, w.p.activation, w.low_q.w_bits, getattr(high, "w_bits", None),
                       float(c.min()), float(c.mean()), float(c.max()), w.recal, c)
        )
    rec.time_s = time.perf_counter() - t0
    return rec


def compensated_input_stats(ranges: Dict[str, InputRange], record: DfmpcRecord) -> Dict[str, InputRange]:
    """The BN statistics reaching each layer's input (:func:`propagate_bn_stats`' result) after
    compensation, for activation ranges: c scales BN l's output, and every op on a pair's path is
    positively homogeneous, so the statistics at l+1's input become (c mu, c sigma) per channel
    (a re-calibrated BN's output keeps N(beta, gamma^2) by construction). Other layers: as given."""
    out = dict(ranges)
    for p in record.pairs:
        found = ranges.get(p.high)
        if found is None or found.stats is None or found.stats.mu.numel() != p.c.numel():
            continue
        s, c = found.stats, p.c.to(found.stats.mu.dtype)
        out[p.high] = InputRange(ChannelStats(s.mu * c, s.sigma * c, s.clip_lo, s.clip_hi, s.floor), found.reason, found.calls)
    return out


def _closed_form_pair(w: _Pair, cfg: DfmpcConfig) -> None:
    x_hat, y_hat = w.effective()
    w.c = closed_form_c(x_hat, w.x, y_hat, w.y, cfg.lambda1, cfg.lambda2)
    w.apply_c(w.c)


def _with_images(float_model, qmodel, work: List[_Pair], cfg: DfmpcConfig, images: torch.Tensor, raw_synthetic: bool) -> None:
    """The steps that need images, pair by pair in execution order during one forward of the
    quantized model: hooks re-calibrate (and, for "dfmpc", compute c) when layer l has run, and fit
    c when layer l+1 is about to, so each pair sees the pairs before it compensated. The float
    model's references (layer l's output statistics, layer l+1's output) come from one forward first.
    ``raw_synthetic``: re-calibrate to the raw statistics on the images instead (for comparison)."""
    synthetic, fitted = cfg.bn_recal == "synthetic", cfg.compensation == "fitted"
    ref: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    targets: Dict[str, torch.Tensor] = {}
    modes = [(m, m.training) for net in (float_model, qmodel) for m in net.modules()]
    handles = []

    def keep_stats(key):
        return lambda m, inp, out: ref.__setitem__(key, _stats_of(out))

    def keep_target(key):
        return lambda m, inp, out: targets.__setitem__(key, out.detach())

    def after_low(w: _Pair):
        def hook(m, inp, out):
            if synthetic:
                mean_q, var_q = _stats_of(out)
                if raw_synthetic:
                    s2 = (bn_affine(float_model.get_submodule(w.p.bn))[0].double() / w.sigma) ** 2
                    mean_r, var_r = (w.beta, s2 * w.var) if w.folded else (w.mu, w.var)
                else:
                    mean_r, var_r = ref.pop(w.p.low)
                w.apply_recal(mean_q - mean_r, _ratio(var_q, var_r))
                w.recal = "synthetic (raw)" if raw_synthetic else "synthetic"
            if cfg.compensation == "dfmpc":
                _closed_form_pair(w, cfg)
            return m.forward(*inp) if w.folded else None

        return hook

    def before_high(w: _Pair):
        def hook(m, inp):
            x = inp[0]
            C = w.x.shape[0]
            w.c = fitted_c(m, x, targets.pop(w.p.low), C)
            w.apply_c(w.c)
            scaled = (x.reshape(x.shape[0], C, -1) * w.c.to(x.dtype).reshape(1, C, 1)).reshape(x.shape)
            return (scaled,) + tuple(inp[1:])

        return hook

    try:
        float_model.eval()
        qmodel.eval()
        for w in work:
            if synthetic and not raw_synthetic:
                handles.append(float_model.get_submodule(w.p.bn if w.folded else w.p.low).register_forward_hook(keep_stats(w.p.low)))
            if fitted:
                src = w.p.high
                if w.folded and w.p.high_bn is not None and not isinstance(qmodel.get_submodule(w.p.high_bn), nn.BatchNorm2d):
                    src = w.p.high_bn  # the quantized l+1 has that BN folded in: compare like with like
                handles.append(float_model.get_submodule(src).register_forward_hook(keep_target(w.p.low)))
        if handles:
            float_model(images)
        for h in handles:
            h.remove()
        handles = []
        for w in work:
            if synthetic or not fitted:
                handles.append(w.low_q.register_forward_hook(after_low(w)))
            if fitted:
                handles.append(qmodel.get_submodule(w.p.high).register_forward_pre_hook(before_high(w)))
        qmodel(images)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
