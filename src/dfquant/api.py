"""``dfquant.quantize``: one call from a float model to a quantized one and its report.

The pipeline: check and copy the caller's model (it is never changed), build the configs (validated
once), run the DFQ steps on the float model if asked, carry BN statistics to every layer input,
quantize each supported layer's weights with the rounding method (codes on a min/max or Lp grid,
or on one of DF-MPC's per-tensor grids), run DF-MPC's compensation step where asked, then give
every layer its input quantizer (from the compensated statistics), and, for the learned methods,
refine the result with Genie-M on synthetic images. Reading and writing files (synthetic images
given as files, ``save_synthetic``) happens here, never inside a method.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .activation_ranges import calibrate_on_noise, propagate_bn_stats, stats_range
from .config import (
    DFMPC_METHOD,
    LEARNED_METHODS,
    METHODS,
    QUANT_FIELDS,
    ROUNDING_METHODS,
    QuantConfig,
    default_a_bits,
    protocol_settings,
)
from .dfmpc import (
    DFMPC_FIELDS,
    DfmpcConfig,
    DfmpcPlan,
    DfmpcRecord,
    check_low_bits,
    compensate,
    compensated_input_stats,
    plan_pairs,
)
from .dfq import bias_correction, equalize_cross_layer, replace_relu6
from .errors import DfquantError
from .genie.config import GENIE_FIELDS, SYNTHESIS_FIELDS, GenieConfig
from .graph import (
    Shortcuts,
    alias_map,
    analyse,
    fold_bn_in_place,
    rebind,
    replace_module,
    residual_shortcuts,
    traced_shapes,
)
from .modelcheck import check_input_size, check_runs, copy_model, float32_eval_cpu
from .qmodules import ActQuantizer, QuantConv2d, QuantLinear, QuantShortcut
from .quantizer import from_grid, grid_codes, grid_params, rtn_round, to_grid, weight_params
from .report import STAGES, LayerReport, QuantReport, stage
from .squant import rounding_error_sums, squant_round

__all__ = ["quantize", "QuantConfig", "DfmpcConfig", "METHODS", "ROUNDING", "round_biases_to_accumulator_grid"]

RoundFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def _squant(kernel: bool, channel: bool) -> RoundFn:
    return lambda x, lo, hi: squant_round(x, lo, hi, kernel=kernel, channel=channel)


#: The rounding function of each rounding method (grid units in, integer codes out).
ROUNDING: Dict[str, RoundFn] = {
    "rtn": rtn_round,
    "squant-e": _squant(False, False),
    "squant-k": _squant(True, False),
    "squant-c": _squant(False, True),
    "squant": _squant(True, True),
}
assert tuple(ROUNDING) == ROUNDING_METHODS

_UNSET: Any = object()
#: Options of the learned methods that are data, not settings: the images to use or where to save them.
DATA_OPTIONS = ("synthetic", "save_synthetic")
#: The GenieConfig settings DF-MPC's images take (Genie-D's); the rest are Genie-M's.
SYNTHESIS_OPTIONS = ("samples",) + SYNTHESIS_FIELDS


def _configs(method: Any, bits: Dict[str, Any], given: Dict[str, Any], options: Dict[str, Any], data: Dict[str, Any]):
    """The validated configs of one call, ``(QuantConfig, GenieConfig or None, DfmpcConfig or None)``:
    keyword options build them, configs given (``given["genie"]``, ``given["dfmpc"]``) are used as given."""
    genie_opts = {k: options.pop(k) for k in list(options) if k in GENIE_FIELDS}
    dfmpc_opts = {k: options.pop(k) for k in list(options) if k in DFMPC_FIELDS}
    cfg = _quant_config(method, bits, options)
    dcfg = _dfmpc_config(cfg, given.get("dfmpc"), dfmpc_opts)
    gcfg = _genie_config(cfg, dcfg, given.get("genie"), genie_opts, data)
    return cfg, gcfg, dcfg


def _quant_config(method: Any, bits: Dict[str, Any], options: Dict[str, Any]) -> QuantConfig:
    """The QuantConfig given, or built from the method, bits (a_bits: :func:`default_a_bits`) and options."""
    if isinstance(method, QuantConfig):
        given = [n for n, v in bits.items() if v is not _UNSET] + sorted(options)
        if given:
            raise DfquantError(f"quantize got a QuantConfig and also {', '.join(given)}: set them in the config", param=given[0])
        return method.validate()
    unknown = sorted(k for k in options if k not in QUANT_FIELDS)
    if unknown:
        raise DfquantError(f"unknown option(s) for method {method!r}: {', '.join(unknown)}", param=unknown[0])
    chosen = {k: v for k, v in bits.items() if v is not _UNSET}
    if "a_bits" not in chosen and isinstance(method, str):
        chosen["a_bits"] = default_a_bits(method)
    # the protocol's settings, where the call does not give them
    options = dict(protocol_settings(options.get("protocol"), chosen.get("a_bits", 4)), **options)
    return QuantConfig(method=method, **chosen, **options).validate()


def _dfmpc_config(cfg: QuantConfig, given: Optional[DfmpcConfig], opts: Dict[str, Any]) -> Optional[DfmpcConfig]:
    """DF-MPC's step: always for method dfmpc, for a rounding method when its config or an option is given."""
    if given is not None and not isinstance(given, DfmpcConfig):
        raise DfquantError(f"dfmpc must be a DfmpcConfig, got {type(given).__name__}", param="dfmpc")
    asked = sorted(opts) + (["dfmpc"] if given is not None else [])
    if cfg.method in LEARNED_METHODS and asked:
        raise DfquantError(
            f"{', '.join(asked)} {'belong' if len(asked) > 1 else 'belongs'} to DF-MPC, which runs as method dfmpc or as a step "
            f"after a rounding method ({', '.join(ROUNDING_METHODS)}), not with {cfg.method!r}",
            param=tuple(asked),
        )
    if cfg.method != DFMPC_METHOD and not asked:
        return None
    dcfg = dataclasses.replace(given if given is not None else DfmpcConfig(), **opts).validate()
    check_low_bits(dcfg.low_bits, cfg.w_bits)
    return dcfg


