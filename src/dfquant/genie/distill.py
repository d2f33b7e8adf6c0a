"""Genie-D and ZeroQ: synthetic calibration images from a model's BatchNorm statistics.

* ``method="genie"``: Genie-D (Jeon, Lee & Kim, CVPR 2023, Sec. 3.1). For every batch a fresh small
  generator (:class:`GenieGenerator`) and the batch's latents are trained jointly on the BNS loss
  (:mod:`.bns_loss`, batch statistics), each with its own Adam optimizer and schedule (latents:
  ReduceLROnPlateau(patience=100, min_lr=1e-4) on the loss every step; generator: ExponentialLR(0.95)
  every 100 steps), while every strided conv of the model is a *swing convolution*
  (:class:`SwingConv2d`). The images are the last iteration's generator output, as in the release.
* ``method="zeroq"``: ZeroQ's distilled data (Cai et al., CVPR 2020, Sec. 3.1, Alg. 1): pixels from
  N(0, 1) optimized by Adam (lr 0.5, the same plateau schedule) on the per-image BNS loss; no swing.

Settings: :class:`dfquant.genie.GenieConfig` (the releases' values, or the CPU budget). Deviations
from the releases: ``n`` need not be a multiple of the batch size (``ceil(n / batch)`` near-equal
batches); all randomness comes from generators seeded by ``seed`` (the caller's RNG is untouched; the
release's swing draws from NumPy's global RNG); the generator starts at ``ceil(H/4) x ceil(W/4)``,
emits the model's channel count and is center-cropped to ``H x W``; swing is skipped on a 1-pixel
side; ZeroQ starts from N(0, 1) as its paper says (its release: uniform noise of std ~0.014); for a
model whose input scaling is not its dataset's usual mean/std standardization (Keras' MobileNet,
darknet) the images are made standardized and fed to it, and returned, in its own input space
(:func:`_input_map`; the releases only target standardized models).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..devices import deterministic_cudnn, resolve_device
from ..errors import DfquantError
from ..modelcheck import check_runs, copy_model, float32_eval_cpu
from .bns_loss import BNInputs, bn_layers, bn_targets, check_has_bn, loss_from_inputs
from .config import DATA_METHODS, SYNTHESIS_FIELDS, GenieConfig

__all__ = ["GenieGenerator", "SwingConv2d", "reflect_shift", "synthesize"]


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

    def draws(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` draws an offset (reflect padding needs pad < size)."""
        j = self.jitter
        return j > 0 and x.shape[-2] > j and x.shape[-1] > j

    def offset(self) -> Tuple[int, int]:
        """The next offset (dy, dx), each uniform in {0, ..., 2 * jitter}: one draw from ``rng``."""
        dy, dx = torch.randint(0, 2 * self.jitter + 1, (2,), generator=self.rng).tolist()
        return dy, dx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        j = self.jitter
        h, w = x.shape[-2:]
        if self.draws(x):
            dy, dx = self.offset()
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


@torch.no_grad()
def _swing_calls(teacher: nn.Module, image_size: Tuple[int, int, int], dev: torch.device) -> List[SwingConv2d]:
    """The swing convolutions that draw an offset in one forward pass, in the order they draw.

    Found by one forward pass on a zero image with every swing conv on a spare generator, so the
    real one is untouched. Which convolutions draw depends on the input size only, not the batch."""
    swings = [m for m in teacher.modules() if isinstance(m, SwingConv2d)]
    calls: List[SwingConv2d] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod) if mod.draws(args[0]) else None) for m in swings]
    rngs = [m.rng for m in swings]
    try:
        for m in swings:
            m.rng = torch.Generator()
        teacher(torch.zeros(1, *image_size, device=dev))
    finally:
        for m, rng in zip(swings, rngs):
            m.rng = rng
        for h in hooks:
            h.remove()
    return calls


