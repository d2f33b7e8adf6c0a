"""dfquant: data-free quantization of trained PyTorch CNNs (SQuant, Genie and their baselines).

One call quantizes a model without touching any data::

    qmodel, report = dfquant.quantize(model, method="squant", w_bits=4, a_bits=4)
    print(report.format_table())
"""
from .api import quantize
from .config import METHODS, QuantConfig
from .errors import DfquantError
from .evaluate import evaluate, paired_comparison, paired_error_comparison
from .genie import GenieConfig, synthesize
from .io import OnnxRuntimeModel, export_onnx, load_quantized, save_quantized
from .models import create_model, list_models
from .squant import squant_round

__all__ = [
    "quantize", "QuantConfig", "GenieConfig", "METHODS", "evaluate", "paired_comparison", "paired_error_comparison", "squant_round",
    "synthesize", "create_model", "list_models", "DfquantError", "export_onnx", "OnnxRuntimeModel", "save_quantized", "load_quantized",
]
__version__ = "0.1.0"