def _genie_config(cfg: QuantConfig, dcfg: Optional[DfmpcConfig], given: Optional[GenieConfig], opts: Dict[str, Any], data: Dict[str, Any]) -> Optional[GenieConfig]:
    """Genie's settings: for the learned methods, and Genie-D's alone for a DF-MPC step that needs images."""
    learned = cfg.method in LEARNED_METHODS
    if not learned and not (dcfg is not None and dcfg.needs_images):
        extra = sorted(opts) + [k for k in DATA_OPTIONS if data.get(k) is not None] + (["genie"] if given is not None else [])
        if extra:
            images = set(extra) <= set(SYNTHESIS_OPTIONS + DATA_OPTIONS)
            hint = "; DF-MPC's compensation='fitted' and bn_recal='synthetic' take the synthesis options" if images else ""
            raise DfquantError(
                f"{', '.join(extra)} {'apply' if len(extra) > 1 else 'applies'} only to the learned methods ({' and '.join(LEARNED_METHODS)}), "
                f"not to {cfg.method!r} (it uses no data and no training{hint})",
                param=tuple(extra),
            )
        return None
    if given is not None and not isinstance(given, GenieConfig):
        raise DfquantError(f"genie must be a GenieConfig, got {type(given).__name__}", param="genie")
    gcfg = dataclasses.replace(given if given is not None else GenieConfig(), **opts).validate()
    if not learned:
        _check_synthesis_only(given, opts)
        return gcfg
    if cfg.a_bits is None and gcfg.act_calib is not None:
        raise DfquantError("act_calib sets where the activation steps start, but a_bits=None quantizes no activation", param="act_calib")
    if (gcfg.act_calib or "data") == "data" and (cfg.n_sigma is not None or cfg.act_range != "dfq"):
        raise DfquantError(
            "n_sigma / act_range set the BN-statistics activation ranges, which act_calib='data' (the default) "
            "replaces by a search on the synthetic images: use them with act_calib='bn'",
            param="n_sigma" if cfg.n_sigma is not None else "act_range",
        )
    return gcfg


def _check_synthesis_only(given: Optional[GenieConfig], opts: Dict[str, Any]) -> None:
    """A DF-MPC step synthesizes images but reconstructs nothing: Genie-M's settings would be ignored."""
    unused = sorted(k for k in opts if k not in SYNTHESIS_OPTIONS)
    if given is not None:
        default = GenieConfig()
        unused += [f for f in GENIE_FIELDS if f not in SYNTHESIS_OPTIONS and f not in unused and getattr(given, f) != getattr(default, f)]
    if unused:
        raise DfquantError(
            f"{', '.join(unused)} {'set' if len(unused) > 1 else 'sets'} Genie-M's reconstruction, which only the learned methods "
            f"({' and '.join(LEARNED_METHODS)}) run; DF-MPC's images take Genie-D's settings only (samples, distill_iters, seed, device, budget)",
            param=unused[0],
        )


