"""Uniform affine quantization primitives. No method logic lives here.

Convention: integer code ``q = round(x / scale) + zero_point`` clamped to ``[qmin, qmax]``, value
``x_hat = (q - zero_point) * scale``. Weights use signed codes (``[-2^(b-1), 2^(b-1)-1]``),
activations unsigned codes (``[0, 2^b - 1]``). Methods (RTN, SQuant, Genie) only decide how a
weight in *grid units* (``x / scale + zero_point``) is turned into an integer code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

import torch

from .errors import DfquantError, check_bits

_EPS = 1e-8


def qrange(bits: int, signed: bool) -> Tuple[int, int]:
    """Integer code range of a ``bits``-bit quantizer."""
    check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass
class QParams:
    """Scale and zero point (per tensor: shape (); per output channel: shape (out,)) of a quantizer."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed)[1]


def _per_channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector (out,) to broadcast over a weight (out, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() == 1 else t


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool) -> QParams:
    """Asymmetric scale/zero point mapping the range [lo, hi] onto the full integer grid.

    ``scale = (hi - lo) / (2^b - 1)`` and ``zero_point = qmin - round(lo / scale)``, so ``lo`` lands
    within half a step of ``qmin`` (the SQuant / ZeroQ convention; zero need not lie in the range).
    """
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if torch.any(hi < lo):
        raise DfquantError("quantization range has hi < lo")
    qmin, qmax = qrange(bits, signed)
    scale = ((hi - lo) / float(qmax - qmin)).clamp_min(_EPS)
    zero_point = qmin - torch.round(lo / scale)
    return QParams(scale, zero_point, bits, signed)


