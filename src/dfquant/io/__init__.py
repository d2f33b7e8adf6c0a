"""Everything dfquant reads or writes: saved quantized models, ONNX export, synthetic image files,
atomic output files. Methods import none of this; the pipeline (:mod:`dfquant.api`) and the CLI do."""
from .export import OnnxRuntimeModel, export_onnx
from .images import load_image_files, load_images, save_image_grid, save_images
from .serialization import load_quantized, save_quantized

__all__ = ["export_onnx", "OnnxRuntimeModel", "save_quantized", "load_quantized", "save_images", "load_images", "load_image_files", "save_image_grid"]