def _check_given_options(cfg: QuantConfig, given: Dict[str, Any]) -> None:
    """Options given explicitly that this run would ignore are refused."""
    if cfg.a_bits is None and "last_input_bits" in given:
        raise DfquantError("last_input_bits sets the classifier input's bits, but a_bits=None quantizes no input", param="last_input_bits")


@dataclass
class _DfmpcStep:
    """DF-MPC's compensation step of one run: its config and how to get its images (called only when needed)."""

    config: DfmpcConfig
    images: Callable[[], Tuple[torch.Tensor, Dict[str, Any]]]


def quantize(model: nn.Module, method: Any = "squant", w_bits: Any = _UNSET, a_bits: Any = _UNSET, *, input_size: Optional[Tuple[int, ...]] = None, progress: bool = False, genie: Optional[GenieConfig] = None, dfmpc: Optional[DfmpcConfig] = None, synthetic: Any = None, save_synthetic: Any = None, **options: Any):
    """Quantize ``model`` without data. Returns ``(quantized_model, report)``; ``model`` is untouched.

    ``method`` is a method name (with ``w_bits``, default 4, ``a_bits``, default 4 and ``None``
    (weight-only) for dfmpc, and any :class:`QuantConfig`, :class:`dfquant.dfmpc.DfmpcConfig` or, for
    genie/zeroq, :class:`GenieConfig` field as a keyword option) or a whole :class:`QuantConfig` (then
    ``genie=GenieConfig(...)`` for the learned methods, ``dfmpc=DfmpcConfig(...)`` for DF-MPC).
    Weights: per-output-channel (``per_channel=False``: per-tensor) asymmetric grid from min/max
    (rounding methods) or the Lp clipping search (genie/zeroq), or a per-tensor ``w_grid`` (TWN,
    DoReFa; dfmpc's default), integer codes chosen by the method. DF-MPC (``method="dfmpc"``, or a
    rounding method with ``compensation=`` / ``bn_recal=`` / ``low_bits=``): layer pairs, the low
    layers at ``low_bits``, each low layer's error compensated through its BN (see
    :mod:`dfquant.dfmpc`). Activations (``a_bits``): per-tensor ranges from BatchNorm statistics
    (compensated ones after DF-MPC), set before any input is seen; inputs no BN statistic reaches
    stay float and are listed in the report. Learned methods and DF-MPC with ``compensation="fitted"``
    or ``bn_recal="synthetic"`` synthesize their images (Genie-D), or take ``synthetic`` (a
    (N, C, H, W) tensor or image files), and save them to ``save_synthetic``. ``input_size``
    (C, H, W) is needed where the registry does not know the model.
    """
    given = dict(options)
    data = dict(synthetic=synthetic, save_synthetic=save_synthetic)
    cfg, gcfg, dcfg = _configs(method, dict(w_bits=w_bits, a_bits=a_bits), dict(genie=genie, dfmpc=dfmpc), options, data)
    _check_given_options(cfg, given)
    if gcfg is not None:
        from .learned import check_data_options

        check_data_options(gcfg, data)
    t0 = time.perf_counter()
    times: Dict[str, float] = {}
    caller = model
    with stage(times, "check"):
        input_size = check_input_size(input_size)
        model, notes = float32_eval_cpu(model)
    with stage(times, "graph"):  # the one trace of the call
        graph = analyse(model)
    with stage(times, "float_steps"):
        base, step_notes = _dfq_float_steps(model, graph, cfg)
    if base is not model:  # a copy with the same graph: rebound, not traced again
        graph = rebind(graph, base)
    step = None
    if dcfg is not None:  # images from the caller's float model, as the learned methods take them
        step = _DfmpcStep(dcfg, lambda: _dfmpc_images(model, gcfg, data, input_size, progress))
    # base is the call's own copy (float32/eval, relu6_to_relu, CLE) when it is not the given model: quantized in
    # place unless DF-MPC or the learned methods read the float model afterwards
    owned = base is not caller and step is None and cfg.method not in LEARNED_METHODS
    qmodel, report = _quantize_rounding(base, graph, cfg, _Run(input_size, times, owned), step)
    report.notes.extend(notes + step_notes)
    if input_size is not None and getattr(qmodel, "input_size", None) is None:
        qmodel.input_size = input_size  # what export_onnx and the learned methods read
    if gcfg is not None and cfg.method in LEARNED_METHODS:
        from .learned import learn

        with stage(times, "learned"):
            learn(model, qmodel, cfg, gcfg, report, input_size=input_size, data=data, progress=progress)
    if cfg.int32_bias:  # last: the learned methods and DF-MPC change the scales the grid is made of
        with stage(times, "int32_bias"):
            n = round_biases_to_accumulator_grid(qmodel)
        report.notes.append(f"int32_bias: the biases of {n} layers with a quantized input rounded to their accumulator grid (as integer kernels add them)")
    report.total_time_s = time.perf_counter() - t0
    report.stage_times = {k: times[k] for k in STAGES if k in times}
    return qmodel, report


