"""Saving and loading quantized models exactly: integer codes, scales and the config.

A save writes two files: ``NAME.safetensors`` (every tensor of the quantized model: int8 weight
codes, per-channel (or per-tensor) scales and zero points, biases, BN buffers, activation scales) with the config
in its metadata, and ``NAME.json`` (the same config plus the report, for people and tools). Both
are written to temporary files and renamed together, so an interrupted save never leaves half a
file or a model beside another model's sidecar.
Loading rebuilds the float architecture (from the registry name, or a model you pass), swaps in
the quantized layers the config lists, and loads the tensors: the result equals the saved model.

File names: ``NAME.safetensors`` is used as given (sidecar ``NAME.json``); a name ending in ``.json``
names the sidecar (the model goes beside it); any other name gets ``.safetensors`` / ``.json``
appended, so ``model.v1`` and ``lr0.04`` keep their dots (:func:`model_paths`).

Nothing in a loaded file is trusted: the metadata must have the layout :func:`save_quantized` writes,
every listed layer must exist in the architecture with the stated kind, the tensors must match the
rebuilt model key for key and shape for shape, and the values must be ones a quantizer can hold
(weight codes inside their stated bits' range, finite positive scales, finite whole zero points;
on the per-tensor grids the saved config's ``w_grid`` names, TWN's zero point 0 and codes -1..1,
DoReFa's half-integer zero point -1/2, which no other grid has).
A file that breaks any of these is refused with one :class:`DfquantError` naming the key at fault.
Every tensor and the config carry a SHA-256 digest in the metadata (:func:`tensor_digest`); a file
whose bytes changed after the save is refused naming the tensor. Files saved before the digests
(no ``digests`` key) still load, with a note.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import DfquantError, note
from ..graph import replace_module
from ..modelcheck import check_plain_module, copy_model, non_finite
from ..qmodules import ActQuantizer, QuantConv2d, QuantLinear, QuantShortcut
from ..quantizer import W_GRID_CHOICES, QParams, grid_for_bits, qrange
from .files import atomic_write_all, check_writable

FORMAT = "dfquant-quantized-v1"


def layer_layout(qmodel: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Per quantized layer: kind, weight bits, and input-quantizer bits (None: float input)."""
    out = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            out[name] = {
                "kind": "conv" if isinstance(m, QuantConv2d) else "linear",
                "w_bits": m.w_bits,
                "a_bits": None if m.input_quant is None else m.input_quant.bits,
                "has_bias": m.bias is not None,
            }
    return out


