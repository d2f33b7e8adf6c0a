"""Export a quantized model to ONNX with QuantizeLinear/DequantizeLinear (QDQ) nodes.

The QDQ format is how ONNX carries a quantized network to an integer runtime (ONNX Runtime,
TensorRT, OpenVINO): every quantized weight is stored as its integer codes (int8 initializers)
followed by a per-output-channel ``DequantizeLinear``, every quantized layer input is a
``QuantizeLinear`` -> ``DequantizeLinear`` pair with the layer's scale and zero point. A runtime
fuses ``DQ -> Conv`` patterns into integer kernels where it supports them and otherwise computes in
float on the exact dequantized values, so the exported file computes what the dfquant model
computes (up to float rounding of the kernels).

Codes narrower than 8 bits are carried in 8-bit containers: a weight's b-bit codes are int8 values
in ``[-2^(b-1), 2^(b-1) - 1]``; an activation input of b < 8 bits is ``QuantizeLinear`` to uint8,
then a ``Clip`` of the codes to ``[0, 2^b - 1]``, then ``DequantizeLinear``: round, add the zero
point, clamp to the b-bit range, exactly dfquant's quantizer. (A float ``Clip`` before the
``QuantizeLinear`` would say the same, but runtimes may drop a clip in front of a quantizer.) A runtime therefore sees 8-bit tensors whose values use
only 2^b levels. With ``int4_weights=True`` the weights of 2- to 4-bit layers are stored packed
as ONNX ``INT4`` tensors instead (two codes per byte, opset 21), which halves their size; ONNX
Runtime 1.32 has no int4 convolution kernel, so it dequantizes them and runs those layers in
float, where int8 containers let it fuse integer ``QLinearConv``/``QGemm`` kernels: storage size
against integer arithmetic is the user's choice.

DF-MPC's DoReFa grid (``w_grid``) has the half-integer zero point -1/2, which no ONNX zero point
is: its layers are stored as the doubled codes ``2 q + 1`` at half the scale with zero point 0, the
same values exactly (int8 up to 7 bits; DoReFa-8's doubled codes need 9 bits, so those layers are
stored as int16 codes, as a grid without 0 is below).

One deliberate difference from dfquant's (fake-quant) model: the bias of a layer whose input is
quantized is stored as int32 codes at scale input scale x weight scale, the unit of an integer
kernel's accumulator. ONNX Runtime does the same to a float bias of every conv it can run in
integers, so without it the file would mean different things to different runtimes. At 8 bits the
rounding is negligible; at 4 bits it moves some outputs by a code (``benchmarks/onnx_export.py``
measures the effect on accuracy; :func:`check_onnx` reports it). A model quantized with
``int32_bias=True`` already adds its biases on that grid, and then the file stores exactly them.
Besides, ONNX Runtime runs some convs as integer ``QLinearConv`` kernels, which round their output
to the next layer's codes once more than the QDQ graph says.

What is not quantized in the dfquant model (the image input under the paper's protocol, BatchNorm
unless the model was quantized with ``fold_bn``, ReLU, residual additions, pooling) stays in float
in the ONNX graph too. For integer deployment export with ``fold_bn=True``, which folds the BNs that
follow quantized convs into their scales and int32 biases (:func:`fold_bn_into_quant_convs`), and
optionally ``integer_adds=True``, which quantizes residual sums as well
(:func:`rewrite_for_integer_kernels`); :mod:`dfquant.io.runtime` says what ONNX Runtime then runs
as integer kernels and how fast.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import operator
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DfquantError
from ..graph import replace_module
from ..qmodules import ActQuantizer, QuantConv2d, QuantLinear, QuantShortcut, _QuantWeightLayer
from ..quantizer import qrange
from .files import atomic_write, check_writable

#: ONNX opset of the exported graph (per-axis DequantizeLinear needs >= 13).
OPSET = 18
#: The opset of a file with packed INT4 or with int16 weight codes (DequantizeLinear of INT4 and
#: INT16 tensors needs >= 21).
OPSET_WIDE_TYPES = 21
#: The "format" of the dfquant metadata stored in an exported file.
FORMAT = "dfquant-onnx-qdq-v1"


def _qd():
    """torch's ``quantized_decomposed`` ops, which the ONNX exporter writes as Q/DQ nodes."""
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

        return torch.ops.quantized_decomposed
    except (ImportError, AttributeError):
        raise DfquantError(f"this torch ({torch.__version__}) lacks the quantized_decomposed ops ONNX QDQ export uses") from None


class _QDQInput(nn.Module):
    """A layer input's quantizer as QuantizeLinear(uint8) [-> Clip of the codes] -> DequantizeLinear."""

    def __init__(self, act: ActQuantizer, layer_name: str):
        super().__init__()
        zp = int(act.zero_point)
        if not 0 <= zp <= 255:
            lo, hi = act.range
            raise DfquantError(
                f"layer {layer_name!r}: its input range [{lo:.4g}, {hi:.4g}] lies so far from 0 that the zero point {zp} "
                "does not fit ONNX's uint8 QuantizeLinear; this model cannot be exported as QDQ"
            )
        self.scale, self.zero_point, self.bits = float(act.scale), zp, act.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _qd()
        q = qd.quantize_per_tensor(x, self.scale, self.zero_point, 0, 255, torch.uint8)
        if self.bits < 8:
            q = torch.clamp(q, *qrange(self.bits, False))  # the b-bit codes inside the uint8 container
        return qd.dequantize_per_tensor(q, self.scale, self.zero_point, 0, 255, torch.uint8)


