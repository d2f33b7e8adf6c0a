"""dfquant: data-free quantization of trained PyTorch CNNs (SQuant, Genie and their baselines).

One call quantizes a model without touching any data::

    qmodel, report = dfquant.quantize(model, method="squant", w_bits=4, a_bits=4)
    print(report.format_table())
"""
from .api import METHODS, QuantConfig, quantize
from .errors import DfquantError
from .evaluate import evaluate, paired_comparison, paired_error_comparison
from .export import OnnxRuntimeModel, export_onnx
from .models import create_model, list_models
from .serialization import load_quantized, save_quantized
from .squant import squant_round
from .synthesis import synthesize

__all__ = ["quantize", "QuantConfig", "METHODS", "evaluate", "paired_comparison", "paired_error_comparison", "squant_round", "synthesize", "create_model", "list_models", "DfquantError", "export_onnx", "OnnxRuntimeModel", "save_quantized", "load_quantized"]
__version__ = "0.1.0"
