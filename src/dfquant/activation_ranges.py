"""Data-free activation ranges: from BatchNorm statistics, or the SQuant authors' noise pass.

Each BN output channel is modelled as a Gaussian N(beta, gamma^2) (DFQ, Nagel et al. 2019, Sec. 4.2
and 5): its running statistics normalise the input, so beta and |gamma| are the output's mean and
standard deviation. These per-channel statistics are carried through the fx graph to every
quantized layer's input:

- ReLU / ReLU6 clip the Gaussian (tracked as "the Gaussian, then clipped"); LeakyReLU gives the
  Gaussian of its output's exact mean and variance (moment matching),
- a residual addition adds the branches' means and variances (independence assumed), using the
  exact moments of a clipped Gaussian for each branch (closed form),
- pooling (also a spatial ``mean``), flatten of a 1x1 map, dropout, identity, spatial slicing pass
  the statistics through, channel zero-padding (option-A shortcuts) adds zero channels,
  concatenation joins them. A map is known to be 1x1 after a global pooling (adaptive pooling to 1,
  a mean over the spatial axes) whatever the input size, so a classifier head keeps its statistics
  without ``input_size``; a flatten of a map whose size depends on the input size needs it.

With these BN rules, a quantized input that no BN statistic reaches (the image, a conv output
without BN, an unknown op) gets no range: the report lists it and its input stays in float; nothing
is guessed.

Two ways to turn a tensor's channel statistics into one per-tensor range:

- ``"dfq"``: ``[min_c(mu - n sigma), max_c(mu + n sigma)]`` (lower end 0 after ReLU), the DFQ
  rule, with ``n`` a per-bit-width setting (``DFQ_N_SIGMA``).
- ``"mse"``: the clipping range that minimises the expected squared quantization error of the
  BN-implied Gaussian mixture, clipping error (closed-form Gaussian tail integrals) plus rounding
  noise (step^2/12), by a grid search. Data-free as well, with no per-bit-width constant.

The SQuant authors' own rule is data-free as well, but not a BN rule: their code sets each range
from one forward pass of the quantizing model on a batch of uniform noise (``alpha = s * std`` of
the input each quantizer receives), which reaches every input, BN or not.
:func:`calibrate_on_noise` reproduces it on a quantized model. None of these rules looks at data.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import DfquantError
from .graph import bn_affine, first_input, traced_shapes

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
        n = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu), validate_args=False)  # no per-call checks: same values
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


def _leaky(src: ChannelStats, slope: float) -> ChannelStats:
    """LeakyReLU of the statistics, as the Gaussian of its exact mean and variance (moment matching):
    ``leaky(x) = a x + (1 - a) relu(x)`` and ``leaky(x)^2 = a^2 x^2 + (1 - a^2) relu(x)^2``."""
    m, v = src.moments()
    mr, vr = src.clipped(0.0, None).moments()
    m, v, mr, vr = m.double(), v.double(), mr.double(), vr.double()
    mean = slope * m + (1 - slope) * mr
    second = slope**2 * (v + m**2) + (1 - slope**2) * (vr + mr**2)
    return ChannelStats(mean.float(), (second - mean**2).clamp_min(0).sqrt().float())


def _leaky_slope(mod_or_fn, node: fx.Node) -> Optional[float]:
    if isinstance(mod_or_fn, nn.LeakyReLU):
        return float(mod_or_fn.negative_slope)
    if mod_or_fn is F.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return float(slope) if isinstance(slope, (int, float)) else None
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


def _layer_input(layer: nn.Module, src, lay: Layout) -> Union[ChannelStats, str, None]:
    """The statistics reaching a Conv2d/Linear, if they describe what it reads: a conv reads the BN
    channels as its input channels; a Linear must see them as its features, on a (batch, features)
    input (applied to the last axis of a feature map it reads something else)."""
    if not isinstance(src, ChannelStats):
        return src
    n = src.mu.numel()
    if isinstance(layer, nn.Conv2d):
        return src if n == layer.in_channels else f"{n} channels with BN statistics, the conv reads {layer.in_channels}"
    if lay is None:
        return "a Linear applied to a tensor of unknown rank: it may read an axis other than the BN channels (give input_size)"
    if len(lay) != 0:
        return f"a Linear applied to a {len(lay) + 2}-D tensor reads an axis other than the BN channels"
    return src if n == layer.in_features else f"{n} channels with BN statistics, the Linear reads {layer.in_features} features"


# What the analysis knows of the tensor a node's statistics describe, besides its channels: the size
# of each axis after (batch, channels), an int when known (a global pooling makes it 1 whatever the
# input size) or None when it depends on the input size and no input_size was given; None as a
# whole when even the rank is unknown. With input_size, the traced shapes give it exactly.
Layout = Optional[Tuple[Optional[int], ...]]

_SIZE_UNKNOWN = "its spatial size depends on the input size (no global pooling before it): give input_size"


def _spatial_text(sizes) -> str:
    return "x".join(str(s) for s in sizes)


def _merge_into_features(lay: Layout, axes: Tuple[Optional[int], ...], what: str) -> Union[Layout, str]:
    """The layout of ``what`` (a flatten or reshape onto (batch, channels, ...)) merging ``axes``
    into the channel axis: only axes of size 1 keep the channels as the features."""
    if any(a is None for a in axes):
        return f"{what} of a feature map whose spatial size is not known: {_SIZE_UNKNOWN}"
    if any(a != 1 for a in axes):
        return f"{what} of a {_spatial_text(axes)} map: its features are the channels at every position, not the BN channels"
    return lay


def _flatten_layout(lay: Layout, start: Any, end: Any) -> Union[Layout, str]:
    if lay is None:
        return "flatten of a tensor of unknown rank (give input_size)"
    rank = len(lay) + 2
    if not all(isinstance(d, int) and -rank <= d < rank for d in (start, end)):
        return "flatten with axes the analysis cannot read"
    s, e = start % rank, end % rank
    if s == 0:
        return "flatten that merges the batch axis into the features"
    if e < s:
        return "flatten with end_dim before start_dim"
    if s == 1:  # channels and spatial axes 2..e become the features
        merged = _merge_into_features(lay[e - 1:], lay[: e - 1], "flatten")
        return merged
    part = lay[s - 2 : e - 1]  # spatial axes only: the channels stay where they are
    size = None if None in part else math.prod(part)
    return lay[: s - 2] + (size,) + lay[e - 1 :]


def _mean_layout(lay: Layout, dim: Any, keepdim: Any) -> Union[Layout, str]:
    """A mean over spatial axes keeps each channel's statistics (as pooling does)."""
    if dim is None:
        return "mean over every axis, batch and channels included"
    if lay is None:
        return "mean of a tensor of unknown rank (give input_size)"
    rank = len(lay) + 2
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
    if dims is None or not all(isinstance(d, int) and not isinstance(d, bool) and -rank <= d < rank for d in dims):
        return "mean over axes the analysis cannot read"
    axes = {d % rank for d in dims}
    if axes & {0, 1}:
        return "mean over the batch or channel axis"
    if keepdim is True:
        return tuple(1 if i + 2 in axes else n for i, n in enumerate(lay))
    if keepdim is not False:
        return "mean with a keepdim the analysis cannot read"
    return tuple(n for i, n in enumerate(lay) if i + 2 not in axes)