class _QDQLayer(nn.Module):
    """A QuantConv2d / QuantLinear as int8 weight codes -> DequantizeLinear(axis 0) -> Conv / Gemm
    (with the bias as int32 codes -> DequantizeLinear when the input is quantized)."""

    def __init__(self, layer: _QuantWeightLayer, name: str):
        super().__init__()
        # A per-tensor grid (one scale for the layer) is written per channel with that scale
        # repeated: the same values, one DequantizeLinear layout for every layer.
        codes, w_scale, zp = _container_codes(layer, name)
        codes, w_scale, zp, self.coarsened = _fit_bias_to_int32(layer, codes, w_scale, zp)
        # A channel whose weights all have one sign has a grid without 0: at 8 bits its zero point
        # can fall outside int8 (a folded depthwise kernel of 9 weights, say). No 8-bit container
        # with an 8-bit zero point holds such a grid, so that layer's codes and zero points are
        # stored as int16 (opset 21): the same values, which runtimes without an int16 kernel run in
        # float. Not as float values: ONNX Runtime quantizes the float weights of a conv between a
        # DequantizeLinear and a QuantizeLinear to int8 on its own (WeightBiasQuantization), after
        # folding a float BN into them, which wrecked MobileNetV1-0.75 exported without fold_bn (top-1
        # 9.6 %). Not as int32 codes: ONNX Runtime 1.32 fuses those into an 8-bit QLinearConv and
        # rejects the graph. The same holds for DoReFa-8's doubled codes (see _container_codes),
        # which span -255..255. Only codes beyond int16 (never seen) are stored as float values.
        self.wide = not _fits(codes, zp, 8)
        self.int16 = self.wide and _fits(codes, zp, 16)
        self.is_conv = isinstance(layer, QuantConv2d)
        self.folded_bn = getattr(layer, "folded_bn", None)  # the BN fold_bn_into_quant_convs folded in
        self.bn_output_stats = getattr(layer, "bn_output_stats", None)
        if self.is_conv:
            self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.register_buffer("w_scale", w_scale)
        if self.wide and not self.int16:
            self.register_buffer("weight_float", layer.weight.detach().clone())
        else:
            self.register_buffer("weight_int", codes.to(torch.int16 if self.int16 else torch.int8))
            self.register_buffer("w_zero_point", zp.to(torch.int64))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.input_qdq = None if layer.input_quant is None else _QDQInput(layer.input_quant, name)
        self.register_buffer("bias_int", None)
        self.register_buffer("bias_scale", None)
        if self.bias is not None and self.input_qdq is not None:
            # An integer kernel adds the bias to its int32 accumulator, whose unit is input scale x
            # weight scale: the bias is stored as int32 codes on that grid (what ONNX Runtime does to
            # a float bias of a QDQ conv), so every runtime adds the same values.
            self.bias_scale = (layer.input_quant.scale * w_scale).float()
            codes = torch.round(self.bias.double() / self.bias_scale.double())
            if codes.abs().max() >= 2**31:
                raise DfquantError(f"layer {name!r}: its bias does not fit int32 at scale input x weight scale")
            self.bias_int = codes.to(torch.int32)
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        qd = _qd()
        if self.wide and not self.int16:
            w = self.weight_float
        else:
            lo, hi = (-(2**15), 2**15 - 1) if self.int16 else (-128, 127)
            w = qd.dequantize_per_channel(self.weight_int, self.w_scale, self.w_zero_point, 0, lo, hi, self.weight_int.dtype)
        bias = self.bias
        if self.bias_int is not None:
            zeros = torch.zeros_like(self.bias_int, dtype=torch.int64)
            bias = qd.dequantize_per_channel(self.bias_int, self.bias_scale, zeros, 0, -(2**31), 2**31 - 1, torch.int32)
        if self.is_conv:
            return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, bias)


