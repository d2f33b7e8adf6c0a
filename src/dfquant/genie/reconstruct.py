"""Genie-M: block-wise reconstruction of a quantized model on synthetic images (Genie Sec. 3.2).

Units (:mod:`.units`) are reconstructed one after the other in execution order. A unit's objective
is BRECQ's block-output reconstruction as the release computes it (plain squared error, no Fisher
weighting): ``||f_q(x~) - f(x)||^2`` summed over channels, averaged over batch and positions, the
target being the float unit's output on the float model's unit input. The unit's input ``x~`` is,
per element, the quantized model's input ``x_q`` or the float one ``x`` with probability 1/2 (QDrop,
``drop_prob``). Adam on the weight steps (lr 1e-4) and activation steps (4e-5), cosine-annealed;
a second Adam on ``V`` (no schedule); the rounding regulariser starts after a 20 % warm-up with
``beta`` annealed linearly 20 -> 2 (the release's ``LinearTempDecay``).

Deviations from the release: true batches of ``batch_size`` from a fresh permutation every epoch
(its ``randperm(N).view(batch_size, -1)`` gives batches of N / batch_size); activation ranges for
``act_calib="data"`` are searched on the unit's hard-rounded start, not inside the first soft pass;
a range the caller fixed (``keep_ranges``) is not searched; the rounding lr follows the budget
(:func:`.config.lr_round_for`); ``keep_best`` (off by default) is ours. On CUDA cuDNN runs its
deterministic algorithms, so a seed gives the same model on the same GPU and software.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .. import distributed
from ..devices import deterministic_cudnn, resolve_device
from ..errors import DfquantError
from .config import GenieConfig
from .quantizer import GenieLayer, calibrate_activations, keep_where, qdrop_mask
from .units import capture, chunks, get_module, ordered_units, set_module, tie_shared_inputs


def recon_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over batch and positions (release)."""
    return (out - target).square().sum(1).mean()


@torch.no_grad()
def unit_error(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    total, n = 0.0, x.shape[0]
    for sl in chunks(n, chunk):
        total += float(recon_error(unit(x[sl].clone()), y[sl])) * (sl.stop - sl.start)  # the unit may write to its input
    return total / n


def beta_schedule(it: int, iters: int, warmup: float, beta: Tuple[float, float]) -> float:
    """The release's LinearTempDecay: beta_start until the warm-up ends, then linear to beta_end."""
    start = warmup * iters
    if it < start:
        return beta[0]
    rel = (it - start) / max(iters - start, 1e-12)
    return beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - rel)


@dataclass
class _Shard:
    """This process's rows ``[lo, hi)`` of the current training batch of ``full`` rows (all of them
    in one process; in a job, :func:`.distributed.shard` of them)."""

    full: int = 0
    lo: int = 0
    hi: int = 0

    def mask(self, shape: Sequence[int], drop_prob: float, gen: torch.Generator, device) -> torch.Tensor:
        """QDrop's keep mask (:func:`.quantizer.qdrop_mask`) for this process's rows: the one-process
        draw for the whole batch, cut to them."""
        return qdrop_mask((self.full,) + tuple(shape[1:]), drop_prob, gen, device)[self.lo : self.hi]

    @property
    def part(self) -> float:
        """This process's share of the batch mean (1.0 in one process)."""
        return (self.hi - self.lo) / self.full


class _ShardLayer(GenieLayer):
    """A :class:`GenieLayer` whose QDrop mask is that of the one-process run on the whole batch,
    cut to this process's rows (:class:`_Shard`); in one process, GenieLayer's draw exactly."""

    def __init__(self, layer: nn.Module, w_float: torch.Tensor, drop_prob: float, rng: torch.Generator, shard: _Shard):
        super().__init__(layer, w_float, drop_prob, rng)
        self.shard = shard

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.mask(x.shape, self.drop_prob, self.rng, x.device)


