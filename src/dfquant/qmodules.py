"""Quantized layers: integer weight codes + per-channel scales, and an input (activation) quantizer.

These modules are the artefact every method produces: a method only decides the integer codes
(and, for learned methods, the scales). They compute in float ("fake quantization") on the exact
values an integer kernel would see, keep the codes as int8 buffers, and save/load exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizer import QParams, code_dtype, fake_quant, from_grid, params_from_range, qrange


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with a fixed range ``[lo, hi]`` (unsigned codes)."""

    def __init__(self, bits: int, lo: float, hi: float):
        super().__init__()
        qp = params_from_range(torch.tensor(float(lo)), torch.tensor(float(max(hi, lo + 1e-6))), bits, signed=False)
        self.bits = bits
        self.register_buffer("scale", qp.scale.reshape(()))
        self.register_buffer("zero_point", qp.zero_point.reshape(()))

    @property
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.bits, False)

    @property
    def range(self):
        qmin, qmax = qrange(self.bits, False)
        return float((qmin - self.zero_point) * self.scale), float((qmax - self.zero_point) * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.scale, self.zero_point, *qrange(self.bits, False))

    def extra_repr(self) -> str:
        lo, hi = self.range
        return f"bits={self.bits}, range=[{lo:.4g}, {hi:.4g}]"


class _QuantWeightLayer(nn.Module):
    """Shared part of QuantConv2d / QuantLinear: int codes, per-channel scale and zero point, bias."""

    def __init__(self, weight_codes: torch.Tensor, qp: QParams, bias: Optional[torch.Tensor], input_quant: Optional[ActQuantizer]):
        super().__init__()
        self.w_bits = qp.bits
        self.register_buffer("weight_int", weight_codes.round().to(code_dtype(qp.bits, True)))
        self.register_buffer("weight_scale", qp.scale.detach().float().reshape(-1).clone())
        self.register_buffer("weight_zero_point", qp.zero_point.detach().float().reshape(-1).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_quant = input_quant

    @property
    def weight_qparams(self) -> QParams:
        return QParams(self.weight_scale, self.weight_zero_point, self.w_bits, True)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, exactly what an integer kernel computes with."""
        return from_grid(self.weight_int, self.weight_qparams)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)


class QuantConv2d(_QuantWeightLayer):
    def __init__(self, conv: nn.Conv2d, weight_codes: torch.Tensor, qp: QParams, input_quant: Optional[ActQuantizer] = None, bias: Optional[torch.Tensor] = None):
        super().__init__(weight_codes, qp, conv.bias if bias is None else bias, input_quant)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError("only zero padding is supported")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Conv2d's name (calls by keyword)
        return F.conv2d(self._quant_input(input), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, w_bits={self.w_bits}"


class QuantLinear(_QuantWeightLayer):
    def __init__(self, linear: nn.Linear, weight_codes: torch.Tensor, qp: QParams, input_quant: Optional[ActQuantizer] = None, bias: Optional[torch.Tensor] = None):
        super().__init__(weight_codes, qp, linear.bias if bias is None else bias, input_quant)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's name (calls by keyword)
        return F.linear(self._quant_input(input), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w_bits={self.w_bits}"


QUANT_LAYERS = (QuantConv2d, QuantLinear)


class QuantShortcut(nn.Module):
    """A residual shortcut that sees its block input quantized: ``inner(input_quant(x))``.

    ``input_quant`` is the very :class:`ActQuantizer` of the block's first layer (the object, not a
    copy), so the residual add receives the block input on the grid the block's convs read it on:
    the Genie release's protocol (``reconstruct.py`` ``QuantizableLayer.forward``, whose
    ``tensor_quantizer`` makes every layer reading one tensor, its ``nn.Identity`` shortcut
    included, share one quantizer). ``inner`` is the float model's shortcut (``nn.Identity``, an
    option-A subsample-and-pad), which commutes with the quantizer (zero is on the grid)."""

    def __init__(self, inner: nn.Module, input_quant: ActQuantizer):
        super().__init__()
        self.inner = inner
        self.input_quant = input_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.input_quant(x))

    def extra_repr(self) -> str:
        return f"bits={self.input_quant.bits} (the block input's quantizer)"