def _fits(codes: torch.Tensor, zp: torch.Tensor, bits: int) -> bool:
    """Whether weight codes and zero points all fit a signed ``bits``-bit container."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return bool(codes.min() >= lo and codes.max() <= hi and zp.min() >= lo and zp.max() <= hi)


def _fit_bias_to_int32(layer: _QuantWeightLayer, codes: torch.Tensor, w_scale: torch.Tensor, zp: torch.Tensor):
    """Coarsen, by a power of two, the weight grid of each channel whose bias does not fit int32 at
    the accumulator's scale (input scale x weight scale); returns (codes, scale, zero point, the
    coarsened channels).

    Such a channel has weights that are all but zero against its bias (a dead channel whose BN was
    folded: weight scale at its floor, a BN shift of order 1; MobileNetV1-0.75 has some). Its bias
    codes need ``k`` more bits than int32 has; at ``2^k`` times the scale they fit, and its weights
    become ``round((q - z) / 2^k)`` with zero point 0: they move by at most half the new step, a
    contribution of order ``2^-31`` of the bias, while every other channel stays exact."""
    if layer.bias is None or layer.input_quant is None:
        return codes, w_scale, zp, []
    step = float(layer.input_quant.scale) * w_scale.double()
    need = layer.bias.detach().double().abs() / step / (2**31 - 2**20)  # a margin for the float32 scale
    k = torch.where(need > 1, torch.ceil(torch.log2(need.clamp_min(1))), torch.zeros_like(need))
    bad = k > 0
    if not bool(bad.any()):
        return codes, w_scale, zp, []
    factor = torch.pow(2.0, k)
    view = (-1,) + (1,) * (codes.dim() - 1)
    shifted = torch.round((codes - zp.reshape(view)).double() / factor.reshape(view)).to(torch.int64)
    codes = torch.where(bad.reshape(view), shifted, codes)
    return codes, (w_scale.double() * factor).float(), torch.where(bad, 0, zp), torch.nonzero(bad).flatten().tolist()


def _container_codes(layer: _QuantWeightLayer, name: str):
    """(codes, per-channel scale, per-channel zero point) of a layer's weight as the file stores them.

    Whole zero points: the layer's own. DoReFa's half-integer zero point -1/2 (``w_grid``; ONNX zero
    points are integers, and rounding it would store other weights): the same values as the codes
    ``2 q - 2 z`` (odd integers) at scale ``s / 2`` with zero point 0, exactly, since
    ``(2q - 2z) * (s / 2) = (q - z) * s`` and halving a float scale is exact. They fit int8 up to
    7 bits; at 8 bits they span -255..255 and the layer is stored as int16 codes instead."""
    out_ch = layer.weight_int.shape[0]
    zp = layer.weight_zero_point.detach().double().expand(out_ch)
    w_scale = layer.weight_scale.detach().expand(out_ch).clone()
    codes = layer.weight_int.detach().to(torch.int64)
    if bool((zp == zp.round()).all()):
        return codes, w_scale, zp.round().to(torch.int64)
    if not bool(((2 * zp) == (2 * zp).round()).all()):
        raise DfquantError(f"layer {name!r}: its weight zero points are neither whole nor half-integers; no ONNX grid holds them")
    view = (-1,) + (1,) * (codes.dim() - 1)
    doubled = 2 * codes - (2 * zp).to(torch.int64).reshape(view)
    return doubled, w_scale / 2, torch.zeros(out_ch, dtype=torch.int64)


def qdq_model(qmodel: nn.Module, fold_bn: bool = False, integer_adds: bool = False) -> nn.Module:
    """A copy of ``qmodel`` whose quantized layers are written with Q/DQ ops (what gets exported);
    with ``fold_bn``, every float BatchNorm that directly follows a quantized conv is folded into it
    first (:func:`fold_bn_into_quant_convs`); with ``integer_adds`` (needs ``fold_bn``) the
    operands of residual sums are quantized too (:func:`rewrite_for_integer_kernels`, an fx GraphModule)."""
    if integer_adds and not fold_bn:
        raise DfquantError("integer_adds needs fold_bn=True: a float BatchNorm after the residual conv would stand between it and its quantizer", param="integer_adds")
    found = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    if not found:
        raise DfquantError("the model has no dfquant quantized layer: quantize it (dfquant.quantize) before exporting")
    out = copy.deepcopy(qmodel).eval()
    if fold_bn:
        fold_bn_into_quant_convs(out)
        found = [(n, m) for n, m in out.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    for name, layer in found:
        replace_module(out, name, _QDQLayer(layer, name))
    for name, m in out.named_modules():  # quantize_shortcuts: the shortcut's Q/DQ pair, the block input's scale
        if isinstance(m, QuantShortcut):
            m.input_quant = _QDQInput(m.input_quant, name)
    out.requires_grad_(False)
    if fold_bn:
        out = rewrite_for_integer_kernels(out, integer_adds)
    return out


class _QDQTensor(nn.Module):
    """An 8-bit QuantizeLinear(uint8) -> DequantizeLinear of a tensor dfquant's model keeps float."""

    def __init__(self, scale: float, zero_point: int, why: str):
        super().__init__()
        self.scale, self.zero_point, self.why = float(scale), int(zero_point), why

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _qd()
        q = qd.quantize_per_tensor(x, self.scale, self.zero_point, 0, 255, torch.uint8)
        return qd.dequantize_per_tensor(q, self.scale, self.zero_point, 0, 255, torch.uint8)


class _QDQTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_QDQLayer, _QDQInput)) or super().is_leaf_module(m, qualname)


_ADDS = (operator.add, operator.iadd, torch.add)
_MOVES = (operator.getitem, F.pad, torch.flatten)  # ops that move values without computing new ones


