"""Data-free activation ranges from BatchNorm statistics.

Each BN output channel is modelled as a Gaussian N(beta, gamma^2) (DFQ, Nagel et al. 2019, Sec. 4.2
and 5): its running statistics normalise the input, so beta and |gamma| are the output's mean and
standard deviation. These per-channel statistics are carried through the fx graph to every
quantized layer's input:

- ReLU / ReLU6 clip the Gaussian (tracked as "the Gaussian, then clipped"),
- a residual addition adds the branches' means and variances (independence assumed), using the
  exact moments of a clipped Gaussian for each branch (closed form),
- pooling (also a spatial ``mean``), flatten of a 1x1 map, dropout, identity, spatial slicing pass
  the statistics through,
  channel zero-padding (option-A shortcuts) adds zero channels, concatenation joins them.

A quantized input that no BN statistic reaches (the image, a conv output without BN, an unknown
op) gets no range: the report lists it and its input stays in float; nothing is guessed.

Two ways to turn a tensor's channel statistics into one per-tensor range:

- ``"dfq"``: ``[min_c(mu - n sigma), max_c(mu + n sigma)]`` (lower end 0 after ReLU), the DFQ
  rule, with ``n`` a per-bit-width setting (``DFQ_N_SIGMA``).
- ``"mse"``: the clipping range that minimises the expected squared quantization error of the
  BN-implied Gaussian mixture, clipping error (closed-form Gaussian tail integrals) plus rounding
  noise (step^2/12), by a grid search. Data-free as well, with no per-bit-width constant.

Deliberate deviation from the SQuant authors' code: it sets activation ranges from the first batch
it is fed (a random batch in their script, the first test batch in others). dfquant never looks at
input data to set a range.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .graph import bn_affine, first_input

# n in beta + n*gamma per activation bit-width for the "dfq" rule, chosen without real data:
# benchmarks/act_nsigma.py scores every n on a grid by the logit error against the float model on
# Genie-D synthetic images (made from the BN statistics alone) of CIFAR ResNet-20 and -56, and takes
# the n with the lowest error relative to each model's best (7 bits: between the 6- and 8-bit
# choices, not measured). Wider than the Gaussian MSE-optimal clip (about 2.6 sigma at 4 bits, Banner
# et al. 2019) because real activations have heavier tails than N(beta, gamma^2), more so in deeper
# networks (ResNet-56 preferred larger n than ResNet-20 at every bit-width; see the result table).
DFQ_N_SIGMA: Dict[int, float] = {2: 2.0, 3: 3.5, 4: 5.0, 5: 6.0, 6: 8.0, 7: 10.0, 8: 12.0}

_PASS_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
)
_PASS_FUNCS = {
    F.dropout, F.avg_pool2d, F.adaptive_avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d,
    torch.flatten,
}
_PASS_METHODS = {"contiguous", "clone", "flatten", "view", "reshape", "detach"}
_ADD = {operator.add, operator.iadd, torch.add}


@dataclass
class ChannelStats:
    """Per-channel statistics of ``clip(N(mu, sigma^2), lo, hi)`` (lo/hi None: not clipped).

    ``floor``: a lower bound the values are known to keep although the Gaussian is not clipped there
    (a sum of two ReLU outputs is >= 0 while its moments are those of the sum); it moves only the
    range's lower end, never the moments."""

    mu: torch.Tensor
    sigma: torch.Tensor
    clip_lo: Optional[float] = None
    clip_hi: Optional[float] = None
    floor: Optional[float] = None

    @property
    def lower_bound(self) -> Optional[float]:
        return self.clip_lo if self.clip_lo is not None else self.floor

    def clipped(self, lo: Optional[float], hi: Optional[float]) -> "ChannelStats":
        new_lo = lo if self.clip_lo is None else (self.clip_lo if lo is None else max(lo, self.clip_lo))
        new_hi = hi if self.clip_hi is None else (self.clip_hi if hi is None else min(hi, self.clip_hi))
        return ChannelStats(self.mu, self.sigma, new_lo, new_hi, self.floor)

    def moments(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact mean and variance of the clipped Gaussian, per channel (closed form)."""
        mu, s = self.mu.double(), self.sigma.double().clamp_min(1e-12)
        a = torch.full_like(mu, -math.inf) if self.clip_lo is None else torch.full_like(mu, self.clip_lo)
        b = torch.full_like(mu, math.inf) if self.clip_hi is None else torch.full_like(mu, self.clip_hi)
        za, zb = ((a - mu) / s).clamp(-40, 40), ((b - mu) / s).clamp(-40, 40)
        a, b = mu + s * za, mu + s * zb  # finite stand-ins for infinite ends (their mass is 0)
        n = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
        pa, pb = n.cdf(za), n.cdf(zb)
        da, db = torch.exp(n.log_prob(za)), torch.exp(n.log_prob(zb))
        mid = pb - pa
        m1 = a * pa + b * (1 - pb) + mu * mid + s * (da - db)
        m2 = a**2 * pa + b**2 * (1 - pb) + (mu**2 + s**2) * mid + 2 * mu * s * (da - db) + s**2 * (za * da - zb * db)
        return m1.float(), (m2 - m1**2).clamp_min(0).float()


@dataclass
class InputRange:
    """What the analysis found for one quantized layer's input."""

    stats: Optional[ChannelStats]
    reason: str = ""  # why there are no statistics
    calls: int = 1  # how often the layer runs in one forward (a shared layer gets one range for all)


def _merge_calls(prev: InputRange, here: InputRange) -> InputRange:
    """One range for a layer called more than once (shared weights): each call's channels are kept
    as channels of their own, so the per-tensor range covers every call's input; when a call has no
    statistics, or the calls' inputs are clipped differently, the input stays float."""
    calls = prev.calls + 1
    a, b = prev.stats, here.stats
    if a is None or b is None:
        why = prev.reason if a is None else here.reason
        return InputRange(None, f"called {calls} times (shared weights); one call's input has no BN statistics: {why}", calls)
    if (a.clip_lo, a.clip_hi) != (b.clip_lo, b.clip_hi):
        return InputRange(None, f"called {calls} times (shared weights) on inputs with different clipping (ReLU/ReLU6/none)", calls)
    return InputRange(_concat_channels([a, b]), "", calls)


def _relu_like(mod_or_fn, node: fx.Node) -> Optional[Tuple[Optional[float], Optional[float]]]:
    if isinstance(mod_or_fn, nn.ReLU) or mod_or_fn in (F.relu, torch.relu, "relu", "relu_"):
        return 0.0, None
    if isinstance(mod_or_fn, nn.ReLU6) or mod_or_fn is F.relu6:
        return 0.0, 6.0
    if isinstance(mod_or_fn, nn.Hardtanh):
        return float(mod_or_fn.min_val), float(mod_or_fn.max_val)
    return None


def _concat_channels(parts) -> ChannelStats:
    """Channel statistics of a concatenation: exact when the parts are clipped alike (e.g. all after
    ReLU, so the result keeps its lower end 0), else each part's clipped moments as a Gaussian."""
    clips = {(p.clip_lo, p.clip_hi) for p in parts}
    if len(clips) == 1:
        lo, hi = clips.pop()
        return ChannelStats(torch.cat([p.mu for p in parts]), torch.cat([p.sigma for p in parts]), lo, hi, _lowest([p.floor for p in parts]))
    ms = [p.moments() for p in parts]
    return ChannelStats(torch.cat([m for m, _ in ms]), torch.cat([v.sqrt() for _, v in ms]), floor=_lowest([p.lower_bound for p in parts]))


def _lowest(bounds) -> Optional[float]:
    """A lower bound of every part, or None when one part has none."""
    return None if None in bounds else min(bounds)


def _layer_input(layer: nn.Module, src, in_shape) -> Union[ChannelStats, str, None]:
    """The statistics reaching a Conv2d/Linear, if they describe what it reads: a conv reads the BN
    channels as its input channels; a Linear must see them as its features, on a (batch, features)
    input (applied to the last axis of a feature map it reads something else)."""
    if not isinstance(src, ChannelStats):
        return src
    n = src.mu.numel()
    if isinstance(layer, nn.Conv2d):
        return src if n == layer.in_channels else f"{n} channels with BN statistics, the conv reads {layer.in_channels}"
    if in_shape is not None and len(in_shape) != 2:
        return f"a Linear applied to a {len(in_shape)}-D tensor reads an axis other than the BN channels"
    return src if n == layer.in_features else f"{n} channels with BN statistics, the Linear reads {layer.in_features} features"


def _add(x: ChannelStats, y: ChannelStats) -> ChannelStats:
    m1, v1 = x.moments()
    m2, v2 = y.moments()
    bounds = (x.lower_bound, y.lower_bound)
    floor = None if None in bounds else bounds[0] + bounds[1]  # e.g. ReLU + ReLU >= 0
    return ChannelStats(m1 + m2, torch.sqrt(v1 + v2), floor=floor)


def propagate_bn_stats(gm: fx.GraphModule, input_size: Optional[Tuple[int, ...]] = None) -> Dict[str, InputRange]:
    """Carry BN channel statistics through the graph; returns, per Conv2d/Linear name, its input's."""
    modules = dict(gm.named_modules())
    shapes_known = False
    if input_size is not None:
        try:  # shapes only (an all-zero tensor), to know how flatten/view regroup channels
            ShapeProp(gm).propagate(torch.zeros(1, *input_size))
            shapes_known = True
        except Exception:
            shapes_known = False

    def shape(n) -> Optional[torch.Size]:
        meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
        return getattr(meta, "shape", None) if shapes_known else None

    env: Dict[str, Union[ChannelStats, None, str]] = {}
    result: Dict[str, InputRange] = {}

    def get(a) -> Union[ChannelStats, None, str]:
        return env.get(a.name, "unknown op before this layer") if isinstance(a, fx.Node) else None

    def channel_preserving(node: fx.Node) -> bool:
        sin, sout = shape(first_input(node)), shape(node)
        if sin is None or sout is None:
            return False
        return len(sin) >= 2 and len(sout) >= 2 and sin[1] == sout[1] and all(d == 1 for d in sout[2:])

    for node in gm.graph.nodes:
        out: Union[ChannelStats, None, str] = "unsupported op " + str(node.target)
        if node.op == "placeholder":
            out = "the model input (image) has no BN statistics"
        elif node.op == "call_module":
            mod = modules[node.target]
            src = get(first_input(node))
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                src = _layer_input(mod, src, shape(first_input(node)))
                here = InputRange(src if isinstance(src, ChannelStats) else None, "" if isinstance(src, ChannelStats) else str(src))
                prev = result.get(node.target)
                result[node.target] = here if prev is None else _merge_calls(prev, here)
                out = f"output of {node.target} (no BN after it)"
            elif isinstance(mod, nn.BatchNorm2d):
                gamma, beta = bn_affine(mod)
                out = ChannelStats(beta.clone(), gamma.abs().clone())
            elif _relu_like(mod, node) is not None:
                out = src.clipped(*_relu_like(mod, node)) if isinstance(src, ChannelStats) else src
            elif isinstance(mod, nn.Flatten):
                out = src if channel_preserving(node) else "flatten of a spatial map"
            elif isinstance(mod, _PASS_MODULES):
                out = src
        elif node.op in ("call_function", "call_method"):
            t = node.target
            args = node.args
            src = get(first_input(node))
            if t in _ADD and len(args) == 2:
                x, y = get(args[0]), get(args[1])
                if isinstance(x, ChannelStats) and isinstance(y, ChannelStats):
                    out = _add(x, y)
                else:
                    out = "addition with an operand without BN statistics"
            elif _relu_like(t, node) is not None:
                out = src.clipped(*_relu_like(t, node)) if isinstance(src, ChannelStats) else src
            elif t in (torch.mean, "mean"):  # global average pooling written as x.mean((2, 3))
                out = src if channel_preserving(node) else "mean over channels or without the shapes (give input_size)"
            elif t in (torch.flatten, "flatten", "view", "reshape"):
                out = src if channel_preserving(node) else "flatten/reshape that regroups channels"
            elif t in _PASS_FUNCS or t in _PASS_METHODS:
                out = src
            elif t is operator.getitem and isinstance(src, ChannelStats):
                idx = args[1]
                idx = idx if isinstance(idx, tuple) else (idx,)
                keeps_channels = len(idx) < 2 or idx[1] == slice(None)
                out = src if (idx and idx[0] == slice(None) and keeps_channels) else "indexing across channels"
            elif t is F.pad and isinstance(src, ChannelStats):
                pad = args[1] if len(args) > 1 else node.kwargs.get("pad")
                value = node.kwargs.get("value", args[3] if len(args) > 3 else 0.0) or 0.0
                mode = node.kwargs.get("mode", args[2] if len(args) > 2 else "constant")
                if mode == "constant" and pad is not None and len(pad) >= 6 and value == 0.0:
                    m, v = src.moments()
                    z = lambda k: torch.zeros(int(k))  # noqa: E731
                    out = ChannelStats(torch.cat([z(pad[4]), m, z(pad[5])]), torch.cat([z(pad[4]), v.sqrt(), z(pad[5])]))
                elif mode == "constant" and pad is not None and len(pad) <= 4:
                    out = src  # spatial zero padding: channel statistics kept (zeros at the border)
                else:
                    out = "padding that is not constant zero"
            elif t is torch.cat:
                tensors = args[0] if args else node.kwargs.get("tensors", ())
                parts = [get(a) for a in tensors]
                dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
                ndim = len(shape(node)) if shape(node) is not None else None
                if isinstance(dim, int) and dim < 0 and ndim is not None:
                    dim += ndim
                if dim != 1:
                    out = "concatenation along an axis other than the channels (or of unknown rank: give input_size)"
                elif not all(isinstance(p, ChannelStats) for p in parts):
                    out = "concatenation of inputs without BN statistics"
                else:
                    out = _concat_channels(parts)
        env[node.name] = out
    return result


def _normal_cdf_pdf(z: torch.Tensor):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))), torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)