def _adaptive_pool_layout(lay: Layout, output_size: Any) -> Layout:
    """2-D adaptive pooling: the output size is fixed (1 for a global pooling), None keeps an axis."""
    sizes = (output_size, output_size) if output_size is None or isinstance(output_size, int) else tuple(output_size)
    if lay is None or len(lay) != 2 or len(sizes) != 2 or not all(n is None or isinstance(n, int) for n in sizes):
        return None
    return tuple(lay[i] if n is None else n for i, n in enumerate(sizes))


def _is_batch_size(a: Any) -> bool:
    """``x.size(0)``, ``x.size()[0]`` or ``x.shape[0]`` of a traced tensor: the batch size."""
    if not isinstance(a, fx.Node):
        return False
    if a.op == "call_method" and a.target == "size":
        return (a.args[1] if len(a.args) > 1 else a.kwargs.get("dim")) == 0
    if a.op == "call_function" and a.target is operator.getitem and len(a.args) == 2 and a.args[1] == 0:
        s = a.args[0]
        return isinstance(s, fx.Node) and (
            (s.op == "call_method" and s.target == "size" and len(s.args) == 1 and not s.kwargs)
            or (s.op == "call_function" and s.target is getattr and s.args[1:] == ("shape",))
        )
    return False


def _reshape_layout(node: fx.Node, lay: Layout, channels: int) -> Union[Layout, str, None]:
    """``view``/``reshape`` to (batch, features) in the spellings of a classifier head:
    ``(x.size(0), -1)``, ``(x.shape[0], C)``, ``(-1, C)``; None: another spelling."""
    target = list(node.args[1:])
    if not target:
        target = node.kwargs.get("shape", node.kwargs.get("size"))
        target = [] if target is None else [target]
    if len(target) == 1 and isinstance(target[0], (tuple, list)):
        target = list(target[0])
    if len(target) != 2:
        return None
    a, b = target
    b_int = isinstance(b, int) and not isinstance(b, bool)
    if not (b_int and ((_is_batch_size(a) and b in (-1, channels)) or (a == -1 and b == channels))):
        return None
    if lay is None:
        return "reshape of a tensor of unknown rank (give input_size)"
    return _merge_into_features((), lay, "reshape")


