"""Saving and loading quantized models exactly: integer codes, scales and the config.

A save writes two files: ``NAME.safetensors`` (every tensor of the quantized model: int8 weight
codes, per-channel (or per-tensor) scales and zero points, biases, BN buffers, activation scales) with the config
in its metadata, and ``NAME.json`` (the same config plus the report, for people and tools). Both
are written to temporary files and renamed together, so an interrupted save never leaves half a
file or a model beside another model's sidecar.
Loading rebuilds the float architecture (from the registry name, or a model you pass), swaps in
the quantized layers the config lists, and loads the tensors: the result equals the saved model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .errors import DfquantError
from .files import atomic_write_all
from .qmodules import ActQuantizer, QuantConv2d, QuantLinear
from .quantizer import QParams

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


def save_quantized(qmodel: nn.Module, path: "str | Path", *, model_name: Optional[str] = None, config: Optional[Dict[str, Any]] = None, report: Optional[Dict[str, Any]] = None) -> Tuple[Path, Path]:
    """Write ``path`` (.safetensors) and its .json sidecar; returns both paths."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.parent.exists():
        raise DfquantError(f"output folder does not exist: {path.parent}")
    folded = [n for n, m in qmodel.named_modules() if isinstance(m, nn.Identity) and getattr(m, "_dfquant_folded", False)]
    meta = {
        "format": FORMAT,
        "model_name": model_name,
        "num_classes": _num_classes(qmodel),
        "layers": layer_layout(qmodel),
        "folded_bn": folded or (config or {}).get("folded_bn", []),
        "relu6_to_relu": [n for n, m in qmodel.named_modules() if isinstance(m, nn.ReLU) and getattr(m, "_dfquant_from_relu6", False)],
        "config": config or {},
    }
    tensors = {k: v.detach().contiguous().clone() for k, v in qmodel.state_dict().items()}
    side = path.with_suffix(".json")
    doc = dict(meta, report=report)
    atomic_write_all(
        [
            (path, lambda p: save_file(tensors, str(p), metadata={"dfquant": json.dumps(meta, default=str)})),
            (side, lambda p: p.write_text(json.dumps(doc, indent=2, default=str))),
        ]
    )
    return path, side


def _num_classes(m: nn.Module) -> Optional[int]:
    last = None
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, QuantLinear)):
            last = mod.out_features
    return last


def read_metadata(path: "str | Path") -> Dict[str, Any]:
    """The dfquant metadata stored in a quantized .safetensors file (clear error if it is not one)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise DfquantError(f"quantized model file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        raise DfquantError(f"{p} is not a safetensors file") from None
    if "dfquant" not in meta:
        raise DfquantError(f"{p} is a safetensors file but not a dfquant quantized model (no dfquant metadata)")
    info = json.loads(meta["dfquant"])
    if info.get("format") != FORMAT:
        raise DfquantError(f"{p}: unsupported format {info.get('format')!r} (expected {FORMAT})")
    return info


def load_quantized(path: "str | Path", model: Optional[nn.Module] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a saved quantized model; ``model`` is the float architecture when not in the registry."""
    from safetensors.torch import load_file

    info = read_metadata(path)
    if model is None:
        if not info.get("model_name"):
            raise DfquantError("this file was saved from a model outside the registry: pass the float model to load it into")
        from .models import create_model

        model = create_model(info["model_name"], num_classes=info.get("num_classes"))
    import copy

    state = load_file(str(path))
    q = copy.deepcopy(model).eval()
    for bn_name in info.get("folded_bn", []):
        q.set_submodule(bn_name, nn.Identity())
    for act_name in info.get("relu6_to_relu", []):  # DFQ's ReLU6 -> ReLU (dfquant.dfq.replace_relu6)
        try:
            act = q.get_submodule(act_name)
        except AttributeError:
            raise DfquantError(f"the saved model replaced a ReLU6 {act_name!r} that this architecture lacks") from None
        if not isinstance(act, (nn.ReLU6, nn.ReLU)):
            raise DfquantError(f"the saved model replaced a ReLU6 {act_name!r}, but this architecture has a {type(act).__name__} there")
        relu = nn.ReLU(inplace=act.inplace)
        relu._dfquant_from_relu6 = True
        q.set_submodule(act_name, relu)
    for name, spec in info["layers"].items():
        try:
            layer = q.get_submodule(name)
        except AttributeError:
            raise DfquantError(f"the saved model has a quantized layer {name!r} that this architecture lacks") from None
        act = ActQuantizer(spec["a_bits"], 0.0, 1.0) if spec["a_bits"] else None
        zeros = torch.zeros_like(layer.weight)
        # one scale per output channel, or one per layer (per-tensor grids): sized as saved
        saved_scale = state.get(f"{name}.weight_scale")
        n_scales = saved_scale.numel() if saved_scale is not None and saved_scale.numel() == 1 else layer.weight.shape[0]
        qp = QParams(torch.ones(n_scales), torch.zeros(n_scales), spec["w_bits"], True)
        bias = torch.zeros(layer.weight.shape[0]) if spec["has_bias"] and layer.bias is None else None
        cls = QuantConv2d if spec["kind"] == "conv" else QuantLinear
        q.set_submodule(name, cls(layer, zeros, qp, act, bias=bias))
    try:
        q.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DfquantError(f"{path} does not fit the architecture: {str(exc).splitlines()[0]}") from None
    return q, info
