"""Synthetic calibration data from a model's BatchNorm statistics: Genie-D and a ZeroQ baseline.

Both methods look for inputs whose activations, at the input of every ``BatchNorm2d`` layer, have
the mean and standard deviation that the layer recorded on the real training data
(``running_mean`` and ``sqrt(running_var)``). They differ in *what* is optimized:

* ``method="genie"`` -- Genie-D (Jeon, Lee & Kim, "Genie: Show Me the Data for Quantization",
  CVPR 2023, arXiv:2212.04780, Sec. 3.1 "synthesizing data"). For every batch a fresh, small
  generator and the batch's latent vectors are trained *jointly*, each with its own Adam optimizer
  and learning-rate schedule; the images are the generator's output for the optimized latents.
  During synthesis every strided convolution of the model is replaced by a *swing convolution*
  (Sec. 3.1, "swing convolution"), which shifts its input by a random offset so that all pixels
  receive gradient and the images show no checkerboard artefacts.
* ``method="zeroq"`` -- ZeroQ's "distilled data" (Cai et al., "ZeroQ: A Novel Zero Shot
  Quantization Framework", CVPR 2020, Sec. 3.1, Eq. 2 and Algorithm 1): the pixels themselves are
  optimized from Gaussian noise.

The settings below were read from the papers and, where the papers leave them open, from the
authors' released code (``SamsungLabs/Genie`` ``distill.py``; ``amirgholami/ZeroQ``
``classification/distill_data.py``, ``utils/data_utils.py``, ``uniform_test.py``). This module is an
independent implementation written from that description; no code was copied.

Genie-D, as released (the GPU defaults in :data:`GENIE_DEFAULTS`)
-----------------------------------------------------------------
* Generator: latent (256) -> Linear -> reshape to (128, H/4, W/4) -> BN -> 2x nearest upsample ->
  3x3 conv 128->64 -> BN -> LeakyReLU(0.2) -> 2x upsample -> 3x3 conv 64->C -> tanh ->
  BN without affine parameters. The generator stays in training mode, so its BN layers use the
  batch's statistics and the final BN makes every channel of the batch zero-mean, unit-variance.
* Loss (the BNS loss, Genie Sec. 3.1, which follows ZeroQ Eq. 2): for every BN layer ``l`` with
  ``C_l`` channels, ``||mu_l - mu_hat_l||^2 / C_l + ||s_l - s_hat_l||^2 / C_l`` where ``mu_hat``
  and ``s_hat`` are the mean and (unbiased) standard deviation of that layer's input over the
  batch and both spatial axes, and ``s_l = sqrt(running_var + 1e-6)``. Plus an input term: the
  per-image, per-channel mean and std of the image itself are pulled to 0 and 1,
  ``sum_b ||m_b||^2 / B + sum_b ||sd_b - 1||^2 / B``.
* Optimizers: the latents use Adam (lr 0.1) with ``ReduceLROnPlateau(patience=100,
  min_lr=1e-4)`` stepped on the total loss every iteration; the generator uses Adam (lr 0.01)
  with ``ExponentialLR(gamma=0.95)`` stepped once every 100 iterations. NOTE: in the released
  ``distill_data`` the arguments are called ``lr_g=0.1`` ("lr of generator") and ``lr_z=0.01``
  ("lr of latent vector"), but the code hands ``lr_g`` to the latents' optimizer and ``lr_z`` to
  the generator's. We reproduce what the code *does* (the run that produced the published
  numbers) and name our arguments after what they apply to: ``lr_z`` = latents = 0.1,
  ``lr_g`` = generator = 0.01.
* 4000 iterations per batch, batch size 128 (1024 images in the paper's ImageNet runs).
* Swing convolution: each ``Conv2d`` with stride != 1 reflect-pads its input by 1 pixel on every
  side and crops back to the original size at a random offset in {0, 1, 2} along each axis (one
  offset per forward call and layer, shared by the batch), then applies the original conv.
* The returned images are those of the last iteration's forward pass (whose loss is the one
  reported), as in the release.

ZeroQ (the defaults in :data:`ZEROQ_DEFAULTS`)
----------------------------------------------
* Pixels initialized from N(0, 1) (ZeroQ Algorithm 1; their release draws uniform integer noise
  scaled by 1/5418.75, i.e. std ~0.014 -- we follow the paper), Adam lr 0.5,
  ``ReduceLROnPlateau(patience=100, min_lr=1e-4)``, 500 iterations, batch size 32.
* ZeroQ's loss is the same BN-statistics loss but with *per-image* statistics: for each image
  the mean and ``sqrt(var + 1e-6)`` over the spatial axes, compared with the running statistics
  and averaged over the images (``||mu - mu_hat_b||^2`` summed over channels, mean over b), plus
  the same per-image input term. We keep that form (``per_sample=True`` in
  :func:`bn_statistics_loss`) so the baseline is ZeroQ's and not a hybrid; the batch-level form
  above is what Genie optimizes. ZeroQ's release hooks the outputs of the convolutions that
  precede the BN layers; we hook the BN inputs directly, which is the same tensor for
  conv -> BN pairs and stays right when the module order differs.
* No swing convolution (``swing=None`` means on for Genie, off for ZeroQ; it can be forced).

Deviations from the releases (all methods)
------------------------------------------
* ``n`` need not be a multiple of the batch size: the images are made in ``ceil(n / batch_size)``
  batches of near-equal size (the releases make ``n // batch_size`` full batches).
* Randomness (latents, initial pixels, generator weights, swing offsets) comes from generators
  seeded by ``seed``, so a run on CPU is reproducible; the caller's global RNG state is untouched.
  The release's swing draws from NumPy's global RNG.
* The generator's first spatial size is ``ceil(H / 4) x ceil(W / 4)`` and its output is
  center-cropped to ``H x W`` when ``H`` or ``W`` is not a multiple of 4 (the release assumes
  224 x 224 and 3 channels); it emits the model's channel count ``C``.
* Swing convolution is skipped (identity shift) for feature maps with a side of 1 pixel, where
  reflect padding is undefined.
* BN layers without running statistics (``track_running_stats=False``) are ignored.

CPU budget
----------
:data:`CPU_BUDGET` (150 iterations, batches of 128) is a far smaller budget for the 2-core CPU this
project is developed on: 256 images for the CIFAR ResNet-20 took 170 s (Genie-D) and 94 s (ZeroQ)
on one thread of one CPU, and 569 s and 433 s on another with a second job running (the
measurements are noted at :data:`CPU_BUDGET` and in ``genie_cifar_headline.md``). The loss is already ~1-2 % of random noise's, but the images are less
converged than with the paper's 4000 iterations; use the GPU defaults (``device="cuda"``) when a
GPU is available.

Files
-----
:func:`save_images` writes ``NAME.safetensors`` (a name already ending in ``.safetensors`` is used
as given; any other gets the suffix appended, so ``syn_seed0.5`` keeps its dot); the PNG grid of
:func:`save_image_grid` goes beside it as ``NAME.png`` (:func:`grid_path`). Neither creates
folders: a missing output folder is refused, so a typo cannot create a directory tree. The
metadata is stored with sorted keys, so two identical runs write byte-identical files.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .devices import deterministic_cudnn, resolve_device as _resolve_device
from .errors import DfquantError
from .files import atomic_write, check_writable
from .modelcheck import check_runs, copy_model, float32_eval_cpu

__all__ = [
    "GENIE_DEFAULTS",
    "ZEROQ_DEFAULTS",
    "CPU_BUDGET",
    "BN_STD_EPS",
    "GenieGenerator",
    "SwingConv2d",
    "bn_statistics_loss",
    "synthesize",
    "save_images",
    "images_path",
    "grid_path",
    "load_images",
    "load_image_files",
    "images_metadata",
    "save_image_grid",
]

#: Genie-D's settings as released (GPU): iterations and batch size per batch of images, Adam
#: learning rates of the generator (``lr_g``) and of the latents (``lr_z``), latent size.
GENIE_DEFAULTS: Dict[str, float] = dict(iters=4000, batch_size=128, lr_g=0.01, lr_z=0.1, latent_dim=256)

#: ZeroQ's settings as released: 500 Adam steps at lr 0.5 on the pixels, batches of 32.
ZEROQ_DEFAULTS: Dict[str, float] = dict(iters=500, batch_size=32, lr_z=0.5)

#: A small budget for CPUs (either method): 150 iterations per batch of 128 instead of 4000.
#: Wall times for 256 images on this project's 2-core CPU, one torch thread, the other core busy
#: (benchmarks/results/genie_cifar_resnet20.md and _resnet56.md): ResNet-20 Genie 569 s, ZeroQ
#: 433 s; ResNet-56 Genie 1425 s, ZeroQ 1256 s. On a busy 2-core machine prefer one thread:
#: OpenMP's two spinning threads contending with another process run much slower than one.
#: The returned images' BN statistics are far closer to the running ones than noise's (tested on
#: digits, tests/test_synthesis.py); the paper's 4000 GPU iterations go further. Results are
#: bit-for-bit reproducible for a seed and a given thread count (the thread count changes float
#: summation order).
CPU_BUDGET: Dict[str, int] = dict(iters=150, batch_size=128)

#: Added to ``running_var`` before the square root, as both releases do.
BN_STD_EPS = 1e-6

_METHODS = ("genie", "zeroq")


# --------------------------------------------------------------------------------------------
# BN statistics loss
# --------------------------------------------------------------------------------------------


def _bn_layers(model: nn.Module) -> List[nn.BatchNorm2d]:
    """The model's BatchNorm2d layers that carry running statistics, in module order."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None
    ]


