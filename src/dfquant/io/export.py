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
stored as their exact float values, as a grid without 0 is below).

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
in the ONNX graph too. For integer deployment quantize with ``fold_bn=True``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DfquantError
from ..graph import replace_module
from ..qmodules import ActQuantizer, QuantConv2d, QuantLinear, QuantShortcut, _QuantWeightLayer
from ..quantizer import qrange
from .files import atomic_write, check_writable

#: ONNX opset of the exported graph (per-axis DequantizeLinear needs >= 13).
OPSET = 18
#: The opset of a file with packed INT4 weights (INT4 DequantizeLinear needs >= 21).
OPSET_INT4 = 21
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
        # A channel whose weights all have one sign has a grid without 0: at 8 bits its zero point
        # can fall outside int8 (a folded depthwise kernel of 9 weights, say). No 8-bit container
        # with an 8-bit zero point holds such a grid, so that layer's weight is stored as its exact
        # dequantized float values, which runtimes run in float. (As int32 codes it would be exact
        # too, but ONNX Runtime 1.32 then fuses it into an 8-bit QLinearConv and rejects the graph.)
        # The same holds for DoReFa-8's doubled codes (see _container_codes), which span -255..255.
        self.wide = bool(torch.any(zp < -128) or torch.any(zp > 127) or codes.min() < -128 or codes.max() > 127)
        self.is_conv = isinstance(layer, QuantConv2d)
        if self.is_conv:
            self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.register_buffer("w_scale", w_scale)
        if self.wide:
            self.register_buffer("weight_float", layer.weight.detach().clone())
        else:
            self.register_buffer("weight_int", codes.to(torch.int8))
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
        if self.wide:
            w = self.weight_float
        else:
            w = qd.dequantize_per_channel(self.weight_int, self.w_scale, self.w_zero_point, 0, -128, 127, torch.int8)
        bias = self.bias
        if self.bias_int is not None:
            zeros = torch.zeros_like(self.bias_int, dtype=torch.int64)
            bias = qd.dequantize_per_channel(self.bias_int, self.bias_scale, zeros, 0, -(2**31), 2**31 - 1, torch.int32)
        if self.is_conv:
            return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, bias)


def _container_codes(layer: _QuantWeightLayer, name: str):
    """(codes, per-channel scale, per-channel zero point) of a layer's weight as the file stores them.

    Whole zero points: the layer's own. DoReFa's half-integer zero point -1/2 (``w_grid``; ONNX zero
    points are integers, and rounding it would store other weights): the same values as the codes
    ``2 q - 2 z`` (odd integers) at scale ``s / 2`` with zero point 0, exactly, since
    ``(2q - 2z) * (s / 2) = (q - z) * s`` and halving a float scale is exact. They fit int8 up to
    7 bits; at 8 bits they span -255..255 and the layer is stored as float values instead."""
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


def qdq_model(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` whose quantized layers are written with Q/DQ ops (what gets exported)."""
    found = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    if not found:
        raise DfquantError("the model has no dfquant quantized layer: quantize it (dfquant.quantize) before exporting")
    out = copy.deepcopy(qmodel).eval()
    for name, layer in found:
        replace_module(out, name, _QDQLayer(layer, name))
    for name, m in out.named_modules():  # quantize_shortcuts: the shortcut's Q/DQ pair, the block input's scale
        if isinstance(m, QuantShortcut):
            m.input_quant = _QDQInput(m.input_quant, name)
    out.requires_grad_(False)
    return out


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
) -> Dict[str, Any]:
    """Write ``qmodel`` (from :func:`dfquant.quantize` or a loaded save) to ``path`` as an ONNX QDQ model.

    ``input_size`` is (C, H, W), default the model's ``input_size``; the batch dimension is dynamic
    unless ``dynamic_batch=False``. The file is written atomically. Returns a summary: the path,
    the opset, how many weights are stored as int8 codes (and which layers' as their exact float
    values, see ``_QDQLayer``), how many layer inputs are quantized, the count of each ONNX op, and
    how many BatchNormalization ops stay float (quantize with ``fold_bn=True`` for integer deployment).
    ``metadata`` (JSON-able: model name, config) is stored in the file's metadata under "dfquant".
    ``int4_weights``: store the codes of every layer of 4 bits or fewer as packed INT4 (opset 21;
    see the module docstring for what that costs in ONNX Runtime); a layer whose per-channel zero
    point lies outside [-8, 7] (a grid that does not contain 0) keeps its int8 container.
    """
    require_onnx()
    import onnx

    path = check_output_path(path)
    input_size = tuple(input_size or getattr(qmodel, "input_size", None) or ())
    if len(input_size) != 3:
        raise DfquantError(
            f"ONNX export takes image models: give the input size as (C, H, W), got {input_size}"
            if input_size
            else "give the model's input size (C, H, W): the model does not record one"
        )
    _qd()  # the ops must be registered before the exporter builds its table of ONNX functions
    m = qdq_model(qmodel)
    opset = OPSET_INT4 if int4_weights else OPSET
    x = torch.zeros(2, *input_size)
    dyn = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    with _quiet_exporter():
        try:
            program = torch.onnx.export(m, (x,), dynamo=True, opset_version=opset, input_names=["x"], output_names=["logits"], dynamic_shapes=dyn)
        except Exception as exc:
            why = _first_line(_root_cause(exc))
            if "data-dependent" in why:
                why += " (the forward branches on tensor values, e.g. `if x.sum() > 0`: an exported graph cannot)"
            raise DfquantError(f"the ONNX exporter could not convert this model: {why}") from None
    model = program.model_proto
    _strip_exporter_notes(model)
    packed = _pack_int4_weights(model) if int4_weights else []
    doc = dict(metadata or {}, format=FORMAT, input_size=list(input_size))
    onnx.helper.set_model_props(model, {"dfquant": json.dumps(doc, default=str)})
    onnx.checker.check_model(model)
    try:
        atomic_write(path, lambda p: onnx.save_model(model, str(p)))
    except OSError as exc:  # a write that failed after the checks (a full disk, ...)
        raise DfquantError(f"cannot write {path}: {exc.strerror or exc}") from None
    ops = Counter(n.op_type for n in model.graph.node)
    wide = [name for name, mod in m.named_modules() if isinstance(mod, _QDQLayer) and mod.wide]
    return {
        "path": str(path),
        "opset": opset,
        "int8_weights": sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2),
        "int4_weights": len(packed),
        "quantized_inputs": ops.get("QuantizeLinear", 0),  # quantize nodes: layers reading one tensor share one
        "ops": dict(sorted(ops.items())),
        "float_batchnorm": ops.get("BatchNormalization", 0),
        "float_weights": wide,
        "bytes": path.stat().st_size,
    }


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
    for key, kind in (("config", dict), ("model_name", str), ("input_size", list)):
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
    """
    inputs = inputs.float()
    got = OnnxRuntimeModel(path)(inputs)
    with torch.no_grad():
        refs = {"file": qdq_model(qmodel)(inputs), "model": qmodel.eval()(inputs)}
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