def _dfmpc_images(model: nn.Module, gcfg: GenieConfig, data: Dict[str, Any], input_size, progress: bool):
    """DF-MPC's synthetic images (Genie-D, or the given ones) and what the report says of them."""
    from .learned import images_for

    images, info, elapsed, resolved, dev = images_for(model, "genie", gcfg, data, input_size, progress)
    info.update(seed=resolved.seed, budget=resolved.budget, device=str(dev), synthesis_time_s=elapsed)
    return images, info


def _dfq_float_steps(model: nn.Module, graph, cfg: QuantConfig) -> Tuple[nn.Module, list]:
    """DFQ's steps on the float model (Nagel et al. 2019, Sec. 4.1, 5): ReLU6 -> ReLU, then CLE.
    ``graph``: :func:`dfquant.graph.analyse` of ``model`` (ReLU6 -> ReLU keeps the graph)."""
    base, notes = model, []
    if cfg.relu6_to_relu:
        base, replaced = replace_relu6(model)
        if not replaced:
            raise DfquantError("relu6_to_relu: the model has no nn.ReLU6 module to replace", param="relu6_to_relu")
        notes.append(f"relu6_to_relu: {len(replaced)} ReLU6 modules replaced by ReLU before quantizing (DFQ Sec. 5; the float function changes)")
    if cfg.cle:  # on the float model, before anything is quantized (learned methods refuse it)
        base, record = equalize_cross_layer(base, graph=graph)
        if not record.pairs:
            why = "; ".join(sorted({w for _, w in record.skipped}))[:400]
            raise DfquantError(f"cle: this model has no conv -> [BN] -> ReLU -> conv pair to equalize ({why})", param="cle")
        notes += [record.summary()] + [f"  not equalized: {name}: {why}" for name, why in record.skipped]
    return base, notes


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
                raise DfquantError("int32_bias: a bias does not fit int32 at its accumulator scale", param="int32_bias")
            layer.bias.copy_((codes * step).to(layer.bias.dtype))
            count += 1
    return count


def _check_layer_names(cfg: QuantConfig, names: list) -> None:
    """``skip`` and ``layer_w_bits`` must name quantizable layers, and leave something to quantize."""
    unknown_skip = [s for s in cfg.skip if s not in names]
    if unknown_skip:
        raise DfquantError(f"skip names no quantizable layer: {', '.join(unknown_skip)}", param="skip")
    if set(names) <= set(cfg.skip):
        raise DfquantError("skip leaves every quantizable layer in float: there is nothing to quantize", param="skip")
    unknown_bits = [s for s in cfg.layer_w_bits if s not in names]
    if unknown_bits:
        raise DfquantError(f"layer bit-widths given for no quantizable layer: {', '.join(unknown_bits)} (see the report's layer names)", param="layer_w_bits")
    if cfg.quantize_first_input and cfg.a_bits is not None and names[0] in cfg.skip:
        raise DfquantError(f"quantize_first_input quantizes the input of {names[0]}, which skip leaves in float", param="quantize_first_input")
    both = [s for s in cfg.layer_w_bits if s in cfg.skip]
    if both:
        raise DfquantError(f"layer(s) both skipped and given a bit-width: {', '.join(both)}", param="skip")


