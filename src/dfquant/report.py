"""What a quantization run did, per layer, in a form for people (a table) and machines (a dict)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

#: The stages of one ``dfquant.quantize`` call, in order, as ``QuantReport.stage_times`` names them
#: (seconds; a stage the call does not run is absent): checks (and a float32/CPU/eval copy where
#: needed), the fx trace and analysis, the float model's DFQ steps (ReLU6 -> ReLU, CLE), one forward
#: (input_size check and traced shapes), BN statistics carried to every layer input, the working
#: copy with BN folded, the weights' grids and codes (with bias correction: ``weight_time_s``), the
#: layer swaps and per-layer report rows, DF-MPC's compensation, the input quantizers (and the noise
#: pass of ``act_range="squant"``), the learned methods' Genie-M, the int32 bias rounding.
STAGES = ("check", "graph", "float_steps", "forward", "bn_stats", "copy", "weights", "layers", "compensation", "inputs", "learned", "int32_bias")


@contextmanager
def stage(times: Dict[str, float], name: str) -> Iterator[None]:
    """Add the time the ``with`` block takes to ``times[name]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t


@dataclass
class LayerReport:
    name: str
    kind: str  # "conv" / "linear"
    shape: Tuple[int, ...]
    w_bits: int
    a_bits: Optional[int]  # None: input left in float
    a_range: Optional[Tuple[float, float]]
    rel_weight_error: float  # ||W_q - W|| / ||W||
    kernel_err_max: float  # max over kernels of |sum of rounding errors| (grid units)
    channel_err_max: float  # max over output channels of |sum of rounding errors| (grid units)
    time_s: float
    note: str = ""


@dataclass
class QuantReport:
    method: str
    w_bits: int
    a_bits: Optional[int]
    config: Dict[str, Any]
    layers: List[LayerReport] = field(default_factory=list)
    unsupported: List[str] = field(default_factory=list)  # weight-bearing modules left in float
    float_inputs: List[Tuple[str, str]] = field(default_factory=list)  # (layer, why its input stays float)
    folded_bn: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    weight_time_s: float = 0.0  # time spent choosing integer weights (the method proper)
    total_time_s: float = 0.0
    stage_times: Dict[str, float] = field(default_factory=dict)  # total_time_s by stage (STAGES)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:  # print(report) shows the table, not the dataclass fields
        return self.format_table()

    def format_table(self) -> str:
        """A readable per-layer table plus the lists of what was left in float."""
        head = f"{'layer':<28} {'kind':<6} {'shape':<18} {'W':>2} {'A':>5} {'act range':>17} {'rel.err':>8} {'|sum|K':>7} {'|sum|C':>7}"
        title = f"dfquant: method={self.method} W{self.w_bits}A{self.a_bits if self.a_bits else 'fp'}"
        low = (self.config.get("dfmpc") or {}).get("low_bits")
        if low:  # DF-MPC's mixed precision: MP low/high
            title += f" (DF-MPC MP{low}/{self.w_bits}: the pairs' low layers at {low} bits)"
        title += f", protocol {self.config.get('protocol', 'dfquant')}"
        lines = [title, head, "-" * len(head)]
        for r in self.layers:
            a = str(r.a_bits) if r.a_bits else "float"
            rng = f"[{r.a_range[0]:.3g}, {r.a_range[1]:.3g}]" if r.a_range else "-"
            shape = "x".join(str(s) for s in r.shape)
            lines.append(
                f"{r.name[:28]:<28} {r.kind:<6} {shape:<18} {r.w_bits:>2} {a:>5} {rng:>17} {r.rel_weight_error:>8.4f} {r.kernel_err_max:>7.3f} {r.channel_err_max:>7.3f}"
                + (f"  {r.note}" if r.note else "")
            )
        lines.append(f"quantized {len(self.layers)} layers; weight rounding {self.weight_time_s * 1000:.1f} ms; total {self.total_time_s:.2f} s")
        if self.folded_bn:
            lines.append(f"BatchNorm folded into the preceding conv: {len(self.folded_bn)}")
        if self.float_inputs:
            lines.append("inputs left in float:")
            lines += [f"  {n}: {why}" for n, why in self.float_inputs]
        if self.unsupported:
            lines.append("unsupported layers left in float: " + ", ".join(self.unsupported))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
