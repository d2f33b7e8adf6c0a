"""Genie-M's quantizer: soft rounding with jointly learned step sizes, LSQ activations and QDrop.

Per weight (Genie Sec. 3.2, on AdaRound, Nagel et al. ICML 2020, Eq. 22-24):
``w_hat = s * (clip(B + h(V), qmin, qmax) - z)`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (zeta = 1.1, gamma = -0.1), a fixed
integer base ``B``, learned ``V`` and a learned per-output-channel step ``s`` (Genie-M's change:
``B`` is decoupled from the learned ``s``); the zero point ``z`` stays fixed. Regulariser
``sum(1 - |2 h(V) - 1|^beta)`` (AdaRound Eq. 24); hard rounding at the end ``clip(B + [V >= 0])``.
Activations: LSQ (Esser et al., ICLR 2020) per-tensor steps with a straight-through rounding (no
gradient scaling, as the release), and QDrop (Wei et al., ICLR 2022): in training each element
keeps its float value with probability ``drop_prob``.

Deviation: the start is the quantized model's codes (RTN or SQuant), not the float weights, and
hard rounding at step 0 reproduces them exactly (:func:`initial_rounding`). With RTN codes on the
Lp grid this is the release's start. Asymmetric quantizers with fixed zero points (dfquant's layers);
the release's activation quantizer is symmetric without a zero point.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfquant.qmodules import ActQuantizer, QuantConv2d
from dfquant.quantizer import QParams, fake_quant, lp_search, params_from_range, qrange, to_grid

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch (Eq. 23)
_INIT_MARGIN = 0.01  # soft values start at least this far from 1/2
_EPS = 1e-8


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid h(V) (Eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _rect_sigmoid_inverse(r: torch.Tensor) -> torch.Tensor:
    """V with h(V) = r for r in [0, 1] (finite: the stretch puts 0 and 1 inside the sigmoid's range)."""
    return -torch.log((_ZETA - _GAMMA) / (r - _GAMMA) - 1.0)



def initial_rounding(w_float: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int):
    """Base ``B`` and rounding variables ``V`` whose hard rounding reproduces ``codes`` exactly.

    With the grid value ``g = W / s0 + z``: ``B = c - 1`` where the code rounds up (``c > g``), else
    ``B = c``, so the hard bit ``c - B`` is 0 or 1 (``B = floor(g)`` for every RTN or SQuant code).
    ``V = h^-1(r)`` with ``r = g - B`` in [0, 1]: the release's start (soft weight = float weight)
    wherever the code is round-to-nearest; where it is not (a SQuant flip) ``r`` is mirrored to
    ``1 - r``, as firm as round-to-nearest would be on the other side of 1/2 (ours). Every ``r`` is
    kept 0.01 from 1/2 and ``V`` clamped to its bit's side, so ``recon_iters=0`` returns the codes
    bit for bit. Returns ``(B, V)`` as float tensors shaped like the weight.
    """
    qp = QParams(scale, zero_point, bits, True)
    g = to_grid(w_float.detach().float(), qp)
    c = codes.float()
    up = c > g
    base = c - up.float()
    r = (g - base).clamp(0.0, 1.0)
    against = torch.where(up, r < 0.5, r >= 0.5)  # codes that are not round-to-nearest (SQuant flips)
    r = torch.where(against, 1.0 - r, r)  # mirrored: as confident as round-to-nearest would be
    r = torch.where(up, r.clamp_min(0.5 + _INIT_MARGIN), r.clamp_max(0.5 - _INIT_MARGIN))
    v = _rect_sigmoid_inverse(r)
    v = torch.where(up, v.clamp_min(1e-4), v.clamp_max(-1e-4))  # exact: V >= 0 <=> bit 1
    return base, v


class GenieLayer(nn.Module):
    """A QuantConv2d/QuantLinear during reconstruction: soft rounding, learned steps, LSQ + QDrop."""

    def __init__(self, layer: nn.Module, w_float: torch.Tensor, drop_prob: float, rng: torch.Generator):
        super().__init__()
        self.layer = layer
        self.bits = layer.w_bits
        self.qmin, self.qmax = qrange(layer.w_bits, True)
        self.is_conv = isinstance(layer, QuantConv2d)
        base, v = initial_rounding(w_float, layer.weight_int, layer.weight_scale, layer.weight_zero_point, layer.w_bits)
        view = (-1,) + (1,) * (base.dim() - 1)
        self.register_buffer("base", base)
        self.register_buffer("w_zp", layer.weight_zero_point.detach().clone().reshape(view))
        self.v = nn.Parameter(v)
        self.w_scale = nn.Parameter(layer.weight_scale.detach().clone().reshape(view))
        aq: Optional[ActQuantizer] = layer.input_quant
        if aq is not None:
            self.a_bits = aq.bits
            self.a_qmin, self.a_qmax = qrange(aq.bits, False)
            self.a_scale: Optional[nn.Parameter] = nn.Parameter(aq.scale.detach().clone())
            self.register_buffer("a_zp", aq.zero_point.detach().clone())
        else:
            self.a_scale = None
        self.soft = True
        self.drop_prob = drop_prob
        self.rng = rng

    # weights ---------------------------------------------------------------------------------
    def soft_bits(self) -> torch.Tensor:
        return _rect_sigmoid(self.v)

    def codes(self) -> torch.Tensor:
        """Hard integer codes (float tensor)."""
        return torch.clamp(self.base + (self.v >= 0).float(), self.qmin, self.qmax)

    def weight(self) -> torch.Tensor:
        q = torch.clamp(self.base + (self.soft_bits() if self.soft else (self.v >= 0).float()), self.qmin, self.qmax)
        return (q - self.w_zp) * self.w_scale.clamp_min(_EPS)

    def round_loss(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser sum(1 - |2h(V) - 1|^beta) (Eq. 24)."""
        return (1.0 - (2.0 * self.soft_bits() - 1.0).abs().pow(beta)).sum()

    # activations -----------------------------------------------------------------------------
    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_scale is None:
            return x
        xq = fake_quant(x, self.a_scale.clamp_min(_EPS), self.a_zp, self.a_qmin, self.a_qmax, ste=True)
        if self.soft and self.drop_prob > 0:  # QDrop: keep the float value with prob. drop_prob
            keep = torch.rand(x.shape, generator=self.rng, device=x.device) < self.drop_prob
            xq = torch.where(keep, x, xq)
        return xq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant_input(x)
        w = self.weight()
        lay = self.layer
        if self.is_conv:
            return F.conv2d(x, w, lay.bias, lay.stride, lay.padding, lay.dilation, lay.groups)
        return F.linear(x, w, lay.bias)

    @torch.no_grad()
    def commit(self) -> None:
        """Write the hard codes and learned steps into the wrapped quantized layer."""
        lay = self.layer
        lay.weight_int.copy_(self.codes().to(lay.weight_int.dtype))
        lay.weight_scale.copy_(self.w_scale.detach().clamp_min(_EPS).reshape(-1))
        if self.a_scale is not None:
            lay.input_quant.scale.copy_(self.a_scale.detach().clamp_min(_EPS).reshape(()))


@torch.no_grad()
def lp_act_range(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The release's activation-range start: :func:`dfquant.quantizer.lp_search` over ``[r * min(x, 0), r * max(x, 0)]``.

    The candidates are computed in double precision from Python floats (as this search first did;
    the weights' in float32), so the ranges, and every Genie model made since, stay bit for bit."""
    x = x.detach().float().reshape(1, -1)
    lo0, hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi0 - lo0 <= 0:
        return torch.tensor(lo0), torch.tensor(lo0 + 1e-6)
    ranges = ((lo0 * r, hi0 * r) for r in (k / 100.0 for k in range(100, 0, -1)))
    cands = ((torch.tensor([lo], device=x.device), torch.tensor([max(hi, lo + 1e-6)], device=x.device)) for lo, hi in ranges)
    lo, hi = lp_search(x, cands, bits, signed=False)
    return lo[0], hi[0]


@torch.no_grad()
def calibrate_activations(unit: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor) -> None:
    """``act_calib="data"``: set each layer's input range by :func:`lp_act_range` on its observed input (execution order)."""
    done = set()

    def hook(mod, args):
        if id(mod) in done or mod.input_quant is None:
            return
        done.add(id(mod))
        aq = mod.input_quant
        lo, hi = lp_act_range(args[0], aq.bits)
        qp = params_from_range(lo, torch.maximum(hi, lo + 1e-6), aq.bits, signed=False)
        aq.scale.copy_(qp.scale.reshape(()).to(aq.scale.device))
        aq.zero_point.copy_(qp.zero_point.reshape(()).to(aq.zero_point.device))

    handles = [lay.register_forward_pre_hook(hook) for lay in layers]
    try:
        unit(x.clone())  # the unit may write to its input
    finally:
        for h in handles:
            h.remove()
