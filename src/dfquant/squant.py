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
entries of largest positive priority. A top-k over every row would cost many times the rounding, so
the rows are searched with reductions instead: a kernel needs at most one flip in most cases, so the
K level takes each row's maximum (and, for the few rows that need more, the next maximum, ...); a
channel needs about sqrt(row length) flips, so the C level ranks the maxima of strided blocks of the
row (one top-k over a sixteenth of it) and looks inside the few winning blocks only. Where entries of
equal priority straddle a row's count, the choice among them is left to the top-k over the whole
row that this module used before (``_topk_mask``), so the codes are the same as with that in every
case.
"""
from __future__ import annotations

import torch

from .errors import DfquantError


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
    lo, hi = torch.aminmax(xf)
    if not torch.isfinite(torch.stack([lo, hi])).all():
        raise DfquantError("squant_round got non-finite values (NaN or inf) in the weight")
    q = torch.round(xf).clamp_(qmin, qmax)
    use_k = kernel and ksize > 1
    if not (use_k or channel):
        return q.reshape(shape).to(x.dtype)
    k = ksize if use_k else 1  # rows of the K level: kernels (or single elements)
    kx, kq = xf.view(-1, k), q.view(-1, k)
    clamps = not (qmin < lo and hi < qmax)  # some x at or beyond an end of the grid
    # One work buffer, rewritten in place: the errors d = q - x for the sums, then the flip
    # priorities, which start from the errors of the elements that can flip (q - clamp(x): 0 where
    # x lies off the grid, its floor and ceiling clamping to one value) times a per-row direction.
    work = kq - kx

    def free_errors():  # q - clamp(x) into work (it holds q - x when nothing clamps)
        if clamps:
            torch.sub(kq, torch.clamp(kx, qmin, qmax, out=work), out=work)

    if use_k:
        # K level: per kernel, flip round(|e|) elements towards reducing |e|, cheapest first.
        e = work.sum(dim=1)
        up = e < 0
        kcount = torch.round(e.abs()).long()
        sign = (1.0 - 2.0 * up).unsqueeze(1)  # +1: flips go down, -1: they go up

        def exact_k(rows, kmax):
            return _topk_mask(_priority(kq[rows] - kx[rows], up[rows].unsqueeze(1), _clamped(kx[rows], qmin, qmax)), kcount[rows], kmax)

        free_errors()
        taken = _peel(work.mul_(sign), kcount, exact_k)  # |q - x| where the flip points that way
        kq.add_(work.copy_(taken).mul_(-sign))
        if channel:
            torch.sub(kq, kx, out=work)

    if channel:
        # C level: each kernel offers its cheapest flip that moves its residual across zero;
        # per output channel take round(|sum|) offers, cheapest first.
        r = work.sum(dim=1) if k > 1 else work.view(-1)
        kernel_up = r < 0
        s = _double_row_sums(r.view(out, -1))
        need_up = s < 0
        free_errors()
        if k > 1:
            toward = work.mul_((1.0 - 2.0 * kernel_up).unsqueeze(1))
            offer = toward.amax(dim=1).view(out, -1)
            offer.masked_fill_(kernel_up.view(out, -1) != need_up.unsqueeze(1), -1.0)
        else:  # one element per kernel: its offer is |error| if that points the channel's way
            offer = work.view(out, -1).mul_(1.0 - 2.0 * need_up.unsqueeze(1))
        ccount = torch.round(s.abs()).long()
        width = offer.shape[1]

        def exact_c(rows, kmax):  # the former offers (values and order) of these channels
            kern = (rows.unsqueeze(1) * width + torch.arange(width, device=rows.device)).view(-1)
            up = kernel_up[kern].unsqueeze(1)
            prio = _priority(kq[kern] - kx[kern], up, _clamped(kx[kern], qmin, qmax)).amax(dim=1).view(len(rows), -1)
            return _topk_mask(prio.masked_fill_(up.view(len(rows), -1) != need_up[rows].unsqueeze(1), -1.0), ccount[rows], kmax)

        rows, cols = _top_blocks(offer, ccount, exact_c)
        kern = rows * width + cols
        if k > 1:  # the offer's element: the first of its kernel with that priority (max's convention)
            col = (toward[kern] == offer[rows, cols].unsqueeze(1)).byte().argmax(dim=1)
            kq[kern, col] += 1.0 - 2.0 * ~kernel_up[kern]
        else:
            kq[kern, 0] += 1.0 - 2.0 * ~kernel_up[kern]
    return q.reshape(shape).to(x.dtype)


def _peel(priority, count, exact):
    """Mask of the ``count[r]`` largest positive entries of each row of ``priority`` (short rows).

    Takes each row's maximum, with every entry equal to it, until the row has its count: one pass
    over all rows (most kernels need at most one flip), then over the few rows that need more.
    """
    n = priority.shape[1]
    need = count.clamp(0, n)
    kmax = int(need.max()) if need.numel() else 0
    top = priority.amax(dim=1)
    active = (need > 0) & (top > 0)
    taken = priority == torch.where(active, top, torch.inf).unsqueeze(1)
    # each active row took one entry, unless some row holds its maximum twice
    took = active.long() if int(taken.count_nonzero()) == int(active.count_nonzero()) else taken.sum(dim=1)
    need = need - took
    tied = [(need < 0).nonzero().squeeze(1)]  # equal entries straddle the count
    rows = (active & (need > 0)).nonzero().squeeze(1)
    cur, need = priority[rows].masked_fill_(taken[rows], -1.0), need[rows]
    while rows.numel():  # the few rows that need more than one entry
        top = cur.amax(dim=1, keepdim=True)
        hit = (cur == top) & (top > 0)
        need = need - hit.sum(dim=1)
        taken[rows] |= hit
        tied.append(rows[need < 0])
        more = (need > 0) & (top.squeeze(1) > 0)
        rows, need, cur = rows[more], need[more], cur[more].masked_fill_(hit[more], -1.0)
    tied = torch.cat(tied)
    if tied.numel():
        taken[tied] = exact(tied, kmax)
    return taken


def _top_blocks(value, count, exact):
    """(row, column) of the ``count[r]`` largest positive entries of each row of ``value`` (long rows).

    Each row is cut into ``s`` strided blocks (block j: columns j, j + b, j + 2b, ...). Its count
    largest entries lie in its count blocks of largest maximum, found by one top-k over the block
    maxima; if those blocks hold just count entries at or above the count-th block maximum, these
    are the answer, else (two large entries share a block) those few candidates are ranked.
    """
    nrows, n = value.shape
    k = count.clamp(0, n)
    kmax = int(k.max()) if k.numel() else 0
    dev = value.device
    none = torch.zeros(0, dtype=torch.long, device=dev)
    if kmax == 0:
        return none, none
    s = 16
    while s > 1 and (n % s or n // s <= kmax):
        s //= 2
    b = n // s
    kk = min(kmax + 1, b)
    top, block = value.view(nrows, s, b).amax(dim=1).topk(kk, dim=1)
    t = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # the count-th block maximum
    tie = (k > 0) & (k < kk) & (top.gather(1, k.clamp(max=kk - 1).unsqueeze(1)) == t).squeeze(1) & (t > 0).squeeze(1)
    pr, pj = (torch.arange(kk, device=dev) < k.unsqueeze(1)).nonzero(as_tuple=True)
    cols = block[pr, pj].unsqueeze(1) + b * torch.arange(s, device=dev)
    vals = value[pr.unsqueeze(1), cols]
    cand = (vals >= t[pr]) & (vals > 0)
    m = torch.zeros(nrows, dtype=torch.long, device=dev).index_add_(0, pr, cand.sum(dim=1))
    i, j = (cand & (~tie & (m <= k))[pr].unsqueeze(1)).nonzero(as_tuple=True)
    rows, cols_out = [pr[i]], [cols[i, j]]
    i, j = (cand & (~tie & (m > k))[pr].unsqueeze(1)).nonzero(as_tuple=True)
    if i.numel():  # rank the candidates of these rows by a top-k of their own
        rr, cc, vv = pr[i], cols[i, j], vals[i, j]
        ur, inv, cnt = torch.unique_consecutive(rr, return_inverse=True, return_counts=True)
        pos = torch.arange(len(rr), device=dev) - (cnt.cumsum(0) - cnt)[inv]
        width = int(cnt.max())
        cv = torch.full((len(ur), width), -1.0, device=dev).index_put_((inv, pos), vv)
        cc = torch.zeros((len(ur), width), dtype=torch.long, device=dev).index_put_((inv, pos), cc)
        kr = k[ur]
        tv, ti = cv.topk(min(int(kr.max()) + 1, width), dim=1)
        split = (tv.gather(1, (kr - 1).unsqueeze(1)) == tv.gather(1, kr.unsqueeze(1))).squeeze(1)
        a, c = ((torch.arange(tv.shape[1], device=dev) < kr.unsqueeze(1)) & ~split.unsqueeze(1)).nonzero(as_tuple=True)
        rows.append(ur[a])
        cols_out.append(cc[a, ti[a, c]])
        tie = tie.index_fill(0, ur[split], True)
    tied = tie.nonzero().squeeze(1)
    if tied.numel():
        a, c = exact(tied, kmax).nonzero(as_tuple=True)
        rows.append(tied[a])
        cols_out.append(c)
    return torch.cat(rows), torch.cat(cols_out)


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


def _double_row_sums(r):
    """``r.double().sum(dim=1)``, the former channel sums, converted a block of rows at a time (a
    large float64 copy costs more than the sum; each row's sum is unchanged: torch reduces the rows
    of a block of two or more rows one by one, as it does the rows of the whole)."""
    step = max(2, (1 << 17) // max(1, r.shape[1]))
    starts = list(range(0, len(r), step))
    if len(starts) > 1 and len(r) - starts[-1] < 2:
        starts.pop()  # no block of a single row
    ends = starts[1:] + [len(r)]
    return torch.cat([r[a:b].double().sum(dim=1) for a, b in zip(starts, ends)])


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
    """Max |sum(q - x)| over kernels and over output channels (the CASE objective's terms)."""
    d = (q.double() - x.double()).reshape(x.shape[0], x.shape[1] if x.dim() > 1 else 1, -1)
    return d.sum(dim=2).abs().max().item(), d.sum(dim=(1, 2)).abs().max().item()