def _needs_bn_stats(cfg: QuantConfig) -> bool:
    """Whether the activation ranges or bias correction read BN statistics."""
    return (cfg.a_bits is not None and cfg.act_range != "squant") or cfg.bias_correction


def _bn_ranges(model: nn.Module, graph, cfg: QuantConfig, input_size, shapes) -> Dict[str, Any]:
    """BN statistics carried to every layer input, when activations or bias correction need them."""
    if not _needs_bn_stats(cfg):
        return {}
    need = "bias correction needs" if cfg.a_bits is None else "data-free activation ranges need"
    fix = "" if cfg.a_bits is None else " (or quantize weights only: a_bits=None)"
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        other = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
        found = f" (it has {', '.join(other)}, which dfquant does not read)" if other else ""
        raise DfquantError(f"the model has no BatchNorm2d layer{found}: {need} BatchNorm2d statistics{fix}")
    if graph.traced is None:
        raise DfquantError(f"{need} the model's graph to carry BN statistics, but torch.fx cannot trace this model's forward{fix}")
    return propagate_bn_stats(graph.traced, input_size, shapes)


@dataclass
class _Run:
    """What one call's steps share: the input size, the stage times (:data:`dfquant.report.STAGES`),
    and whether the model given to :func:`_quantize_rounding` is the call's own copy, quantized in place."""

    input_size: Optional[Tuple[int, ...]]
    times: Dict[str, float]
    owned: bool = False


def _forward_shapes(model: nn.Module, graph, input_size, shapes: bool) -> Optional[Dict[str, Any]]:
    """One all-zero input through the model: a wrong input_size is a clear error, not a
    half-analysed graph; with ``shapes`` (the BN statistics will need them), through the traced
    graph, so that the same forward gives every node's shape."""
    if input_size is None:
        return None
    if shapes and graph.traced is not None:
        try:
            return traced_shapes(graph.traced, input_size)
        except Exception:  # noqa: BLE001 - the model's own forward says what is wrong, or runs
            pass
    check_runs(model, input_size)
    return None


def _quantize_rounding(model: nn.Module, graph, cfg: QuantConfig, run: _Run, step: Optional[_DfmpcStep] = None):
    """Replace every supported layer of a copy of ``model`` (``graph``: its analysis) by its
    quantized version (weights, then DF-MPC's ``step`` if any, then the input quantizers)."""
    times = run.times
    input_size = run.input_size or check_input_size(getattr(model, "input_size", None))
    with stage(times, "forward"):
        moments = step is not None and step.config.bn_recal == "moments"
        shapes = _forward_shapes(model, graph, input_size, _needs_bn_stats(cfg) or moments)
    if not graph.layers:
        raise DfquantError("the model has no Conv2d or Linear layer to quantize")
    _check_layer_names(cfg, [l.name for l in graph.layers])
    plan = None
    if step is not None:  # pairs on the float model, after relu6_to_relu and CLE, before folding
        plan = _dfmpc_plan(model, graph, cfg, step.config)
        cfg = _with_low_bits(cfg, plan, step.config)
    report = QuantReport(cfg.method, cfg.w_bits, cfg.a_bits, config=cfg.to_dict(), unsupported=list(graph.unsupported))
    if graph.note:
        report.notes.append(graph.note)
    shortcuts = _shortcuts(model, graph, cfg)
    with stage(times, "bn_stats"):
        ranges = _bn_ranges(model, graph, cfg, input_size, shapes)
    with stage(times, "copy"):
        qmodel = _working_copy(model, graph, cfg, report, run.owned)
    with stage(times, "layers"):
        ends = (graph.layers[0].name, graph.layers[-1].name)
        names = alias_map(qmodel)
        for info in graph.layers:
            if info.name not in cfg.skip:
                _quantize_layer(qmodel, info.name, cfg, ends, ranges, report, names)
    times["layers"] -= report.weight_time_s
    times["weights"] = report.weight_time_s
    if step is not None:
        with stage(times, "compensation"):
            stats = ranges or (propagate_bn_stats(graph.traced, input_size, shapes) if moments else None)
            record = _compensate_step(model, qmodel, plan, cfg, step, stats, report)
            ranges = compensated_input_stats(ranges, record) if ranges else ranges
    with stage(times, "inputs"):
        _quantize_inputs(qmodel, graph, cfg, ranges, report, shortcuts)
        if cfg.act_range == "squant" and cfg.a_bits is not None:
            _noise_ranges(qmodel, cfg, input_size, ends[0], report)
    return qmodel, report