def input_sharing(qmodel: nn.Module) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``(shared_inputs, shortcuts)``: each quantized layer whose input quantizer is another layer's
    (the same object, ``quantize_shortcuts``), and each :class:`QuantShortcut`, mapped to the first
    layer (registration order) that holds that quantizer."""
    owners: Dict[int, str] = {}
    shared: Dict[str, str] = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)) and m.input_quant is not None:
            owner = owners.setdefault(id(m.input_quant), name)
            if owner != name:
                shared[name] = owner
    shortcuts: Dict[str, str] = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantShortcut):
            if id(m.input_quant) not in owners:
                raise DfquantError(f"the quantized shortcut {name!r} holds a quantizer no quantized layer reads with; such a model cannot be saved")
            shortcuts[name] = owners[id(m.input_quant)]
    return shared, shortcuts


def model_paths(path: "str | Path") -> Tuple[Path, Path]:
    """The ``.safetensors`` file and ``.json`` sidecar that a save to ``path`` writes.

    ``x.safetensors`` -> (``x.safetensors``, ``x.json``); ``x.json`` -> the same pair; any other
    name is kept whole and the suffixes are appended: ``model.v1`` -> ``model.v1.safetensors``,
    ``model.v1.json`` (``Path.with_suffix`` would cut it to ``model``).
    """
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise DfquantError(f"{path!r} names a folder: give a file name to save the model under (e.g. {path}model)")
    path = Path(path)
    name = path.name
    if name in ("", ".", "..") or name in (".safetensors", ".json"):
        raise DfquantError(f"not a file name to save a model under: {str(path)!r}")
    if name.endswith(".safetensors"):
        stem = name[: -len(".safetensors")]
    elif name.endswith(".json"):
        stem = name[: -len(".json")]
    else:
        stem = name
    return path.with_name(stem + ".safetensors"), path.with_name(stem + ".json")


def check_output_paths(paths: "Tuple[Path, ...]") -> None:
    """Refuse, before any work, outputs that could not be written (:func:`dfquant.files.check_writable`)."""
    for p in paths:
        check_writable(p)


def save_quantized(qmodel: nn.Module, path: "str | Path", *, model_name: Optional[str] = None, config: Optional[Dict[str, Any]] = None, report: Optional[Dict[str, Any]] = None) -> Tuple[Path, Path]:
    """Write ``path`` (.safetensors) and its .json sidecar; returns both paths.

    ``path`` is named as :func:`model_paths` says. Refused before anything is written: a model
    with no quantized layer, and (with ``model_name``) a model that does not fit the registry
    model of that name, since that file could never be loaded again.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path, side = model_paths(path)
    check_output_paths((path, side))
    layers = layer_layout(qmodel)
    if not layers:
        raise DfquantError("the model has no quantized layer: quantize it first (dfquant.quantize), then save it")
    folded = [n for n, m in qmodel.named_modules() if isinstance(m, nn.Identity) and getattr(m, "_dfquant_folded", False)]
    meta = {
        "format": FORMAT,
        "model_name": model_name,
        "num_classes": _num_classes(qmodel),
        "layers": layers,
        "folded_bn": folded or (config or {}).get("folded_bn", []),
        "relu6_to_relu": [n for n, m in qmodel.named_modules() if isinstance(m, nn.ReLU) and getattr(m, "_dfquant_from_relu6", False)],
        # layers left in float (skipped) that carry a bias: BN folding gives a conv one it may not have had
        "float_biased": [n for n, m in qmodel.named_modules() if type(m) in (nn.Conv2d, nn.Linear) and m.bias is not None],
        "config": _without_timings(config or {}),
    }
    meta["shared_inputs"], meta["shortcuts"] = input_sharing(qmodel)  # quantize_shortcuts: one quantizer object, several users
    tensors = {k: v.detach().contiguous().clone() for k, v in qmodel.state_dict().items()}
    if model_name is not None:
        _check_fits_registry(qmodel, model_name, meta, tensors)
    meta["digests"] = {k: tensor_digest(t) for k, t in tensors.items()}
    meta["config_digest"] = config_digest(meta["config"])
    doc = dict(meta, config=config or {}, report=report)  # the sidecar keeps the timings
    try:
        atomic_write_all(
            [
                (path, lambda p: save_file(tensors, str(p), metadata={"dfquant": json.dumps(meta, default=str)})),
                (side, lambda p: p.write_text(json.dumps(doc, indent=2, default=str))),
            ]
        )
    except OSError as exc:
        raise DfquantError(f"cannot write {path}: {exc.strerror or exc}") from None
    except SafetensorError as exc:  # the writer's own I/O errors (a full disk, ...)
        raise DfquantError(f"cannot write {path}: {str(exc).splitlines()[0]}") from None
    return path, side


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (hex)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_digest(config: Dict[str, Any]) -> str:
    """SHA-256 of the saved config as canonical JSON (hex)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def check_digests(p: Any, info: Dict[str, Any], state: Dict[str, torch.Tensor]) -> str:
    """``"ok"`` when every tensor matches the digest saved with it, ``"absent"`` for a file saved
    before digests; a changed tensor is one error naming it (the config's digest is checked with the
    rest of the metadata, :func:`read_metadata`)."""
    digests = info.get("digests")
    if digests is None:
        return "absent"
    missing = sorted(set(state) ^ set(digests))
    if missing:
        raise _damaged(p, f"the tensors and their saved digests differ in names ({', '.join(missing[:4])})")
    for name, t in state.items():
        if tensor_digest(t) != digests[name]:
            raise _damaged(p, f"tensor {name!r} does not match its saved digest: the file was changed after it was saved")
    return "ok"


def _without_timings(value: Any) -> Any:
    """``value`` without its wall-clock entries (keys ending in ``time_s``): they stay in the .json
    sidecar, so the same seed gives a byte-identical .safetensors file."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not str(k).endswith("time_s")}
    if isinstance(value, (list, tuple)):
        return [_without_timings(v) for v in value]
    return value