def _skip_swing_draws(teacher: nn.Module, image_size: Tuple[int, int, int], dev: torch.device, forwards: int) -> None:
    """Advance the shared swing generator past ``forwards`` forward passes, drawing what they draw.

    A process whose first batch is batch k starts where the one-process run is at batch k: each
    earlier batch made ``distill_iters`` teacher forward passes and each pass one draw per call in
    :func:`_swing_calls` (the same draws, in the same order, so the generator's state is the same)."""
    calls = _swing_calls(teacher, image_size, dev)
    for _ in range(forwards):
        for conv in calls:
            conv.offset()


#: 1-D taps of a 3-tap kernel seen through a nearest x2 upsampling: output phase a (even, odd
#: rows), tap u of a 2-tap kernel on the low-resolution input, original tap i: [[W0, W1 + W2], [W0 + W1, W2]].
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def upsample_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(nearest_upsample_x2(x))`` for a 3x3, stride-1, zero-padding-1 ``conv``, computed on
    ``x`` itself: each of the four output phases (row and column parity) is a 2x2 convolution of
    ``x`` with summed taps of the 3x3 kernel (an upsampled image repeats every pixel twice), so the
    four are one convolution with 4x the output channels, interleaved afterwards. The same function
    and gradients as upsampling first (up to float rounding), with 16 (H+1)(W+1) instead of 36 HW
    multiply-adds per channel pair and without the 4x larger upsampled tensor."""
    n, _, h, w = x.shape
    out_ch = conv.out_channels
    taps = _PHASE_TAPS.to(device=conv.weight.device, dtype=conv.weight.dtype)
    kernel = torch.einsum("aui,bvj,ocij->abocuv", taps, taps, conv.weight).reshape(4 * out_ch, conv.in_channels, 2, 2)
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    y = F.conv2d(x, kernel, bias, padding=1).view(n, 2, 2, out_ch, h + 1, w + 1)  # (phase a, phase b, ...)
    return _Interleave.apply(y)


class _Interleave(torch.autograd.Function):
    """``out[:, :, 2p + a, 2q + b] = y[:, a, b, :, p + a, q + b]``: the four phases of
    :func:`upsample_conv3x3` (each (H + 1, W + 1), cropped at its own offset) woven into one
    (2H, 2W) map; written as one copy per phase each way (autograd's slices and stacks would fill and
    add a zero tensor per phase in the backward)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        n, _, _, c, h1, w1 = y.shape
        h, w = h1 - 1, w1 - 1
        out = y.new_empty(n, c, h, 2, w, 2)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, :, a, :, b] = y[:, a, b, :, a : a + h, b : b + w]
        return out.view(n, c, 2 * h, 2 * w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, c, h2, w2 = grad.shape
        h, w = h2 // 2, w2 // 2
        g = grad.reshape(n, c, h, 2, w, 2)
        gy = grad.new_zeros(n, 2, 2, c, h + 1, w + 1)
        for a in (0, 1):
            for b in (0, 1):
                gy[:, a, b, :, a : a + h, b : b + w] = g[:, :, :, a, :, b]
        return gy


def _fusable(up: nn.Module, conv: nn.Module) -> bool:
    """Whether ``up`` then ``conv`` is a nearest x2 upsampling then a plain 3x3 same convolution."""
    return (
        isinstance(up, nn.Upsample) and up.mode == "nearest" and up.size is None and up.scale_factor in (2, 2.0)
        and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
    )


class GenieGenerator(nn.Module):
    """Genie-D's generator (Genie Sec. 3.1; architecture as in the authors' release).

    ``z (latent_dim) -> Linear -> (c1, ceil(H/4), ceil(W/4)) -> BN -> up x2 -> conv3x3 c1->c2 ->
    BN -> LeakyReLU(0.2) -> up x2 -> conv3x3 c2->C -> tanh -> BN(affine=False)``, center-cropped
    to (H, W) when H or W is not a multiple of 4. Used in training mode (batch-statistics BN).
    Each upsampling and the conv after it run as one :func:`upsample_conv3x3` (the same function).
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
        layers, i = list(self.body), 0
        while i < len(layers):  # an upsampling then a 3x3 conv runs as one (upsample_conv3x3)
            if i + 1 < len(layers) and _fusable(layers[i], layers[i + 1]):
                x, i = upsample_conv3x3(x, layers[i + 1]), i + 2
            else:
                x, i = layers[i](x), i + 1
        h, w = self.out_hw
        if x.shape[-2:] != (h, w):
            top = (x.shape[-2] - h) // 2
            left = (x.shape[-1] - w) // 2
            x = x[:, :, top : top + h, left : left + w]
        return x


# --------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------


def _batch_sizes(n: int, batch_size: int) -> List[int]:
    """Split n into ceil(n / batch_size) near-equal batches."""
    k = math.ceil(n / batch_size)
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


@dataclass
class _Run:
    """What every batch of one synthesis shares."""

    cfg: GenieConfig  # resolved
    teacher: nn.Module  # the model copy (swing convolutions in place)
    rec: BNInputs
    targets: List[Tuple[torch.Tensor, torch.Tensor]]
    image_size: Tuple[int, int, int]
    device: torch.device
    step: Callable[[float], None]
    to_input: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (scale, shift): see _input_map


def _model_input(run: _Run, z: torch.Tensor) -> torch.Tensor:
    """The model's input for a standardized image ``z`` (the identity for most models)."""
    return z if run.to_input is None else z * run.to_input[0] + run.to_input[1]


def _genie_batch(run: _Run, bsz: int, seed: int) -> torch.Tensor:
    """One Genie-D batch: fresh generator + latents, jointly optimized (Genie Sec. 3.1)."""
    cfg = run.cfg
    torch.manual_seed(seed)  # generator weights (inside the caller's fork_rng)
    gen = GenieGenerator(run.image_size, latent_dim=cfg.latent_dim).to(run.device).train()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(bsz, cfg.latent_dim, generator=g).to(run.device).requires_grad_(True)
    opt_z = torch.optim.Adam([z], lr=cfg.lr_z)
    sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=100, min_lr=1e-4)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.95)
    x = None
    for it in range(cfg.distill_iters):
        opt_z.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        run.rec.clear()
        x = gen(z)
        run.teacher(_model_input(run, x))
        mean_loss, std_loss = loss_from_inputs(x, run.rec.inputs, run.targets, per_sample=False, input_term=True)
        loss = mean_loss + std_loss
        loss.backward()
        opt_z.step()
        opt_g.step()
        value = loss.item()
        sched_z.step(value)
        if (it + 1) % 100 == 0:
            sched_g.step()
        run.step(value)
    run.rec.clear()
    return _model_input(run, x.detach())