def _noise_ranges(qmodel: nn.Module, cfg: QuantConfig, input_size, first: str, report: QuantReport) -> None:
    """``act_range="squant"``: every input range from one pass of uniform noise through the quantized
    model, the SQuant authors' rule (:func:`dfquant.activation_ranges.calibrate_on_noise`); after
    DF-MPC's compensation, so the ranges see the compensated layers."""
    if input_size is None:
        raise DfquantError("act_range='squant' runs the model on a batch of noise of its input's shape: give input_size, e.g. (3, 32, 32)", param="input_size")
    fixed = (first,) if cfg.quantize_first_input and cfg.input_range is not None else ()
    found = calibrate_on_noise(qmodel, input_size, a_bits=cfg.a_bits, s=cfg.noise_s, seed=cfg.noise_seed, fixed=fixed)
    rows = {r.name: r for r in report.layers}
    for name, r in found.items():
        rows[name].a_range = r.range
    s = next(iter(found.values())).s
    report.notes.append(f"act_range squant: {len(found)} input ranges from one batch of uniform noise (seed {cfg.noise_seed}), alpha = {s:g} * std (SQuant authors' rule)")


def _working_copy(model: nn.Module, graph, cfg: QuantConfig, report: QuantReport, owned: bool) -> nn.Module:
    """The eval-mode copy of ``model`` that gets the quantized layers (BN folded into it with
    ``fold_bn``): one copy, folded in place; ``model`` itself when ``owned`` (the call's own copy)."""
    qmodel = (model if owned else copy_model(model)).eval()
    if cfg.fold_bn:
        qmodel = fold_bn_in_place(qmodel, graph)
        report.folded_bn = sorted(graph.conv_bn.values())
        if not report.folded_bn:
            why = "the model is not fx-traceable, so no pair can be found" if graph.traced is None else "no Conv2d -> BatchNorm2d pair found"
            report.notes.append(f"fold_bn: {why}; nothing was folded")
    return qmodel


def _dfmpc_plan(model: nn.Module, graph, cfg: QuantConfig, dcfg: DfmpcConfig) -> DfmpcPlan:
    """DF-MPC's pairs (:func:`dfquant.dfmpc.plan_pairs`), or one error when none can be compensated."""
    param = "method" if cfg.method == DFMPC_METHOD else "compensation"
    who = "method dfmpc" if cfg.method == DFMPC_METHOD else f"the DF-MPC step (compensation={dcfg.compensation!r})"
    if graph.traced is None:
        raise DfquantError(f"{who} pairs layers from the model's graph, but torch.fx cannot trace this model's forward", param=param)
    plan = plan_pairs(model, graph)
    if any(p.low not in cfg.skip for p in plan.pairs):
        return plan
    if plan.pairs:
        why = f"the low layers of all its pairs are skipped ({', '.join(p.low for p in plan.pairs)})"
    else:
        why = "; ".join(sorted({w for _, w in plan.unpaired}))[:400]
    hint = " (relu6_to_relu=True replaces ReLU6 by ReLU first, as DFQ does)" if "ReLU6" in why and not cfg.relu6_to_relu else ""
    raise DfquantError(f"{who}: the model has no compensable pair conv -> BN -> [ReLU] -> conv or linear: {why}{hint}", param=param)


def _with_low_bits(cfg: QuantConfig, plan: DfmpcPlan, dcfg: DfmpcConfig) -> QuantConfig:
    """The config with the pairs' low layers at ``low_bits`` in ``layer_w_bits`` (so the saved config
    gives every layer's bits); ``layer_w_bits`` may not give a low layer other bits."""
    if dcfg.low_bits is None:
        return cfg
    lows = [p.low for p in plan.pairs if p.low not in cfg.skip]
    clash = [n for n in lows if cfg.layer_w_bits.get(n, dcfg.low_bits) != dcfg.low_bits]
    if clash:
        raise DfquantError(
            f"layer_w_bits gives {clash[0]} {cfg.layer_w_bits[clash[0]]} bits, but it is the low layer of a DF-MPC pair, "
            f"which low_bits={dcfg.low_bits} sets",
            param="layer_w_bits",
        )
    return dataclasses.replace(cfg, layer_w_bits={**cfg.layer_w_bits, **{n: dcfg.low_bits for n in lows}})