def rewrite_for_integer_kernels(m: nn.Module, integer_adds: bool = False) -> nn.Module:
    """Place Q/DQ pairs (in the export's graph ``m``) where a runtime needs them to fuse integer kernels.

    Always (exact): a zero padding in front of an 8-bit quantized layer (TensorFlow's "same"
    padding of MobileNetV1's stride-2 convs) gets that layer's QuantizeLinear -> DequantizeLinear
    in front of it too. The pad's zeros are on the grid, so quantizing before and after the pad
    gives the same values, and ONNX Runtime can then run the pad on the uint8 codes and the conv
    before it with a quantized output. ``gm.requantized_pads`` counts them.

    With ``integer_adds``, quantize both operands of every residual sum ``conv(...) + skip`` at 8
    bits, so that a runtime can run the conv as an integer kernel with a quantized output and the
    sum as ``QLinearAdd``. A deviation from dfquant's model, which keeps residual sums in float (SQuant and Genie quantize
    layer inputs only): two more roundings per block. The conv's output (its folded BN's output) gets
    a uint8 grid from that BN's statistics, ``N(beta, gamma^2)`` per channel, by the MSE range rule
    of :func:`dfquant.activation_ranges.stats_range` (the library's data-free input ranges); the skip
    gets the grid of the 8-bit quantizer that already reads it (the next block's first conv), so the
    sum adds exactly what that conv sees. A sum whose conv has no folded BN statistics or whose skip
    has no 8-bit quantizer keeps that operand float (``residual_adds`` in the export summary).
    The result records what it did in ``gm.residual_adds``: one ``{"add", "quantized", "why"}`` each.
    Returns ``m`` itself when there is nothing to do (or, without ``integer_adds``, when it does not
    fx-trace), else an fx GraphModule.
    """
    from ..activation_ranges import ChannelStats, stats_range

    try:
        graph = _QDQTracer().trace(m)
    except Exception as exc:
        if not integer_adds:
            return m
        raise DfquantError(f"integer_adds needs an fx-traceable model: {_first_line(exc)}", param="integer_adds") from None
    gm = fx.GraphModule(m, graph, type(m).__name__)
    mods = dict(gm.named_modules())
    pads = _quantize_before_pads(gm, mods)
    if not integer_adds:
        if not pads:
            return m
        gm.graph.lint()
        gm.recompile()
        gm.requantized_pads, gm.residual_adds = pads, []
        return gm

    def through(node, moves):  # walk back through Identity modules (folded BNs) and value moves
        while isinstance(node, fx.Node) and ((node.op == "call_module" and isinstance(mods.get(node.target), (nn.Identity, nn.Sequential)))
                                             or (moves and node.op == "call_function" and node.target in _MOVES)):
            node = node.args[0]
        return node

    def quantized_conv(node):
        n = through(node, False)
        mod = mods.get(n.target) if isinstance(n, fx.Node) and n.op == "call_module" else None
        return mod if isinstance(mod, _QDQLayer) and mod.is_conv else None

    def skip_grid(node):
        src = through(node, True)
        for user in src.users if isinstance(src, fx.Node) else ():
            mod = mods.get(user.target) if user.op == "call_module" else None
            if isinstance(mod, _QDQLayer) and mod.input_qdq is not None and mod.input_qdq.bits == 8:
                return mod.input_qdq.scale, mod.input_qdq.zero_point
        return None

    done = []
    for k, node in enumerate([n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ADDS]):
        args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        convs = [quantized_conv(a) for a in args]
        if len(args) != 2 or not any(convs):
            continue  # not a residual sum of a quantized conv
        i = 0 if convs[0] is not None else 1
        conv, res, skip = convs[i], args[i], args[1 - i]
        stats = getattr(conv, "bn_output_stats", None)
        if stats is None:
            done.append({"add": node.name, "quantized": False, "why": "the residual conv has no folded BN statistics to set its output's range from (export with fold_bn a model that kept its BN)"})
            continue
        lo, hi = stats_range(ChannelStats(stats[0], stats[1]), 8, "mse")
        act = ActQuantizer(8, min(lo, 0.0), max(hi, 0.0))
        grid = skip_grid(skip)
        pairs = [(res, (float(act.scale), int(act.zero_point)), "residual conv output, range from its BN statistics")]
        if grid is not None:
            pairs.append((skip, grid, "skip, the grid of the 8-bit quantizer that reads it"))
        for j, (arg, (scale, zp), why) in enumerate(pairs):
            name = f"residual_qdq_{k}_{j}"
            gm.add_submodule(name, _QDQTensor(scale, zp, why))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (arg,))
            node.replace_input_with(arg, new)
        done.append({"add": node.name, "quantized": grid is not None,
                     "why": "" if grid is not None else "its skip has no 8-bit quantizer to share (activations below 8 bits): the sum stays float"})
    gm.graph.lint()
    gm.recompile()
    gm.requantized_pads, gm.residual_adds = pads, done
    return gm


