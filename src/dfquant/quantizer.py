"""Uniform affine quantization primitives. No method logic lives here.

Convention: integer code ``q = round(x / scale) + zero_point`` clamped to ``[qmin, qmax]``, value
``x_hat = (q - zero_point) * scale``. Weights use signed codes (``[-2^(b-1), 2^(b-1)-1]``),
activations unsigned codes (``[0, 2^b - 1]``). Methods (RTN, SQuant, Genie) only decide how a
weight in *grid units* (``x / scale + zero_point``) is turned into an integer code.
"""
from __future__ import annotations

import math
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
    most of its levels on. Vectorized over rows; the loop runs over the candidates.
    """
    qmin, qmax = qrange(bits, signed)
    best = best_lo = best_hi = None
    for lo, hi in candidates:
        qp = params_from_range(lo, hi, bits, signed)
        s, z = qp.scale.unsqueeze(1), qp.zero_point.unsqueeze(1)
        err = ((torch.clamp(torch.round(flat / s) + z, qmin, qmax) - z) * s - flat).abs_().pow_(p).mean(dim=1)
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


#: How a weight's grid is chosen: "minmax" (the SQuant protocol) or "lp" (clipping search).
WEIGHT_RANGES = ("minmax", "lp")


def weight_params(w: torch.Tensor, bits: int, rule: str = "minmax", per_channel: bool = True) -> QParams:
    """Signed weight grid by ``rule``: :func:`minmax_params` or :func:`lp_params`."""
    if rule == "minmax":
        return minmax_params(w, bits, per_channel=per_channel, signed=True)
    if rule == "lp":
        return lp_params(w, bits, per_channel=per_channel, signed=True)
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
