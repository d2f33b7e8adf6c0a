"""``dfquant.quantize``: one call from a float model to a quantized one and its report."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from .activation_ranges import propagate_bn_stats, stats_range
from .errors import DfquantError, check_bits
from .graph import analyse, fold_bn, replace_module
from .modelcheck import check_input_size, check_runs, copy_model, float32_eval_cpu
from .qmodules import ActQuantizer, QuantConv2d, QuantLinear
from .quantizer import WEIGHT_RANGES, from_grid, rtn_round, to_grid, weight_params
from .report import LayerReport, QuantReport
from .squant import rounding_error_sums, squant_round

RoundFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def _squant(kernel: bool, channel: bool) -> RoundFn:
    return lambda x, lo, hi: squant_round(x, lo, hi, kernel=kernel, channel=channel)


# Methods that decide each weight's rounding from the weight alone (no data, no training).
ROUNDING_METHODS: Dict[str, RoundFn] = {
    "rtn": rtn_round,
    "squant-e": _squant(False, False),
    "squant-k": _squant(True, False),
    "squant-c": _squant(False, True),
    "squant": _squant(True, True),
}
# Methods that start from a rounding method and then learn (need synthetic data).
LEARNED_METHODS = ("genie", "zeroq")
METHODS = tuple(ROUNDING_METHODS) + LEARNED_METHODS


def _finite_number(value: Any, positive: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and (value > 0 or not positive)


@dataclass
class QuantConfig:
    """Every setting of a quantization run (saved with the model)."""

    method: str = "squant"
    w_bits: int = 4
    a_bits: Optional[int] = 4  # None: weight-only, activations stay float
    squant_kernel: bool = True
    squant_channel: bool = True
    fold_bn: bool = False  # SQuant's protocol keeps BN separate; fold for integer deployment
    act_range: str = "dfq"  # "dfq" (beta + n*gamma) or "mse" (see activation_ranges)
    n_sigma: Optional[float] = None  # for act_range="dfq"; None: DFQ_N_SIGMA[bits]
    quantize_first_input: bool = False  # the image: left in float by the paper's protocol
    first_input_bits: int = 8
    input_range: Optional[Tuple[float, float]] = None  # the image's range, needed to quantize it
    last_input_bits: Optional[int] = 8  # the classifier's input: 8 bits by the paper's protocol
    first_last_w_bits: Optional[int] = None  # None: same as w_bits (SQuant quantizes all layers)
    # Per-layer weight bit-widths by layer name (mixed precision); they override w_bits and first_last_w_bits.
    layer_w_bits: Dict[str, int] = field(default_factory=dict)
    per_channel: bool = True  # False: one weight scale per layer (per-tensor grid, DFQ's protocol)
    # The weight grid: "minmax" (SQuant's protocol) or "lp" (the clipping search Genie's release
    # starts from). None: "lp" for the learned methods, "minmax" for the rounding methods.
    w_range: Optional[str] = None
    skip: Tuple[str, ...] = ()  # layer names to leave in float
    init: str = "rtn"  # learned methods: the rounding they start from ("rtn" or "squant")
    # DFQ baselines (Nagel et al. 2019, dfquant.dfq), for the rounding methods: cross-layer range
    # equalization of the float model before quantizing, and analytic bias correction after.
    cle: bool = False
    bias_correction: bool = False
    # DFQ's MobileNetV2 step (Sec. 5): replace nn.ReLU6 by nn.ReLU first, so CLE can pair through
    # them. It changes the float model's function, so it is never implied by cle.
    relu6_to_relu: bool = False
    # Round each bias whose layer input is quantized to its int32 accumulator grid (input scale x
    # weight scale), as integer kernels and the ONNX export add it, so the model evaluated here is
    # the deployed one. Off by default: the papers' protocols keep float biases.
    int32_bias: bool = False

    def validate(self) -> "QuantConfig":
        if self.method not in METHODS:
            raise DfquantError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        for name in ("first_input_bits", "last_input_bits", "first_last_w_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        if isinstance(self.skip, str):
            raise DfquantError(f"skip must be a list of layer names, got the string {self.skip!r} (write skip=({self.skip!r},))")
        if self.n_sigma is not None and not _finite_number(self.n_sigma, positive=True):
            raise DfquantError(f"n_sigma must be a positive finite number (n in beta + n*gamma), got {self.n_sigma!r}")
        if self.input_range is not None:
            rng = tuple(self.input_range) if isinstance(self.input_range, (tuple, list)) else ()
            if len(rng) != 2 or not all(_finite_number(v) for v in rng) or not float(rng[0]) < float(rng[1]):
                raise DfquantError(f"input_range must be two finite numbers (lo, hi) with lo < hi, got {self.input_range!r}")
        if not isinstance(self.layer_w_bits, dict):
            raise DfquantError(f"layer_w_bits must map layer names to bit-widths, got {type(self.layer_w_bits).__name__}")
        for layer, bits in self.layer_w_bits.items():
            check_bits(bits, f"the weight bit-width of layer {layer!r}")
        self.layer_w_bits = dict(self.layer_w_bits)
        if not isinstance(self.int32_bias, bool):
            raise DfquantError(f"int32_bias must be True or False, got {self.int32_bias!r}")
        if not isinstance(self.per_channel, bool):
            raise DfquantError(f"per_channel must be True (a scale per output channel) or False (one per layer), got {self.per_channel!r}")
        if self.act_range not in ("mse", "dfq"):
            raise DfquantError(f"unknown activation range rule {self.act_range!r}; choose mse or dfq")
        if self.w_range is None:
            self.w_range = "lp" if self.method in LEARNED_METHODS else "minmax"
        if self.w_range not in WEIGHT_RANGES:
            raise DfquantError(f"unknown weight range rule {self.w_range!r}; choose {' or '.join(WEIGHT_RANGES)}")
        if self.init not in ("rtn", "squant"):
            raise DfquantError(f"unknown initial rounding {self.init!r}; choose rtn or squant")
        # Settings a method would silently ignore are refused: the model would not be the one asked for.
        for name in ("cle", "bias_correction", "relu6_to_relu"):
            if getattr(self, name) and self.method in LEARNED_METHODS:
                raise DfquantError(f"{name} is a DFQ step for the rounding methods ({', '.join(ROUNDING_METHODS)}), not for {self.method!r}")
        if self.init != "rtn" and self.method not in LEARNED_METHODS:
            raise DfquantError(f"init={self.init!r} applies to the learned methods ({', '.join(LEARNED_METHODS)}) only, not to {self.method!r}")
        if self.a_bits is None:
            for name, unset in (("n_sigma", None), ("act_range", "dfq"), ("quantize_first_input", False), ("input_range", None)):
                if getattr(self, name) != unset:
                    raise DfquantError(f"{name} sets how activations are quantized, but a_bits=None quantizes none (weight-only)")
        if self.n_sigma is not None and self.act_range != "dfq":
            raise DfquantError(f"n_sigma is the n of the dfq range rule (beta + n*gamma); act_range={self.act_range!r} does not use it")
        if self.input_range is not None and not self.quantize_first_input:
            raise DfquantError("input_range is the image's range for quantize_first_input=True; the image input stays float otherwise")
        if not (self.squant_kernel and self.squant_channel) and self.method != "squant":
            raise DfquantError(
                f"squant_kernel/squant_channel switch SQuant's levels of method 'squant' only, not of {self.method!r} "
                "(the levels have their own methods: squant-e, squant-k, squant-c)"
            )
        self.skip = tuple(self.skip)
        return self

    @property
    def rounding(self) -> str:
        if self.method in ROUNDING_METHODS:
            if self.method == "squant" and not (self.squant_kernel and self.squant_channel):
                return {(True, False): "squant-k", (False, True): "squant-c", (False, False): "squant-e"}[
                    (self.squant_kernel, self.squant_channel)
                ]
            return self.method
        return self.init


def quantize(model: nn.Module, method: str = "squant", w_bits: int = 4, a_bits: Optional[int] = 4, *, input_size: Optional[Tuple[int, ...]] = None, progress: bool = False, **options: Any):
    """Quantize ``model`` without data. Returns ``(quantized_model, report)``; ``model`` is untouched.

    Weights: per-output-channel (``per_channel=False``: per-tensor) asymmetric grid, from min/max
    for the rounding methods and from the Lp clipping search for genie/zeroq (``w_range``), integer
    codes chosen by ``method``
    (``rtn``, ``squant`` with ``squant_kernel``/``squant_channel`` flags or ``squant-e/k/c``, or a
    learned method). Activations (``a_bits``): per-tensor ranges from BatchNorm statistics, set before
    any input is seen; inputs no BN statistic reaches stay float and are listed in the report.
    Other options: the fields of :class:`QuantConfig`; learned methods take theirs too.
    """
    learned_opts = {k: options.pop(k) for k in list(options) if k not in QuantConfig.__dataclass_fields__}
    cfg = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, **options).validate()
    if cfg.method not in LEARNED_METHODS and learned_opts:
        raise DfquantError(f"unknown option(s) for method {cfg.method!r}: {', '.join(sorted(learned_opts))}")
    t0 = time.perf_counter()
    input_size = check_input_size(input_size)
    model, cle_notes = float32_eval_cpu(model)
    base = model
    if cfg.relu6_to_relu:
        from .dfq import replace_relu6

        base, replaced = replace_relu6(model)
        if not replaced:
            raise DfquantError("relu6_to_relu: the model has no nn.ReLU6 module to replace")
        cle_notes.append(f"relu6_to_relu: {len(replaced)} ReLU6 modules replaced by ReLU before quantizing (DFQ Sec. 5; the float function changes)")
    if cfg.cle:  # on the float model, before anything is quantized (learned methods refuse it)
        from .dfq import equalize_cross_layer

        base, record = equalize_cross_layer(base)
        if not record.pairs:
            why = "; ".join(sorted({w for _, w in record.skipped}))[:400]
            raise DfquantError(f"cle: this model has no conv -> [BN] -> ReLU -> conv pair to equalize ({why})")
        cle_notes += [record.summary()] + [f"  not equalized: {name}: {why}" for name, why in record.skipped]
    qmodel, report = _quantize_rounding(base, cfg, input_size)
    report.notes.extend(cle_notes)
    if input_size is not None and getattr(qmodel, "input_size", None) is None:
        qmodel.input_size = input_size  # what export_onnx and the learned methods read
    if cfg.method in LEARNED_METHODS:
        from .genie import reconstruct_model  # learned refinement on synthetic data

        qmodel = reconstruct_model(model, qmodel, cfg, report, input_size=input_size, progress=progress, **learned_opts)
    if cfg.int32_bias:  # last: the learned methods change the scales the grid is made of
        n = round_biases_to_accumulator_grid(qmodel)
        report.notes.append(f"int32_bias: the biases of {n} layers with a quantized input rounded to their accumulator grid (as integer kernels add them)")
    report.total_time_s = time.perf_counter() - t0
    return qmodel, report


@torch.no_grad()
def round_biases_to_accumulator_grid(qmodel: nn.Module) -> int:
    """Round, in place, the bias of every quantized layer whose input is quantized to a multiple of
    input scale x weight scale (per output channel): the int32 grid an integer kernel accumulates
    on, and the one :func:`dfquant.export_onnx` stores biases on. Returns how many were rounded."""
    count = 0
    for layer in qmodel.modules():
        if isinstance(layer, (QuantConv2d, QuantLinear)) and layer.bias is not None and layer.input_quant is not None:
            step = (layer.input_quant.scale * layer.weight_scale).double().expand(layer.bias.shape[0])
            codes = torch.round(layer.bias.double() / step)
            if codes.abs().max() >= 2**31:
                raise DfquantError("int32_bias: a bias does not fit int32 at its accumulator scale")
            layer.bias.copy_((codes * step).to(layer.bias.dtype))
            count += 1
    return count


def _quantize_rounding(model: nn.Module, cfg: QuantConfig, input_size: Optional[Tuple[int, ...]]):
    """Replace every supported layer of a copy of ``model`` by its quantized version."""
    input_size = input_size or check_input_size(getattr(model, "input_size", None))
    if input_size is not None:
        check_runs(model, input_size)
    graph = analyse(model)
    if not graph.layers:
        raise DfquantError("the model has no Conv2d or Linear layer to quantize")
    names = {l.name for l in graph.layers}
    unknown_skip = [s for s in cfg.skip if s not in names]
    if unknown_skip:
        raise DfquantError(f"--skip names no quantizable layer: {', '.join(unknown_skip)}")
    if names <= set(cfg.skip):
        raise DfquantError("skip leaves every quantizable layer in float: there is nothing to quantize")
    unknown_bits = [s for s in cfg.layer_w_bits if s not in names]
    if unknown_bits:
        raise DfquantError(f"layer bit-widths given for no quantizable layer: {', '.join(unknown_bits)} (see the report's layer names)")
    if cfg.quantize_first_input and cfg.a_bits is not None and graph.layers[0].name in cfg.skip:
        raise DfquantError(f"quantize_first_input quantizes the input of {graph.layers[0].name}, which skip leaves in float")
    both = [s for s in cfg.layer_w_bits if s in cfg.skip]
    if both:
        raise DfquantError(f"layer(s) both skipped and given a bit-width: {', '.join(both)}")
    report = QuantReport(cfg.method, cfg.w_bits, cfg.a_bits, config=dict(cfg.__dict__), unsupported=list(graph.unsupported))
    if graph.note:
        report.notes.append(graph.note)

    ranges: Dict[str, Any] = {}
    if cfg.a_bits is not None or cfg.bias_correction:
        need = "bias correction needs" if cfg.a_bits is None else "data-free activation ranges need"
        fix = "" if cfg.a_bits is None else " (or quantize weights only: a_bits=None / --a-bits none)"
        if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            other = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
            found = f" (it has {', '.join(other)}, which dfquant does not read)" if other else ""
            raise DfquantError(f"the model has no BatchNorm2d layer{found}: {need} BatchNorm2d statistics{fix}")
        if graph.traced is None:
            raise DfquantError(f"{need} the model's graph to carry BN statistics, but torch.fx cannot trace this model's forward{fix}")
        ranges = propagate_bn_stats(graph.traced, input_size)

    qmodel = copy_model(model).eval()
    if cfg.fold_bn:
        qmodel = fold_bn(qmodel, graph)
        report.folded_bn = sorted(graph.conv_bn.values())
        if not report.folded_bn:
            why = "the model is not fx-traceable, so no pair can be found" if graph.traced is None else "no Conv2d -> BatchNorm2d pair found"
            report.notes.append(f"fold_bn: {why}; nothing was folded")
    rounding = ROUNDING_METHODS[cfg.rounding]
    first, last = graph.layers[0].name, graph.layers[-1].name
    for info in graph.layers:
        name = info.name
        layer = qmodel.get_submodule(name)
        if name in cfg.skip:
            report.float_inputs.append((name, "skipped on request (weights and input in float)"))
            continue
        w_bits = cfg.first_last_w_bits if (cfg.first_last_w_bits and name in (first, last)) else cfg.w_bits
        w_bits = cfg.layer_w_bits.get(name, w_bits)
        act, a_range, a_bits_used = _input_quantizer(name, first, last, cfg, ranges, report)
        t = time.perf_counter()
        w = layer.weight.detach()
        qp = weight_params(w, w_bits, cfg.w_range, per_channel=cfg.per_channel)
        grid = to_grid(w, qp)
        codes = rounding(grid, qp.qmin, qp.qmax)
        bias, note = None, ""
        if cfg.bias_correction:
            bias, note = _corrected_bias(layer, from_grid(codes, qp) - w, ranges.get(name))
        dt = time.perf_counter() - t
        report.weight_time_s += dt
        if isinstance(layer, nn.Conv2d):
            new = QuantConv2d(layer, codes, qp, act, bias=bias)
        else:
            new = QuantLinear(layer, codes, qp, act, bias=bias)
        replace_module(qmodel, name, new)
        k_err, c_err = rounding_error_sums(codes, grid if grid.dim() > 1 else grid.unsqueeze(1))
        rel = float((from_grid(codes, qp) - w).norm() / w.norm().clamp_min(1e-12))
        report.layers.append(
            LayerReport(name, "conv" if isinstance(layer, nn.Conv2d) else "linear", tuple(w.shape), w_bits, a_bits_used, a_range, rel, k_err, c_err, dt, note)
        )
    return qmodel, report


def _corrected_bias(layer: nn.Module, weight_error: torch.Tensor, found: Any):
    """DFQ bias correction of one layer: its new bias (None: unchanged) and a note for the report."""
    from .dfq import bias_correction

    if found is not None and found.calls > 1:
        return None, f"not bias-corrected: the layer runs {found.calls} times on different inputs (shared weights)"
    if found is None or found.stats is None:
        return None, "not bias-corrected: no BN statistic reaches its input"
    mean = found.stats.moments()[0].float()
    delta = bias_correction(weight_error, mean, getattr(layer, "groups", 1))
    old = layer.bias.detach() if layer.bias is not None else torch.zeros_like(delta)
    return old + delta, f"bias corrected (max |change| {float(delta.abs().max()):.3g})"


def _input_quantizer(name: str, first: str, last: str, cfg: QuantConfig, ranges: Dict[str, Any], report: QuantReport):
    """The activation quantizer for a layer's input (or None), following the paper's protocol."""
    if cfg.a_bits is None:
        return None, None, None
    if name == first and not cfg.quantize_first_input:
        report.float_inputs.append((name, "first layer: the image input stays float (paper protocol)"))
        return None, None, None
    bits = cfg.last_input_bits if (name == last and cfg.last_input_bits) else cfg.a_bits
    if name == first:
        bits = cfg.first_input_bits
        if cfg.input_range is not None:
            lo, hi = (float(v) for v in cfg.input_range)
            act = ActQuantizer(bits, lo, hi)
            return act, act.range, bits  # the range the grid really covers (zero made exact)
    found = ranges.get(name)
    if found is None or found.stats is None:
        why = found.reason if found is not None else "layer not reached in the traced graph"
        if name == first:  # the only input a given input_range applies to
            why += " (give input_range to quantize it)"
        report.float_inputs.append((name, why))
        return None, None, None
    lo, hi = stats_range(found.stats, bits, cfg.act_range, cfg.n_sigma)
    act = ActQuantizer(bits, lo, hi)
    return act, act.range, bits  # the range the grid really covers (zero made exact)