def _quantize_before_pads(gm: fx.GraphModule, mods: Dict[str, nn.Module]) -> int:
    """Insert an 8-bit quantized layer's Q/DQ in front of the zero padding that feeds it (exact: see
    :func:`rewrite_for_integer_kernels`); returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        mod = mods.get(node.target) if node.op == "call_module" else None
        if not (isinstance(mod, _QDQLayer) and mod.input_qdq is not None and mod.input_qdq.bits == 8 and node.args):
            continue
        pad = node.args[0]
        if not (isinstance(pad, fx.Node) and pad.op == "call_function" and pad.target is F.pad and len(pad.users) == 1
                and pad.kwargs.get("mode", "constant") == "constant" and pad.kwargs.get("value") in (None, 0, 0.0)
                and len(pad.args) == 2 and isinstance(pad.args[0], fx.Node)):
            continue
        name = f"pad_qdq_{count}"
        gm.add_submodule(name, _QDQTensor(mod.input_qdq.scale, mod.input_qdq.zero_point, f"{node.target}'s input quantizer, before its zero padding"))
        with gm.graph.inserting_before(pad):
            new = gm.graph.call_module(name, (pad.args[0],))
        pad.replace_input_with(pad.args[0], new)
        count += 1
    return count


class _QuantTracer(fx.Tracer):
    """fx's tracer with dfquant's quantized layers and BatchNorm kept as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_QuantWeightLayer, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def quant_conv_bn_pairs(qmodel: nn.Module) -> Dict[str, str]:
    """Quantized conv name -> the float BatchNorm2d (running statistics) that directly and only
    follows it, each run once: the BNs an export can fold. {} when the model does not fx-trace."""
    try:
        graph = _QuantTracer().trace(qmodel)
    except Exception:
        return {}
    modules = dict(qmodel.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = {}
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None or not node.args:
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), QuantConv2d)
                and len(src.users) == 1 and calls[src.target] == calls[node.target] == 1):
            pairs[src.target] = node.target
    return pairs


def fold_bn_into_quant_convs(qmodel: nn.Module) -> Dict[str, str]:
    """Fold, in place, every BN of :func:`quant_conv_bn_pairs` into its quantized conv; returns the pairs.

    Exact algebra on the grid, the codes unchanged: with ``a = gamma / sqrt(var + eps)`` per output
    channel, ``a (q - z) s = (q - z) (a s)``, so the channel's weight scale becomes ``|a| s`` and
    the bias ``beta + (b - mean) a`` (computed in float64). A channel with a negative ``a`` keeps a
    positive scale (what integer kernels expect) and takes the codes and zero point negated,
    ``(-q - (-z)) |a| s``. A negated lowest code ``-2^(b-1)`` would be ``2^(b-1)``, one past the
    b-bit range (128 for int8); such a channel has its codes and zero point both shifted down by
    one, ``(-q - 1) - (-z - 1)``, the same values, so the layer keeps its int8 (or int4) container.
    A channel with ``a = 0`` gets codes and zero point 0 (its weights are exactly 0) at its old scale.
    The BN's output statistics ``(beta, |gamma|)`` are kept on the conv as ``bn_output_stats``.
    """
    pairs = quant_conv_bn_pairs(qmodel)
    for conv_name, bn_name in pairs.items():
        conv, bn = qmodel.get_submodule(conv_name), qmodel.get_submodule(bn_name)
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(bn.num_features, dtype=torch.float64)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(bn.num_features, dtype=torch.float64)
        a = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
        out_ch = conv.weight_int.shape[0]
        sign = torch.where(a < 0, -1, 1).to(torch.int64)
        dead = a == 0
        view = (-1,) + (1,) * (conv.weight_int.dim() - 1)
        codes = conv.weight_int.to(torch.int64) * sign.reshape(view)
        # (-q + c) - (-z + c) = z - q for any whole c: shift a negated channel down by one where its
        # codes would otherwise reach 2^(b-1) (the negated -2^(b-1)), so they stay in the container.
        top = qrange(conv.w_bits, True)[1]
        shift = ((sign < 0) & (codes.flatten(1).amax(1) > top)).to(torch.int64)
        codes = (codes - shift.reshape(view)).masked_fill(dead.reshape(view), 0)
        zp = (conv.weight_zero_point.double().expand(out_ch) * sign - shift).masked_fill(dead, 0)
        scale = conv.weight_scale.double().expand(out_ch)
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(out_ch, dtype=torch.float64)
        conv.weight_int = codes.to(torch.int16)  # _QDQLayer checks the container range
        conv.weight_scale = torch.where(dead, scale, scale * a.abs()).float()
        conv.weight_zero_point = zp.float()
        conv.bias = nn.Parameter((beta + (bias - bn.running_mean.double()) * a).float(), requires_grad=False)
        conv.folded_bn = bn_name  # read by _QDQLayer, for the export summary
        conv.bn_output_stats = (beta.float(), gamma.abs().float())  # the BN output's N(beta, gamma^2): rewrite_for_integer_kernels
        replace_module(qmodel, bn_name, nn.Identity())
    return pairs


def require_onnx() -> None:
    """Clear error when the optional export packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the torch.onnx exporter needs it)
    except ImportError:
        raise DfquantError("ONNX export needs the onnx and onnxscript packages: pip install 'dfquant[onnx]'") from None


def check_output_path(path: "str | Path") -> Path:
    """The output path, or a clear error when it does not end in .onnx or its folder is missing."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise DfquantError(f"the ONNX output file must end in .onnx, got {path.name}")
    check_writable(path)
    return path