def _compensate_step(model: nn.Module, qmodel: nn.Module, plan: DfmpcPlan, cfg: QuantConfig, step: _DfmpcStep, stats, report: QuantReport) -> DfmpcRecord:
    """DF-MPC's compensation of ``qmodel`` (weights quantized, inputs still float), recorded in ``report``."""
    images, data_info = step.images() if step.config.needs_images else (None, None)
    record = compensate(model, qmodel, plan, step.config, folded=cfg.fold_bn, stats=stats, images=images)
    report.notes.extend(record.lines())
    info = dict(step.config.to_dict(), **record.to_dict())
    if data_info is not None:
        info["data"] = data_info
    report.config["dfmpc"] = info
    rows = {r.name: r for r in report.layers}
    for p in record.pairs:
        for name, text in ((p.low, f"DF-MPC low layer, pair with {p.high}: c {p.c_min:.3g}..{p.c_max:.3g}"), (p.high, f"DF-MPC high layer after {p.low}")):
            if name in rows:
                rows[name].note = (rows[name].note + "; " if rows[name].note else "") + text
    return record


def _weight_codes(w: torch.Tensor, w_bits: int, cfg: QuantConfig):
    """(integer codes, QParams, grid units) of one weight: the rounding method on the config's grid."""
    grid_name = cfg.layer_grid(w_bits)
    if grid_name is None:
        qp = weight_params(w, w_bits, cfg.w_range, per_channel=cfg.per_channel)
        grid = to_grid(w, qp)
        return ROUNDING[cfg.rounding](grid, qp.qmin, qp.qmax), qp, grid
    qp = grid_params(w, w_bits, grid_name)  # rtn: the grid's own rule (TWN's threshold, DoReFa's nearest level)
    codes = grid_codes(w, qp, grid_name, None if cfg.rounding == "rtn" else ROUNDING[cfg.rounding])
    return codes, qp, to_grid(w, qp)


def _quantize_layer(qmodel: nn.Module, name: str, cfg: QuantConfig, ends: Tuple[str, str], ranges: Dict[str, Any], report: QuantReport, names=None) -> None:
    """Quantize one layer's weights in ``qmodel`` in place and add its line to the report (its input
    quantizer comes later, :func:`_quantize_inputs`). ``names``: :func:`dfquant.graph.alias_map` of ``qmodel``."""
    layer = qmodel.get_submodule(name)
    w_bits = cfg.first_last_w_bits if (cfg.first_last_w_bits and name in ends) else cfg.w_bits
    w_bits = cfg.layer_w_bits.get(name, w_bits)
    t = time.perf_counter()
    w = layer.weight.detach()
    codes, qp, grid = _weight_codes(w, w_bits, cfg)
    bias, note, error = None, "", None
    if cfg.bias_correction:
        error = from_grid(codes, qp) - w
        bias, note = _corrected_bias(layer, error, ranges.get(name))
    dt = time.perf_counter() - t
    error = from_grid(codes, qp) - w if error is None else error
    report.weight_time_s += dt
    kind = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    replace_module(qmodel, name, kind(layer, codes, qp, None, bias=bias), names)
    k_err, c_err = rounding_error_sums(codes, grid if grid.dim() > 1 else grid.unsqueeze(1))
    rel = float(error.norm() / w.norm().clamp_min(1e-12))
    report.layers.append(LayerReport(name, "conv" if kind is QuantConv2d else "linear", tuple(w.shape), w_bits, None, None, rel, k_err, c_err, dt, note))


def _shortcuts(model: nn.Module, graph, cfg: QuantConfig) -> Optional[Shortcuts]:
    """``quantize_shortcuts``: where the residual shortcuts are (:func:`dfquant.graph.residual_shortcuts`),
    checked before any weight is quantized; None when the run quantizes no shortcut."""
    if not cfg.quantize_shortcuts or cfg.a_bits is None:
        return None
    param = "protocol" if cfg.protocol == "genie" else "quantize_shortcuts"
    if graph.traced is None:
        raise DfquantError(f"{param}: quantizing residual shortcuts needs the model's graph, but torch.fx cannot trace this model's forward", param=param)
    found = residual_shortcuts(model, graph.traced, [l.name for l in graph.layers if l.name not in cfg.skip])
    if found.bare:
        raise DfquantError(
            f"{param}: the residual add(s) {', '.join(found.bare)} take the block input directly, with no shortcut module to hold its "
            "quantizer; write the shortcut as a module (the Genie release's models use identity = self.identity(x), an nn.Identity), "
            "or use protocol='dfquant'",
            param=param,
        )
    return found


