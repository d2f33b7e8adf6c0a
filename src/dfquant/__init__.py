"""dfquant: data-free quantization of trained PyTorch CNNs (SQuant, Genie, DF-MPC and their baselines).

One call quantizes a model without touching any data::

    qmodel, report = dfquant.quantize(model, method="squant", w_bits=4, a_bits=4)
    print(report.format_table())

The names below are imported on first use, so ``import dfquant.cli`` (the command line) starts
without loading torch, and a Ctrl-C during that start is the CLI's to report.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> (module, attribute)
_EXPORTS = {
    "quantize": ("api", "quantize"),
    "QuantConfig": ("config", "QuantConfig"),
    "METHODS": ("config", "METHODS"),
    "DfquantError": ("errors", "DfquantError"),
    "evaluate": ("evaluation", "evaluate"),
    "paired_comparison": ("evaluation", "paired_comparison"),
    "paired_error_comparison": ("evaluation", "paired_error_comparison"),
    "reference_logits": ("evaluation", "reference_logits"),
    "GenieConfig": ("genie.config", "GenieConfig"),
    "synthesize": ("genie.distill", "synthesize"),
    "export_onnx": ("io.export", "export_onnx"),
    "OnnxRuntimeModel": ("io.export", "OnnxRuntimeModel"),
    "save_quantized": ("io.serialization", "save_quantized"),
    "load_quantized": ("io.serialization", "load_quantized"),
    "create_model": ("models", "create_model"),
    "list_models": ("models", "list_models"),
    "squant_round": ("squant", "squant_round"),
    "inspect": ("preflight", "inspect"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dfquant' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