def _check_has_bn(model: nn.Module) -> List[nn.BatchNorm2d]:
    layers = _bn_layers(model)
    if not layers:
        other = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
        found = f" (it has {', '.join(other)}, which synthesis does not read)" if other else ""
        raise DfquantError(
            f"model {type(model).__name__} has no BatchNorm2d layer with running statistics{found}: Genie/ZeroQ synthesis needs BN statistics"
        )
    return layers


class _BNInputs:
    """Forward pre-hooks that keep the latest input of each BN layer (Genie Sec. 3.1 taps).

    The tensors are kept by reference (no copy in the synthesis loop); :attr:`inputs` checks that
    none was written to in place after its BN read it (``x += ...`` in the model's forward), which
    would make the statistics those of another tensor."""

    def __init__(self, layers: Sequence[nn.BatchNorm2d]):
        self._taps: List[Optional[Tuple[torch.Tensor, int]]] = [None] * len(layers)
        self._handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self._taps[i] = (x, x._version)

        return hook

    @property
    def inputs(self) -> List[Optional[torch.Tensor]]:
        if any(t is not None and t[0]._version != t[1] for t in self._taps):
            raise DfquantError(
                "the model writes to a BatchNorm layer's input in place after the BN has read it (e.g. `x += f(x)`): "
                "the BN statistics cannot be matched on it; write that step out of place (`x = x + f(x)`)"
            )
        return [t[0] if t is not None else None for t in self._taps]

    def clear(self) -> None:
        self._taps = [None] * len(self._taps)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _targets(layers: Sequence[nn.BatchNorm2d], device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(running mean, sqrt(running var + 1e-6)) of each BN layer, detached."""
    return [
        (
            layer.running_mean.detach().to(device=device, dtype=torch.float32).clone(),
            torch.sqrt(layer.running_var.detach().to(device=device, dtype=torch.float32) + BN_STD_EPS),
        )
        for layer in layers
    ]


def _sq_err(target: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """``||target - est||^2 / est.shape[0]`` (target broadcast over est's leading axis if needed).

    For batch statistics ``est`` is (C,), so this is the channel-mean squared error; for per-image
    statistics ``est`` is (B, C), so it is the per-image squared error summed over channels and
    averaged over images. This is the normalisation of both releases.
    """
    return (est - target).pow(2).sum() / est.shape[0]


def _per_image_stats(x: torch.Tensor, with_eps: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel (mean, std) over the spatial axes: two (B, C) tensors."""
    flat = x.flatten(2)
    mean = flat.mean(dim=2)
    # unbiased as published; a 1x1 map (a BN after global pooling) has std 0, not the 0/0 of n - 1 = 0
    correction = 1 if flat.shape[2] > 1 else 0
    if with_eps:  # ZeroQ: sqrt(unbiased var + eps)
        std = torch.sqrt(flat.var(dim=2, correction=correction) + BN_STD_EPS)
    else:  # Genie: unbiased std
        std = flat.std(dim=2, correction=correction)
    return mean, std


def _loss_from_inputs(
    images: torch.Tensor,
    bn_inputs: Sequence[Optional[torch.Tensor]],
    targets: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    per_sample: bool,
    input_term: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, std loss) given the recorded BN inputs; see :func:`bn_statistics_loss`."""
    mean_loss = images.new_zeros(())
    std_loss = images.new_zeros(())
    if input_term:
        m, s = _per_image_stats(images, with_eps=per_sample)
        mean_loss = mean_loss + _sq_err(torch.zeros_like(m[:1]), m)
        std_loss = std_loss + _sq_err(torch.ones_like(s[:1]), s)
    for x, (mu, sigma) in zip(bn_inputs, targets):
        if x is None:  # a BN layer the forward pass did not reach
            continue
        x = x.float()
        if per_sample:  # ZeroQ Eq. 2: statistics of each image
            m, s = _per_image_stats(x, with_eps=True)
        else:  # Genie: statistics of the batch
            s, m = torch.std_mean(x, dim=(0, 2, 3))
        mean_loss = mean_loss + _sq_err(mu, m)
        std_loss = std_loss + _sq_err(sigma, s)
    return mean_loss, std_loss


def bn_statistics_loss(
    model: nn.Module,
    images: torch.Tensor,
    *,
    per_sample: bool = False,
    input_term: bool = True,
) -> torch.Tensor:
    """The BN-statistics ("BNS") loss of ``images`` under ``model``, as a 0-dim tensor.

    ``per_sample=False`` is Genie's form (Genie Sec. 3.1): at every ``BatchNorm2d`` input, the
    mean and unbiased std over (batch, H, W) against ``running_mean`` and
    ``sqrt(running_var + 1e-6)``, squared error averaged over channels, summed over layers.
    ``per_sample=True`` is ZeroQ's (ZeroQ Eq. 2): statistics of each image over (H, W), squared
    error summed over channels and averaged over images. ``input_term`` adds the term both
    releases use on the image itself: per-image, per-channel mean -> 0 and std -> 1.

    The model is run in eval mode (so BN uses and keeps its running statistics) and restored to
    its previous mode; temporary hooks are removed. Gradients flow to ``images`` when it requires
    grad; call under ``torch.no_grad()`` to just measure. The images must be on the model's device.
    """
    layers = _check_has_bn(model)
    if images.dim() != 4:
        raise DfquantError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if images.shape[0] < 2 and not per_sample:
        raise DfquantError("Genie's batch-statistics loss needs at least 2 images")
    modes = {m: m.training for m in model.modules()}
    rec = _BNInputs(layers)
    try:
        model.eval()
        model(images)
        targets = _targets(layers, images.device)
        mean_loss, std_loss = _loss_from_inputs(images, rec.inputs, targets, per_sample, input_term)
    finally:
        rec.remove()
        for m, training in modes.items():
            m.training = training
    return mean_loss + std_loss


# --------------------------------------------------------------------------------------------
# Swing convolution and the generator
# --------------------------------------------------------------------------------------------


class SwingConv2d(nn.Module):
    """Swing convolution (Genie Sec. 3.1): a strided conv applied to a randomly shifted input.

    The input is reflect-padded by ``jitter`` pixels on each side and cropped back to its own size
    at an offset drawn uniformly from ``{0, ..., 2 * jitter}`` along each axis (one draw per call,
    shared by the batch), then passed to the wrapped convolution. Used only during synthesis.
    """

    def __init__(self, conv: nn.Conv2d, rng: torch.Generator, jitter: int = 1):
        super().__init__()
        self.conv = conv
        self.jitter = jitter
        self.rng = rng

    def __getattr__(self, name: str):
        # a model's forward may read the conv's attributes (``self.conv1.stride``): the wrapped conv's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["conv"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        j = self.jitter
        h, w = x.shape[-2:]
        if j > 0 and h > j and w > j:  # reflect padding needs pad < size
            dy, dx = torch.randint(0, 2 * j + 1, (2,), generator=self.rng).tolist()
            if x.is_cuda:  # the same values; a backward without atomics (see reflect_shift)
                x = reflect_shift(reflect_shift(x, dy - j, -2), dx - j, -1)
            else:  # kept on the CPU so that earlier CPU results stay bit for bit reproducible
                x = F.pad(x, (j, j, j, j), mode="reflect")[:, :, dy : dy + h, dx : dx + w]
        return self.conv(x)


def reflect_shift(x: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    """``x`` shifted by ``shift`` along ``dim``, the edge filled by reflection (edge not repeated).

    Equal to reflect-padding by ``|shift|`` and cropping back to the input's size at offset
    ``|shift| + shift``, but built from slices, flips and a concatenation: their gradients need no
    atomic adds, so it is deterministic on a GPU, where reflection padding's backward is not.
    """
    n = x.shape[dim]
    if shift == 0:
        return x
    if not 0 < abs(shift) < n:
        raise ValueError(f"shift {shift} must be smaller than the size {n}")
    if shift < 0:  # out[i] = x[|i + shift|]: first |shift| rows are x[|shift|], ..., x[1]
        return torch.cat([x.narrow(dim, 1, -shift).flip(dim), x.narrow(dim, 0, n + shift)], dim)
    # out[i] = x[i + shift] inside, then x[n - 2], ..., x[n - 1 - shift]
    return torch.cat([x.narrow(dim, shift, n - shift), x.narrow(dim, n - 1 - shift, shift).flip(dim)], dim)


def _apply_swing(model: nn.Module, rng: torch.Generator, jitter: int = 1) -> int:
    """Replace every strided Conv2d of ``model`` (in place: call on a copy) by a SwingConv2d."""
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1) and name
    ]
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SwingConv2d(conv, rng, jitter))
    return len(targets)


class GenieGenerator(nn.Module):
    """Genie-D's generator (Genie Sec. 3.1; architecture as in the authors' release).

    ``z (latent_dim) -> Linear -> (c1, ceil(H/4), ceil(W/4)) -> BN -> up x2 -> conv3x3 c1->c2 ->
    BN -> LeakyReLU(0.2) -> up x2 -> conv3x3 c2->C -> tanh -> BN(affine=False)``, center-cropped
    to (H, W) when H or W is not a multiple of 4. Used in training mode (batch-statistics BN).
    """

    def __init__(self, image_size: Tuple[int, int, int], latent_dim: int = 256, c1: int = 128, c2: int = 64):
        super().__init__()
        channels, height, width = image_size
        self.out_hw = (height, width)
        self.init_hw = (math.ceil(height / 4), math.ceil(width / 4))
        self.c1 = c1
        self.linear = nn.Linear(latent_dim, c1 * self.init_hw[0] * self.init_hw[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(c1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, stride=1, padding=1),
            nn.BatchNorm2d(c2),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c2, channels, 3, stride=1, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.linear(z).view(z.shape[0], self.c1, *self.init_hw)
        x = self.body(x)
        h, w = self.out_hw
        if x.shape[-2:] != (h, w):
            top = (x.shape[-2] - h) // 2
            left = (x.shape[-1] - w) // 2
            x = x[:, :, top : top + h, left : left + w]
        return x


# --------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DfquantError(f"{what} must be a positive integer, got {value!r}")
    return value


def _positive_float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise DfquantError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def _batch_sizes(n: int, batch_size: int) -> List[int]:
    """Split n into ceil(n / batch_size) near-equal batches."""
    k = math.ceil(n / batch_size)
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _genie_batch(teacher, rec, targets, bsz, image_size, latent_dim, lr_g, lr_z, iters, seed, device, step):
    """One Genie-D batch: fresh generator + latents, jointly optimized (Genie Sec. 3.1)."""
    torch.manual_seed(seed)  # generator weights (inside the caller's fork_rng)
    gen = GenieGenerator(image_size, latent_dim=latent_dim).to(device).train()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(bsz, latent_dim, generator=g).to(device).requires_grad_(True)
    opt_z = torch.optim.Adam([z], lr=lr_z)
    sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=100, min_lr=1e-4)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr_g)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.95)
    x = None
    for it in range(iters):
        opt_z.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        rec.clear()
        x = gen(z)
        teacher(x)
        mean_loss, std_loss = _loss_from_inputs(x, rec.inputs, targets, per_sample=False, input_term=True)
        loss = mean_loss + std_loss
        loss.backward()
        opt_z.step()
        opt_g.step()
        value = loss.item()
        sched_z.step(value)
        if (it + 1) % 100 == 0:
            sched_g.step()
        step(value)
    rec.clear()
    return x.detach()


def _zeroq_batch(teacher, rec, targets, bsz, image_size, lr, iters, seed, device, step):
    """One ZeroQ batch: pixels from N(0, 1) optimized on ZeroQ's per-image BN loss (ZeroQ Alg. 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, *image_size, generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=100, min_lr=1e-4)
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        rec.clear()
        teacher(x)
        mean_loss, std_loss = _loss_from_inputs(x, rec.inputs, targets, per_sample=True, input_term=True)
        loss = mean_loss + std_loss
        loss.backward()
        opt.step()
        value = loss.item()
        sched.step(value)
        step(value)
    rec.clear()
    return x.detach()


def synthesize(
    model: nn.Module,
    n: int,
    *,
    method: str = "genie",
    batch_size: Optional[int] = None,
    iters: Optional[int] = None,
    lr_g: Optional[float] = None,
    lr_z: Optional[float] = None,
    latent_dim: Optional[int] = None,
    swing: Optional[bool] = None,
    input_size: Optional[Tuple[int, int, int]] = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Synthesize ``n`` images from ``model``'s BatchNorm statistics: a float32 (n, C, H, W) CPU tensor.

    Args:
        model: a trained model with ``BatchNorm2d`` layers. It is never modified: synthesis runs
            on a deep copy in eval mode with frozen parameters (and swing convolutions).
        n: number of images.
        method: ``"genie"`` (Genie-D, the default) or ``"zeroq"`` (ZeroQ's distilled data).
        batch_size, iters: images per optimized batch and optimization steps per batch. ``None``
            takes the method's published default (:data:`GENIE_DEFAULTS`: 128 and 4000;
            :data:`ZEROQ_DEFAULTS`: 32 and 500). On a CPU pass ``**CPU_BUDGET``.
        lr_g: Adam learning rate of Genie's generator (default 0.01); Genie only.
        lr_z: Adam learning rate of the optimized input: Genie's latents (default 0.1) or ZeroQ's
            pixels (default 0.5).
        latent_dim: Genie's latent size (default 256); Genie only.
        swing: replace strided convolutions by swing convolutions during synthesis. ``None``: on
            for Genie (as published), off for ZeroQ (which has none).
        input_size: (C, H, W); default ``dfquant.models.input_size_of(model)``.
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:K"``) or ``"auto"`` (CUDA when available).
        seed: the whole run is a function of the seed (bit for bit on the same CPU, or the same GPU
            and software: cuDNN runs its deterministic algorithms, swing convolutions a backward
            without atomics).
        progress: show a progress bar (stderr) with the current loss and the ETA.

    The images are in the model's input space (normalized), like the data it was trained on.
    """
    if method not in _METHODS:
        raise DfquantError(f"unknown synthesis method {method!r}; choose {' or '.join(_METHODS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DfquantError(f"number of images must be a positive integer, got {n!r}")
    model, _ = float32_eval_cpu(model)  # a half-precision or training-mode model: a float32 eval copy
    _check_has_bn(model)
    dev = _resolve_device(device)
    defaults = GENIE_DEFAULTS if method == "genie" else ZEROQ_DEFAULTS
    batch_size = _positive_int(int(defaults["batch_size"]) if batch_size is None else batch_size, "batch_size")
    iters = _positive_int(int(defaults["iters"]) if iters is None else iters, "iters")
    lr_z = _positive_float(defaults["lr_z"] if lr_z is None else lr_z, "lr_z")
    if method == "genie":
        lr_g = _positive_float(GENIE_DEFAULTS["lr_g"] if lr_g is None else lr_g, "lr_g")
        latent_dim = _positive_int(int(GENIE_DEFAULTS["latent_dim"]) if latent_dim is None else latent_dim, "latent_dim")
    elif lr_g is not None or latent_dim is not None:
        raise DfquantError("lr_g and latent_dim apply only to method='genie' (ZeroQ optimizes the pixels)")
    if swing is None:
        swing = method == "genie"
    if input_size is None:
        from .models import input_size_of

        input_size = input_size_of(model)
    try:
        input_size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise DfquantError(f"input_size must be (C, H, W), got {input_size!r}") from None
    if len(input_size) != 3 or min(input_size) < 1:
        raise DfquantError(f"input_size must be three positive integers (C, H, W), got {input_size!r}")
    check_runs(model, input_size)
    sizes = _batch_sizes(n, batch_size)
    if method == "genie" and min(sizes) < 2:
        raise DfquantError(
            f"Genie needs at least 2 images per batch (its loss uses batch statistics): {n} images in batches of at most "
            f"{batch_size} split into {sizes}; choose the number of images and the batch size so that no batch has one image"
        )

    fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    out: List[torch.Tensor] = []
    with torch.random.fork_rng(devices=fork_devices), deterministic_cudnn(dev):
        seeds = torch.Generator().manual_seed(int(seed))
        swing_rng = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=seeds)))

        teacher = copy_model(model)
        teacher.eval().requires_grad_(False)
        if swing:
            _apply_swing(teacher, swing_rng)
        teacher.to(dev)
        layers = _bn_layers(teacher)
        targets = _targets(layers, dev)
        rec = _BNInputs(layers)

        total = iters * len(sizes)
        from .progress import progress_bar

        bar = progress_bar(range(total), desc=f"{method} synthesis", enable=progress, total=total)
        ticks = iter(bar)
        state = {"batch": 0, "it": 0}

        def step(loss_value: float) -> None:
            next(ticks, None)
            state["it"] += 1
            if hasattr(bar, "set_postfix") and (state["it"] % 10 == 0 or state["it"] == total):
                bar.set_postfix(loss=f"{loss_value:.4g}", batch=f"{state['batch'] + 1}/{len(sizes)}", refresh=False)

        try:
            for i, bsz in enumerate(sizes):
                state["batch"] = i
                batch_seed = int(torch.randint(2**62, (1,), generator=seeds))
                if method == "genie":
                    x = _genie_batch(
                        teacher, rec, targets, bsz, input_size, latent_dim, lr_g, lr_z, iters, batch_seed, dev, step
                    )
                else:
                    x = _zeroq_batch(teacher, rec, targets, bsz, input_size, lr_z, iters, batch_seed, dev, step)
                out.append(x.to("cpu", torch.float32))
            next(ticks, None)  # let the bar finish
        finally:
            rec.remove()
            if hasattr(bar, "close"):
                bar.close()
    return torch.cat(out)[:n].contiguous()


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def images_path(path) -> Path:
    """The file :func:`save_images` writes for ``path``: ``x.safetensors`` as given, ``x`` or
    ``x.v1`` with ``.safetensors`` appended (the name is never cut at a dot). A ``.png`` name is
    refused: the images go to a ``.safetensors`` file and the grid is written beside it."""
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise DfquantError(f"{path!r} names a folder: give a .safetensors file name for the synthetic images")
    p = Path(path)
    if p.name in ("", ".", "..", ".safetensors"):
        raise DfquantError(f"not a file name to save synthetic images under: {str(path)!r}")
    if p.name.lower().endswith(".png"):
        raise DfquantError(f"{p}: give a .safetensors name for the synthetic images; the .png grid is written beside it")
    return p if p.name.endswith(".safetensors") else p.with_name(p.name + ".safetensors")


def grid_path(path) -> Path:
    """The PNG grid beside an images file: ``x.safetensors`` -> ``x.png``, ``x.v1`` -> ``x.v1.png``."""
    p = images_path(path)
    return p.with_name(p.name[: -len(".safetensors")] + ".png")


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted.

    The writer keeps metadata in a hash map whose order changes from run to run, so two identical
    runs would differ in bytes. Sorting does not change the header's length (same keys, same
    compact JSON), so the header is overwritten in place, padded with spaces as the format allows.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted((header.get("__metadata__") or {}).items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) <= n:
            f.seek(8)
            f.write(new + b" " * (n - len(new)))
            return
        f.seek(8 + n)  # (not expected) a longer encoding: rewrite the whole file
        rest = f.read()
        new += b" " * (-(8 + len(new)) % 8)
        f.seek(0)
        f.write(len(new).to_bytes(8, "little") + new + rest)
        f.truncate()


def save_images(images: torch.Tensor, path, metadata: Optional[Dict[str, object]] = None) -> Path:
    """Save images to a safetensors file (key ``"images"``), atomically; returns the file written.

    ``path`` is named as :func:`images_path` says (``.safetensors`` appended unless present; a
    ``.png`` name is refused). Its folder must exist (it is not created). The file is written next
    to the target under a temporary name and renamed over it only when complete, so an interrupted
    run never leaves a half-written file. ``metadata`` values are stored as strings together with
    the shape and dtype, with sorted keys (identical runs give identical bytes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise DfquantError("images must be a (N, C, H, W) tensor")
    path = images_path(path)
    check_writable(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", "dfquant-synthetic-images")
    meta["shape"] = "x".join(str(s) for s in images.shape)
    meta["dtype"] = str(images.dtype).replace("torch.", "")
    meta = dict(sorted(meta.items()))
    data = {"images": images.detach().cpu().contiguous()}

    def write(p: Path) -> None:
        save_file(data, str(p), metadata=meta)
        _sort_metadata(p)

    try:
        atomic_write(path, write)
    except OSError as exc:
        raise DfquantError(f"cannot write {path}: {exc.strerror or exc}") from None
    except SafetensorError as exc:  # the writer's own I/O errors (a full disk, ...)
        raise DfquantError(f"cannot write {path}: {str(exc).splitlines()[0]}") from None
    return path


def _open_images_file(path: Path, read_images: bool):
    from safetensors import safe_open

    if not path.is_file():
        raise DfquantError(f"synthetic images file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "images" not in f.keys():
                raise DfquantError(f"{path} holds no 'images' tensor")
            images = f.get_tensor("images") if read_images else None
            meta = dict(f.metadata() or {})
    except DfquantError:
        raise
    except Exception as exc:  # corrupt or foreign file
        raise DfquantError(f"cannot read synthetic images from {path}: {exc}") from None
    return images, meta


def load_images(path, with_metadata: bool = False):
    """Load images saved by :func:`save_images` (and, if asked, their metadata dict)."""
    images, meta = _open_images_file(Path(path), read_images=True)
    return (images, meta) if with_metadata else images


def images_metadata(path) -> Dict[str, str]:
    """The metadata of an images file from :func:`save_images` (model, method, seed, shape, ...),
    without reading the images; a clear error if the file is missing or not such a file."""
    return _open_images_file(Path(path), read_images=False)[1]


def load_image_files(paths: Sequence) -> Tuple[torch.Tensor, List[Dict[str, str]]]:
    """Load several image files and concatenate them, in the order given, with their metadata.

    For a synthetic set made in parts, e.g. 1024 images as four parallel ``dfquant synthesize -n
    256 --seed i`` runs (each part is an independent synthesis with its own seed). Fails with a
    clear error when the files' per-image shapes differ or when two files hold the same images
    (the same part given twice would silently weight those images double).
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise DfquantError("no synthetic images files given")
    sets = [load_images(p, with_metadata=True) for p in paths]
    first_shape = tuple(sets[0][0].shape[1:])
    for p, (x, _) in zip(paths[1:], sets[1:]):
        if tuple(x.shape[1:]) != first_shape:
            raise DfquantError(
                f"synthetic images in {p} have shape {tuple(x.shape[1:])} per image, but those in {paths[0]} have {first_shape}"
            )
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            if sets[i][0].shape == sets[j][0].shape and torch.equal(sets[i][0], sets[j][0]):
                raise DfquantError(f"{paths[i]} and {paths[j]} hold the same images; give each part once")
    images = torch.cat([x for x, _ in sets]) if len(sets) > 1 else sets[0][0]
    return images, [m for _, m in sets]


def save_image_grid(
    images: torch.Tensor,
    png_path,
    nrow: int = 8,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    scale: Optional[int] = None,
) -> Path:
    """Write the first (up to) 64 images as a PNG grid, for a person to look at.

    With ``mean``/``std`` (the model's input normalization) the images are de-normalized
    (``x * std + mean``) and clipped to [0, 1]; otherwise each image is min-max scaled on its own.
    One-channel images are written in grey. Small images are enlarged by an integer factor
    (nearest neighbour) so the grid is legible: ``scale`` sets it, default so that a side is at
    least 64 pixels. The PNG is written atomically; its folder must exist (see :func:`grid_path`
    for the name beside an images file).
    """
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise DfquantError("images must be a non-empty (N, C, H, W) tensor")
    nrow = _positive_int(nrow, "nrow")
    x = images[:64].detach().cpu().float()
    c = x.shape[1]
    if c not in (1, 3):
        raise DfquantError(f"can only draw 1- or 3-channel images, got {c} channels")
    if mean is not None or std is not None:
        m = torch.tensor(list(mean) if mean is not None else [0.0] * c, dtype=torch.float32)
        s = torch.tensor(list(std) if std is not None else [1.0] * c, dtype=torch.float32)
        if m.numel() == 1:
            m = m.expand(c)
        if s.numel() == 1:
            s = s.expand(c)
        if m.numel() != c or s.numel() != c:
            raise DfquantError(f"mean/std must have 1 or {c} values")
        x = (x * s.view(1, c, 1, 1) + m.view(1, c, 1, 1)).clamp(0, 1)
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    h, w = x.shape[-2:]
    if scale is None:
        scale = max(1, math.ceil(64 / max(h, w)))
    scale = _positive_int(scale, "scale")
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
        h, w = h * scale, w * scale
    k = x.shape[0]
    cols = min(nrow, k)
    rows = math.ceil(k / cols)
    pad = 2
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(k):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    arr = (grid * 255).round().clamp(0, 255).to(torch.uint8)
    if c == 1:
        img = Image.fromarray(arr[0].numpy())  # uint8 2-D -> mode "L"
    else:
        img = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())
    png_path = Path(png_path)
    check_writable(png_path)
    try:
        atomic_write(png_path, lambda p: img.save(str(p), format="PNG"))
    except OSError as exc:
        raise DfquantError(f"cannot write {png_path}: {exc.strerror or exc}") from None
    return png_path