def export_onnx(
    qmodel: nn.Module,
    path: "str | Path",
    input_size: Optional[Sequence[int]] = None,
    *,
    dynamic_batch: bool = True,
    metadata: Optional[Dict[str, Any]] = None,
    int4_weights: bool = False,
    fold_bn: bool = False,
    integer_adds: bool = False,
) -> Dict[str, Any]:
    """Write ``qmodel`` (from :func:`dfquant.quantize` or a loaded save) to ``path`` as an ONNX QDQ model.

    ``input_size`` is (C, H, W), default the model's ``input_size``; the batch dimension is dynamic
    unless ``dynamic_batch=False``. The file is written atomically. Returns a summary: the path,
    the opset, how many weights are stored as int8 codes (and which layers' as int16 codes: an
    8-bit grid without 0, see ``_QDQLayer``; the file then has opset 21), how many layer inputs are quantized, the count of each ONNX op, and
    how many BatchNormalization ops stay float (export or quantize with ``fold_bn=True`` for integer deployment).
    ``metadata`` (JSON-able: model name, config) is stored in the file's metadata under "dfquant".
    ``int4_weights``: store the codes of every layer of 4 bits or fewer as packed INT4 (opset 21;
    see the module docstring for what that costs in ONNX Runtime); a layer whose per-channel zero
    point lies outside [-8, 7] (a grid that does not contain 0) keeps its int8 container.
    ``fold_bn``: fold every float BatchNorm that directly follows a quantized conv (SQuant's
    protocol keeps them) into that conv's per-channel weight scale and int32 bias
    (:func:`fold_bn_into_quant_convs`), so that no float op stands between a conv and the next
    layer's QuantizeLinear and a runtime can fuse them into an integer kernel; ``folded_bn`` in
    the summary counts them. ``integer_adds`` (with ``fold_bn``): quantize the operands of residual
    sums at 8 bits too (:func:`rewrite_for_integer_kernels`: a deviation from dfquant's model, which
    :func:`check_onnx` measures), so that the residual convs and sums can run as integer kernels;
    ``residual_adds`` in the summary says what each sum got. Both settings are stored in the file's
    metadata (``export``), which :func:`check_onnx` reads.
    """
    require_onnx()
    import onnx

    path = check_output_path(path)
    input_size = _input_size(qmodel, input_size)
    _qd()  # the ops must be registered before the exporter builds its table of ONNX functions
    m = qdq_model(qmodel, fold_bn=fold_bn, integer_adds=integer_adds)
    layers = {name: mod for name, mod in m.named_modules() if isinstance(mod, _QDQLayer)}
    int16 = [name for name, mod in layers.items() if mod.int16]
    opset = OPSET_WIDE_TYPES if int4_weights or int16 else OPSET
    program = _run_exporter(m, input_size, opset, dynamic_batch)
    model = program.model_proto
    _strip_exporter_notes(model)
    packed = _pack_int4_weights(model) if int4_weights else []
    doc = dict(metadata or {}, format=FORMAT, input_size=list(input_size), export={"fold_bn": fold_bn, "integer_adds": integer_adds})
    onnx.helper.set_model_props(model, {"dfquant": json.dumps(doc, default=str)})
    onnx.checker.check_model(model)
    try:
        atomic_write(path, lambda p: onnx.save_model(model, str(p)))
    except OSError as exc:  # a write that failed after the checks (a full disk, ...)
        raise DfquantError(f"cannot write {path}: {exc.strerror or exc}") from None
    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "path": str(path),
        "opset": opset,
        "int8_weights": sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2),
        "int4_weights": len(packed),
        "quantized_inputs": ops.get("QuantizeLinear", 0),  # quantize nodes: layers reading one tensor share one
        "ops": dict(sorted(ops.items())),
        "float_batchnorm": ops.get("BatchNormalization", 0),
        "residual_adds": getattr(m, "residual_adds", []),
        "requantized_pads": getattr(m, "requantized_pads", 0),
        "folded_bn": sum(1 for _, mod in m.named_modules() if isinstance(mod, _QDQLayer) and mod.folded_bn is not None),
        "int16_weights": int16,
        "float_weights": [name for name, mod in layers.items() if mod.wide and not mod.int16],
        "coarsened_channels": {name: mod.coarsened for name, mod in m.named_modules() if isinstance(mod, _QDQLayer) and mod.coarsened},
        "bytes": path.stat().st_size,
    }


def _run_exporter(m: nn.Module, input_size, opset: int, dynamic_batch: bool):
    """torch's (dynamo) ONNX exporter on ``m``, its output quiet and its errors one line."""
    x = torch.zeros(2, *input_size)
    dyn = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    with _quiet_exporter():
        try:
            return torch.onnx.export(m, (x,), dynamo=True, opset_version=opset, input_names=["x"], output_names=["logits"], dynamic_shapes=dyn)
        except Exception as exc:
            why = _first_line(_root_cause(exc))
            if "data-dependent" in why:
                why += " (the forward branches on tensor values, e.g. `if x.sum() > 0`: an exported graph cannot)"
            raise DfquantError(f"the ONNX exporter could not convert this model: {why}") from None