def _zeroq_batch(run: _Run, bsz: int, seed: int) -> torch.Tensor:
    """One ZeroQ batch: pixels from N(0, 1) optimized on ZeroQ's per-image BN loss (ZeroQ Alg. 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, *run.image_size, generator=g).to(run.device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=run.cfg.lr_z)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=100, min_lr=1e-4)
    for _ in range(run.cfg.distill_iters):
        opt.zero_grad(set_to_none=True)
        run.rec.clear()
        run.teacher(_model_input(run, x))
        mean_loss, std_loss = loss_from_inputs(x, run.rec.inputs, run.targets, per_sample=True, input_term=True)
        loss = mean_loss + std_loss
        loss.backward()
        opt.step()
        value = loss.item()
        sched.step(value)
        run.step(value)
    run.rec.clear()
    return _model_input(run, x.detach())


def _settings(config: Optional[GenieConfig], settings: dict) -> GenieConfig:
    """``config`` updated by keyword settings; ``iters``/``batch_size`` name the synthesis's here."""
    aliases = {"iters": "distill_iters", "batch_size": "distill_batch"}
    unknown = sorted(k for k in settings if k not in aliases and k not in SYNTHESIS_FIELDS)
    if unknown:
        raise DfquantError(f"unknown synthesis setting(s): {', '.join(unknown)}; synthesize takes {', '.join(SYNTHESIS_FIELDS)}, iters and batch_size")
    given = {aliases.get(k, k): v for k, v in settings.items() if v is not None}
    return dataclasses.replace(config if config is not None else GenieConfig(), **given)


