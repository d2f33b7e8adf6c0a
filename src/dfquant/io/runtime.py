"""What ONNX Runtime makes of an exported file, and how fast it runs it.

:func:`runtime_kernels` builds an onnxruntime session (its graph optimizer at ``ORT_ENABLE_ALL``
by default), has it write the optimized graph (``SessionOptions.optimized_model_filepath``) and
counts its op types: the layers whose DequantizeLinear -> Conv/Gemm -> QuantizeLinear pattern it
fused into an integer kernel (``QLinearConv``, ``QGemm``, ...) and those it runs in float, each with
the reason read off the exported graph (a float input, a float BatchNormalization or Add after the
layer, int4 weights, ...). :func:`bench` times files and torch models side by side.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from ..errors import DfquantError

#: onnxruntime op types that compute in integers (the contrib ops of its QDQ fusions included).
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QLinearReduceMean",
})
#: The layers whose kernels are counted (the exported graph's op types).
LAYER_OPS = ("Conv", "Gemm", "MatMul")
LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise DfquantError("running an ONNX file needs onnxruntime: pip install 'dfquant[onnx]'") from None
    return ort


def session(path: "str | Path", threads: int = 1, level: str = "all", optimized_path: "str | Path | None" = None):
    """An onnxruntime CPU session with ``threads`` intra-op threads (one inter-op thread)."""
    ort = _ort()
    if level not in LEVELS:
        raise DfquantError(f"level must be one of {', '.join(LEVELS)}, got {level!r}", param="level")
    if threads < 1:
        raise DfquantError(f"threads must be 1 or more, got {threads}", param="threads")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        from .export import _first_line

        raise DfquantError(f"{path} is not an ONNX model onnxruntime can run: {_first_line(exc)}") from None


def runtime_kernels(path: "str | Path", level: str = "all") -> Dict[str, Any]:
    """Which conv/gemm layers of the file onnxruntime runs as integer kernels, and why the others are float.

    Returns ``level``, ``ops`` (op-type counts of the optimized graph), ``layers`` / ``integer_layers``
    (conv and gemm nodes of the file / those run as an integer kernel), ``convs`` /
    ``integer_convs`` (the same for convolutions only), and ``float_layers``: one
    ``{"layer", "node", "op", "why"}`` per layer that runs in float. A layer counts as integer when
    an integer op of the optimized graph reads its weight initializer (the codes keep their name
    when onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into ``QLinearConv``).
    ``requantized_by_onnxruntime``: layers whose float weights onnxruntime quantized to int8 on its
    own (its ``WeightBiasQuantization`` transformer), so that it runs something else than the file
    says: a file whose check then differs (found on MobileNetV1-0.75 exported without fold_bn).
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise DfquantError(f"ONNX file not found: {path}")
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, 1, level, optimized)
        opt = onnx.load(str(optimized))
    exported = onnx.load(str(path))
    integer = {i for n in opt.graph.node if n.op_type in INTEGER_OPS for i in n.input}
    # onnxruntime's WeightBiasQuantization transformer quantizes, on its own, the float weights of a
    # conv between a DequantizeLinear and a QuantizeLinear (new initializer "<node>_weight_q"):
    # the file's exact float weights then become onnxruntime's int8 rounding of them.
    requantized = {i[: -len("_weight_q")] for i in integer if i.endswith("_weight_q")}
    graph = _Graph(exported.graph)
    rows = []
    for node in (n for n in exported.graph.node if n.op_type in LAYER_OPS):
        w = graph.weight_codes(node)
        own = node.name in requantized
        fused = (w is not None and w in integer) or own
        rows.append({"layer": graph.layer_name(node), "node": node.name, "op": node.op_type, "integer": fused, "own": own,
                     "why": None if fused else graph.why_float(node)})
    convs = [r for r in rows if r["op"] == "Conv"]
    return {
        "level": level,
        "ops": dict(sorted(Counter(n.op_type for n in opt.graph.node).items())),
        "layers": len(rows),
        "integer_layers": sum(r["integer"] for r in rows),
        "convs": len(convs),
        "integer_convs": sum(r["integer"] for r in convs),
        "float_layers": [{k: r[k] for k in ("layer", "node", "op", "why")} for r in rows if not r["integer"]],
        "requantized_by_onnxruntime": [r["layer"] for r in rows if r["own"]],
    }


