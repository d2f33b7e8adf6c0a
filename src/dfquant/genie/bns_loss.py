"""The BN-statistics ("BNS") loss that Genie-D and ZeroQ minimise.

At the input of every ``BatchNorm2d`` with running statistics, the images' activations should have
the mean ``running_mean`` and the std ``sqrt(running_var + 1e-6)`` the layer recorded on real data.
Genie (Jeon et al., CVPR 2023, Sec. 3.1) compares the statistics of the whole batch over
(batch, H, W); ZeroQ (Cai et al., CVPR 2020, Eq. 2) those of each image over (H, W). Both releases
add a term on the image itself (per-image, per-channel mean -> 0, std -> 1) and normalise as
:func:`_sq_err` says. We hook the BN inputs, where ZeroQ's release hooks the preceding convs'
outputs: the same tensor for conv -> BN pairs, and still right when the module order differs.
BN layers without running statistics are ignored; a 1x1 map (a BN after global pooling) has std 0.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import DfquantError

#: Added to ``running_var`` before the square root, as both releases do.
BN_STD_EPS = 1e-6


def bn_layers(model: nn.Module) -> List[nn.BatchNorm2d]:
    """The model's BatchNorm2d layers that carry running statistics, in module order."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None
    ]


def check_has_bn(model: nn.Module) -> List[nn.BatchNorm2d]:
    layers = bn_layers(model)
    if not layers:
        other = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
        found = f" (it has {', '.join(other)}, which synthesis does not read)" if other else ""
        raise DfquantError(
            f"model {type(model).__name__} has no BatchNorm2d layer with running statistics{found}: Genie/ZeroQ synthesis needs BN statistics"
        )
    return layers


class BNInputs:
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


def bn_targets(layers: Sequence[nn.BatchNorm2d], device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
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


class _BatchStdMean(torch.autograd.Function):
    """Per-channel (unbiased std, mean) over (batch, H, W) of an (N, C, H, W) tensor, in two
    passes (mean, then the centred squares), with the gradient written out: ``dL/dx = a_c x + b_c``
    with ``a_c = g_std / ((n - 1) std)`` (0 where std = 0, as autograd's std does) and
    ``b_c = g_mean / n - a_c mean``, one elementwise pass instead of autograd's several."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        n = x.numel() // x.shape[1]
        mean = x.mean(dim=(0, 2, 3))
        std = ((x - mean[:, None, None]).square_().sum(dim=(0, 2, 3)) / max(n - 1, 1)).sqrt()
        ctx.save_for_backward(x, mean, std)
        return std, mean

    @staticmethod
    def backward(ctx, g_std, g_mean):
        x, mean, std = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        g_std = torch.zeros_like(std) if g_std is None else g_std
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        a = torch.where(std > 0, g_std / (max(n - 1, 1) * std), torch.zeros_like(std))
        b = g_mean / n - a * mean
        return torch.addcmul(b[:, None, None], x, a[:, None, None])


def batch_std_mean(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.std_mean(x, dim=(0, 2, 3))`` (unbiased) of an (N, C, H, W) tensor, faster on
    a CPU with its gradient (equal up to float rounding; the mean and centred squares are summed in
    separate passes, as ``std`` is defined; timings in benchmarks/results/speed.md)."""
    return _BatchStdMean.apply(x)


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


def loss_from_inputs(
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
            s, m = batch_std_mean(x)
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
    layers = check_has_bn(model)
    if images.dim() != 4:
        raise DfquantError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if images.shape[0] < 2 and not per_sample:
        raise DfquantError("Genie's batch-statistics loss needs at least 2 images")
    modes = {m: m.training for m in model.modules()}
    rec = BNInputs(layers)
    try:
        model.eval()
        model(images)
        targets = bn_targets(layers, images.device)
        mean_loss, std_loss = loss_from_inputs(images, rec.inputs, targets, per_sample, input_term)
    finally:
        rec.remove()
        for m, training in modes.items():
            m.training = training
    return mean_loss + std_loss