def _check_fits_registry(qmodel: nn.Module, model_name: str, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    """Refuse to save under ``model_name`` a model that the registry's architecture cannot load."""
    from ..models import create_model

    if not isinstance(model_name, str):
        raise DfquantError(f"model_name must be a registry model name (a string), got {model_name!r}")
    arch = create_model(model_name, num_classes=meta["num_classes"])
    for name, spec in meta["layers"].items():
        try:
            layer = arch.get_submodule(name)
        except AttributeError:
            raise DfquantError(f"model_name={model_name!r}: the registry model has no layer {name!r}; this is not a {model_name} (pass the right name, or model_name=None)") from None
        want = nn.Conv2d if spec["kind"] == "conv" else nn.Linear
        if not isinstance(layer, want):
            raise DfquantError(f"model_name={model_name!r}: layer {name!r} is a {type(layer).__name__} in the registry model, but a quantized {spec['kind']} here")
        shape = tuple(qmodel.get_submodule(name).weight_int.shape)
        if tuple(layer.weight.shape) != shape:
            raise DfquantError(f"model_name={model_name!r}: layer {name!r} has weight shape {tuple(layer.weight.shape)} in the registry model, but {shape} here")
    # the rest (folded BNs, biases, buffers): rebuild exactly as loading would and compare keys
    rebuilt = _rebuild(meta, arch, tensors, f"model_name={model_name!r}")
    problem = _state_mismatch(rebuilt.state_dict(), tensors)
    if problem:
        raise DfquantError(f"model_name={model_name!r}: the model does not fit the registry model, so the file could not be loaded: {problem}")


def _num_classes(m: nn.Module) -> Optional[int]:
    last = None
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, QuantLinear)):
            last = mod.out_features
    return last


def _damaged(p: Any, what: str) -> DfquantError:
    return DfquantError(f"{p}: {what}; the file is damaged or was edited")


def _is_bits(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 8


def _check_metadata(p: Path, info: Any) -> Dict[str, Any]:
    """The metadata's layout, as :func:`save_quantized` writes it; one error naming the bad key."""
    if not isinstance(info, dict):
        raise _damaged(p, f"the dfquant metadata must be a JSON object, found a {type(info).__name__}")
    if info.get("format") != FORMAT:
        raise DfquantError(f"{p}: unsupported format {info.get('format')!r} (expected {FORMAT})")
    for key in ("layers", "config"):
        if key not in info:
            raise _damaged(p, f"the metadata lacks {key!r}")
        if not isinstance(info[key], dict):
            raise _damaged(p, f"metadata {key!r} must be a JSON object, found a {type(info[key]).__name__}")
    if "config_digest" in info and config_digest(info["config"]) != info["config_digest"]:
        raise _damaged(p, "the config does not match its saved digest: the metadata was changed after it was saved")
    name = info.get("model_name")
    if name is not None and not isinstance(name, str):
        raise _damaged(p, f"metadata 'model_name' must be a string or null, found {name!r}")
    n = info.get("num_classes")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        raise _damaged(p, f"metadata 'num_classes' must be a positive integer or null, found {n!r}")
    digests = info.get("digests")
    if digests is not None and not (isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())):
        raise _damaged(p, "metadata 'digests' must map tensor names to hex digests")
    for key in ("folded_bn", "relu6_to_relu", "float_biased"):
        names = info.get(key, [])
        if not isinstance(names, list) or not all(isinstance(x, str) and x for x in names):
            raise _damaged(p, f"metadata {key!r} must be a list of layer names, found {names!r}")
    for key in ("shared_inputs", "shortcuts"):
        pairs = info.get(key, {})
        if not isinstance(pairs, dict) or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in pairs.items()):
            raise _damaged(p, f"metadata {key!r} must map module names to layer names, found {pairs!r}")
        for k, owner in pairs.items():
            spec = info["layers"].get(owner)
            if not isinstance(spec, dict) or spec.get("a_bits") is None or owner in info.get("shared_inputs", {}):
                raise _damaged(p, f"metadata {key}[{k!r}] names {owner!r}, which is no quantized layer with an input quantizer of its own")
    for lname, spec in info["layers"].items():
        where = f"layers[{lname!r}]"
        if not isinstance(spec, dict):
            raise _damaged(p, f"{where} must be a JSON object, found {spec!r}")
        for key in ("kind", "w_bits", "a_bits", "has_bias"):
            if key not in spec:
                raise _damaged(p, f"{where} lacks {key!r}")
        if spec["kind"] not in ("conv", "linear"):
            raise _damaged(p, f"{where} 'kind' must be 'conv' or 'linear', found {spec['kind']!r}")
        if not _is_bits(spec["w_bits"]):
            raise _damaged(p, f"{where} 'w_bits' must be an integer 2..8, found {spec['w_bits']!r}")
        if spec["a_bits"] is not None and not _is_bits(spec["a_bits"]):
            raise _damaged(p, f"{where} 'a_bits' must be null (float input) or an integer 2..8, found {spec['a_bits']!r}")
        if not isinstance(spec["has_bias"], bool):
            raise _damaged(p, f"{where} 'has_bias' must be true or false, found {spec['has_bias']!r}")
    _check_bits_against_config(p, info)
    return info


