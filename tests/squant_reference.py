"""The SQuant rounding as it was before it was made fast (dfquant commit 794aeaf), frozen verbatim
as the oracle: :func:`squant_round` in ``dfquant.squant`` must give the same codes, bit for bit.
Do not edit; ``benchmarks/speed.py`` also times it side by side with the current one.
"""
from __future__ import annotations

import torch

from dfquant.errors import DfquantError


def _flip_top(priority: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mask of the ``count[r]`` largest positive entries of each row of ``priority``.

    One top-k over the largest count per tensor, then the first ``count[r]`` of each row's ranked
    indices are scattered into the mask (entries with priority <= 0, i.e. not movable, never).
    Ties are broken by top-k's fixed order, so the same input always gives the same mask.
    """
    n = priority.shape[1]
    k = count.clamp(0, n)
    kmax = int(k.max()) if k.numel() else 0
    mask = torch.zeros_like(priority, dtype=torch.bool)
    if kmax == 0:
        return mask
    vals, idx = torch.topk(priority, kmax, dim=1, sorted=True)
    take = (torch.arange(kmax, device=priority.device) < k.unsqueeze(1)) & (vals > 0)
    return mask.scatter_(1, idx, take)


def _priority(d: torch.Tensor, up: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
    """Cost-ordering of a flip in direction ``up`` (per row), from the rounding errors ``d = q - x``.

    Moving up is possible for an element rounded down (``d < 0``), moving down for one rounded up
    (``d > 0``), except where ``x`` lies outside the grid (``clamped``: its floor and ceiling clamp
    to the same end). The priority is ``|d|`` for those, <= 0 otherwise; a larger ``|d|`` is a cheaper
    flip (the new |error| is ``1 - |d|``).
    """
    return torch.where(up, -d, d).masked_fill_(clamped, -1.0)


def squant_round(
    x: torch.Tensor, qmin: int, qmax: int, *, kernel: bool = True, channel: bool = True
) -> torch.Tensor:
    """SQuant rounding of weights already in grid units (``w / scale + zero_point``).

    ``x`` has shape (out, in, *kernel) or (out, in). Returns integer-valued values in [qmin, qmax],
    each the floor or the ceiling of ``x`` clamped to that range. Where clamping allows:
    with ``kernel=True, channel=False`` every kernel's |sum(q - x)| <= 0.5; with ``kernel=True,
    channel=True`` every output channel's |sum(q - x)| <= 0.5 and every kernel's <= 1 (<= 0.5 for
    the kernels the C level did not touch); with ``kernel=False, channel=True`` (SQuant-C) every
    output channel's <= 0.5, its elements flipped channel-wide with no kernel bound.
    ``kernel=False, channel=False`` is round-to-nearest (SQuant-E).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise DfquantError(
            f"squant_round needs a tensor of shape (out, in, *kernel) or (out, in), got {getattr(x, 'shape', type(x))}"
        )
    if not qmin < qmax:
        raise DfquantError(f"squant_round needs qmin < qmax, got {qmin}, {qmax}")
    if not torch.isfinite(x).all():
        raise DfquantError("squant_round got non-finite values (NaN or inf) in the weight")
    shape = x.shape
    out = shape[0]
    ksize = x[0, 0].numel()
    use_k = kernel and ksize > 1
    # Rows are kernels. Without the K level each element is its own "kernel" for the C level,
    # so the channel may pick any element, as in the authors' SQuant-C.
    xf = x.detach().float().reshape(-1, ksize if use_k else 1)
    q = torch.clamp(torch.round(xf), qmin, qmax)
    d = q - xf  # rounding error of every element, kept up to date with q
    clamped = (xf >= qmax) | (xf <= qmin)  # floor and ceiling clamp to one value: never flipped

    if use_k:
        # K level: per kernel, flip round(|e|) elements towards reducing |e|, cheapest first.
        e = d.sum(dim=1)
        up = (e < 0).unsqueeze(1)
        flips = _flip_top(_priority(d, up, clamped), torch.round(e.abs()).long())
        step = flips * (2.0 * up - 1.0)
        q += step
        d += step

    if channel:
        # C level: each kernel offers its cheapest flip that moves its residual across zero;
        # per output channel take round(|sum|) offers, cheapest first.
        r = d.sum(dim=1)
        kernel_up = (r < 0).unsqueeze(1)
        offer, offer_idx = _priority(d, kernel_up, clamped).max(dim=1)
        offer = offer.reshape(out, -1)
        kernel_up = kernel_up.reshape(out, -1)
        s = r.reshape(out, -1).double().sum(dim=1)
        need_up = (s < 0).unsqueeze(1)
        offer = offer.masked_fill(kernel_up != need_up, -1.0)
        take = _flip_top(offer, torch.round(s.abs()).long())
        step = (take * (2.0 * kernel_up - 1.0)).reshape(-1, 1)
        q.scatter_add_(1, offer_idx.unsqueeze(1), step)

    return q.reshape(shape).to(x.dtype)