def float_twin(qmodel: nn.Module) -> nn.Module:
    """A float copy of a quantized model: every quantized layer an ``nn.Conv2d`` / ``nn.Linear``
    with its dequantized weight and bias and no input quantizer. It has the quantized model's
    architecture and op count (the float baseline a speed comparison needs); it computes with the
    quantized weights, so it is not the original float model."""
    out = copy.deepcopy(qmodel).eval()
    for name, layer in [(n, m) for n, m in out.named_modules() if isinstance(m, _QuantWeightLayer)]:
        bias = layer.bias is not None
        if isinstance(layer, QuantConv2d):
            new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups, bias=bias)
        else:
            new = nn.Linear(layer.in_features, layer.out_features, bias=bias)
        with torch.no_grad():
            new.weight.copy_(layer.weight.reshape(new.weight.shape))
            if bias:
                new.bias.copy_(layer.bias)
        replace_module(out, name, new)
    return out.requires_grad_(False)


def export_float_onnx(model: nn.Module, path: "str | Path", input_size: Optional[Sequence[int]] = None, *, dynamic_batch: bool = True) -> Dict[str, Any]:
    """Write a float model to ``path`` with the exporter :func:`export_onnx` uses (same opset,
    input/output names, dynamic batch), no Q/DQ: the float baseline of a deployment comparison.
    Returns ``path``, ``opset``, ``ops`` and ``bytes``."""
    require_onnx()
    import onnx

    path = check_output_path(path)
    input_size = _input_size(model, input_size)
    model = model.eval()
    program = _run_exporter(model, input_size, OPSET, dynamic_batch)
    proto = program.model_proto
    _strip_exporter_notes(proto)
    onnx.checker.check_model(proto)
    try:
        atomic_write(path, lambda p: onnx.save_model(proto, str(p)))
    except OSError as exc:
        raise DfquantError(f"cannot write {path}: {exc.strerror or exc}") from None
    ops = Counter(n.op_type for n in proto.graph.node)
    return {"path": str(path), "opset": OPSET, "ops": dict(sorted(ops.items())), "bytes": path.stat().st_size}


def _input_size(model: nn.Module, input_size) -> tuple:
    input_size = tuple(input_size or getattr(model, "input_size", None) or ())
    if len(input_size) != 3:
        raise DfquantError(
            f"ONNX export takes image models: give the input size as (C, H, W), got {input_size}"
            if input_size
            else "give the model's input size (C, H, W): the model does not record one",
            param="input_size",
        )
    return input_size


def _strip_exporter_notes(model) -> None:
    """Drop the notes torch's exporter attaches to every node (the FX node, module path and Python
    stack trace): they are for debugging the exporter, carry the paths of this machine's source
    files into a file meant to be shipped, and made up about 40 % of a ResNet-20's bytes."""
    for graph in [model.graph, *model.functions]:
        for node in graph.node:
            del node.metadata_props[:]