def expected_quant_mse(stats: ChannelStats, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Expected squared error of quantizing ``stats`` with range [lo, hi] (candidates along dim 0).

    Clipping error from closed-form Gaussian tail integrals plus rounding noise step^2/12 inside the
    range, averaged over channels. An existing clip (ReLU) at the range's end costs nothing there.
    """
    mu = stats.mu.double().unsqueeze(0)
    s = stats.sigma.double().clamp_min(1e-12).unsqueeze(0)
    lo, hi = lo.double().unsqueeze(1), hi.double().unsqueeze(1)
    za, zb = (lo - mu) / s, (hi - mu) / s
    pa, da = _normal_cdf_pdf(za)
    pb, db = _normal_cdf_pdf(zb)
    upper = s**2 * ((1 + zb**2) * (1 - pb) - zb * db)
    if stats.clip_hi is not None:  # values above clip_hi are clip_hi, which may still exceed hi
        upper = torch.where(hi >= stats.clip_hi, torch.zeros_like(upper), upper)
    lower = s**2 * ((1 + za**2) * pa + za * da)
    if stats.clip_lo is not None:
        lower = torch.where(lo <= stats.clip_lo, torch.zeros_like(lower), lower)
    step = (hi - lo) / (2**bits - 1)
    inside = (pb - pa).clamp_min(0)
    return (upper + lower + step**2 / 12 * inside).mean(dim=1)


def stats_range(stats: ChannelStats, bits: int, rule: str = "mse", n_sigma: Optional[float] = None) -> Tuple[float, float]:
    """One per-tensor range [lo, hi] for an activation with these channel statistics."""
    mu, s = stats.mu.float(), stats.sigma.float()
    n = n_sigma if n_sigma is not None else DFQ_N_SIGMA[bits]
    hi_env = float((mu + n * s).max()) if rule == "dfq" else float((mu + 8 * s).max())
    lo_env = float((mu - n * s).min()) if rule == "dfq" else float((mu - 8 * s).min())
    bound = stats.lower_bound
    if bound is not None:
        lo_env = max(lo_env, bound)
    if stats.clip_hi is not None:
        hi_env = min(hi_env, stats.clip_hi)
    if bound is not None and bound >= 0:
        lo_env = bound  # after ReLU: zero must be exact, so the range starts at the clip
    hi_env = max(hi_env, lo_env + 1e-6)
    if rule == "dfq":
        return lo_env, hi_env
    if rule != "mse":
        raise ValueError(f"unknown range rule {rule!r}")
    grid = torch.linspace(0.02, 1.0, 50, dtype=torch.float64)
    if bound is not None and bound >= 0:
        his = lo_env + (hi_env - lo_env) * torch.linspace(0.01, 1.0, 400, dtype=torch.float64)
        los = torch.full_like(his, lo_env)
    else:  # two-sided: shrink each end towards the channel means' span independently
        c_lo, c_hi = float(mu.min()), float(mu.max())
        c_lo, c_hi = min(c_lo, c_hi, 0.0), max(c_hi, c_lo, 0.0)
        gl, gh = torch.meshgrid(grid, grid, indexing="ij")
        los = (c_lo + (lo_env - c_lo) * gl).reshape(-1)
        his = (c_hi + (hi_env - c_hi) * gh).reshape(-1)
    err = expected_quant_mse(stats, los, his, bits)
    i = int(torch.argmin(err))
    return float(los[i]), float(his[i])