def _check_bits_against_config(p: Path, info: Dict[str, Any]) -> None:
    """Each layer's bits must be ones its config gives: a hand-edited ``a_bits`` or ``w_bits`` would
    otherwise load as another model than the one the file says it is."""
    cfg = info["config"]
    if cfg.get("w_grid") is not None and cfg.get("w_grid") not in W_GRID_CHOICES:
        raise _damaged(p, f"config 'w_grid' must be null or one of {', '.join(W_GRID_CHOICES)}, found {cfg.get('w_grid')!r}")
    if not _is_bits(cfg.get("w_bits")) or not (cfg.get("a_bits") is None or _is_bits(cfg.get("a_bits"))):
        return  # a config without the bits (not written by save_quantized from quantize): nothing to compare
    per_layer = cfg.get("layer_w_bits") if isinstance(cfg.get("layer_w_bits"), dict) else {}
    w_allowed = {b for b in (cfg["w_bits"], cfg.get("first_last_w_bits")) if _is_bits(b)}
    a_allowed = set()
    if cfg["a_bits"] is not None:
        first = cfg.get("first_input_bits") if cfg.get("quantize_first_input") else None
        a_allowed = {b for b in (cfg["a_bits"], cfg.get("last_input_bits"), cfg.get("second_input_bits"), first) if _is_bits(b)}
    for name, spec in info["layers"].items():
        want = per_layer.get(name)
        if (spec["w_bits"] != want) if _is_bits(want) else (spec["w_bits"] not in w_allowed):
            raise _damaged(p, f"layers[{name!r}] 'w_bits' {spec['w_bits']} is not what the config gives it ({want if _is_bits(want) else sorted(w_allowed)})")
        if spec["a_bits"] is not None and spec["a_bits"] not in a_allowed:
            raise _damaged(p, f"layers[{name!r}] 'a_bits' {spec['a_bits']} is none of the config's activation bits ({sorted(a_allowed) or 'none: weight-only'})")


def saved_model_file(path: "str | Path") -> Path:
    """The ``.safetensors`` file a save to ``path`` wrote: the names saving takes are read back too
    (``r20`` and ``r20.json`` -> ``r20.safetensors``)."""
    p = Path(path)
    if p.is_file() and not p.name.endswith(".json"):
        return p
    if not p.exists() or p.name.endswith(".json"):  # the .json sidecar names its model file too
        try:
            written = model_paths(path)[0]
        except DfquantError:
            written = p
        if written.is_file():
            return written
    if p.is_file():  # a .json with no model file beside it
        raise DfquantError(f"{p} is a sidecar whose model file {model_paths(p)[0].name} is missing")
    raise DfquantError(f"quantized model file not found: {p}" + (" (a folder)" if p.is_dir() else ""))


