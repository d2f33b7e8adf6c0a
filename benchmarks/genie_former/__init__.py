"""FROZEN COPY, for benchmarks/speed.py only: ``dfquant.genie`` as it was on main at 9d3bcda, before
the speed work of issue #21 (relative imports of dfquant made absolute; nothing else changed).
``speed.py --only genie`` runs it side by side with the current implementation. Do not edit.

Genie (Jeon, Lee & Kim, "Genie: Show Me the Data for Quantization", CVPR 2023, arXiv:2212.04780).

Two parts, as in the authors' release (``SamsungLabs/Genie``): Genie-D distils calibration images
from the model's BatchNorm statistics (:mod:`.distill`, on the loss of :mod:`.bns_loss`; ZeroQ's
distilled pixels are the data baseline), and Genie-M refines a rounding-initialised quantized model
on them block by block (:mod:`.reconstruct`, with the quantizer of :mod:`.quantizer` and the units
of :mod:`.units`). Every setting is one field of :class:`GenieConfig` (:mod:`.config`). Enter through
``dfquant.quantize(model, method="genie")`` or ``dfquant.synthesize``. Only the paper's abstract
could be consulted while writing this: its section numbers are unverified; the method follows the
release, written from its description with no code copied.
"""
from .bns_loss import BN_STD_EPS, bn_statistics_loss
from .config import CPU_BUDGET, DISTILL_DEFAULTS, GPU_BUDGET, GenieConfig, lr_round_for
from .distill import GenieGenerator, SwingConv2d, reflect_shift, synthesize
from .quantizer import GenieLayer, initial_rounding
from .reconstruct import reconstruct_model
from .units import BLOCK_CLASS_NAMES, find_units

__all__ = [
    "GenieConfig", "CPU_BUDGET", "GPU_BUDGET", "DISTILL_DEFAULTS", "lr_round_for", "BN_STD_EPS", "bn_statistics_loss",
    "GenieGenerator", "SwingConv2d", "reflect_shift", "synthesize", "GenieLayer", "initial_rounding",
    "reconstruct_model", "BLOCK_CLASS_NAMES", "find_units",
]