@dataclass
class _Run:
    """What every unit of one reconstruction shares."""

    cfg: GenieConfig  # resolved
    ref: nn.Module
    qmodel: nn.Module
    images: torch.Tensor  # on the device
    device: torch.device
    gen_cpu: torch.Generator
    gen_dev: torch.Generator
    tick: Callable[..., None]
    keep_ranges: Sequence[str] = ()

    @property
    def chunk(self) -> int:
        return max(self.cfg.batch_size, 64)


@dataclass
class UnitRecord:
    name: str
    layers: List[str]
    before: float = 0.0
    after: float = 0.0
    codes_changed: int = 0
    weights: int = 0
    time_s: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dict(name=self.name, layers=self.layers, before=self.before, after=self.after, codes_changed=self.codes_changed, weights=self.weights, time_s=self.time_s, **self.extra)


def _sum_over_processes(params: Sequence[torch.Tensor], rec_part: torch.Tensor) -> float:
    """In a job: the gradients of each process's share of the batch loss summed over the processes
    (the one-process batch mean's gradients, up to summation order), in one collective; returns
    the batch's loss, the shares' sum. In one process: the loss."""
    if not distributed.active():
        return float(rec_part.detach())
    total = rec_part.detach().reshape(1).clone()
    distributed.all_reduce_sum_([p.grad for p in params if p.grad is not None] + [total])
    return float(total)


def _train_layout(t: torch.Tensor) -> torch.Tensor:
    """A unit's training tensors in channels-last order on the CPU (4-D ones): the batches gathered
    from them keep it, and the units' convolutions with their gradients run faster on small
    channel counts (measured, benchmarks/results/speed.md; the same values up to float rounding).
    Unchanged on a GPU (not measured there)."""
    if t.device.type == "cpu" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _train_unit(run: _Run, unit: nn.Module, wrappers: Sequence[GenieLayer], shard: _Shard, x_fp, x_q, y) -> float:
    """Adam on (steps, V) of one unit: the release's ``reconstruct_block`` objective and schedule.

    In a job every process draws the same batches and QDrop masks (the same generators), keeps its
    rows of each batch (``shard``) and weighs its loss by its share; the summed gradients make
    every process take the same steps. Returns the fraction of soft rounding values not yet within
    0.01 of 0 or 1 at the end.
    """
    cfg = run.cfg
    groups = [{"params": [w.w_scale for w in wrappers], "lr": cfg.lr_w_scale}]
    a_scales = list({id(w.a_scale): w.a_scale for w in wrappers if w.a_scale is not None}.values())  # one per shared quantizer
    if a_scales:
        groups.append({"params": a_scales, "lr": cfg.lr_a_scale})
    opt_scale = torch.optim.Adam(groups)
    opt_round = torch.optim.Adam([w.v for w in wrappers], lr=cfg.lr_round)
    params = [p for group in groups for p in group["params"]] + [w.v for w in wrappers]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_scale, T_max=cfg.recon_iters)
    x_fp, x_q, y = (_train_layout(t) for t in (x_fp, x_q, y))
    n = x_q.shape[0]
    bs = min(cfg.batch_size, n)
    batches: List[torch.Tensor] = []
    for w in wrappers:
        w.soft = True
    for it in range(1, cfg.recon_iters + 1):
        if not batches:
            perm = torch.randperm(n, generator=run.gen_cpu)
            batches = [perm[i : i + bs] for i in range(0, n - bs + 1, bs)]
        idx = batches.pop(0)
        shard.full = idx.numel()
        shard.lo, shard.hi = distributed.shard(shard.full)
        idx = idx[shard.lo : shard.hi].to(x_q.device)
        xf, xq, target = x_fp[idx], x_q[idx], y[idx]
        if cfg.drop_prob > 0:  # QDrop on the unit's input: float or quantized-model input
            xin = keep_where(shard.mask(xq.shape, cfg.drop_prob, run.gen_dev, xq.device), xf, xq)
        else:
            xin = xq
        rec = recon_error(unit(xin), target) * shard.part
        beta = beta_schedule(it, cfg.recon_iters, cfg.warmup, cfg.beta)
        rnd = sum(w.round_loss(beta) for w in wrappers) if it >= cfg.warmup * cfg.recon_iters else rec.new_zeros(())
        loss = rec + cfg.round_weight * rnd if distributed.is_main() else rec  # the regulariser counted once
        opt_scale.zero_grad(set_to_none=True)
        opt_round.zero_grad(set_to_none=True)
        loss.backward()
        rec_value = _sum_over_processes(params, rec)
        opt_scale.step()
        opt_round.step()
        sched.step()
        run.tick(it, rec_value, float(rnd.detach()), beta)
    with torch.no_grad():  # soft bits still away from 0/1: the soft-to-hard gap at the end
        h = torch.cat([w.soft_bits().reshape(-1) for w in wrappers])
        undecided = float(((h > 0.01) & (h < 0.99)).float().mean())
    for w in wrappers:
        w.soft = False
    return undecided