def read_metadata(path: "str | Path") -> Dict[str, Any]:
    """The dfquant metadata stored in a quantized .safetensors file (clear error if it is not one,
    or if the metadata lacks or garbles a key a load needs)."""
    from safetensors import safe_open

    p = saved_model_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        hint = " (a float checkpoint: load it with --model NAME --weights FILE)" if p.suffix.lower() in (".pth", ".pt", ".th", ".ckpt") else ""
        raise DfquantError(f"{p} is not a safetensors file{hint}") from None
    if "dfquant" not in meta:
        raise DfquantError(f"{p} is a safetensors file but not a dfquant quantized model (no dfquant metadata)")
    try:
        info = json.loads(meta["dfquant"])
    except ValueError as exc:
        raise _damaged(p, f"the dfquant metadata is not valid JSON ({exc})") from None
    return _check_metadata(p, info)


def _rebuild(info: Dict[str, Any], model: nn.Module, state: Dict[str, torch.Tensor], where: Any) -> nn.Module:
    """A copy of the float ``model`` with the saved structure: folded BNs, ReLU6 -> ReLU, and each
    listed layer swapped for a quantized layer of the saved kind, bits and scale count."""
    check_plain_module(model)
    q = copy_model(model).float().cpu().eval()  # the file's tensors are float32 CPU tensors

    def lookup(name: str, key: str) -> nn.Module:
        try:
            return q.get_submodule(name)
        except AttributeError:
            raise DfquantError(f"{where}: {key} names a layer {name!r} that this architecture ({type(model).__name__}) lacks") from None

    for bn_name in info.get("folded_bn", []):
        bn = lookup(bn_name, "folded_bn")
        if not isinstance(bn, (nn.modules.batchnorm._BatchNorm, nn.Identity)):
            raise DfquantError(f"{where}: folded_bn names {bn_name!r}, which is a {type(bn).__name__} in this architecture, not a BatchNorm")
        replace_module(q, bn_name, nn.Identity())
    for act_name in info.get("relu6_to_relu", []):  # DFQ's ReLU6 -> ReLU (dfquant.dfq.replace_relu6)
        try:
            act = q.get_submodule(act_name)
        except AttributeError:
            raise DfquantError(f"the saved model replaced a ReLU6 {act_name!r} that this architecture lacks") from None
        if not isinstance(act, (nn.ReLU6, nn.ReLU)):
            raise DfquantError(f"the saved model replaced a ReLU6 {act_name!r}, but this architecture has a {type(act).__name__} there")
        relu = nn.ReLU(inplace=act.inplace)
        relu._dfquant_from_relu6 = True
        replace_module(q, act_name, relu)
    for name in info.get("float_biased", []):
        layer = lookup(name, "float_biased")
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise DfquantError(f"{where}: float_biased names {name!r}, which is a {type(layer).__name__} in this architecture, not a Conv2d or Linear")
        if layer.bias is None:  # a skipped conv whose BN was folded into it
            out_features = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            layer.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
    for name, spec in info["layers"].items():
        layer = lookup(name, "layers")
        want = nn.Conv2d if spec["kind"] == "conv" else nn.Linear
        if not isinstance(layer, want):
            raise DfquantError(
                f"{where}: layers[{name!r}] is a quantized {spec['kind']}, but this architecture has a {type(layer).__name__} there (expected nn.{want.__name__})"
            )
        act = ActQuantizer(spec["a_bits"], 0.0, 1.0) if spec["a_bits"] else None
        zeros = torch.zeros_like(layer.weight)
        # one scale per output channel, or one per layer (per-tensor grids): sized as saved
        saved_scale = state.get(f"{name}.weight_scale")
        n_scales = saved_scale.numel() if saved_scale is not None and saved_scale.numel() == 1 else layer.weight.shape[0]
        qp = QParams(torch.ones(n_scales), torch.zeros(n_scales), spec["w_bits"], True)
        bias = torch.zeros(layer.weight.shape[0]) if spec["has_bias"] and layer.bias is None else None
        cls = QuantConv2d if spec["kind"] == "conv" else QuantLinear
        replace_module(q, name, cls(layer, zeros, qp, act, bias=bias))
    for name, owner in info.get("shared_inputs", {}).items():  # the one quantizer object, as saved
        layer, held = lookup(name, "shared_inputs"), q.get_submodule(owner).input_quant
        if not isinstance(layer, (QuantConv2d, QuantLinear)) or layer.input_quant is None or layer.input_quant.bits != held.bits:
            raise DfquantError(f"{where}: shared_inputs names {name!r}, which is no quantized layer with an input of {held.bits} bits in the file")
        layer.input_quant = held
    for name, owner in info.get("shortcuts", {}).items():
        replace_module(q, name, QuantShortcut(lookup(name, "shortcuts"), q.get_submodule(owner).input_quant))
    return q


