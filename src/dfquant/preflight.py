"""``dfquant.inspect``: what quantizing a model will do, before doing it (a pre-flight check).

One row per layer with weights: quantized or left in float and why, its BatchNorm (foldable or not),
where its input's range comes from (BN statistics, or none: float), its CLE partner, its DF-MPC
pair, its Genie-M unit; then a summary (counts, parameters by precision) and warnings (dead BN
channels, ReLU6 blocking CLE, layers run twice, unsupported types). The quantized/float columns come
from a dry run of :func:`dfquant.quantize` with round-to-nearest and the same options, so they are
what ``quantize`` does by construction; the model is never changed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .graph import analyse, call_counts

#: A BN channel whose running variance is below this is "dead" (its weights decayed to ~0).
DEAD_VAR = 1e-8


@dataclass
class LayerRow:
    name: str
    kind: str
    shape: Tuple[int, ...]
    quantized: bool
    why_float: str = ""  # why the weights stay float
    bn: str = ""  # the BatchNorm right after it (foldable), or ""
    input: str = ""  # "BN statistics (A4)" / "float: <why>"
    cle_partner: str = ""
    dfmpc: str = ""  # "low -> X" / "high <- X" / "unpaired: why"
    genie_unit: str = ""


@dataclass
class Inspection:
    model: str
    layers: List[LayerRow]
    summary: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return self.format_table()

    def format_table(self) -> str:
        head = f"{'layer':<24} {'kind':<6} {'W':<5} {'BN':<14} {'input':<26} {'CLE partner':<18} {'DF-MPC':<22} {'Genie unit':<16}"
        lines = [f"dfquant inspect: {self.model}", head, "-" * len(head)]
        for r in self.layers:
            w = "q" if r.quantized else "float"
            lines.append(f"{r.name[:24]:<24} {r.kind:<6} {w:<5} {r.bn[:14]:<14} {r.input[:26]:<26} {r.cle_partner[:18]:<18} {r.dfmpc[:22]:<22} {r.genie_unit[:16]:<16}")
        for r in self.layers:
            if not r.quantized:
                lines.append(f"  {r.name}: weights stay float: {r.why_float}")
            elif r.input.startswith("float"):
                lines.append(f"  {r.name}: input stays float: {r.input[len('float: '):]}")
        s = self.summary
        lines.append(
            f"{s['quantized_layers']} layers quantized, {s['float_layers']} left in float; parameters: "
            f"{s['quantized_params']} quantized, {s['float_params']} float; {s['quantized_inputs']} inputs quantized, {s['float_inputs']} float"
        )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def inspect(model: nn.Module, *, input_size: Optional[Tuple[int, ...]] = None, **options: Any) -> Inspection:
    """Inspect ``model`` as :func:`dfquant.quantize` would see it with these ``options``
    (:class:`dfquant.QuantConfig` fields; the method is ignored: every method quantizes the same layers)."""
    from .api import quantize
    from .modelcheck import float32_eval_cpu

    model, _ = float32_eval_cpu(model)
    opts = {k: v for k, v in options.items() if k != "method"}
    opts.setdefault("a_bits", 4)
    if opts["a_bits"] is None:
        opts.pop("act_range", None)
    qmodel, report = quantize(model, "rtn", opts.pop("w_bits", 8), opts.pop("a_bits"), input_size=input_size, **opts)
    graph = analyse(model)
    rows = _layer_rows(model, graph, report)
    _cle_column(model, rows)
    _dfmpc_column(model, graph, rows)
    _genie_column(qmodel, rows)
    insp = Inspection(type(model).__name__, list(rows.values()))
    insp.summary = _summary(model, list(rows.values()))
    insp.warnings = _warnings(model, graph, report, rows)
    return insp


def _layer_rows(model: nn.Module, graph, report) -> Dict[str, LayerRow]:
    quantized = {l.name: l for l in report.layers}
    float_inputs = dict(report.float_inputs)
    rows: Dict[str, LayerRow] = {}
    for info in graph.layers:
        m = info.module
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        row = LayerRow(info.name, kind, tuple(m.weight.shape), info.name in quantized, bn=graph.conv_bn.get(info.name, ""))
        if not row.quantized:
            row.why_float = float_inputs.get(info.name, "skipped")
            row.input = "float (layer skipped)"
        elif quantized[info.name].a_bits is None:
            row.input = "float: " + float_inputs.get(info.name, "weight-only (a_bits=None)")
        else:
            row.input = f"quantized, A{quantized[info.name].a_bits}"
        rows[info.name] = row
    for name in graph.unsupported:
        mod = model.get_submodule(name) if name and not name.startswith("(") else model
        weight = getattr(mod, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        rows[name] = LayerRow(name, type(mod).__name__, shape, False, why_float=f"unsupported layer type {type(mod).__name__}", input="-")
    return rows


def _cle_column(model: nn.Module, rows: Dict[str, LayerRow]) -> None:
    from .dfq import equalization_pairs

    try:
        pairs, skipped = equalization_pairs(model)
    except Exception as exc:  # noqa: BLE001 - an untraceable model has no pairs; say why
        for r in rows.values():
            r.cle_partner = f"- ({str(exc).splitlines()[0][:40]})"
        return
    for p in pairs:
        if p.first in rows:
            rows[p.first].cle_partner = f"-> {p.second}"
        if p.second in rows and not rows[p.second].cle_partner:
            rows[p.second].cle_partner = f"<- {p.first}"
    for name, why in skipped:
        if name in rows and not rows[name].cle_partner:
            rows[name].cle_partner = "none: " + why


def _dfmpc_column(model: nn.Module, graph, rows: Dict[str, LayerRow]) -> None:
    from .dfmpc import plan_pairs
    from .errors import DfquantError

    try:
        plan = plan_pairs(model, graph)
    except DfquantError as exc:
        for r in rows.values():
            r.dfmpc = "- (" + str(exc)[:40] + ")"
        return
    for p in plan.pairs:
        rows[p.low].dfmpc = f"low -> {p.high}"
        rows[p.high].dfmpc = f"high <- {p.low}"
    for name, why in plan.unpaired:
        if name in rows and not rows[name].dfmpc:
            rows[name].dfmpc = "unpaired: " + why


def _genie_column(qmodel: nn.Module, rows: Dict[str, LayerRow]) -> None:
    from .genie.units import find_units

    for unit, layers in find_units(qmodel):
        for name in layers:
            if name in rows:
                rows[name].genie_unit = unit if unit != name else "(itself)"


def _summary(model: nn.Module, rows: List[LayerRow]) -> Dict[str, Any]:
    def params(r: LayerRow) -> int:
        mod = model.get_submodule(r.name) if r.name and not r.name.startswith("(") else model
        return sum(p.numel() for p in mod.parameters(recurse=False))

    q = [r for r in rows if r.quantized]
    f = [r for r in rows if not r.quantized]
    return dict(
        quantized_layers=len(q),
        float_layers=len(f),
        quantized_params=sum(params(r) for r in q),
        float_params=sum(params(r) for r in f),
        quantized_inputs=sum(1 for r in q if r.input.startswith("quantized")),
        float_inputs=sum(1 for r in q if r.input.startswith("float")),
    )


def _warnings(model: nn.Module, graph, report, rows: Dict[str, LayerRow]) -> List[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_var is not None:
            dead = int((m.running_var < DEAD_VAR).sum())
            if dead:
                out.append(f"{name}: {dead} dead BN channel(s) (running variance < {DEAD_VAR:g}); their output is the constant beta")
    if any("ReLU6" in r.cle_partner for r in rows.values()):
        out.append("ReLU6 blocks cross-layer equalization (and DF-MPC pairs): relu6_to_relu / --relu6-to-relu replaces it (changes the float model)")
    if graph.traced is not None:
        for name, n in call_counts(graph.traced).items():
            if n > 1 and name in rows:
                out.append(f"{name} runs {n} times per forward (shared weights): one activation range covers every call; not BN-folded, equalized or bias-corrected; Genie-M refuses it")
    if graph.unsupported:
        out.append("unsupported layers stay float: " + ", ".join(graph.unsupported))
    out += [n for n in report.notes if "not fx-traceable" in n]
    return out