class _Graph:
    """Producers, consumers and initializers of an ONNX graph, to say why a layer stays float."""

    def __init__(self, graph):
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: Dict[str, List[Any]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in graph.initializer}

    def _dq(self, name: str):
        p = self.producer.get(name)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def weight_codes(self, node):
        """The initializer of a layer's integer weight codes (None: float weights)."""
        w = self._dq(node.input[1]) if len(node.input) > 1 else None
        return None if w is None else w.input[0]

    def layer_name(self, node) -> str:
        """The dfquant layer a node computes, from its weight's initializer name."""
        w = self._dq(node.input[1]) if len(node.input) > 1 else None
        src = w.input[0] if w is not None else (node.input[1] if len(node.input) > 1 else node.name)
        for suffix in ("_int4", ".weight_int", ".weight_float"):
            src = src[: -len(suffix)] if src.endswith(suffix) else src
        return src

    def why_float(self, node) -> str:
        from onnx import TensorProto, numpy_helper

        if self._dq(node.input[0]) is None:
            return "its input is not quantized (a float activation: the image input under the paper's protocol, or an unquantized producer)"
        w = self._dq(node.input[1])
        if w is None:
            return "its weights are stored as float values (an 8-bit grid without 0: no int8 zero point fits)"
        codes_type = getattr(self.inits.get(w.input[0]), "data_type", None)
        if codes_type == TensorProto.INT16:
            return ("int16 weight codes (an 8-bit grid without 0: no int8 zero point fits): onnxruntime has no int16 "
                    "convolution/gemm kernel, it runs the layer in float on the exact values")
        if codes_type == TensorProto.INT4:
            return "int4 weights: onnxruntime has no int4 convolution/gemm kernel, it dequantizes them and runs the layer in float"
        out, seen = node.output[0], []
        while True:
            users = self.consumers.get(out, [])
            if len(users) != 1:
                return f"its output has {len(users)} consumers, not one QuantizeLinear to fuse into"
            user = users[0]
            if user.op_type == "QuantizeLinear":
                break
            if user.op_type == "BatchNormalization":
                return "a float BatchNormalization stands between it and the next QuantizeLinear (export with fold_bn / --fold-bn)"
            if user.op_type == "Add":
                return "its output is not quantized: it feeds a float Add (a residual sum), and an integer kernel needs a QuantizeLinear on its output"
            if user.op_type not in ("Relu", "Clip") or seen:
                return f"its output feeds a float {user.op_type}, not a QuantizeLinear"
            seen.append(user.op_type)
            out = user.output[0]
        if seen == ["Clip"]:
            return "a Clip (ReLU6) before its output's QuantizeLinear that onnxruntime keeps: the quantizer's range reaches past the clip"
        zp = self.inits.get(w.input[2]) if len(w.input) > 2 else None
        if zp is not None and numpy_helper.to_array(zp).any():
            return "its weight zero points are not 0 (onnxruntime's integer kernels here take symmetric weights only)"
        return "onnxruntime left the DequantizeLinear -> {} -> QuantizeLinear pattern unfused".format(node.op_type)


@dataclass
class BenchConfig:
    """How :func:`bench` times: intra-op ``threads`` for onnxruntime and torch (default 1), latency
    at ``latency_batch`` (mean of ``latency_runs`` calls per repeat), throughput at
    ``throughput_batch`` (one call per repeat), medians over ``repeat`` interleaved repeats."""

    threads: int = 1
    latency_batch: int = 1
    throughput_batch: int = 64
    latency_runs: int = 20
    repeat: int = 7

    def __post_init__(self):
        for key in ("threads", "latency_batch", "throughput_batch", "latency_runs", "repeat"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DfquantError(f"{key} must be a whole number of 1 or more, got {value!r}", param=key)


Runnable = Union[str, Path, nn.Module]


def bench(variants: Dict[str, Runnable], input_size, config: Optional[BenchConfig] = None) -> Dict[str, Dict[str, Any]]:
    """Latency (ms per call at ``latency_batch``) and throughput (images/s at ``throughput_batch``)
    of each variant: an ONNX file (run by onnxruntime on the CPU) or a torch module (CPU, no grad).

    Repeats are interleaved (each runs every variant once, in turn) and medians reported, so the
    ratios between variants are measured side by side on a shared machine. Files also get ``bytes``.
    """
    config = config or BenchConfig()
    gen = torch.Generator().manual_seed(0)
    xs = {b: torch.randn(b, *input_size, generator=gen) for b in {config.latency_batch, config.throughput_batch}}
    calls, out = {}, {}
    for name, v in variants.items():
        if isinstance(v, nn.Module):
            model = v.eval()
            calls[name] = lambda x, model=model: model(x)
            out[name] = {"runtime": "torch"}
        else:
            sess = session(v, config.threads)
            feed = sess.get_inputs()[0].name
            calls[name] = lambda x, sess=sess, feed=feed: sess.run(None, {feed: x})
            out[name] = {"runtime": "onnxruntime", "bytes": Path(v).stat().st_size}
    inputs = {k: {b: (x.numpy() if out[k]["runtime"] == "onnxruntime" else x) for b, x in xs.items()} for k in variants}
    lat: Dict[str, list] = {k: [] for k in variants}
    thr: Dict[str, list] = {k: [] for k in variants}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.inference_mode():
            for k, f in calls.items():  # warm-up
                f(inputs[k][config.latency_batch])
                f(inputs[k][config.throughput_batch])
            for _ in range(config.repeat):
                for k, f in calls.items():
                    x = inputs[k][config.latency_batch]
                    t = time.perf_counter()
                    for _ in range(config.latency_runs):
                        f(x)
                    lat[k].append((time.perf_counter() - t) / config.latency_runs)
                    t = time.perf_counter()
                    f(inputs[k][config.throughput_batch])
                    thr[k].append(config.throughput_batch / (time.perf_counter() - t))
    finally:
        torch.set_num_threads(old_threads)
    for k in variants:
        out[k].update(latency_ms=1e3 * statistics.median(lat[k]), throughput_ips=statistics.median(thr[k]))
    return out