def _train_wrapped(run: _Run, uname: str, layers: List[str], x_fp, x_q, y) -> float:
    """Swap the unit's layers for trainable stand-ins, train them, write the result back."""
    q_layers = [get_module(run.qmodel, n) for n in layers]
    shard = _Shard()
    wrappers = [_ShardLayer(lay, get_module(run.ref, n).weight, run.cfg.drop_prob, run.gen_dev, shard) for n, lay in zip(layers, q_layers)]
    for n, w in zip(layers, wrappers):
        set_module(run.qmodel, n, w)
    try:
        with tie_shared_inputs(get_module(run.qmodel, uname), wrappers):
            undecided = _train_unit(run, get_module(run.qmodel, uname), wrappers, shard, x_fp, x_q, y)
        for w in wrappers:
            w.commit()
    finally:
        for n, lay in zip(layers, q_layers):
            set_module(run.qmodel, n, lay)
    return undecided


def _reconstruct_unit(run: _Run, uname: str, layers: List[str]) -> UnitRecord:
    t0 = time.perf_counter()
    rec = UnitRecord(uname, list(layers))
    x_fp, y = capture(run.ref, get_module(run.ref, uname), run.images, run.chunk, run.device, want_output=True)
    x_q, _ = capture(run.qmodel, get_module(run.qmodel, uname), run.images, run.chunk, run.device, want_output=False)
    q_layers = [get_module(run.qmodel, n) for n in layers]
    unit = get_module(run.qmodel, uname)
    rec.before = unit_error(unit, x_q, y, run.chunk)
    start_codes = [lay.weight_int.clone() for lay in q_layers]
    start_state = [copy.deepcopy(lay.state_dict()) for lay in q_layers] if run.cfg.keep_best else None
    searched = [lay for n, lay in zip(layers, q_layers) if lay.input_quant is not None and n not in run.keep_ranges]
    if run.cfg.act_calib == "data" and searched:
        calibrate_activations(unit, searched, x_q[: min(run.cfg.batch_size, x_q.shape[0])])
        rec.extra["after_act_calib"] = unit_error(unit, x_q, y, run.chunk)
    if run.cfg.recon_iters > 0:
        rec.extra["soft_undecided"] = _train_wrapped(run, uname, layers, x_fp, x_q, y)
        if distributed.active():  # the same steps everywhere; rank 0's values are made everyone's
            differed = distributed.broadcast_([t for lay in q_layers for t in lay.state_dict().values()])
            rec.extra["ranks_differed"] = distributed.max_over_ranks(differed)
    rec.after = unit_error(get_module(run.qmodel, uname), x_q, y, run.chunk)
    if run.cfg.keep_best and rec.after > rec.before:  # the guard: keep the unit's starting state
        for lay, state in zip(q_layers, start_state):
            lay.load_state_dict(state)
        rec.extra.update(kept_start=True, after_trained=rec.after)
        rec.after = unit_error(get_module(run.qmodel, uname), x_q, y, run.chunk)
    rec.codes_changed = int(sum(int((lay.weight_int != c).sum()) for lay, c in zip(q_layers, start_codes)))
    rec.weights = int(sum(lay.weight_int.numel() for lay in q_layers))
    rec.time_s = time.perf_counter() - t0
    return rec


