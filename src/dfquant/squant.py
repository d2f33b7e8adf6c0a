"""SQuant: data-free rounding by a diagonal-Hessian argument (Guo et al., ICLR 2022).

The paper approximates the loss change of a weight perturbation by the Hessian's diagonal blocks at
three granularities (element, kernel, output channel), giving the CASE objective (Sec. 3.3, Eq. 9-11):
each element's rounding error within 0.5 (E), the sum of the errors over each kernel (one input
channel's K = kh*kw weights) within 0.5 (K), and the sum over each output channel within 0.5 (C).

SQuant-E is round-to-nearest. SQuant-K (Alg. 1, "SQuant-K"): for a kernel whose error sum is ``e``,
flip ``round(|e|)`` elements in the direction that reduces ``|e|`` (round-up if ``e < 0``), choosing
the elements whose flip costs least, i.e. whose current error magnitude is largest (closest to 0.5).
SQuant-C (Alg. 1, "SQuant-C"): each kernel then offers exactly one further flip that moves its
residual ``r`` (``|r| <= 0.5``) across zero (so ``|r| <= 1`` afterwards); per output channel,
``round(|sum r|)`` of those offers are taken, again cheapest first. As in the authors' code, a
kernel's offer is the cheapest flip in that direction: the next element not yet flipped when the
kernel was under-compensated, or undoing its last flip when it was over-compensated.

Our implementation is vectorized over all kernels and channels at once, with no Python loop over
weights. Fully-connected and 1x1 layers have one element per kernel, so the K level is a no-op and
the C level works on single elements (the paper treats FC as a 1x1 conv).

Each level takes, in every row (a kernel's elements for K, a channel's offers for C), the ``count``
entries of largest positive priority. A top-k over every row would cost many times the rounding
itself, so instead: the K level takes each kernel's maximum with one reduction (most kernels need
at most one flip) and sorts the few kernels that need more. The C level's inputs follow from the K
level's choices without more passes over the weights: a kernel's residual is ``e`` minus its flips,
its offer the row maximum (no flip) or one minus its last flip's priority (over-compensated; an
under-compensated kernel's maximum stands in for its next element, and the rare channels that take
such a value are redone exactly). Per channel, one sort of its offers (numpy's vectorized sort; for
long rows only of the strided blocks that can hold the largest) gives the count-th largest, and the
offers at or above it are found through the blocks' maxima.

The codes are those of the former implementation, which took a top-k over each whole row: where a
sum computed another way could round to a different decision (a kernel residual within a rounding
bound of 0, a channel sum within one of a half-integer) the former sum is computed, and where
entries of equal priority straddle a row's count the former top-k (``_topk_mask``) decides.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import DfquantError

_EPS32 = 2.0**-24  # float32 unit roundoff
_EPS64 = 2.0**-53


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
    shape, out, ksize = x.shape, x.shape[0], x[0, 0].numel()
    xf = x.detach().float().reshape(out, -1)
    q = torch.round(xf).clamp_(qmin, qmax)
    if kernel and ksize > 1:
        lo, hi = _finite_range(xf)
        grid = (qmin, qmax, lo <= qmin or hi >= qmax)  # the last: some x at or beyond an end of the grid
        kx, kq = xf.view(-1, ksize), q.view(-1, ksize)
        kernels = _kernel_level(kx, kq, grid, lo, hi, channel)
        if channel:
            _channel_level(kx, kq, grid, out, *kernels)
    elif channel:  # its channel sums are finite exactly where x is: no separate pass for the range
        _channel_level_elements(xf, q, (qmin, qmax, True))
    else:
        _finite_range(xf)
    return q.reshape(shape).to(x.dtype)


def _finite_range(x):
    """(min, max) of ``x`` as floats; a DfquantError where it holds NaN or inf."""
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _non_finite()
    return lo, hi


def _non_finite():
    return DfquantError("squant_round got non-finite values (NaN or inf) in the weight")


def _free_errors(q, x, d, grid):
    """``d`` := q - clamp(x): the error of the elements that can flip, 0 where x lies off the grid
    (its floor and ceiling clamp to one value), so those never get a positive priority."""
    qmin, qmax, clamps = grid
    if clamps:
        torch.sub(q, torch.clamp(x, qmin, qmax, out=d), out=d)
    return d


def _signs(v):
    """+1 where v >= 0, -1 where v < 0 (the former code's direction: down unless v < 0)."""
    return v.sign().add_(0.5).sign_()


def _kernel_level(x, q, grid, lo, hi, offers):
    """SQuant-K in place on ``q`` (rows: kernels). With ``offers``, also what the C level needs of
    each kernel, found from this level's choices rather than from more passes over the weights:
    its residual ``r = sum(q - x)``, its direction (sign of r) and the priority of its offer."""
    qmin, qmax, _ = grid
    n = x.shape[1]
    d = q - x  # the rounding errors; this buffer then holds the flip priorities
    e = d.sum(dim=1)
    sign = _signs(e).unsqueeze(1)  # +1: flips go down, -1: they go up
    count = _counts(e, n, lo, hi, qmin, qmax)
    p = _free_errors(q, x, d, grid).mul_(sign)  # |error| where it points the flip's way, <= 0 otherwise

    def exact(rows, kmax):
        prio = _priority(q.index_select(0, rows) - x.index_select(0, rows), sign[rows] < 0, _clamped(x.index_select(0, rows), qmin, qmax))
        return _topk_mask(prio, torch.round(e[rows].abs()).long(), kmax)

    def priority(rows):
        qr, xr = q.index_select(0, rows), x.index_select(0, rows)
        return (qr - xr.clamp(qmin, qmax)).mul_(sign[rows])

    t, top, last = _peel(p, count, priority, exact)  # p: 1 where an element flips
    result = None
    if offers:
        # The residual is e - sign * t up to float rounding (at most `bound`); kernels whose residual
        # is that close to 0 get the exact sum. The offer of a kernel without flips is its row
        # maximum; of one over-compensated (its residual changed sign), undoing its cheapest flip:
        # priority 1 - last. An under-compensated kernel offers its next element, a priority <= its
        # maximum <= 0.5, which stands in for it here (see _channel_level).
        r = torch.addcmul(e, sign.squeeze(1), t, value=-1.0)
        bound = _sum_bound(n, lo, hi, qmin, qmax)
        near = (r.abs() <= bound) & (t > 0)
        if bool(near.any()):
            near = near.nonzero().squeeze(1)
            r[near] = (q.index_select(0, near) - sign[near] * d.index_select(0, near) - x.index_select(0, near)).sum(dim=1)
        rsign = _signs(r)
        over = (rsign != sign.squeeze(1)) & (t > 0)
        result = r, rsign, torch.where(over, 1.0 - last, top), bound
    q.addcmul_(d, sign, value=-1.0)
    return result


def _channel_level(x, q, grid, out, r, rsign, offer, bound):
    """SQuant-C over kernels in place on ``q``, from the K level's residuals and offers."""
    qmin, qmax, _ = grid
    width = r.numel() // out
    s = _double_row_sums(r.view(out, -1))
    # The former code summed the exact residuals: where ours could round s to a different decision
    # (s within `slack` of 0 or of a half-integer: each residual is off by at most `bound`, and each
    # float64 sum by its own rounding), the channel's exact residuals are summed. (A kernel's
    # direction is right already: its residual is off by less than its distance from 0.)
    slack = width * bound + 3.0 * width * width * _EPS64 * (float(r.abs().max()) + bound)
    a = s.abs()
    margin = torch.minimum(a, a.frac().sub_(0.5).abs_())
    if float(margin.min()) <= slack:
        near = (margin <= slack).nonzero().squeeze(1)
        kern = (near.unsqueeze(1) * width + torch.arange(width, device=near.device)).view(-1)
        r[kern] = (q.index_select(0, kern) - x.index_select(0, kern)).sum(dim=1)
        s[near] = _double_row_sums(r.view(out, -1)[near])
    kernel_up = rsign < 0
    need_up = s < 0
    count = torch.round(s.abs()).long()
    # an offer (>= 0) counts where its kernel's direction is the channel's (negative elsewhere)
    value = offer.mul_(rsign).view(out, -1).mul_(s.sign().float().unsqueeze(1))

    def former(kern):  # the former priorities of these kernels' elements
        qk, xk = q.index_select(0, kern), x.index_select(0, kern)
        return _priority(qk - xk, kernel_up[kern].unsqueeze(1), _clamped(xk, qmin, qmax))

    def exact(rows, kmax):  # the former offers (values and order) of these channels
        kern = (rows.unsqueeze(1) * width + torch.arange(width, device=rows.device)).view(-1)
        prio = former(kern).amax(dim=1).view(len(rows), -1)
        return _topk_mask(prio.masked_fill_(kernel_up[kern].view(len(rows), -1) != need_up[rows].unsqueeze(1), -1.0), count[rows], kmax)

    rows, cols = _top_rows(value, count, exact)
    # An under-compensated kernel's value was its maximum, not its offer. Both are <= 0.5 and the
    # other values are exact, so a channel whose every chosen value is > 0.5 is right; the others
    # (few: a channel needs more flips than it has kernels to undo) are redone exactly.
    low = torch.full((out,), torch.inf, device=q.device).scatter_reduce_(0, rows, value[rows, cols], "amin") <= 0.5
    if bool(low.any()):
        redo = low.nonzero().squeeze(1)
        keep = ~low[rows]
        a, c = exact(redo, int(count.clamp(0, width).max())).nonzero(as_tuple=True)
        rows, cols = torch.cat([rows[keep], redo[a]]), torch.cat([cols[keep], c])
    kern = rows * width + cols
    col = former(kern).argmax(dim=1)  # the offer's element: the first cheapest (max's convention)
    q.view(-1).index_add_(0, kern * x.shape[1] + col, rsign[kern].neg_())


def _channel_level_elements(x, q, grid):
    """SQuant-C over single elements (no K level, or one element per kernel) in place on ``q``."""
    qmin, qmax, _ = grid
    d = q - x
    s = _double_row_sums(d)  # float64 sums of float32 terms: finite unless some x is NaN or inf
    if not bool(torch.isfinite(s).all()):
        raise _non_finite()
    need_up = s < 0
    count = torch.round(s.abs()).long()
    csign = s.sign().float().unsqueeze(1)
    value = _free_errors(q, x, d, grid).mul_(csign)  # |error| where it points the channel's way, else <= 0

    def exact(rows, kmax):  # the former offers of these channels
        err = q.index_select(0, rows) - x.index_select(0, rows)
        prio = _priority(err, err < 0, _clamped(x.index_select(0, rows), qmin, qmax))
        return _topk_mask(prio.masked_fill_((err < 0) != need_up[rows].unsqueeze(1), -1.0), count[rows], kmax)

    rows, cols = _top_rows(value, count, exact)
    q.view(-1).index_add_(0, rows * x.shape[1] + cols, csign.squeeze(1)[rows].neg_())


def _counts(e, n, lo, hi, qmin, qmax):
    """``round(|e|)`` clamped to [0, n] as floats: the former ``torch.round(e.abs()).long().clamp(0, n)``
    (whose int64 conversion wraps sums beyond 2**63 to a negative number, so no flips there)."""
    count = e.abs().round_()
    if n * (max(abs(lo), abs(hi)) + abs(qmin) + abs(qmax)) >= 2.0**62:
        count.masked_fill_(count >= 2.0**63, 0.0)
    return count.clamp_(max=n)


def _sum_bound(n, lo, hi, qmin, qmax):
    """A bound on |r - r'| for two float32 sums over a row of n errors that agree in exact arithmetic
    up to the flips' roundings (any summation order: the error of an n-term sum is at most
    (n-1) u sum|terms| with u the unit roundoff); errors are at most ``big`` in magnitude."""
    big = max(0.5, hi - qmax, qmin - lo) + 1.0
    return 2.0 * _EPS32 * n * (n * (2.0 * big) + big + 3.0)


def _peel(p, count, priority, exact):
    """The ``count[r]`` largest positive entries of each row of ``p`` (short rows): ``p`` is
    overwritten with them as a 0/1 mask; returns the number taken, the row maximum and the
    smallest value taken, per row (floats). ``priority(rows)`` gives the rows of ``p`` again.

    Takes each row's maximum (with every entry equal to it) in one pass over all rows: most kernels
    need at most one flip. The few rows that need more, or hold their maximum twice, are sorted.
    Rows where equal entries straddle the count are decided by ``exact(rows, kmax)``.
    """
    n = p.shape[1]
    kmax = int(count.max()) if count.numel() else 0
    top = p.amax(dim=1)
    t = torch.minimum(count, top.sign().clamp_(min=0))  # 1 where a positive maximum is due, else 0
    taken = p == (top / t).unsqueeze(1)  # nothing is taken where t = 0 (the target is inf or nan)
    need = (count > t) & (t > 0)
    rows = need.nonzero().squeeze(1)
    sub = p.index_select(0, rows)
    mask = p.copy_(taken.view(torch.uint8))
    # some row holds its maximum twice (float sums of 0/1 are exact below 2**24)
    if (int(mask.sum()) if mask.numel() < 2**24 else int(taken.count_nonzero())) != int(t.sum()):
        rows = need.logical_or_(mask.sum(dim=1) > 1).nonzero().squeeze(1)
        sub = priority(rows)
    last = top
    if rows.numel():
        c = count.index_select(0, rows).long().unsqueeze(1)
        g = _sort_rows(sub).gather(1, torch.cat([n - c, n - 1 - c], dim=1).clamp_(0, n - 1))
        th, below = g[:, :1], g[:, 1:]
        hit = (sub >= th) & (sub > 0)
        tied = ((below == th) & (th > 0) & (c < n)).squeeze(1)
        if bool(tied.any()):
            hit[tied] = exact(rows[tied], kmax)
        taken = hit.float()
        mask.index_copy_(0, rows, taken)
        t = t.index_copy(0, rows, taken.sum(dim=1))
        # the smallest value taken: the count-th largest, unless fewer entries were positive
        small = th.squeeze(1).clone()
        odd = (th.squeeze(1) <= 0) | tied
        if bool(odd.any()):
            small[odd] = sub[odd].masked_fill(~hit[odd], torch.inf).amin(dim=1)
        last = top.index_copy(0, rows, small)
    return t, top, last


def _top_rows(value, count, exact):
    """(row, column) of the ``count[r]`` largest positive entries of each row of ``value`` (long rows).

    Each row is cut into ``s`` strided blocks (block j: columns j, j + b, j + 2b, ...) with their
    maxima. A sort gives the count-th largest entry ``t``: of the whole row, or for long rows only of
    the blocks whose maximum reaches the count-th largest block maximum (which cannot exceed t). The
    entries >= t are then looked for in the blocks whose maximum is >= t. Rows where the count-th
    and the next largest entries are equal go to ``exact``.
    """
    nrows, n = value.shape
    k = count.clamp(0, n)
    kmax = int(k.max()) if k.numel() else 0
    dev = value.device
    if kmax == 0:
        return torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
    s = 8
    while s > 1 and (n % s or n // s <= kmax):
        s //= 2
    b = n // s
    blocks = value.view(nrows, s, b)
    top = blocks.amax(dim=1)
    if n >= 1024 and s >= 4:
        low = _sort_rows(top).gather(1, (b - k).clamp(max=b - 1).unsqueeze(1))
        pr, blk = ((top >= low) & (k > 0).unsqueeze(1)).nonzero(as_tuple=True)
        per_row = torch.bincount(pr, minlength=nrows)
        pos = torch.arange(len(pr), device=dev) - (per_row.cumsum(0) - per_row)[pr]
        cand = torch.full((nrows, int(per_row.max()), s), -torch.inf, device=dev).index_put_((pr, pos), blocks[pr, :, blk])
        srt = _sort_rows(cand.view(nrows, -1))
    else:
        srt = _sort_rows(value)
    w = srt.shape[1]
    g = srt.gather(1, torch.stack([w - k, w - 1 - k], dim=1).clamp_(0, w - 1))
    t, below = g[:, :1], g[:, 1:]  # the count-th and the next largest
    tie = (below == t) & (t > 0) & ((k > 0) & (k < n)).unsqueeze(1)
    t.masked_fill_(tie | (k == 0).unsqueeze(1), torch.inf)
    pr, blk = ((top >= t) & (top > 0)).nonzero(as_tuple=True)
    vals = blocks[pr, :, blk]
    i, j = ((vals >= t[pr]) & (vals > 0)).nonzero(as_tuple=True)
    rows, cols = pr[i], blk[i] + b * j
    tied = tie.squeeze(1).nonzero().squeeze(1)
    if tied.numel():
        a, c = exact(tied, kmax).nonzero(as_tuple=True)
        rows, cols = torch.cat([rows, tied[a]]), torch.cat([cols, c])
    return rows, cols


def _double_row_sums(r):
    """``r.double().sum(dim=1)``, the former channel sums, converted a block of rows at a time (a
    large float64 copy costs more than the sum; each row's sum is unchanged: torch reduces the rows
    of a block of two or more rows one by one, as it does the rows of the whole)."""
    step = max(2, (1 << 19) // max(1, r.shape[1]))
    starts = list(range(0, len(r), step))
    if len(starts) > 1 and len(r) - starts[-1] < 2:
        starts.pop()  # no block of a single row
    ends = starts[1:] + [len(r)]
    return torch.cat([r[a:b].double().sum(dim=1) for a, b in zip(starts, ends)])


def _sort_rows(v):
    """Each row sorted ascending (values only; numpy's vectorized sort on the CPU is several times
    faster than torch's for many short rows, and sorted values do not depend on the algorithm)."""
    if v.device.type == "cpu":
        return torch.from_numpy(np.sort(v.numpy(), axis=1))
    return v.sort(dim=1).values


def _topk_mask(priority, count, kmax):
    """Mask of the ``count[r]`` largest positive entries of each row of ``priority``: the first
    ``count[r]`` of one top-``kmax`` (the former selection, kept for rows where a tie decides; ``kmax``
    is the largest count over all rows of the layer, as it was, so that top-k orders ties the same)."""
    k = count.clamp(0, priority.shape[1])
    mask = torch.zeros_like(priority, dtype=torch.bool)
    if kmax == 0:
        return mask
    vals, idx = torch.topk(priority, kmax, dim=1, sorted=True)
    take = (torch.arange(kmax, device=priority.device) < k.unsqueeze(1)) & (vals > 0)
    return mask.scatter_(1, idx, take)


def _clamped(x, qmin, qmax):
    """Elements whose floor and ceiling clamp to one value: never flipped."""
    return (x >= qmax) | (x <= qmin)


def _priority(d, up, clamped):
    """Cost-ordering of a flip in direction ``up`` (per row), from the rounding errors ``d = q - x``.

    Moving up is possible for an element rounded down (``d < 0``), moving down for one rounded up
    (``d > 0``), except where ``x`` lies outside the grid (``clamped``: its floor and ceiling clamp
    to the same end). The priority is ``|d|`` for those, <= 0 otherwise; a larger ``|d|`` is a cheaper
    flip (the new |error| is ``1 - |d|``).
    """
    return torch.where(up, -d, d).masked_fill_(clamped, -1.0)


def rounding_error_sums(q: torch.Tensor, x: torch.Tensor):
    """Max |sum(q - x)| over kernels and over output channels (the CASE objective's terms).

    For the report: ``q - x`` in float32 (exact but where a value within float32 rounding of 0 was
    flipped), kernel sums accumulated in float64, channel sums from those."""
    d = (q.to(torch.float32) - x.float()).reshape(x.shape[0], x.shape[1] if x.dim() > 1 else 1, -1)
    k = d.sum(dim=2, dtype=torch.float64)
    return k.abs().max().item(), k.sum(dim=1).abs().max().item()
