"""Uniform affine quantization primitives. No method logic lives here.

Convention: integer code ``q = round(x / scale) + zero_point`` clamped to ``[qmin, qmax]``, value
``x_hat = (q - zero_point) * scale``. Weights use signed codes (``[-2^(b-1), 2^(b-1)-1]``),
activations unsigned codes (``[0, 2^b - 1]``). Methods (RTN, SQuant, Genie) only decide how a
weight in *grid units* (``x / scale + zero_point``) is turned into an integer code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

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


def fake_quant(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient for the rounding (for learned methods)."""
    g = to_grid(x, qp)
    q = torch.clamp(g + (torch.round(g) - g).detach(), qp.qmin, qp.qmax)
    return from_grid(q, qp)


def code_dtype(bits: int, signed: bool) -> torch.dtype:
    """Smallest integer dtype that holds the codes (int8 / uint8 for <= 8 bits)."""
    check_bits(bits)
    return torch.int8 if signed else torch.uint8