def _broadcast_layout(a: Layout, b: Layout) -> Layout:
    """The layout of an elementwise result (addition, concatenation along the channels)."""
    if a is None or b is None or len(a) != len(b):
        return None
    return tuple(x if x == y else (y if x == 1 else x if y == 1 else None) for x, y in zip(a, b))


def _pad_layout(lay: Layout, pad: Any) -> Layout:
    if lay is None:
        return None
    sizes = list(lay)
    for i in range(min(len(pad) // 2, len(sizes))):  # F.pad pads the last axis first
        j = len(sizes) - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        sizes[j] = sizes[j] + lo + hi if sizes[j] is not None and isinstance(lo, int) and isinstance(hi, int) else None
    return tuple(sizes)


def _getitem_layout(lay: Layout, idx: tuple) -> Layout:
    if lay is None:
        return None
    sizes = []
    for i, n in enumerate(lay):
        k = idx[i + 2] if i + 2 < len(idx) else slice(None)
        if isinstance(k, int) and not isinstance(k, bool):
            continue  # the axis is dropped
        if not isinstance(k, slice):
            return None
        sizes.append(n if k == slice(None) else None)
    return tuple(sizes)


def _add(x: ChannelStats, y: ChannelStats) -> ChannelStats:
    m1, v1 = x.moments()
    m2, v2 = y.moments()
    bounds = (x.lower_bound, y.lower_bound)
    floor = None if None in bounds else bounds[0] + bounds[1]  # e.g. ReLU + ReLU >= 0
    return ChannelStats(m1 + m2, torch.sqrt(v1 + v2), floor=floor)


def propagate_bn_stats(
    gm: fx.GraphModule, input_size: Optional[Tuple[int, ...]] = None, shapes: Optional[Dict[str, torch.Size]] = None
) -> Dict[str, InputRange]:
    """Carry BN channel statistics through the graph; returns, per Conv2d/Linear name, its input's.

    Without ``input_size`` the spatial size of a feature map is unknown, but a global pooling
    (adaptive pooling to 1, a mean over the spatial axes) makes it 1, so a classifier head
    ``pool -> flatten / view(N, -1) -> Linear`` keeps its statistics; a flatten of a map whose size
    depends on the input size is refused, saying so. ``shapes``: :func:`dfquant.graph.traced_shapes`
    of ``gm`` at ``input_size``, when the caller has them (else one forward here computes them)."""
    modules = dict(gm.named_modules())
    if shapes is None and input_size is not None:
        try:  # shapes only (an all-zero tensor), to know how flatten/view regroup channels
            shapes = traced_shapes(gm, input_size)
        except Exception:
            shapes = None
    shapes_known = shapes is not None

    def shape(n) -> Optional[torch.Size]:
        return shapes.get(n.name) if shapes_known and isinstance(n, fx.Node) else None

    env: Dict[str, Union[ChannelStats, None, str]] = {}
    layouts: Dict[str, Layout] = {}
    result: Dict[str, InputRange] = {}

    def get(a) -> Union[ChannelStats, None, str]:
        return env.get(a.name, "unknown op before this layer") if isinstance(a, fx.Node) else None

    def layout(a) -> Layout:
        return layouts.get(a.name) if isinstance(a, fx.Node) else None

    def channel_preserving(node: fx.Node) -> bool:
        sin, sout = shape(first_input(node)), shape(node)
        if sin is None or sout is None:
            return False
        return len(sin) >= 2 and len(sout) >= 2 and sin[1] == sout[1] and all(d == 1 for d in sout[2:])

    def arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    def reshaped(src, new: Union[Layout, str]):
        """(statistics, layout) after an op that changes the layout (a str: the reason it refuses)."""
        if not isinstance(src, ChannelStats):
            return src, None
        return (new, None) if isinstance(new, str) else (src, new)

    for node in gm.graph.nodes:
        out: Union[ChannelStats, None, str] = "unsupported op " + str(node.target)
        src_node = first_input(node)
        lay: Layout = layout(src_node)  # most ops keep their input's layout
        if node.op == "placeholder":
            out = "the model input (image) has no BN statistics"
        elif node.op == "call_module":
            mod = modules[node.target]
            src = get(src_node)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                src = _layer_input(mod, src, lay)
                here = InputRange(src if isinstance(src, ChannelStats) else None, "" if isinstance(src, ChannelStats) else str(src))
                prev = result.get(node.target)
                result[node.target] = here if prev is None else _merge_calls(prev, here)
                out = f"output of {node.target} (no BN after it)"
            elif isinstance(mod, nn.BatchNorm2d):
                gamma, beta = bn_affine(mod)
                out, lay = ChannelStats(beta.clone(), gamma.abs().clone()), (None, None)
            elif _relu_like(mod, node) is not None:
                out = src.clipped(*_relu_like(mod, node)) if isinstance(src, ChannelStats) else src
            elif _leaky_slope(mod, node) is not None:
                out = _leaky(src, _leaky_slope(mod, node)) if isinstance(src, ChannelStats) else src
            elif isinstance(mod, nn.Flatten):
                out, lay = reshaped(src, _flatten_layout(lay, mod.start_dim, mod.end_dim))
            elif isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                out, lay = src, _adaptive_pool_layout(lay, mod.output_size)
            elif isinstance(mod, (nn.AvgPool2d, nn.MaxPool2d)):
                out, lay = src, (None, None) if lay is not None and len(lay) == 2 else None
            elif isinstance(mod, _PASS_MODULES):
                out = src
        elif node.op in ("call_function", "call_method"):
            t = node.target
            args = node.args
            src = get(src_node)
            if t in _ADD and len(args) == 2:
                x, y = get(args[0]), get(args[1])
                if isinstance(x, ChannelStats) and isinstance(y, ChannelStats):
                    out, lay = _add(x, y), _broadcast_layout(layout(args[0]), layout(args[1]))
                else:
                    out = "addition with an operand without BN statistics"
            elif _relu_like(t, node) is not None:
                out = src.clipped(*_relu_like(t, node)) if isinstance(src, ChannelStats) else src
            elif _leaky_slope(t, node) is not None:
                out = _leaky(src, _leaky_slope(t, node)) if isinstance(src, ChannelStats) else src
            elif t in (torch.mean, "mean"):  # global average pooling written as x.mean((2, 3))
                out, lay = reshaped(src, _mean_layout(lay, arg(node, 1, "dim", None), arg(node, 2, "keepdim", False)))
            elif t in (torch.flatten, "flatten"):
                out, lay = reshaped(src, _flatten_layout(lay, arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)))
            elif t in ("view", "reshape"):
                n = src.mu.numel() if isinstance(src, ChannelStats) else 0
                new = _reshape_layout(node, lay, n)
                if new is None:  # another spelling: only the traced shapes can tell
                    new = () if channel_preserving(node) else (
                        "flatten/reshape that regroups channels" if shapes_known else "a view/reshape the analysis cannot read without the shapes (give input_size)"
                    )
                out, lay = reshaped(src, new)
            elif t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
                out, lay = src, _adaptive_pool_layout(lay, arg(node, 1, "output_size", None))
            elif t in (F.avg_pool2d, F.max_pool2d):
                out, lay = src, (None, None) if lay is not None and len(lay) == 2 else None
            elif t in _PASS_FUNCS or t in _PASS_METHODS:
                out = src
            elif t is operator.getitem and isinstance(src, ChannelStats):
                idx = args[1]
                idx = idx if isinstance(idx, tuple) else (idx,)
                keeps_channels = len(idx) < 2 or idx[1] == slice(None)
                out = src if (idx and idx[0] == slice(None) and keeps_channels) else "indexing across channels"
                lay = _getitem_layout(lay, idx)
            elif t is F.pad and isinstance(src, ChannelStats):
                pad = args[1] if len(args) > 1 else node.kwargs.get("pad")
                value = node.kwargs.get("value", args[3] if len(args) > 3 else 0.0) or 0.0
                mode = node.kwargs.get("mode", args[2] if len(args) > 2 else "constant")
                if mode == "constant" and pad is not None and len(pad) >= 6 and value == 0.0:
                    m, v = src.moments()
                    z = lambda k: torch.zeros(int(k))  # noqa: E731
                    out = ChannelStats(torch.cat([z(pad[4]), m, z(pad[5])]), torch.cat([z(pad[4]), v.sqrt(), z(pad[5])]))
                    lay = _pad_layout(lay, pad[:4])
                elif mode == "constant" and pad is not None and len(pad) <= 4:
                    out = src  # spatial zero padding: channel statistics kept (zeros at the border)
                    lay = _pad_layout(lay, pad)
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
                    lay = layout(tensors[0]) if tensors else None
                    for a in tensors[1:]:
                        lay = _broadcast_layout(lay, layout(a))
        sh = shape(node)
        if sh is not None and len(sh) >= 2:
            lay = tuple(int(d) for d in sh[2:])  # the traced shapes, when known, are exact
        env[node.name] = out
        layouts[node.name] = lay if isinstance(out, ChannelStats) else None
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


# ---------------------------------------------------------------------------------------------
# The SQuant authors' data-free activation rule: one forward pass on uniform noise.

#: s in alpha = s * std per activation bit-width of the run: the authors' run.sh passes ``-s 12``,
#: ``-s 14``, ``-s 25`` with ``-ab 4``, ``-ab 6``, ``-ab 8`` (one s per run, for every quantizer of
#: the run, the classifier's 8-bit input included). They give none for 2, 3, 5 or 7 bits.
SQUANT_NOISE_S: Dict[int, float] = {4: 12.0, 6: 14.0, 8: 25.0}

#: Below this bit-width alpha is also clipped at the input's maximum (the authors' ``bit < 6``).
SQUANT_CLIP_BELOW_BITS = 6


@dataclass
class NoiseRange:
    """What :func:`calibrate_on_noise` set for one layer's input quantizer."""

    alpha: float  # the rule's clipping value
    signed: bool  # the noise pass gave the input a negative value: range [-alpha, alpha], else [0, alpha]
    bits: int
    s: float  # the factor in alpha = s * std
    range: Tuple[float, float]  # what the quantizer's grid really covers (zero on a code)


def squant_alpha(x: torch.Tensor, bits: int, s: float) -> Tuple[float, bool]:
    """The SQuant authors' clipping value for one activation tensor: ``(alpha, signed)``.

    ``signed`` when ``x`` has a negative value. Unsigned: ``alpha = s * std(x[x > 0])``; signed:
    ``alpha = s * std(x) / 1.25`` (the range is then ``[-alpha, alpha]``); the standard deviation is
    the unbiased one (``torch.std``'s default), over every element of the batch. Below 6 bits alpha
    is also at most ``max(x)``. (``quant_modules.py``: ``Quantizer._sigma``, ``updata_signed``,
    ``_init_quant_para``.) Where the authors' code would give NaN or an inverted range we do not:
    fewer than two values to take a standard deviation of give ``alpha = max(x)``, and a negative
    alpha (every value below zero, clipped at its maximum) is 0."""
    x = x.detach()
    signed = bool(x.min() < 0)
    values = x.reshape(-1) if signed else x[x > 0]
    if values.numel() > 1:
        alpha = s * float(values.std())
        if signed:
            alpha /= 1.25
    else:
        alpha = float(x.max())
    if bits < SQUANT_CLIP_BELOW_BITS:
        alpha = min(alpha, float(x.max()))
    return max(alpha, 0.0), signed


def _input_quantizers(qmodel: nn.Module):
    """(layer name, its ActQuantizer) for every quantized layer with an input quantizer, once each."""
    from .qmodules import QUANT_LAYERS, ActQuantizer

    found, seen = [], set()
    for name, layer in qmodel.named_modules():
        act = getattr(layer, "input_quant", None) if isinstance(layer, QUANT_LAYERS) else None
        if isinstance(act, ActQuantizer) and id(act) not in seen:
            seen.add(id(act))
            found.append((name, act))
    return found


@torch.no_grad()
def calibrate_on_noise(
    qmodel: nn.Module,
    input_size: Tuple[int, ...],
    *,
    a_bits: Optional[int] = None,
    s: Optional[float] = None,
    seed: int = 0,
    batch: int = 256,
    fixed: Tuple[str, ...] = (),
) -> Dict[str, NoiseRange]:
    """Set the input range of every activation quantizer of a dfquant quantized model the way the
    SQuant authors' code does (Guo et al., ICLR 2022, github.com/clevercool/SQuant), in place.

    One forward pass of the quantizing model, in eval mode, on ``batch`` images of uniform noise
    in [0, 1) of shape ``input_size`` (``main.py``: ``torch.rand([batch_size, 3, 224, 224])``,
    ``batch_size`` 256 by default, then ``quantized_model(rand_input)``). Each quantizer takes its
    range from the first input it receives (:func:`squant_alpha`), and quantizes with it at once,
    so a later layer's range is computed on what the already-quantized earlier layers give it, in
    execution order (``quant_modules.py``: ``Quantizer.tensor_forward`` initialises once, in the
    forward). A layer run more than once takes its range from its first call, as there.

    ``s``: the factor of the rule, for every quantizer (the authors pass one per run); None:
    :data:`SQUANT_NOISE_S` at ``a_bits``, the run's activation bit-width (None: the lowest
    bit-width among the quantizers), so an 8-bit classifier input in a 4-bit run uses the 4-bit s,
    as the authors' ``set_first_last_layer`` (``quant_model.py``) only changes its bit-width. The
    clip at ``max(x)`` below 6 bits follows each quantizer's own bit-width. ``fixed``: layer names
    whose quantizer keeps its range (a given image range): it is active in the pass, not set.

    Range onto our quantizer: ``ActQuantizer(bits, 0, alpha)`` or ``ActQuantizer(bits, -alpha,
    alpha)``. The authors' activation quantizer (``quant_affine.py``, ``AsymmetricQuantFunction``)
    uses unsigned codes on [0, alpha] (the same grid as ours) and, for a signed input, signed codes
    with step 2 alpha / (2^b - 1) and zero on a code, so its 2^b levels end half a step beyond
    alpha at one end and half a step inside at the other; ours (unsigned codes, zero point) has the
    same step and levels, and in both codes which end gets the extra half step is decided by the
    float rounding of a tie (the zero point is -(2^b - 1)/2 before rounding), so the two can differ
    by that one level on a signed input. Deviations: the noise is drawn from a seeded generator
    (theirs is unseeded), and :func:`squant_alpha` avoids their NaN/inverted edge cases.

    Returns, per layer name in calibration order, what was set; quantizers the pass does not run
    (and ``fixed`` ones) keep their range and are absent. The global RNG, the modules' train/eval
    modes and their hooks are as before the call. Memory: one forward of ``batch`` images."""
    from .checks import check_bits, check_float, check_int, fail
    from .modelcheck import check_input_size
    from .qmodules import ActQuantizer

    if not isinstance(qmodel, nn.Module):
        raise fail("qmodel", f"qmodel must be a quantized torch.nn.Module, got {type(qmodel).__name__}")
    try:
        size = check_input_size(input_size)
    except DfquantError as exc:
        raise fail("input_size", str(exc)) from None
    if size is None:
        raise fail("input_size", "input_size is needed: the noise batch has the input's shape, e.g. (3, 32, 32)")
    check_int(seed, "seed")
    check_int(batch, "batch", 1)
    if a_bits is not None:
        check_bits(a_bits, "a_bits")
    if s is not None:
        s = check_float(s, "s", 0.0, lo_open=True)
    if isinstance(fixed, str) or not all(isinstance(n, str) for n in fixed):
        raise fail("fixed", f"fixed must be a list of layer names, got {fixed!r}")
    quantizers = _input_quantizers(qmodel)
    names = {n for n, _ in quantizers}
    unknown = [n for n in fixed if n not in names]
    if unknown:
        raise fail("fixed", f"fixed names no layer with an input quantizer: {', '.join(unknown)}")
    todo = [(n, act) for n, act in quantizers if n not in fixed]
    if not todo:
        raise fail("qmodel", "qmodel has no activation quantizer to calibrate (quantize it with a_bits set)")
    run_bits = a_bits if a_bits is not None else min(act.bits for _, act in todo)
    if s is None:
        if run_bits not in SQUANT_NOISE_S:
            have = ", ".join(f"{b} bits: {v:g}" for b, v in SQUANT_NOISE_S.items())
            raise fail("a_bits", f"a_bits={run_bits}: the SQuant authors give s only for 4-, 6- and 8-bit activations ({have}); pass s explicitly")
        s = SQUANT_NOISE_S[run_bits]

    result: Dict[str, NoiseRange] = {}

    def hook_for(name: str, act: ActQuantizer):
        def hook(module, args):
            if name in result:
                return
            x = args[0]
            if not torch.isfinite(x).all():
                raise DfquantError(f"the noise pass gave NaN or inf at the input of {name}: no range can be set from it", param="qmodel")
            alpha, signed = squant_alpha(x, act.bits, s)
            new = ActQuantizer(act.bits, -alpha if signed else 0.0, alpha)
            act.scale.copy_(new.scale)
            act.zero_point.copy_(new.zero_point)
            result[name] = NoiseRange(alpha, signed, act.bits, s, act.range)

        return hook

    device = next((t.device for t in list(qmodel.parameters()) + list(qmodel.buffers())), torch.device("cpu"))
    noise = torch.rand((batch, *size), generator=torch.Generator().manual_seed(seed)).to(device)
    modes = [(m, m.training) for m in qmodel.modules()]
    handles = [act.register_forward_pre_hook(hook_for(n, act)) for n, act in todo]
    try:
        qmodel.eval()
        try:
            qmodel(noise)
        except DfquantError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's model: say which parameter to look at
            raise fail("input_size", f"the model does not run on a noise batch of shape {tuple(noise.shape)} (check input_size): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return result
