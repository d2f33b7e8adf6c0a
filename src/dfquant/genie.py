"""Genie-M: block-wise reconstruction of a quantized model on synthetic data.

Genie (Jeon, Lee & Kim, "Genie: Show Me the Data for Quantization", CVPR 2023, arXiv:2212.04780)
has two parts: Genie-D synthesizes calibration images from the model's BatchNorm statistics
(:mod:`dfquant.synthesis`), and Genie-M (Sec. 3.2, "quantizing models") refines a quantized model
on those images. This module is Genie-M, entered through ``dfquant.quantize(model, method="genie")``
(Genie-D images) or ``method="zeroq"`` (ZeroQ's distilled images, the data baseline of the paper's
ablations), both of which first build a rounding-initialised model (RTN or SQuant, ``init=``).

What is optimized (read from the paper and, where it leaves details open, the authors' release
``SamsungLabs/Genie`` ``reconstruct.py`` / ``quantizer.py`` / ``main.py``; written from that
description, no code copied):

* **Units** (BRECQ, Li et al., ICLR 2021, Sec. 3.2 / 4.1 "block reconstruction"): residual blocks
  and inverted residuals are reconstructed as one unit, every other quantized layer on its own. A
  module is a block when its class name is one the release lists (``BasicBlock``, ``Bottleneck``,
  ``ResBottleneckBlock``, ``DwsConvBlock``, ``ConvBlock``, ``InvertedResidual``) or, generically,
  when it is a child of an ``nn.Sequential`` and holds at least two quantized layers. Units are
  reconstructed one after the other in execution order.
* **Objective** of a unit (BRECQ's block output reconstruction, as the release computes it: plain
  squared error, without BRECQ's Fisher weighting): the squared error of the unit's output against
  the float unit's output, summed over channels and averaged over the batch and spatial
  positions, ``||f_q(x~) - f(x)||^2``. The target is the *float* model's unit output on
  the *float* model's unit input. The unit's input ``x~`` follows the release (QDrop, Wei et al.,
  ICLR 2022): element-wise, the input of the already-quantized preceding model ``x_q``
  or the float input ``x``, each with probability 1/2 (``drop_prob``).
* **Weights** (Genie Sec. 3.2): AdaRound's soft rounding (Nagel et al., ICML 2020, Eq. 22-24) with
  the step size learned *jointly*, which is Genie-M's change to BRECQ/AdaRound. Per weight
  ``w_hat = s * (clip(B + h(V), qmin, qmax) - z)`` with the rectified sigmoid
  ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``,
  a fixed integer base ``B`` (in the paper and release ``B = floor(W / s0)``: the base is decoupled
  from the learned ``s``), learned ``V`` and learned per-output-channel step ``s``; ``z`` is the
  zero point (kept fixed). Rounding regulariser (AdaRound Eq. 24):
  ``lambda * sum(1 - |2 h(V) - 1|^beta)``, switched on after a warm-up of 20 % of the iterations,
  ``beta`` annealed linearly from 20 to 2 over the rest, ``lambda = 1`` (the release's
  ``round_weight``; the sum is not normalised). After training the rounding is hard:
  ``code = clip(B + [V >= 0], qmin, qmax)``.
* **Activations**: LSQ (Esser et al., ICLR 2020) step sizes learned per tensor with the
  straight-through rounding (no LSQ gradient scaling, as in the release), and QDrop: during
  training each element of a quantized activation keeps its float value with probability
  ``drop_prob = 0.5``.
* **Optimizers** (release): Adam for the weight steps (lr 1e-4) and activation steps (lr 4e-5) with
  cosine annealing over the unit's iterations; a second Adam for ``V`` (lr 1e-3), no schedule.
  20000 iterations per unit, batches of 32, 1024 images (:data:`GPU_DEFAULTS`). With fewer
  iterations the rounding lr is raised so that lr x iterations stays the release's
  (:func:`lr_round_for`; a deviation, below).

Starting from the given codes (``init="rtn"`` or ``"squant"``)
------------------------------------------------------------
The release starts AdaRound from the float weights (``V = h^-1(W/s - floor(W/s))``, so that the soft
weights equal the float weights and hard rounding is round-to-nearest). Here the start is the
quantized model handed in, whose codes ``c`` came from RTN or SQuant, and hard rounding at step 0
must reproduce ``c`` exactly. With the grid value ``g = W / s0 + z``:

* base ``B = c - 1`` where ``c > g`` (the code rounds up) and ``B = c`` otherwise, so the hard bit
  ``c - B`` is 0 or 1 and ``B = floor(g)`` for every code that is ``floor(g)`` or ``ceil(g)`` (all
  RTN and SQuant codes; clipped codes at the grid's ends included);
* ``V = h^-1(r)`` with ``r = g - B`` clipped to [0, 1]: the release's initialisation (the soft
  weight is the float weight) wherever the code is round-to-nearest. Where the code is not (SQuant
  flipped the element), ``r`` is mirrored to ``1 - r``, so the flipped decision starts as firmly
  as round-to-nearest would have, on the other side of 1/2. Every ``r`` is then kept at least
  0.01 away from 1/2 on the side of its bit, and ``V`` is clamped to that side
  (``V >= 1e-4`` or ``V <= -1e-4``), so ``V >= 0`` exactly where the bit is 1 and
  ``recon_iters=0`` returns the starting codes bit for bit. (Measured on the digits CNN at a
  tiny budget, mirroring kept more of SQuant's decisions and gave a lower unit error than
  starting flipped elements just past 1/2, where they flip back within a few steps.)

The weight step sizes start from the quantized model's and its zero points are kept. For the
learned methods that model's weight grid is, by default, the release's: per output channel, the
clipped range ``[r * min, r * max]`` (r = 1.00, 0.99, ..., 0.01) minimising the mean
``|w - Q(w)|^2.4`` (:func:`dfquant.quantizer.lp_params`, ``w_range="lp"``); ``w_range="minmax"``
starts from SQuant's min/max grid instead. (Measured on CIFAR ResNet-20 at W2A4, Genie from RTN,
with the release's rounding lr 1e-3: 73.3 % top-1 from the min/max grid, 81.7 % from the Lp grid;
benchmarks/results/genie_cifar_resnet20_grid_ablation.md.)
Activation steps start, by default, from a search on the synthetic data (``act_calib="data"``: the
per-tensor clipping ratio in 1.00, 0.99, ..., 0.01 of the observed range minimising the mean
``|x - Q(x)|^2.4`` on the unit's first batch, the release's ``init_scale`` criterion, asymmetric here
because dfquant's activation quantizers are), or from the quantized model's BatchNorm-derived ranges
(``act_calib="bn"``, the default until 2026-11-25, with which every committed ``genie_cifar_*`` table
was made). The release's start also measured better: on CIFAR ResNet-20/56 at W4A4 and W3A3 the
data start left every run closer to FP32 than the BN start from the same images (logit MSE e.g.
0.64-0.66 against 1.07-1.13 on ResNet-56 W4A4, sign test p <= 1e-7 in every pair), and at W2A4 on
ResNet-56 too (p = 2e-15); at ResNet-20 W2A4 in four of five whole-run seeds (p <= 0.003; the
fifth level, p = 0.09), with top-1 level there (88.94 +- 0.72 from data, 89.05 +- 0.89 from BN;
benchmarks/results/genie_actcalib_pairs.md, genie_cifar_seeds_data_start.md). The start follows the images: with ZeroQ's images
(``method="zeroq"``) the data start left every run *further* from FP32 than the BN start (six
cells, sign test p <= 3e-12, top-1 unresolved; zeroq_actcalib_pairs.md), so ``act_calib="bn"`` is
the better choice there; the default stays one rule for both, so that the ZeroQ baseline differs
from Genie in its images only.

Measured with the CPU budget
----------------------------
Accuracy and wall times of every variant (RTN or SQuant start, Lp or min/max grid, ZeroQ data) on
CIFAR ResNet-20/56 are in ``benchmarks/results/genie_cifar_*.md`` with the commands that made them.
At the CPU budget one learned run took about 4-5 min on ResNet-20 and 12-15 min on ResNet-56 (one
torch thread, the other core busy); on a 2-core machine where anything else runs, prefer
``torch.set_num_threads(1)``: two OpenMP threads contending with another process run much slower.
With the release's rounding lr (1e-3) at this budget about 77 % of the soft rounding values were
still between 0.01 and 0.99 when the hard rounding was taken (``soft_undecided`` in each unit's
record) and 2.9-4.2 % of the codes changed; with :func:`lr_round_for`'s 0.04 all are decided and 13-16 %
change (``genie_lr_round.md``). Against the release's lr (``genie_cifar_resnet*_lr0.001.md``) that
lifted Genie's top-1 on ResNet-20 from 90.4 to 92.4 at W4A4 and from 81.7 to 89.0 at W2A4, and on
ResNet-56 from 90.4 to 92.1 at W2A4; ResNet-56 at W4A4 fell from 93.1 to 92.4 (6 of 846 images)
while its logit error against FP32 also fell (1.25 to 1.09). With 2000 iterations per unit
(``genie_cifar_resnet*_recon2000.md``, about 4x the time) the logit error of every run fell a
further 6-18 % and top-1 moved within the 846-image test set's noise. The same seed gives the
same model bit for bit in separate processes on the same machine and thread count. Another CPU
(another vector instruction set in torch's kernels) rounds floats differently; thousands of
optimizer steps amplify that, so there the synthetic images and the learned model differ
(``genie_cifar_rerun_2nd_cpu.md``: top-1 of a learned row moved by up to two points either way,
its logit error against FP32 by up to 13 %).

Deviations from the release
---------------------------
* Bit-widths and which inputs are quantized come from the quantized model handed in (dfquant's
  protocol: the image input stays float, the last layer's input at 8 bits, all weights at
  ``w_bits`` unless ``first_last_w_bits``); the release keeps the first and last layers' weights
  at 8 bits and the second layer's input at 8 bits (BRECQ's setting). Identity shortcuts are not
  quantized (dfquant's quantized layers quantize their own input only), where the release shares
  one quantizer between a block's input convolution and its shortcut.
* Asymmetric (zero-point) weight and activation quantizers with fixed zero points, as dfquant's
  layers store; the release's activation quantizer is symmetric/unsigned without zero point.
* The starting codes are the quantized model's (see above): with ``init="rtn"`` and the default
  Lp grid this is the release's start (its soft weights equal the float weights, and hard rounding
  is round-to-nearest); ``init="squant"`` starts from SQuant's rounding on that grid instead.
* Batches are true batches of ``batch_size`` drawn from a fresh permutation every epoch (the
  release's ``randperm(N).view(batch_size, -1)`` gives batches of ``N / batch_size``, which equals
  32 only for its default of 1024 images).
* Activation ranges for ``act_calib="data"`` are searched on the hard-rounded starting state of
  the unit, not lazily inside the first soft forward pass. An image input range the caller gave
  (``quantize_first_input`` with ``input_range``) is kept as the start, not searched.
* Rounding learning rate: by default ``lr_round = min(0.1, 1e-3 * 20000 / recon_iters)``
  (:func:`lr_round_for`), the release's 1e-3 at its 20000 iterations and 0.04 at the CPU budget's
  500 (the cap of 0.1 holds below 200 iterations). With the release's 1e-3 at 500 iterations ``V``
  can move only about 0.5 and 77 % of the soft rounding values were still undecided at the end on
  CIFAR ResNet-20, so the final hard rounding was far from what had been trained. The rule was
  checked on synthetic data only (lower unit error on the training images and lower logit error on
  held-out ZeroQ images than 1e-3 and 1e-2, at W4A4 and W2A4: benchmarks/results/genie_lr_round.md).
  ``lr_round=`` overrides it.
* Budget: :data:`CPU_BUDGET` runs far fewer images and iterations than the paper (see above).
  All randomness comes from generators seeded by ``seed``, so a run is reproducible bit for bit
  on the same CPU, and on the same GPU and software: on CUDA the run switches cuDNN to its
  deterministic algorithms (:func:`dfquant.devices.deterministic_cudnn`; without them two runs
  disagreed on 13 % of the codes on an H100). CPU and GPU results differ by float noise that
  the optimization amplifies (benchmarks/results/gpu_equivalence.md).
* ``keep_best`` (off by default) is ours: it restores a unit's starting state when training
  left its output error higher than at the start.
* Only the Genie paper's abstract could be consulted while writing this: its section number
  above is unverified and no equation numbers of it are cited; the method follows the release.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .devices import deterministic_cudnn, resolve_device as _resolve_device
from .errors import DfquantError
from .graph import replace_module
from .modelcheck import check_runs
from .qmodules import QUANT_LAYERS, ActQuantizer, QuantConv2d
from .quantizer import params_from_range, qrange, to_grid

__all__ = [
    "GPU_DEFAULTS",
    "CPU_BUDGET",
    "HYPERPARAMETERS",
    "BLOCK_CLASS_NAMES",
    "find_units",
    "lr_round_for",
    "initial_rounding",
    "reconstruct_model",
]

#: The paper's / release's budget (``main.py``): 1024 synthetic images, 20000 iterations per unit,
#: batches of 32. ``None`` for the synthesis settings means the synthesis method's own published
#: defaults (Genie-D: 4000 iterations per batch of 128; ZeroQ: 500 per batch of 32).
GPU_DEFAULTS: Dict[str, Optional[int]] = dict(samples=1024, distill_iters=None, distill_batch=None, recon_iters=20000, batch_size=32)

#: A budget for this project's 2-core CPU: 256 images synthesized in 2 batches of 128 at 150
#: iterations (``dfquant.synthesis.CPU_BUDGET``), then 500 iterations per unit on batches of 32
#: (40x fewer than the paper); learning rates and schedules stay the release's. Measured times
#: and accuracies: the module docstring, "Measured with the CPU budget".
CPU_BUDGET: Dict[str, Any] = dict(samples=256, distill_iters=150, distill_batch=128, recon_iters=500, batch_size=32)

#: Optimisation settings of the release (``reconstruct_block`` defaults, ``main.py``).
HYPERPARAMETERS: Dict[str, Any] = dict(
    lr_w_scale=1e-4,  # Adam, weight step sizes (cosine-annealed)
    lr_a_scale=4e-5,  # Adam, activation step sizes (cosine-annealed)
    lr_round=None,  # Adam, rounding variables V (constant): None = budget rule, see lr_round_for
    round_weight=1.0,  # lambda of the rounding regulariser (unnormalised sum)
    beta=(20.0, 2.0),  # annealing range of the regulariser's exponent
    warmup=0.2,  # fraction of iterations before the regulariser starts and beta decays
    drop_prob=0.5,  # QDrop: probability that an element keeps its float value
)

#: The release's rounding learning rate and the iteration count it was set for: its product, the
#: distance Adam may move each ``V`` over a unit's training, is what :func:`lr_round_for` keeps.
RELEASE_LR_ROUND, RELEASE_RECON_ITERS = 1e-3, 20000

#: The largest default rounding learning rate (the rule's value at 200 iterations). Without it a
#: short run got a rate that scrambled the rounding: 1.0 at 20 iterations left ResNet-20 W4A4's
#: unit error at 186 against 33 at 0.04 (benchmarks/results/genie_lr_round_short.md).
LR_ROUND_CAP = 0.1


def lr_round_for(recon_iters: int) -> float:
    """Default rounding learning rate for ``recon_iters`` iterations: the release's lr x iterations.

    The release trains ``V`` with Adam at lr 1e-3 for 20000 iterations. Adam moves a parameter by at
    most about ``lr`` per step, so at 500 iterations that lr lets ``V`` travel 0.5 where the release
    allows 20: measured on CIFAR ResNet-20, 77 % of the soft rounding values were still undecided
    when the hard rounding was taken. Keeping ``lr * iterations`` at the release's 20 (1e-3 at 20000
    iterations, 0.04 at the CPU budget's 500) settles them; the rate was chosen on synthetic data only
    (benchmarks/results/genie_lr_round.md). Below 200 iterations the rate stays at
    :data:`LR_ROUND_CAP` (0.1): at 20 and 50 iterations the rule's 1.0 and 0.4 gave a higher unit
    error on the training images than 0.04 or 0.1 at both W4A4 and W2A4
    (benchmarks/results/genie_lr_round_short.md).
    """
    return min(LR_ROUND_CAP, RELEASE_LR_ROUND * RELEASE_RECON_ITERS / max(int(recon_iters), 1))


#: Class names whose modules are reconstructed as one unit (the release's list in ``main.py``).
BLOCK_CLASS_NAMES = ("BasicBlock", "Bottleneck", "ResBottleneckBlock", "DwsConvBlock", "ConvBlock", "InvertedResidual")

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch (Eq. 23)
_INIT_MARGIN = 0.01  # soft values start at least this far from 1/2
_EPS = 1e-8
_LP_NORM = 2.4  # the release's init_scale criterion
_BUDGETS = ("auto", "cpu", "gpu")
_ACT_CALIB = ("bn", "data")


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


def _quant_layer_names(module: nn.Module, prefix: str) -> List[str]:
    return [f"{prefix}.{n}" if n else prefix for n, m in module.named_modules() if isinstance(m, QUANT_LAYERS)]


def find_units(qmodel: nn.Module) -> List[Tuple[str, List[str]]]:
    """The reconstruction units of a quantized model: ``(module name, [quantized layer names])``.

    Blocks (class name in :data:`BLOCK_CLASS_NAMES`, or a non-container child of an
    ``nn.Sequential`` holding >= 2 quantized layers) form one unit; every other quantized layer is
    its own unit. Returned in registration order (``reconstruct_model`` sorts by execution order).
    """
    units: List[Tuple[str, List[str]]] = []
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, QUANT_LAYERS):
                units.append((full, [full]))
                continue
            layers = _quant_layer_names(child, full)
            if not layers:
                continue
            is_block = type(child).__name__ in BLOCK_CLASS_NAMES or (
                isinstance(module, nn.Sequential) and len(layers) >= 2 and not isinstance(child, containers)
            )
            if is_block:
                units.append((full, layers))
            else:
                visit(full, child)

    if isinstance(qmodel, QUANT_LAYERS):
        return [("", [""])]
    visit("", qmodel)
    return units


# --------------------------------------------------------------------------------------------
# The trainable stand-in of one quantized layer
# --------------------------------------------------------------------------------------------


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid h(V) (Eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _rect_sigmoid_inverse(r: torch.Tensor) -> torch.Tensor:
    """V with h(V) = r for r in [0, 1] (finite: the stretch puts 0 and 1 inside the sigmoid's range)."""
    return -torch.log((_ZETA - _GAMMA) / (r - _GAMMA) - 1.0)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def initial_rounding(w_float: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int):
    """Base ``B`` and rounding variables ``V`` whose hard rounding reproduces ``codes`` exactly.

    See the module docstring ("Starting from the given codes"). Returns ``(B, V)`` as float tensors
    shaped like the weight.
    """
    from .quantizer import QParams

    qp = QParams(scale, zero_point, bits, True)
    g = to_grid(w_float.detach().float(), qp)
    c = codes.float()
    up = c > g
    base = c - up.float()
    r = (g - base).clamp(0.0, 1.0)
    against = torch.where(up, r < 0.5, r >= 0.5)  # codes that are not round-to-nearest (SQuant flips)
    r = torch.where(against, 1.0 - r, r)  # mirrored: as confident as round-to-nearest would be
    r = torch.where(up, r.clamp_min(0.5 + _INIT_MARGIN), r.clamp_max(0.5 - _INIT_MARGIN))
    v = _rect_sigmoid_inverse(r)
    v = torch.where(up, v.clamp_min(1e-4), v.clamp_max(-1e-4))  # exact: V >= 0 <=> bit 1
    return base, v


class _GenieLayer(nn.Module):
    """A QuantConv2d/QuantLinear during reconstruction: soft rounding, learned steps, LSQ + QDrop."""

    def __init__(self, layer: nn.Module, w_float: torch.Tensor, drop_prob: float, rng: torch.Generator):
        super().__init__()
        self.layer = layer
        self.bits = layer.w_bits
        self.qmin, self.qmax = qrange(layer.w_bits, True)
        self.is_conv = isinstance(layer, QuantConv2d)
        base, v = initial_rounding(w_float, layer.weight_int, layer.weight_scale, layer.weight_zero_point, layer.w_bits)
        view = (-1,) + (1,) * (base.dim() - 1)
        self.register_buffer("base", base)
        self.register_buffer("w_zp", layer.weight_zero_point.detach().clone().reshape(view))
        self.v = nn.Parameter(v)
        self.w_scale = nn.Parameter(layer.weight_scale.detach().clone().reshape(view))
        aq: Optional[ActQuantizer] = layer.input_quant
        if aq is not None:
            self.a_bits = aq.bits
            self.a_qmin, self.a_qmax = qrange(aq.bits, False)
            self.a_scale: Optional[nn.Parameter] = nn.Parameter(aq.scale.detach().clone())
            self.register_buffer("a_zp", aq.zero_point.detach().clone())
        else:
            self.a_scale = None
        self.soft = True
        self.drop_prob = drop_prob
        self.rng = rng

    # weights ---------------------------------------------------------------------------------
    def soft_bits(self) -> torch.Tensor:
        return _rect_sigmoid(self.v)

    def codes(self) -> torch.Tensor:
        """Hard integer codes (float tensor)."""
        return torch.clamp(self.base + (self.v >= 0).float(), self.qmin, self.qmax)

    def weight(self) -> torch.Tensor:
        q = torch.clamp(self.base + (self.soft_bits() if self.soft else (self.v >= 0).float()), self.qmin, self.qmax)
        return (q - self.w_zp) * self.w_scale.clamp_min(_EPS)

    def round_loss(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser sum(1 - |2h(V) - 1|^beta) (Eq. 24)."""
        return (1.0 - (2.0 * self.soft_bits() - 1.0).abs().pow(beta)).sum()

    # activations -----------------------------------------------------------------------------
    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_scale is None:
            return x
        s = self.a_scale.clamp_min(_EPS)
        q = torch.clamp(_round_ste(x / s) + self.a_zp, self.a_qmin, self.a_qmax)
        xq = (q - self.a_zp) * s
        if self.soft and self.drop_prob > 0:  # QDrop: keep the float value with prob. drop_prob
            keep = torch.rand(x.shape, generator=self.rng, device=x.device) < self.drop_prob
            xq = torch.where(keep, x, xq)
        return xq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant_input(x)
        w = self.weight()
        lay = self.layer
        if self.is_conv:
            return F.conv2d(x, w, lay.bias, lay.stride, lay.padding, lay.dilation, lay.groups)
        return F.linear(x, w, lay.bias)

    @torch.no_grad()
    def commit(self) -> None:
        """Write the hard codes and learned steps into the wrapped quantized layer."""
        lay = self.layer
        lay.weight_int.copy_(self.codes().to(lay.weight_int.dtype))
        lay.weight_scale.copy_(self.w_scale.detach().clamp_min(_EPS).reshape(-1))
        if self.a_scale is not None:
            lay.input_quant.scale.copy_(self.a_scale.detach().clamp_min(_EPS).reshape(()))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted tensor is captured."""


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def _capture(net: nn.Module, module: nn.Module, data: torch.Tensor, chunk: int, device, want_output: bool):
    """Input (and output) of ``module`` when ``net`` runs on ``data`` (in chunks); stops early."""
    xs: List[torch.Tensor] = []
    ys: List[torch.Tensor] = []

    def pre(mod, args):
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise DfquantError(f"Genie-M units must take one tensor input; {type(mod).__name__} gets {len(args)} arguments")
        xs.append(args[0].detach().clone())  # a copy: a unit may add to its input in place (x += ...)
        if not want_output:
            raise _Stop

    def post(mod, args, out):
        if not isinstance(out, torch.Tensor):
            raise DfquantError(f"Genie-M units must return one tensor; {type(mod).__name__} returns {type(out).__name__}")
        ys.append(out.detach())
        raise _Stop

    h1 = module.register_forward_pre_hook(pre)
    h2 = module.register_forward_hook(post) if want_output else None
    try:
        for sl in _chunks(data.shape[0], chunk):
            try:
                net(data[sl].to(device))
            except _Stop:
                pass
    finally:
        h1.remove()
        if h2 is not None:
            h2.remove()
    if len(xs) != math.ceil(data.shape[0] / chunk):
        raise DfquantError("a reconstruction unit was not reached by the forward pass")
    return torch.cat(xs), (torch.cat(ys) if want_output else None)


def _recon_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over batch and positions (release)."""
    return (out - target).pow(2).sum(1).mean()


@torch.no_grad()
def _unit_error(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    total, n = 0.0, x.shape[0]
    for sl in _chunks(n, chunk):
        total += float(_recon_error(unit(x[sl].clone()), y[sl])) * (sl.stop - sl.start)  # the unit may write to its input
    return total / n


@torch.no_grad()
def _lp_act_range(x: torch.Tensor, bits: int) -> Tuple[float, float]:
    """The release's activation-range search: clipping ratio 1.00..0.01, minimum mean |x - Q(x)|^2.4."""
    x = x.detach().float().reshape(-1)
    lo0, hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi0 - lo0 <= 0:
        return lo0, lo0 + 1e-6
    qmin, qmax = qrange(bits, False)
    best, best_range = math.inf, (lo0, hi0)
    for k in range(100, 0, -1):
        r = k / 100.0
        lo, hi = lo0 * r, hi0 * r
        qp = params_from_range(torch.tensor(lo), torch.tensor(max(hi, lo + 1e-6)), bits, signed=False)
        s, z = qp.scale.to(x.device), qp.zero_point.to(x.device)
        xq = (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
        score = float((x - xq).abs().pow(_LP_NORM).mean())
        if score < best:
            best, best_range = score, (lo, hi)
    return best_range


@torch.no_grad()
def _calibrate_unit_activations(unit: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor) -> None:
    """act_calib="data": set each layer's input range from its observed input (in execution order)."""
    done = set()

    def hook(mod, args):
        if id(mod) in done or mod.input_quant is None:
            return
        done.add(id(mod))
        aq = mod.input_quant
        lo, hi = _lp_act_range(args[0], aq.bits)
        qp = params_from_range(torch.tensor(lo), torch.tensor(max(hi, lo + 1e-6)), aq.bits, signed=False)
        aq.scale.copy_(qp.scale.reshape(()).to(aq.scale.device))
        aq.zero_point.copy_(qp.zero_point.reshape(()).to(aq.zero_point.device))

    handles = [lay.register_forward_pre_hook(hook) for lay in layers]
    try:
        unit(x.clone())  # the unit may write to its input
    finally:
        for h in handles:
            h.remove()


def _beta_schedule(it: int, iters: int, warmup: float, beta: Tuple[float, float]) -> float:
    """The release's LinearTempDecay: beta_start until the warm-up ends, then linear to beta_end."""
    start = warmup * iters
    if it < start:
        return beta[0]
    rel = (it - start) / max(iters - start, 1e-12)
    return beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - rel)


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DfquantError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_float(value: Any, what: str, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    ok = ok and (float(value) > lo if lo_open else float(value) >= lo) and float(value) <= hi
    if not ok:
        upper = ")" if math.isinf(hi) else "]"  # a finite number: an infinite bound is open
        raise DfquantError(f"{what} must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{upper}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Reconstruction of one unit
# --------------------------------------------------------------------------------------------


def _check_beta(value: Any) -> Tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise DfquantError(f"beta must be a pair (start, end), got {value!r}")
    return (_check_float(value[0], "beta start", 0.0, lo_open=True), _check_float(value[1], "beta end", 0.0, lo_open=True))


@dataclass
class _Settings:
    recon_iters: int
    batch_size: int
    lr_w_scale: float
    lr_a_scale: float
    lr_round: float
    round_weight: float
    beta: Tuple[float, float]
    warmup: float
    drop_prob: float


@dataclass
class _UnitRecord:
    name: str
    layers: List[str]
    before: float = 0.0
    after: float = 0.0
    codes_changed: int = 0
    weights: int = 0
    time_s: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)


def _train_unit(unit: nn.Module, wrappers: Sequence[_GenieLayer], x_fp, x_q, y, st: _Settings, gen_cpu, gen_dev, tick) -> float:
    """Adam on (steps, V) of one unit: the release's ``reconstruct_block`` objective and schedule.

    Returns the fraction of soft rounding values not yet within 0.01 of 0 or 1 at the end.
    """
    w_scales = [w.w_scale for w in wrappers]
    a_scales = [w.a_scale for w in wrappers if w.a_scale is not None]
    groups = [{"params": w_scales, "lr": st.lr_w_scale}]
    if a_scales:
        groups.append({"params": a_scales, "lr": st.lr_a_scale})
    opt_scale = torch.optim.Adam(groups)
    opt_round = torch.optim.Adam([w.v for w in wrappers], lr=st.lr_round)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_scale, T_max=st.recon_iters)
    n = x_q.shape[0]
    bs = min(st.batch_size, n)
    batches: List[torch.Tensor] = []
    for w in wrappers:
        w.soft = True
    for it in range(1, st.recon_iters + 1):
        if not batches:
            perm = torch.randperm(n, generator=gen_cpu)
            batches = [perm[i : i + bs] for i in range(0, n - bs + 1, bs)]
        idx = batches.pop(0).to(x_q.device)
        xf, xq, target = x_fp[idx], x_q[idx], y[idx]
        if st.drop_prob > 0:  # QDrop on the unit's input: float or quantized-model input
            keep = torch.rand(xq.shape, generator=gen_dev, device=xq.device) < st.drop_prob
            xin = torch.where(keep, xf, xq)
        else:
            xin = xq
        rec = _recon_error(unit(xin), target)
        beta = _beta_schedule(it, st.recon_iters, st.warmup, st.beta)
        if it >= st.warmup * st.recon_iters:
            rnd = sum(w.round_loss(beta) for w in wrappers)
        else:
            rnd = rec.new_zeros(())
        loss = rec + st.round_weight * rnd
        opt_scale.zero_grad(set_to_none=True)
        opt_round.zero_grad(set_to_none=True)
        loss.backward()
        opt_scale.step()
        opt_round.step()
        sched.step()
        tick(it, float(rec.detach()), float(rnd.detach()), beta)
    with torch.no_grad():  # soft bits still away from 0/1: the soft-to-hard gap at the end
        h = torch.cat([w.soft_bits().reshape(-1) for w in wrappers])
        undecided = float(((h > 0.01) & (h < 0.99)).float().mean())
    for w in wrappers:
        w.soft = False
    return undecided


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def reconstruct_model(
    model: nn.Module,
    qmodel: nn.Module,
    cfg: Any,
    report: Any,
    *,
    input_size: Optional[Tuple[int, ...]] = None,
    progress: bool = False,
    budget: str = "auto",
    samples: Optional[int] = None,
    distill_iters: Optional[int] = None,
    distill_batch: Optional[int] = None,
    recon_iters: Optional[int] = None,
    batch_size: Optional[int] = None,
    synthetic: Any = None,
    save_synthetic: Any = None,
    act_calib: str = "data",
    device: str = "auto",
    seed: int = 0,
    drop_prob: Optional[float] = None,
    lr_w_scale: Optional[float] = None,
    lr_a_scale: Optional[float] = None,
    lr_round: Optional[float] = None,
    round_weight: Optional[float] = None,
    beta: Optional[Tuple[float, float]] = None,
    warmup: Optional[float] = None,
    keep_best: bool = False,
    **unknown: Any,
) -> nn.Module:
    """Genie-M: refine ``qmodel`` (a rounding-initialised copy of ``model``) on synthetic data.

    Called by :func:`dfquant.quantize` for ``method="genie"`` / ``"zeroq"``; options are passed
    through ``quantize(..., **options)``. Returns ``qmodel`` itself (modified in place: final hard
    codes in ``weight_int``, learned steps in ``weight_scale`` and ``input_quant.scale``, zero
    points unchanged) on the CPU. ``model`` is never modified.

    Options:
        budget: ``"gpu"`` (:data:`GPU_DEFAULTS`, the paper's), ``"cpu"`` (:data:`CPU_BUDGET`) or
            ``"auto"`` (gpu settings on CUDA, cpu settings otherwise); supplies every setting
            below that is left at ``None``.
        samples: number of synthetic images. distill_iters, distill_batch: synthesis iterations
            per batch and images per batch (``None`` under the gpu budget: the method's own).
        recon_iters: Adam iterations per unit (0: no training; the result is the start).
        batch_size: reconstruction batch size.
        synthetic: a (N, C, H, W) tensor, or a file or list of files from
            :func:`dfquant.synthesis.save_images` (concatenated in order), of images to use
            instead of synthesizing; with ``samples`` the first ``samples``.
        save_synthetic: path to save the images used (safetensors).
        act_calib: ``"data"`` (default, the release's) first searches each activation range on
            the synthetic data; ``"bn"`` keeps the BatchNorm-derived ranges as LSQ's start.
        device: ``"cpu"``, ``"cuda"``/``"cuda:K"`` or ``"auto"``. seed: all randomness.
        drop_prob, lr_w_scale, lr_a_scale, round_weight, beta, warmup: see
            :data:`HYPERPARAMETERS` (the release's values). lr_round: the rounding variables'
            Adam lr; ``None`` = :func:`lr_round_for` ``(recon_iters)`` (the release's lr x iterations).
        keep_best: after each unit, if its output error on the synthetic data (hard-quantized,
            quantized-model input) is higher than at its start, restore the start (not in the
            paper or release; off by default). The unit record says ``kept_start``.

    Records in ``report.config["genie"]`` the settings, the synthesis and reconstruction times and,
    per unit, the output error before and after (``units``); updates each layer's report entry.
    """
    if unknown:
        raise DfquantError(
            f"unknown option(s) for method {getattr(cfg, 'method', 'genie')!r}: {', '.join(sorted(unknown))}; "
            "Genie options: budget, samples, distill_iters, distill_batch, recon_iters, batch_size, synthetic, "
            "save_synthetic, act_calib, device, seed, drop_prob, lr_w_scale, lr_a_scale, lr_round, round_weight, beta, warmup, keep_best"
        )
    if budget not in _BUDGETS:
        raise DfquantError(f"unknown budget {budget!r}; choose {', '.join(_BUDGETS)}")
    if save_synthetic is not None:  # checked before minutes of synthesis, not after
        from .serialization import check_output_paths
        from .synthesis import images_path

        check_output_paths((images_path(save_synthetic),))
    if act_calib not in _ACT_CALIB:
        raise DfquantError(f"unknown act_calib {act_calib!r}; choose bn or data")
    if act_calib == "data" and (getattr(cfg, "n_sigma", None) is not None or getattr(cfg, "act_range", "dfq") != "dfq"):
        raise DfquantError(
            "n_sigma / act_range set the BN-statistics activation ranges, which act_calib='data' (the default) "
            "replaces by a search on the synthetic images: use them with act_calib='bn' (--act-calib bn)"
        )
    dev = _resolve_device(device)
    budget_used = budget if budget != "auto" else ("gpu" if dev.type == "cuda" else "cpu")
    base = dict(GPU_DEFAULTS if budget_used == "gpu" else CPU_BUDGET)
    hp = dict(HYPERPARAMETERS)
    hp.update({k: v for k, v in base.items() if k in hp})
    pick = lambda given, key, src: src[key] if given is None else given  # noqa: E731
    samples_given = samples is not None
    samples = pick(samples, "samples", base)
    distill_iters = pick(distill_iters, "distill_iters", base)
    distill_batch = pick(distill_batch, "distill_batch", base)
    recon_iters = _check_int(pick(recon_iters, "recon_iters", base), "recon_iters", 0)
    st = _Settings(
        recon_iters=recon_iters,
        batch_size=_check_int(pick(batch_size, "batch_size", base), "batch_size", 1),
        lr_w_scale=_check_float(pick(lr_w_scale, "lr_w_scale", hp), "lr_w_scale"),
        lr_a_scale=_check_float(pick(lr_a_scale, "lr_a_scale", hp), "lr_a_scale"),
        lr_round=lr_round_for(recon_iters) if lr_round is None else _check_float(lr_round, "lr_round"),
        round_weight=_check_float(pick(round_weight, "round_weight", hp), "round_weight"),
        beta=_check_beta(pick(beta, "beta", hp)),
        warmup=_check_float(pick(warmup, "warmup", hp), "warmup", 0.0, 1.0),
        drop_prob=_check_float(pick(drop_prob, "drop_prob", hp), "drop_prob", 0.0, 1.0),
    )
    if samples is not None:
        samples = _check_int(samples, "samples", 1)
    if distill_iters is not None:
        distill_iters = _check_int(distill_iters, "distill_iters", 1)
    if distill_batch is not None:
        distill_batch = _check_int(distill_batch, "distill_batch", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DfquantError(f"seed must be an integer, got {seed!r}")
    if not isinstance(keep_best, bool):
        raise DfquantError(f"keep_best must be True or False, got {keep_best!r}")

    info: Dict[str, Any] = dict(
        budget=budget_used,
        device=str(dev),
        seed=seed,
        act_calib=act_calib,
        init=getattr(cfg, "init", None),
        recon_iters=st.recon_iters,
        batch_size=st.batch_size,
        lr_w_scale=st.lr_w_scale,
        lr_a_scale=st.lr_a_scale,
        lr_round=st.lr_round,
        round_weight=st.round_weight,
        beta=list(st.beta),
        warmup=st.warmup,
        drop_prob=st.drop_prob,
        keep_best=keep_best,
    )

    # (1) synthetic data ------------------------------------------------------------------------
    t0 = time.perf_counter()
    data_method = "zeroq" if getattr(cfg, "method", "genie") == "zeroq" else "genie"
    if synthetic is not None:
        files = None
        if isinstance(synthetic, (str, Path)) or (
            isinstance(synthetic, (list, tuple)) and synthetic and all(isinstance(p, (str, Path)) for p in synthetic)
        ):
            from .synthesis import load_image_files

            files = [str(p) for p in ([synthetic] if isinstance(synthetic, (str, Path)) else synthetic)]
            synthetic, _ = load_image_files(files)
        if not isinstance(synthetic, torch.Tensor) or synthetic.dim() != 4 or synthetic.shape[0] < 1:
            raise DfquantError("synthetic must be a non-empty (N, C, H, W) tensor of images")
        if samples_given:
            if samples > synthetic.shape[0]:
                raise DfquantError(f"samples={samples} but only {synthetic.shape[0]} synthetic images were given")
            synthetic = synthetic[:samples]
        expected = input_size if input_size is not None else getattr(model, "input_size", None)
        if expected is not None and tuple(synthetic.shape[1:]) != tuple(int(s) for s in expected):
            raise DfquantError(f"synthetic images have shape {tuple(synthetic.shape[1:])} per image; the model expects {tuple(expected)}")
        if expected is None:
            check_runs(model, tuple(synthetic.shape[1:]))
        images = synthetic.detach().float().cpu()
        info["data"] = dict(source="given", n=int(images.shape[0]))
        if files is not None:
            info["data"].update(source="files", files=files)
    else:
        from .synthesis import synthesize

        images = synthesize(
            model,
            samples,
            method=data_method,
            batch_size=distill_batch,
            iters=distill_iters,
            input_size=tuple(input_size) if input_size is not None else None,
            device=str(dev),
            seed=seed,
            progress=progress,
        )
        info["data"] = dict(source=f"synthesized ({data_method})", n=int(images.shape[0]), distill_iters=distill_iters, distill_batch=distill_batch)
    if not torch.isfinite(images).all():
        raise DfquantError(f"the {info['data']['source']} calibration images contain NaN or inf values: nothing can be reconstructed on them")
    synth_time = time.perf_counter() - t0
    info["synthesis_time_s"] = synth_time
    if save_synthetic is not None:
        from .synthesis import save_images

        written = save_images(images, save_synthetic, metadata=dict(method=data_method, seed=seed, source=info["data"]["source"]))
        info["data"]["saved_to"] = str(written)

    # (2) float reference ----------------------------------------------------------------------
    t1 = time.perf_counter()
    if getattr(cfg, "fold_bn", False):
        from .graph import fold_bn

        ref = fold_bn(model)  # works on a copy
    else:
        ref = copy.deepcopy(model)
    ref.eval().requires_grad_(False).to(dev)
    grad_flags = {p: p.requires_grad for p in qmodel.parameters()}
    qmodel.eval().requires_grad_(False).to(dev)

    # (3) units in execution order -------------------------------------------------------------
    units = find_units(qmodel)
    order = _execution_order(qmodel, images[: min(2, images.shape[0])].to(dev))
    for _, layers in units:
        for name in layers:
            if order.get(name, (None, 0))[1] > 1:
                raise DfquantError(f"layer {name} runs {order[name][1]} times per forward pass; Genie-M needs each layer used once")
            ref_layer = _get(ref, name)
            q_layer = _get(qmodel, name)
            if not isinstance(ref_layer, (nn.Conv2d, nn.Linear)) or tuple(ref_layer.weight.shape) != tuple(q_layer.weight_int.shape):
                raise DfquantError(f"the float model's {name!r} does not match the quantized layer")
    skipped = [(u, ls) for u, ls in units if any(n not in order for n in ls)]
    units = [(u, ls) for u, ls in units if all(n in order for n in ls)]
    units.sort(key=lambda u: min(order[n][0] for n in u[1]))
    for u, layers in units:
        layers.sort(key=lambda n: order[n][0])

    # An image input range given explicitly (quantize_first_input with input_range) is the
    # caller's: act_calib="data" does not replace it by a search on the synthetic images.
    given_range = set()
    if getattr(cfg, "quantize_first_input", False) and getattr(cfg, "input_range", None) is not None and order:
        given_range.add(min(order, key=lambda n: order[n][0]))

    gen_cpu = torch.Generator().manual_seed(int(seed) + 1)
    gen_dev = torch.Generator(device=dev).manual_seed(int(seed) + 2)
    from .progress import progress_bar

    total = st.recon_iters * len(units)
    bar = progress_bar(range(total), desc="Genie-M reconstruction", enable=progress and total > 0, total=total)
    ticks = iter(bar)
    records: List[_UnitRecord] = []
    chunk = max(st.batch_size, 64)
    images_dev = images.to(dev)
    cudnn_flags = contextlib.ExitStack()  # closed in the finally below
    try:
        cudnn_flags.enter_context(deterministic_cudnn(dev))
        for ui, (uname, layers) in enumerate(units):
            tu = time.perf_counter()
            rec = _UnitRecord(uname, list(layers))
            x_fp, y = _capture(ref, _get(ref, uname), images_dev, chunk, dev, want_output=True)
            x_q, _ = _capture(qmodel, _get(qmodel, uname), images_dev, chunk, dev, want_output=False)
            q_layers = [_get(qmodel, n) for n in layers]
            unit_q = _get(qmodel, uname)
            rec.before = _unit_error(unit_q, x_q, y, chunk)
            start_codes = [lay.weight_int.clone() for lay in q_layers]
            start_state = [copy.deepcopy(lay.state_dict()) for lay in q_layers] if keep_best else None
            searched = [lay for n, lay in zip(layers, q_layers) if lay.input_quant is not None and n not in given_range]
            if act_calib == "data" and searched:
                _calibrate_unit_activations(unit_q, searched, x_q[: min(st.batch_size, x_q.shape[0])])
                rec.extra["after_act_calib"] = _unit_error(unit_q, x_q, y, chunk)
            if st.recon_iters > 0:
                wrappers = [_GenieLayer(lay, _get(ref, n).weight, st.drop_prob, gen_dev) for n, lay in zip(layers, q_layers)]
                for n, w in zip(layers, wrappers):
                    _set(qmodel, n, w)
                unit_train = _get(qmodel, uname)

                def tick(it, rec_loss, rnd_loss, b, _u=uname, _i=ui):
                    next(ticks, None)
                    if hasattr(bar, "set_postfix") and (it % 10 == 0 or it == st.recon_iters):
                        bar.set_postfix(unit=f"{_i + 1}/{len(units)} {_u}", rec=f"{rec_loss:.4g}", round=f"{rnd_loss:.4g}", b=f"{b:.1f}", refresh=False)

                try:
                    rec.extra["soft_undecided"] = _train_unit(unit_train, wrappers, x_fp, x_q, y, st, gen_cpu, gen_dev, tick)
                    for w in wrappers:
                        w.commit()
                finally:
                    for n, lay in zip(layers, q_layers):
                        _set(qmodel, n, lay)
            rec.after = _unit_error(_get(qmodel, uname), x_q, y, chunk)
            if keep_best and rec.after > rec.before:  # the guard: keep the unit's starting state
                for lay, state in zip(q_layers, start_state):
                    lay.load_state_dict(state)
                rec.extra["kept_start"] = True
                rec.extra["after_trained"] = rec.after
                rec.after = _unit_error(_get(qmodel, uname), x_q, y, chunk)
            rec.codes_changed = int(sum(int((lay.weight_int != c).sum()) for lay, c in zip(q_layers, start_codes)))
            rec.weights = int(sum(lay.weight_int.numel() for lay in q_layers))
            rec.time_s = time.perf_counter() - tu
            records.append(rec)
            del x_fp, x_q, y
        next(ticks, None)
    finally:
        cudnn_flags.close()
        if hasattr(bar, "close"):
            bar.close()
        qmodel.to("cpu")
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
    recon_time = time.perf_counter() - t1

    # (4) report -------------------------------------------------------------------------------
    info["reconstruction_time_s"] = recon_time
    info["units"] = [
        dict(name=r.name, layers=r.layers, before=r.before, after=r.after, codes_changed=r.codes_changed, weights=r.weights, time_s=r.time_s, **r.extra)
        for r in records
    ]
    if skipped:
        info["units_not_run"] = [u for u, _ in skipped]
    report.config["genie"] = info
    _update_layer_reports(report, qmodel, ref.to("cpu"))
    changed = sum(r.codes_changed for r in records)
    nweights = max(1, sum(r.weights for r in records))
    src = info["data"]["source"]
    report.notes.append(
        f"Genie-M ({budget_used} budget, init={info['init']}, act_calib={act_calib}): {len(records)} units x "
        f"{st.recon_iters} iterations on {images.shape[0]} images ({src}); "
        f"{changed} of {nweights} weight codes changed ({100.0 * changed / nweights:.1f}%); "
        f"unit output error before -> after: {sum(r.before for r in records):.4g} -> {sum(r.after for r in records):.4g} (sum over units); "
        f"synthesis {synth_time:.1f} s, reconstruction {recon_time:.1f} s"
    )
    if skipped:
        report.notes.append("Genie-M: units not reached by the forward pass were left as initialised: " + ", ".join(u for u, _ in skipped))
    return qmodel


def _get(root: nn.Module, name: str) -> nn.Module:
    return root if name == "" else root.get_submodule(name)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    if name == "":
        raise DfquantError("the model itself is a single quantized layer: nothing to reconstruct around it")
    replace_module(root, name, module)


@torch.no_grad()
def _execution_order(qmodel: nn.Module, x: torch.Tensor) -> Dict[str, Tuple[int, int]]:
    """name -> (first call index, number of calls) of every quantized layer in one forward pass."""
    seen: Dict[str, List[int]] = {}
    counter = [0]
    handles = []
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_LAYERS):

            def hook(mod, args, _n=name):
                if _n not in seen:
                    seen[_n] = [counter[0], 0]
                    counter[0] += 1
                seen[_n][1] += 1

            handles.append(m.register_forward_pre_hook(hook))
    try:
        qmodel(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (v[0], v[1]) for n, v in seen.items()}


@torch.no_grad()
def _update_layer_reports(report: Any, qmodel: nn.Module, ref: nn.Module) -> None:
    """Per-layer weight error, rounding-error sums and activation range after reconstruction."""
    from .squant import rounding_error_sums

    for lr in getattr(report, "layers", []):
        try:
            lay = qmodel.get_submodule(lr.name)
            w = ref.get_submodule(lr.name).weight.detach().float()
        except AttributeError:
            continue
        if not isinstance(lay, QUANT_LAYERS):
            continue
        wq = lay.weight
        lr.rel_weight_error = float((wq - w).norm() / w.norm().clamp_min(1e-12))
        grid = to_grid(w, lay.weight_qparams)
        lr.kernel_err_max, lr.channel_err_max = rounding_error_sums(lay.weight_int, grid if grid.dim() > 1 else grid.unsqueeze(1))
        if lay.input_quant is not None:
            lr.a_range = lay.input_quant.range
        lr.note = (lr.note + "; " if lr.note else "") + "Genie-M: learned rounding and step sizes"