def _state_mismatch(expected: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> str:
    """The keys of ``state`` that ``expected`` lacks, wants, or shapes or types differently ('' if none)."""
    from ..models.weights import describe_state_mismatch

    codes = [  # int8 codes copied into an int8 buffer unchanged; a float or wider type would not be
        f"{k} ({str(state[k].dtype).replace('torch.', '')}, expected {str(expected[k].dtype).replace('torch.', '')})"
        for k in expected
        if k.endswith(".weight_int") and k in state and state[k].dtype != expected[k].dtype
    ]
    return describe_state_mismatch(expected, state, extra={"weight codes of the wrong type": codes})


def _check_values(p: Any, q: nn.Module, info: Dict[str, Any]) -> None:
    """Every quantized layer's tensors hold values a quantizer of the stated bits can produce."""
    for name, spec in info["layers"].items():
        layer = q.get_submodule(name)
        bits = spec["w_bits"]
        qmin, qmax = qrange(bits, True)
        codes = layer.weight_int
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < qmin or hi > qmax:
                raise _damaged(p, f"layer {name!r}: weight codes span {lo}..{hi}, outside the {bits}-bit range {qmin}..{qmax} its w_bits states")
        scale = layer.weight_scale
        ok = torch.isfinite(scale) & (scale > 0)
        if not bool(ok.all()):
            raise _damaged(p, f"layer {name!r}: weight scales must be finite and > 0, found {_bad_values(scale, ok)}")
        _check_weight_grid(p, name, layer, grid_for_bits(info["config"].get("w_grid"), bits))
        aq = layer.input_quant
        if aq is not None:
            s, z = aq.scale, aq.zero_point
            ok = torch.isfinite(s) & (s > 0)
            if not bool(ok.all()):
                raise _damaged(p, f"layer {name!r}: activation scale must be finite and > 0, found {_bad_values(s, ok)}")
            # a whole number, not necessarily inside 0..2^b-1: a range with lo > 0 (e.g. an
            # input_range of (0.5, 1.0)) has its zero outside the grid, which params_from_range allows
            ok = torch.isfinite(z) & (z == z.round())
            if not bool(ok.all()):
                raise _damaged(p, f"layer {name!r}: activation zero point must be a finite whole number, found {_bad_values(z, ok)}")


def _check_weight_grid(p: Any, name: str, layer: nn.Module, grid: Optional[str]) -> None:
    """The zero points (and, for TWN, the codes) the layer's grid gives: whole numbers on the min/max
    and lp grids, 0 and codes -1..1 on TWN's, -1/2 on DoReFa's (its levels are the half-integers)."""
    zp = layer.weight_zero_point
    if grid == "dorefa":
        ok = zp == -0.5
        if not bool(ok.all()):
            raise _damaged(p, f"layer {name!r}: the config's DoReFa grid (w_grid) has zero point -0.5, found {_bad_values(zp, ok)}")
        return
    ok = torch.isfinite(zp) & (zp == zp.round())
    if not bool(ok.all()):
        raise _damaged(p, f"layer {name!r}: weight zero points must be finite whole numbers, found {_bad_values(zp, ok)}")
    if grid == "twn":
        codes = layer.weight_int
        if not bool((zp == 0).all()) or (codes.numel() and (int(codes.min()) < -1 or int(codes.max()) > 1)):
            raise _damaged(p, f"layer {name!r}: the config's ternary grid (w_grid) has zero point 0 and codes -1..1")


def _bad_values(t: torch.Tensor, ok: torch.Tensor) -> str:
    """The first few values of ``t`` where ``ok`` is False."""
    bad = t.detach().reshape(-1).float()[~ok.reshape(-1)]
    return ", ".join(f"{v:.4g}" for v in bad[:3].tolist()) + (f" (+{bad.numel() - 3} more)" if bad.numel() > 3 else "")


def _read_file(path: "str | Path") -> Tuple[Path, Dict[str, Any], Dict[str, torch.Tensor]]:
    """A saved model's path, checked metadata and tensors (one error for unreadable tensor data)."""
    from safetensors.torch import load_file

    path = saved_model_file(path)
    info = read_metadata(path)
    try:
        state = load_file(str(path))
    except Exception as exc:  # truncated or corrupt tensor data
        raise DfquantError(f"cannot read the tensors of {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return path, info, state


def _check_shared(p: Any, q: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """A quantizer shared by several modules is saved under each one's name: the copies must agree
    (loading keeps one of them)."""
    held = q.state_dict(keep_vars=True)
    for key, t in held.items():
        if not torch.equal(state[key], t.detach()):
            raise _damaged(p, f"{key} differs from the other copy of the quantizer it shares (quantize_shortcuts)")


def load_quantized(path: "str | Path", model: Optional[nn.Module] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a saved quantized model; ``model`` is the float architecture when not in the registry.

    Refuses, with one error naming the key at fault, a file whose metadata or tensors do not fit
    the architecture or hold values no quantizer of the stated bits produces (see the module doc).
    """
    path, info, state = _read_file(path)
    n_classes = info.get("num_classes")
    if n_classes is not None and not any(k.endswith((".weight_int", ".weight")) and t.dim() and t.shape[0] == n_classes for k, t in state.items()):
        raise _damaged(path, f"metadata 'num_classes' {n_classes} is the output count of no layer in the file")
    if model is None:
        if not info.get("model_name"):
            raise DfquantError(
                f"{path} was saved from a model outside the registry: load it in Python with dfquant.load_quantized(path, model=<the float model>)"
            )
        from ..models import create_model

        try:
            model = create_model(info["model_name"], num_classes=info.get("num_classes"))
        except DfquantError as exc:
            raise DfquantError(f"{path}: metadata 'model_name' {info['model_name']!r}: {exc}") from None
    if check_digests(path, info, state) == "absent":
        note(f"{path} carries no tensor digests (saved before dfquant checked them): its bytes cannot be verified")
    bad = non_finite(state.items())
    if bad:
        raise _damaged(path, f"NaN or inf values in {bad}")
    q = _rebuild(info, model, state, path)
    problem = _state_mismatch(q.state_dict(), state)
    if problem:
        raise DfquantError(f"{path} does not fit the architecture ({type(model).__name__}): {problem}")
    try:
        q.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DfquantError(f"{path} does not fit the architecture: {str(exc).splitlines()[0]}") from None
    _check_shared(path, q, state)
    _check_values(path, q, info)
    return q, info


#: the settings that say under which protocol a saved model was quantized
PROTOCOL_KEYS = ("protocol", "fold_bn", "per_channel", "w_range", "w_grid", "act_range", "quantize_first_input", "last_input_bits", "second_input_bits", "first_last_w_bits", "quantize_shortcuts", "int32_bias", "cle", "bias_correction")


def file_info(path: "str | Path") -> Dict[str, Any]:
    """What a saved quantized model is, without building it or any data: method, bits per layer,
    protocol settings, digest status (``ok`` / ``absent``; a changed tensor is an error) and sizes."""
    path, info, state = _read_file(path)
    cfg, layers = info["config"], info["layers"]
    codes = {k: t for k, t in state.items() if k.endswith(".weight_int")}
    packed = sum(t.numel() * layers[k[: -len(".weight_int")]]["w_bits"] for k, t in codes.items() if k[: -len(".weight_int")] in layers) / 8
    other = sum(t.numel() * t.element_size() for k, t in state.items() if k not in codes)
    return dict(
        path=str(path),
        model_name=info.get("model_name"),
        method=cfg.get("method"),
        w_bits=cfg.get("w_bits"),
        a_bits=cfg.get("a_bits"),
        config_version=cfg.get("config_version", 1),
        protocol={k: cfg[k] for k in PROTOCOL_KEYS if k in cfg},
        layers={n: dict(w_bits=v["w_bits"], a_bits=v["a_bits"]) for n, v in layers.items()},
        float_layers=list(cfg.get("skip", [])),
        digests=check_digests(path, info, state),
        file_bytes=path.stat().st_size,
        tensors=len(state),
        weight_codes=sum(t.numel() for t in codes.values()),
        packed_weight_bytes=int(packed),
        other_tensor_bytes=int(other),
    )