def _image_size(model: nn.Module, input_size: Any) -> Tuple[int, int, int]:
    if input_size is None:
        from ..models import input_size_of

        input_size = input_size_of(model)
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise DfquantError(f"input_size must be (C, H, W), got {input_size!r}", param="input_size") from None
    if len(size) != 3 or min(size) < 1:
        raise DfquantError(f"input_size must be three positive integers (C, H, W), got {input_size!r}", param="input_size")
    return size


def synthesize(model: nn.Module, n: int, config: Optional[GenieConfig] = None, *, method: str = "genie", input_size: Any = None, progress: bool = True, **settings: Any) -> torch.Tensor:
    """Synthesize ``n`` images from ``model``'s BatchNorm statistics: a float32 (n, C, H, W) CPU tensor.

    ``method``: ``"genie"`` (Genie-D) or ``"zeroq"``. Settings come from ``config``
    (:class:`GenieConfig`: budget, device, seed, distill_iters, distill_batch, lr_g, lr_z,
    latent_dim, swing), overridden by keywords of the same names; ``iters`` and ``batch_size`` are
    the synthesis's iterations and images per batch here. Unset settings follow the budget
    (``budget="auto"``: the paper's on CUDA, the CPU budget otherwise). ``input_size`` (C, H, W)
    defaults to the registry's. ``model`` is never modified (synthesis runs on a float32 eval copy
    with frozen parameters). The images are in the model's (normalized) input space, made as
    standardized images and mapped there when its input scaling is not the standardization the
    releases assume (a model from :func:`dfquant.create_model`: ``mobilenet_v1``, ``tiny_darknet``). The run is a
    function of the seed: bit for bit on the same CPU, or the same GPU and software.

    Inside an initialised ``torch.distributed`` process group of several processes (``torchrun``),
    each process synthesizes a contiguous share of the batches, each batch with the seed and swing
    draws it has in one process, and every process returns all ``n`` images in batch order: the
    one-process images bit for bit on the same CPU (same thread count). Every process must call
    it with the same model and settings (checked).
    """
    if method not in DATA_METHODS:
        raise DfquantError(f"unknown synthesis method {method!r}; choose {' or '.join(DATA_METHODS)}", param="method")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DfquantError(f"number of images must be a positive integer, got {n!r}", param="n")
    model, _ = float32_eval_cpu(model)  # a half-precision or training-mode model: a float32 eval copy
    check_has_bn(model)
    cfg = _settings(config, settings)
    dev = distributed.rank_device(resolve_device(cfg.device))
    cfg = cfg.resolve(dev.type, method)
    image_size = _image_size(model, input_size)
    check_runs(model, image_size)
    to_input = _input_map(model, image_size[0])
    sizes = _batch_sizes(n, cfg.distill_batch)
    if method == "genie" and min(sizes) < 2:
        raise DfquantError(
            f"Genie needs at least 2 images per batch (its loss uses batch statistics): {n} images in batches of at most "
            f"{cfg.distill_batch} split into {sizes}; choose the number of images and the batch size so that no batch has one image"
        )
    distributed.check_same(list(model.state_dict().values()) + [_text_tensor(f"{method} {n} {image_size} {cfg!r}")], "models or synthesis settings")
    return _run_batches(model, cfg, method, image_size, sizes, dev, progress, to_input)