def minmax_params(w: torch.Tensor, bits: int, per_channel: bool = True, signed: bool = True) -> QParams:
    """Scale/zero point from the tensor's min and max, per output channel (dim 0) or per tensor."""
    w = w.detach().float()
    if per_channel:
        flat = w.reshape(w.shape[0], -1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    else:
        lo, hi = w.min(), w.max()
    return params_from_range(lo, hi, bits, signed)


#: Exponent of the clipping search's error (BRECQ's and Genie's ``init_scale``: mean |w - Q(w)|^2.4).
LP_NORM = 2.4


def lp_search(flat: torch.Tensor, candidates: Iterable[Tuple[torch.Tensor, torch.Tensor]], bits: int, signed: bool, p: float = LP_NORM):
    """Per row of ``flat`` (R, N), the candidate range ``(lo, hi)`` (each of shape (R,)) minimising
    the mean ``|x - Q(x)|^p``; the first candidate wins ties. Returns ``(lo, hi)``, each (R,).

    With candidates ``[r * min, r * max]`` for ``r = 1, 0.99, ..., 0.01`` this is the clipping search of
    BRECQ (Li et al., ICLR 2021) that Genie's release uses to start its weight and activation step
    sizes (``init_scale``, p = 2.4): at low bit-widths it clips outliers that a min/max grid spends
    most of its levels on. Vectorized over rows; the loop runs over the candidates. Deviation: the
    errors are raised to ``p`` and averaged in float64 (the release: float32), so the choice does not
    depend on the CPU.
    """
    qmin, qmax = qrange(bits, signed)
    best = best_lo = best_hi = None
    for lo, hi in candidates:
        qp = params_from_range(lo, hi, bits, signed)
        s, z = qp.scale.unsqueeze(1), qp.zero_point.unsqueeze(1)
        # the error's power and mean in float64: float32 pow (SLEEF or libm by CPU) and sums (SIMD
        # order) differ in the last bits between CPUs, enough to flip a near-tie between candidates
        err = ((torch.clamp(torch.round(flat / s) + z, qmin, qmax) - z) * s - flat).abs_().double().pow_(p).mean(dim=1)
        if best is None:
            best, best_lo, best_hi = err, lo.clone(), hi.clone()
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def lp_params(w: torch.Tensor, bits: int, per_channel: bool = True, signed: bool = True, p: float = LP_NORM, steps: int = 100) -> QParams:
    """Weight grid of the :func:`lp_search` range over ``[r * min, r * max]``, per output channel (or per tensor)."""
    w = w.detach().float()
    flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    lo0, hi0 = flat.min(dim=1).values, flat.max(dim=1).values
    lo, hi = lp_search(flat, ((lo0 * (1.0 - i / steps), hi0 * (1.0 - i / steps)) for i in range(steps)), bits, signed, p)
    if not per_channel:
        lo, hi = lo[0], hi[0]
    return params_from_range(lo, hi, bits, signed)


def symmetric_params(w: torch.Tensor, bits: int, per_channel: bool = True) -> QParams:
    """Signed grid with zero point 0 and ``scale = max|w| / (2^(b-1) - 1)``, per output channel (or per tensor).

    Not a grid of the papers (SQuant's is min/max, Genie's the lp search): the one integer runtimes
    run fastest (onnxruntime's depthwise ``QLinearConv`` takes a slow path for non-zero weight zero
    points). Round-to-nearest codes lie in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; ``-2^(b-1)`` stays a valid
    code, which a rounding method may reach only from a weight within float rounding of ``-max|w|``.
    """
    w = w.detach().float()
    flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    top = flat.abs().amax(dim=1)
    if not per_channel:
        top = top[0]
    scale = (top / float(qrange(bits, True)[1])).clamp_min(_EPS)
    return QParams(scale, torch.zeros_like(scale), bits, True)


#: How a weight's grid is chosen: "minmax" (the SQuant protocol), "lp" (clipping search) or
#: "symmetric" (zero point 0, for integer runtimes).
WEIGHT_RANGES = ("minmax", "lp", "symmetric")


def weight_params(w: torch.Tensor, bits: int, rule: str = "minmax", per_channel: bool = True) -> QParams:
    """Signed weight grid by ``rule``: :func:`minmax_params`, :func:`lp_params` or :func:`symmetric_params`."""
    if rule == "minmax":
        return minmax_params(w, bits, per_channel=per_channel, signed=True)
    if rule == "lp":
        return lp_params(w, bits, per_channel=per_channel, signed=True)
    if rule == "symmetric":
        return symmetric_params(w, bits, per_channel=per_channel)
    raise DfquantError(f"unknown weight range rule {rule!r}; choose {' or '.join(WEIGHT_RANGES)}")


def to_grid(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Real values to (unrounded) grid units: ``x / scale + zero_point``."""
    return x / _per_channel_view(qp.scale, x) + _per_channel_view(qp.zero_point, x)


def from_grid(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes (or grid units) back to real values: ``(q - zero_point) * scale``."""
    q = q.float()
    return (q - _per_channel_view(qp.zero_point, q)) * _per_channel_view(qp.scale, q)


def rtn_round(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Round-to-nearest baseline: nearest integer, clamped to [qmin, qmax]."""
    return torch.clamp(torch.round(x), qmin, qmax)


def quantize_tensor(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes of ``x`` by round-to-nearest (as float tensor with integer values)."""
    return rtn_round(to_grid(x, qp), qp.qmin, qp.qmax)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, ste: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x``: ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.

    The activation quantizer of every dfquant layer; with ``ste`` the rounding passes gradients
    straight through (the learned methods' LSQ steps)."""
    g = x / scale
    r = g + (torch.round(g) - g).detach() if ste else torch.round(g)
    return (torch.clamp(r + zero_point, qmin, qmax) - zero_point) * scale


def code_dtype(bits: int, signed: bool) -> torch.dtype:
    """Smallest integer dtype that holds the codes (int8 / uint8 for <= 8 bits)."""
    check_bits(bits)
    return torch.int8 if signed else torch.uint8


# --------------------------------------------------------------------------------------------
# Per-tensor weight grids of DF-MPC (Chen et al., Pattern Recognition 143, 2023, Sec. 3.1, 5.2):
# ternary (TWN) at 2 bits, DoReFa at 3..8. Both are one scale per layer (QParams of shape ()).
# A caller picks one with ``w_grid`` for any rounding method:
#   - "rtn" on a grid is the grid's own rule (:func:`grid_codes` with ``round_fn=None``): TWN's
#     threshold at 2 bits (Eq. 3-4), round-to-nearest on DoReFa's levels (exactly Eq. 6). These
#     are the paper's quantizers, the ones ``method="dfmpc"`` uses.
#   - any other rounding (SQuant's) works on the grid's scale and code range in grid units: on
#     TWN's grid it starts from round-to-nearest on {-a, 0, a} (threshold a/2, not TWN's 0.7 mean|W|)
#     and flips within [-1, 1], so the codes stay ternary.
# --------------------------------------------------------------------------------------------

#: Per-tensor weight grids: "twn" (ternary, 2 bits) and "dorefa" (2^k levels over [-max|W|, max|W|]).
WEIGHT_GRIDS = ("twn", "dorefa")

#: TWN's threshold as a fraction of mean |W| (Li et al. 2016; DF-MPC Eq. 3).
TWN_THRESHOLD = 0.7


def twn_round(x: torch.Tensor, qmin: int = -1, qmax: int = 1) -> torch.Tensor:
    """TWN's threshold rule (DF-MPC Eq. 3) on a tensor: ``sign(x)`` where ``|x| > 0.7 mean|x|``, else 0.

    The rule is scale-free (the threshold is a fraction of the tensor's own mean |x|), so it gives the
    same codes on the weight as on its grid units ``w / alpha``. Clamped to [qmin, qmax]."""
    a = x.abs()
    return torch.clamp(torch.sign(x) * (a > TWN_THRESHOLD * a.mean()), qmin, qmax)


def twn_params(w: torch.Tensor) -> QParams:
    """Ternary grid (DF-MPC Eq. 3-4): zero point 0, scale ``alpha = mean |W|`` over ``|W| > 0.7 mean|W|``.

    Codes are {-1, 0, 1} in the 2-bit signed container. A weight with no entry above the threshold
    (all zero) gets the smallest scale instead of 0/0; its codes are all 0."""
    a = w.detach().float().abs()
    above = twn_round(a) > 0
    alpha = (a * above).sum() / above.sum().clamp_min(1)
    return QParams(alpha.clamp_min(_EPS), torch.zeros(()), 2, True)


def dorefa_params(w: torch.Tensor, bits: int) -> QParams:
    """DoReFa's grid (DF-MPC Eq. 6), ``2^k`` levels spread evenly over ``[-m, m]``, ``m = max|W|``.

    Eq. 6's integer ``i = round((2^k - 1)(w / 2m + 1/2))`` in [0, 2^k - 1] is stored as the signed
    code ``i - 2^(k-1)``; value ``(code + 1/2) * 2m / (2^k - 1)``: scale ``2m / (2^k - 1)`` and a
    half-integer zero point ``-1/2`` (no level is exactly zero). Round-to-nearest of
    :func:`to_grid` gives Eq. 6's codes exactly (``2^(k-1)`` is even, so ties round alike). An
    all-zero weight gets the smallest scale (its values are then +-scale/2, not 0)."""
    check_bits(bits)
    m = w.detach().float().abs().max()
    scale = (2 * m / (2**bits - 1)).clamp_min(_EPS)
    return QParams(scale, torch.full((), -0.5), bits, True)


def grid_params(w: torch.Tensor, bits: int, grid: str) -> QParams:
    """The per-tensor ``grid`` ("twn": 2 bits only; "dorefa": any bit-width) for weight ``w``."""
    if grid == "twn":
        if bits != 2:
            raise DfquantError(f"w_grid='twn' is ternary (2 bits); got {bits} bits (use w_grid='dorefa' above 2 bits)", param="w_grid")
        return twn_params(w)
    if grid == "dorefa":
        return dorefa_params(w, bits)
    raise DfquantError(f"unknown w_grid {grid!r}; choose {' or '.join(WEIGHT_GRIDS)}", param="w_grid")


#: The choices of ``w_grid``: one grid for every layer, or "paper", DF-MPC's rule per layer (Sec. 5.2):
#: TWN at 2 bits, DoReFa at 3..8.
W_GRID_CHOICES = WEIGHT_GRIDS + ("paper",)


def grid_for_bits(w_grid, bits: int):
    """The grid (``"twn"`` / ``"dorefa"``) a layer of ``bits`` bits gets under ``w_grid``; None (the
    per-channel min/max or lp grid) for ``w_grid=None``."""
    if w_grid == "paper":
        return "twn" if bits == 2 else "dorefa"
    return w_grid


def grid_code_range(grid: str, bits: int) -> Tuple[int, int]:
    """Codes a rounding may use on ``grid``: [-1, 1] on TWN's, the full signed range on DoReFa's."""
    return (-1, 1) if grid == "twn" else qrange(bits, True)


def grid_codes(w: torch.Tensor, qp: QParams, grid: str, round_fn=None) -> torch.Tensor:
    """Integer codes of ``w`` on ``grid`` (``qp`` from :func:`grid_params`).

    ``round_fn=None`` ("rtn"): the grid's own rule, TWN's threshold or DoReFa's nearest level (the
    paper's quantizers). Otherwise ``round_fn(grid_units, qmin, qmax)`` (e.g. SQuant's) within
    :func:`grid_code_range`."""
    lo, hi = grid_code_range(grid, qp.bits)
    x = to_grid(w.detach().float(), qp)
    if round_fn is None:
        round_fn = twn_round if grid == "twn" else rtn_round
    return round_fn(x, lo, hi)