def _pack_int4_weights(model) -> list:
    """Store, in ``model``, the weight codes of every int8 weight DequantizeLinear whose codes and
    zero points all fit [-8, 7] (layers of 2-4 bits) as packed INT4 tensors, the zero point too
    (DequantizeLinear wants both of one type). The node gets new initializers (the exporter may
    share one constant between nodes); int8 ones no node uses any more are dropped. Returns the
    names of the packed weight tensors."""
    import ml_dtypes
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    packed = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        w, zp = inits.get(node.input[0]), inits.get(node.input[2])
        if w is None or zp is None or w.data_type != TensorProto.INT8 or len(w.dims) < 2:
            continue
        codes, zeros = numpy_helper.to_array(w), numpy_helper.to_array(zp)
        if codes.min() < -8 or codes.max() > 7 or zeros.min() < -8 or zeros.max() > 7:
            continue
        for i, values in ((0, codes), (2, zeros)):
            name = f"{node.input[i]}_int4"
            if name not in inits:
                inits[name] = numpy_helper.from_array(values.astype(ml_dtypes.int4), name)
                graph.initializer.append(inits[name])
            node.input[i] = name
        packed.append(node.input[0])
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return packed


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _read_file_metadata(path: Path, text: Optional[str]) -> Dict[str, Any]:
    """The dfquant metadata of an ONNX file ({} for a file dfquant did not write), checked for the
    keys readers use: a damaged entry is one clear error, not a failure later."""
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except ValueError:
        raise DfquantError(f"{path}: its dfquant metadata is not valid JSON (damaged or edited file)") from None
    if not isinstance(meta, dict):
        raise DfquantError(f"{path}: its dfquant metadata must be a JSON object, found a {type(meta).__name__}")
    for key, kind in (("config", dict), ("model_name", str), ("input_size", list), ("export", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise DfquantError(f"{path}: dfquant metadata {key!r} must be a {kind.__name__}, found {meta[key]!r}")
    size = meta.get("input_size")
    if size is not None and not (len(size) == 3 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)):
        raise DfquantError(f"{path}: dfquant metadata 'input_size' must be three positive integers, found {size!r}")
    return meta


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception behind ``exc``: the exporter wraps what went wrong (e.g. data-dependent
    control flow in the model's forward) in a page of generic advice."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _first_line(exc: BaseException) -> str:
    """The first line of an exporter/runtime error (their messages are pages long), without colour codes."""
    text = str(exc).strip()
    return _ANSI.sub("", text.splitlines()[0]) if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter narrates its steps on stdout and logs warnings (no torchvision): keep output clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


#: What :func:`check_onnx` accepts of the file against the export's own graph in torch: integer
#: kernels round each conv's output once more, which can move a value within rounding of a step by
#: one code, and that grows through the layers (ResNet-20 W4A4 on 64 random inputs: 6 % of the largest
#: output, one arg-max in 64); a wrong scale or zero point gives differences of the output's own size.
CHECK_TOLERANCE = {"rel_max_diff": 0.1, "argmax_agreement": 0.95}


def check_onnx(qmodel: nn.Module, path: "str | Path", inputs: torch.Tensor) -> Dict[str, Any]:
    """Run the exported file with ONNX Runtime on ``inputs`` and compare it with two references.

    ``file``: torch running the export's own graph (:func:`qdq_model`, biases on the int32 grid):
    checks that the file computes what was meant; they differ by float summation order and by the
    output rounding of the convs ONNX Runtime runs as integer ``QLinearConv``, either of which can
    move a value lying within rounding of a step boundary by one code. ``model``: dfquant's
    quantized model: adds the int32 bias rounding every integer runtime applies, unless the model
    was quantized with ``int32_bias=True`` (then its biases are already on that grid).
    Each: the largest absolute output difference, that relative to the largest output, and the
    fraction of inputs whose arg-max agrees; ``verdict``: ``"ok"`` when the ``file`` comparison is
    within :data:`CHECK_TOLERANCE`, else ``"differs"``, and ``tolerance``: that tolerance.
    The ``file`` reference is built with the export settings stored in the file (``fold_bn``,
    ``integer_adds``); the ``model`` comparison then includes what ``integer_adds`` changes.
    """
    inputs = inputs.float()
    runtime = OnnxRuntimeModel(path)
    got = runtime(inputs)
    settings = runtime.metadata.get("export") or {}
    with torch.no_grad():
        file_graph = qdq_model(qmodel, fold_bn=bool(settings.get("fold_bn")), integer_adds=bool(settings.get("integer_adds")))
        refs = {"file": file_graph(inputs), "model": qmodel.eval()(inputs)}
    out: Dict[str, Any] = {"n": int(inputs.shape[0])}
    for key, want in refs.items():
        if got.shape != want.shape:
            raise DfquantError(f"the ONNX file's output shape {tuple(got.shape)} differs from the model's {tuple(want.shape)}")
        diff = float((got - want).abs().max())
        out[key] = {
            "max_abs_diff": diff,
            "rel_max_diff": diff / max(float(want.abs().max()), 1e-12),
            "argmax_agreement": float((got.argmax(1) == want.argmax(1)).float().mean()),
        }
    f = out["file"]
    ok = f["rel_max_diff"] <= CHECK_TOLERANCE["rel_max_diff"] and f["argmax_agreement"] >= CHECK_TOLERANCE["argmax_agreement"]
    out.update(verdict="ok" if ok else "differs", tolerance=dict(CHECK_TOLERANCE))
    return out


class OnnxRuntimeModel(nn.Module):
    """An exported .onnx file run by ONNX Runtime, callable like the torch model (for evaluation).

    ``metadata`` is what :func:`export_onnx` stored (model name, config), or {} for a file that
    dfquant did not write.
    """

    def __init__(self, path: "str | Path", threads: Optional[int] = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise DfquantError("running an ONNX file needs onnxruntime: pip install 'dfquant[onnx]'") from None
        path = Path(path)
        if not path.is_file():
            raise DfquantError(f"ONNX file not found: {path}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise DfquantError(f"{path} is not an ONNX model onnxruntime can run: {_first_line(exc)}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata: Dict[str, Any] = _read_file_metadata(path, props.get("dfquant"))
        self.input_name = self.session.get_inputs()[0].name
        size = self.metadata.get("input_size")
        if size:
            self.input_size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the file on ``x`` (sent as float32); inputs the file cannot take (a wrong shape, a
        fixed batch size, another input type) give one DfquantError, not onnxruntime's traceback."""
        try:
            out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})
        except Exception as exc:  # onnxruntime's InvalidArgument / Fail / ... derive from Exception only
            want = ", ".join(str(d) if d is not None else "?" for d in (self.session.get_inputs()[0].shape or []))
            raise DfquantError(
                f"the ONNX model cannot run on these inputs of shape {tuple(x.shape)}: {_first_line(exc)} "
                f"(the file's input {self.input_name!r} has shape ({want}))"
            ) from None
        return torch.from_numpy(out[0])