def _quantize_inputs(qmodel: nn.Module, graph, cfg: QuantConfig, ranges: Dict[str, Any], report: QuantReport, shortcuts: Optional[Shortcuts] = None) -> None:
    """Give every quantized layer its input quantizer, in layer order, and fill in the report's rows
    (with ``shortcuts``: layers reading one tensor share the first one's quantizer, and each
    shortcut module gets its block input's)."""
    names = [l.name for l in graph.layers]
    ends = (names[0], names[1] if len(names) > 1 else None, names[-1])
    rows = {r.name: r for r in report.layers}
    for name in names:
        if name in cfg.skip:
            report.float_inputs.append((name, "skipped on request (weights and input in float)"))
            continue
        owner = shortcuts.shared.get(name) if shortcuts is not None else None
        if owner is not None and qmodel.get_submodule(owner).input_quant is not None:
            act = qmodel.get_submodule(owner).input_quant
            a_range, a_bits = act.range, act.bits
            rows[name].note = (rows[name].note + "; " if rows[name].note else "") + f"input quantizer shared with {owner} (the same tensor)"
        else:
            act, a_range, a_bits = _input_quantizer(name, ends, cfg, ranges, report)
        if act is not None:
            qmodel.get_submodule(name).input_quant = act
        rows[name].a_bits, rows[name].a_range = a_bits, a_range
    if shortcuts is not None:
        _quantize_shortcuts(qmodel, shortcuts, report)


def _quantize_shortcuts(qmodel: nn.Module, shortcuts: Shortcuts, report: QuantReport) -> None:
    """Wrap each shortcut module in a :class:`QuantShortcut` holding its block input's quantizer."""
    done = []
    for name, owner in shortcuts.modules.items():
        act = qmodel.get_submodule(owner).input_quant
        if act is None:
            report.float_inputs.append((name, f"residual shortcut left float: {owner}, which reads the same block input, has a float input"))
            continue
        replace_module(qmodel, name, QuantShortcut(qmodel.get_submodule(name), act))
        done.append(f"{name} ({owner}'s, {act.bits} bits)")
    report.float_inputs += [(n, "residual shortcut left float: its block input feeds no quantized layer") for n in shortcuts.unquantized]
    if done:
        report.notes.append(f"quantize_shortcuts: {len(done)} residual shortcuts quantized with their block input's quantizer: " + ", ".join(done))


def _corrected_bias(layer: nn.Module, weight_error: torch.Tensor, found: Any):
    """DFQ bias correction of one layer: its new bias (None: unchanged) and a note for the report."""
    if found is not None and found.calls > 1:
        return None, f"not bias-corrected: the layer runs {found.calls} times on different inputs (shared weights)"
    if found is None or found.stats is None:
        return None, "not bias-corrected: no BN statistic reaches its input"
    mean = found.stats.moments()[0].float()
    delta = bias_correction(weight_error, mean, getattr(layer, "groups", 1))
    old = layer.bias.detach() if layer.bias is not None else torch.zeros_like(delta)
    return old + delta, f"bias corrected (max |change| {float(delta.abs().max()):.3g})"


def _input_quantizer(name: str, ends: Tuple[str, str], cfg: QuantConfig, ranges: Dict[str, Any], report: QuantReport):
    """The activation quantizer for a layer's input (or None), following the paper's protocol."""
    first, second, last = ends
    if cfg.a_bits is None:
        return None, None, None
    if name == first and not cfg.quantize_first_input:
        report.float_inputs.append((name, "first layer: the image input stays float (paper protocol)"))
        return None, None, None
    bits = cfg.a_bits
    if name == second and cfg.second_input_bits:
        bits = cfg.second_input_bits
    if name == last and cfg.last_input_bits:
        bits = cfg.last_input_bits
    if name == first:
        bits = cfg.first_input_bits
        if cfg.input_range is not None:
            act = ActQuantizer(bits, *cfg.input_range)
            return act, act.range, bits  # the range the grid really covers (zero made exact)
    if cfg.act_range == "squant":  # a placeholder: _noise_ranges sets it
        return ActQuantizer(bits, 0.0, 1.0), None, bits
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