def _input_map(model: nn.Module, channels: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Where a standardized image goes in the model's input: None, or ``(scale, shift)``.

    Genie-D's generator ends in ``BN(affine=False)`` and both releases' input term pulls each image
    to mean 0, std 1 per channel: they make images *standardized* like the input of the models
    they target (pixels normalized by the dataset's mean and std, torchvision's ImageNet scaling).
    A model with another input scaling (Keras' MobileNet ``x / 127.5 - 1``, darknet's ``x / 255``)
    would be fed images it never sees (on darknet: mean 0 and std 1 where photos have mean 0.44
    and std 0.25). For such a model (its ``preprocessing`` and ``dataset`` attributes, as
    :func:`dfquant.create_model` sets them, differ from the dataset's usual scaling) the images
    stay standardized during synthesis and are fed to the model, and returned, as the same pixels
    in its own input space. Not in either release (whose models all take standardized input)."""
    from ..data import dataset_preprocessing
    from ..data.preprocessing import Preprocessing

    pre, dataset = getattr(model, "preprocessing", None), getattr(model, "dataset", None)
    if not isinstance(pre, Preprocessing) or not isinstance(dataset, str):
        return None
    try:
        usual = dataset_preprocessing(dataset)
    except DfquantError:  # a dataset with no usual scaling: nothing to map from
        return None
    return pre.from_standardized(usual, channels)


def _text_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _run_batches(model: nn.Module, cfg: GenieConfig, method: str, image_size, sizes: Sequence[int], dev: torch.device, progress: bool, to_input=None) -> torch.Tensor:
    """Synthesize the batches ``sizes`` in order; in a job, each process its share (:func:`.distributed.shard`)
    with the seeds and swing draws the one-process run gives them, then every process gets all images."""
    first, stop = distributed.shard(len(sizes))
    images = _own_batches(model, cfg, method, image_size, sizes, dev, (first, stop), progress and distributed.is_main(), to_input)
    return distributed.all_gather_cat(images)[: sum(sizes)].contiguous()


def _own_batches(model: nn.Module, cfg: GenieConfig, method: str, image_size, sizes: Sequence[int], dev: torch.device, mine: Tuple[int, int], progress: bool, to_input=None) -> torch.Tensor:
    """Batches ``mine[0]`` to ``mine[1] - 1`` of ``sizes``, concatenated (a (0, C, H, W) tensor for none)."""
    from ..progress import progress_bar

    fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    out: List[torch.Tensor] = [torch.zeros(0, *image_size)]
    first, stop = mine
    with torch.random.fork_rng(devices=fork_devices), deterministic_cudnn(dev):
        seeds = torch.Generator().manual_seed(int(cfg.seed))
        swing_rng = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=seeds)))
        batch_seeds = [int(torch.randint(2**62, (1,), generator=seeds)) for _ in sizes]  # one per batch, in order
        teacher = copy_model(model)
        teacher.eval().requires_grad_(False)
        if cfg.swing:
            _apply_swing(teacher, swing_rng)
        teacher.to(dev)
        if cfg.swing and first > 0:
            _skip_swing_draws(teacher, image_size, dev, first * cfg.distill_iters)
        layers = bn_layers(teacher)
        total = cfg.distill_iters * (stop - first)
        bar = progress_bar(range(total), desc=f"{method} synthesis", enable=progress, total=total)
        ticks = iter(bar)
        state = {"batch": 0, "it": 0}

        def step(loss_value: float) -> None:
            next(ticks, None)
            state["it"] += 1
            if hasattr(bar, "set_postfix") and (state["it"] % 10 == 0 or state["it"] == total):
                bar.set_postfix(loss=f"{loss_value:.4g}", batch=f"{state['batch'] + 1}/{len(sizes)}", refresh=False)

        maps = None if to_input is None else tuple(t.to(dev) for t in to_input)
        run = _Run(cfg, teacher, BNInputs(layers), bn_targets(layers, dev), image_size, dev, step, maps)
        make = _genie_batch if method == "genie" else _zeroq_batch
        try:
            for i in range(first, stop):
                state["batch"] = i
                out.append(make(run, sizes[i], batch_seeds[i]).to("cpu", torch.float32))
            next(ticks, None)  # let the bar finish
        finally:
            run.rec.remove()
            if hasattr(bar, "close"):
                bar.close()
    return torch.cat(out)