def _progress(units, cfg: GenieConfig, enable: bool):
    """A progress bar over every unit's iterations and the tick that advances it."""
    from ..progress import progress_bar

    total = cfg.recon_iters * len(units)
    bar = progress_bar(range(total), desc="Genie-M reconstruction", enable=enable and total > 0, total=total)
    ticks = iter(bar)
    where = {"unit": ""}

    def tick(it, rec_loss, rnd_loss, b):
        next(ticks, None)
        if hasattr(bar, "set_postfix") and (it % 10 == 0 or it == cfg.recon_iters):
            bar.set_postfix(unit=where["unit"], rec=f"{rec_loss:.4g}", round=f"{rnd_loss:.4g}", b=f"{b:.1f}", refresh=False)

    return bar, ticks, tick, where


def _check_job(ref: nn.Module, qmodel: nn.Module, images: torch.Tensor, config: GenieConfig) -> None:
    """In a job: every process holds the same models, images and settings, and a batch has a row for each."""
    if not distributed.active():
        return
    bs, procs = min(config.batch_size, images.shape[0]), distributed.world_size()
    if config.recon_iters > 0 and bs < procs:
        raise DfquantError(f"reconstruction batches of {bs} images cannot be split over {procs} processes: use at least {procs} images per batch, or fewer processes", param="batch_size")
    text = torch.tensor(list(repr(config).encode("utf-8")), dtype=torch.uint8)
    tensors = [images, text] + list(ref.state_dict().values()) + list(qmodel.state_dict().values())
    distributed.check_same(tensors, "models, calibration images or reconstruction settings")


def reconstruct_model(ref: nn.Module, qmodel: nn.Module, images: torch.Tensor, config: GenieConfig, *, keep_ranges: Sequence[str] = (), progress: bool = False) -> Dict[str, Any]:
    """Genie-M: refine ``qmodel`` in place against the float model ``ref`` on ``images``.

    ``config`` is a resolved :class:`GenieConfig` (:meth:`GenieConfig.resolve`). ``ref`` has the
    quantized model's layer names (BN folded when ``qmodel``'s is). Final hard codes go into
    ``weight_int``, learned steps into ``weight_scale`` and ``input_quant.scale`` (zero points
    unchanged); the input ranges of the layers in ``keep_ranges`` are not searched. ``qmodel`` ends
    on the CPU; ``ref`` is not modified. Returns the per-unit records (output error before and
    after, codes changed, time) and the units the forward pass did not reach.

    Inside an initialised ``torch.distributed`` process group of several processes, every process
    runs the same units in the same order and trains each on its rows of every batch, with the
    gradients summed over the processes (data parallel); every process ends with the same model,
    the one-process model up to float summation order. All must be given the same inputs (checked).
    """
    dev = distributed.rank_device(resolve_device(config.device))
    _check_job(ref, qmodel, images, config)
    ref = copy.deepcopy(ref).eval().requires_grad_(False).to(dev)
    grad_flags = {p: p.requires_grad for p in qmodel.parameters()}
    qmodel.eval().requires_grad_(False).to(dev)
    units, skipped = ordered_units(qmodel, ref, images[: min(2, images.shape[0])].to(dev))
    bar, ticks, tick, where = _progress(units, config, progress and distributed.is_main())
    gens = torch.Generator().manual_seed(int(config.seed) + 1), torch.Generator(device=dev).manual_seed(int(config.seed) + 2)
    run = _Run(config, ref, qmodel, images.to(dev), dev, gens[0], gens[1], tick, tuple(keep_ranges))
    records: List[UnitRecord] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(deterministic_cudnn(dev))
        stack.callback(lambda: bar.close() if hasattr(bar, "close") else None)
        stack.callback(lambda: [p.requires_grad_(f) for p, f in grad_flags.items()])
        stack.callback(lambda: qmodel.to("cpu"))
        for i, (uname, layers) in enumerate(units):
            where["unit"] = f"{i + 1}/{len(units)} {uname}"
            records.append(_reconstruct_unit(run, uname, layers))
        next(ticks, None)
    return dict(units=[r.to_dict() for r in records], units_not_run=[u for u, _ in skipped])
