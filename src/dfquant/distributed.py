"""torch.distributed for the learned methods: one job of N processes started by ``torchrun``.

Every helper the methods need lives here, so that :mod:`dfquant.genie` reads as the one-process
method: joining and leaving the job (:func:`init`, :func:`shutdown`), who this process is
(:func:`rank`, :func:`world_size`, :func:`is_main`, :func:`rank_device`), the split of a range of
work (:func:`shard`) and the collectives (:func:`all_gather_cat`, :func:`all_reduce_sum_`,
:func:`broadcast_`, :func:`check_same`). Outside a process group of two or more processes every
helper is the one-process identity, so the methods run unchanged in one process.

Failures: a collective that fails because another process died, was stopped or did not answer
within the timeout (``DFQUANT_DIST_TIMEOUT`` seconds, default 1800) raises :class:`DfquantError`;
:func:`claim_failure` lets the first process of the job that fails print the job's one error line.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .errors import DfquantError, Stopped

TIMEOUT_ENV = "DFQUANT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
_FAILED_KEY = "dfquant/failures"


# --------------------------------------------------------------------------------------------
# Joining the job
# --------------------------------------------------------------------------------------------


def launched() -> bool:
    """Whether a launcher (``torchrun``) started this process as one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """Whether this process is in an initialised process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the process that evaluates, reports and writes files (or the only process)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK`` from torchrun; else the current GPU, else 0)."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def timeout() -> datetime.timedelta:
    """How long a collective waits for the other processes: ``DFQUANT_DIST_TIMEOUT`` seconds (default 1800)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DfquantError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def backend_for(device: str) -> str:
    """``nccl`` when the learned methods run on CUDA (``--device`` auto with a GPU, cuda, cuda:K), else ``gloo``."""
    return "nccl" if str(device) != "cpu" and torch.cuda.is_available() else "gloo"


def init(device: str = "auto") -> bool:
    """Join the job ``torchrun`` started (``env://``); True when this process is one of several.

    The backend follows ``device`` (:func:`backend_for`); with ``nccl`` each process takes the GPU
    of its local rank. Nothing happens outside a launcher or in a group already initialised."""
    if active() or not launched():
        return active()
    backend = backend_for(device)
    if backend == "nccl" and str(device).startswith("cuda:"):
        raise DfquantError(f"device {device} puts every process of the job on the same GPU: use device auto or cuda (each process then takes the GPU of its local rank)", param="device")
    if backend == "nccl":
        torch.cuda.set_device(gpu_index())
    with _collective("joining the job"):
        dist.init_process_group(backend, timeout=timeout())
    return True


def shutdown(failed: bool = False) -> None:
    """Leave the process group (if one was joined). After a failure an ``nccl`` group is left to the
    process's exit (tearing it down could wait on the failed collective); a ``gloo`` one is closed,
    so that its threads do not abort the exit."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if failed and dist.get_backend() == "nccl":
        return
    dist.destroy_process_group()


def gpu_index() -> int:
    """This process's GPU: the one of its local rank, or the only one it sees (a launcher that gives
    each process its own GPU through ``CUDA_VISIBLE_DEVICES``)."""
    local, count = local_rank(), torch.cuda.device_count()
    if local < count:
        return local
    if count == 1:
        return 0
    raise DfquantError(f"process {local} on this machine has no GPU of its own ({count} visible): start at most {count} processes per machine, or use --device cpu")


def rank_device(dev: torch.device) -> torch.device:
    """In a job, an unnumbered CUDA device (``auto``, ``cuda``) is this process's own GPU (:func:`gpu_index`)."""
    if active() and dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", gpu_index())
    return dev


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Stopped`, so that ``finally`` blocks (temporary files) run."""

    def stop(signum, frame):
        raise Stopped()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def claim_failure() -> bool:
    """Called by a process that is failing: True for the job's first failure (it prints the job's
    one error line), False for the processes that fail after it (they stay silent). In one
    process, always True. When the job's key-value store cannot be reached, True."""
    if not active():
        return True
    try:
        return dist.distributed_c10d._get_default_store().add(_FAILED_KEY, 1) == 1
    except Exception:  # the store went with the process that hosted it
        return True


# --------------------------------------------------------------------------------------------
# Splitting work and the collectives
# --------------------------------------------------------------------------------------------


def shard(n: int, index: Optional[int] = None, parts: Optional[int] = None) -> Tuple[int, int]:
    """``[lo, hi)``: part ``index`` (default this rank) of ``range(n)`` cut into ``parts`` (default
    the world size) contiguous, near-equal pieces (the first ``n % parts`` one longer)."""
    index = rank() if index is None else index
    parts = world_size() if parts is None else parts
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def _first_line(exc: BaseException) -> str:
    """The backend's message, first line, without its source-file prefix (``[.../pair.cc:553] ``)."""
    text = str(exc).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*", "", text[0] if text else type(exc).__name__)[:300]


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """A failed collective (a peer died, was stopped or timed out) as one :class:`DfquantError`."""
    try:
        yield
    except RuntimeError as exc:  # gloo and nccl raise RuntimeError (or DistError, a subclass)
        wait = f"{timeout().total_seconds():g} s"
        raise DfquantError(f"{what}: another process of the job failed or did not answer within {wait} ({TIMEOUT_ENV}): {_first_line(exc)}") from None


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every process's ``t`` (any number of rows, the same trailing shape and dtype) concatenated
    along dim 0 in rank order, on every process; ``t`` itself in one process. On ``t``'s device."""
    if not active():
        return t
    dev = _comm_device()
    with _collective("gathering results"):
        rows = torch.tensor([t.shape[0]], device=dev)
        counts = [torch.zeros_like(rows) for _ in range(world_size())]
        dist.all_gather(counts, rows)
        counts = [int(c) for c in counts]
        padded = torch.zeros((max(counts),) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
        padded[: t.shape[0]] = t.to(dev)
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` (float, one device) over the processes, in place, in one flat collective;
    every process gets the same values. A no-op in one process."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_comm_device())
    with _collective("summing gradients"):
        dist.all_reduce(flat)
    flat = flat.to(tensors[0].device)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> int:
    """Overwrite ``tensors`` with rank ``src``'s values; returns how many differed here (0 on ``src``)."""
    if not active():
        return 0
    differed = 0
    dev = _comm_device()
    with _collective("sharing parameters"):
        for t in tensors:
            buf = t.detach().to(dev, copy=True)
            dist.broadcast(buf, src)
            if not torch.equal(buf.to(t.device), t):
                differed += 1
                t.data.copy_(buf.to(t.device))
    return differed


def max_over_ranks(value: int) -> int:
    """The largest of one integer over the processes."""
    if not active():
        return value
    x = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    with _collective("comparing processes"):
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(tensors: Sequence[torch.Tensor], block: int = 1 << 22) -> torch.Tensor:
    """Each tensor's size and two exact integer sums of its bits (plain and position-weighted):
    equal tensors give equal fingerprints; integer sums do not depend on the order of addition."""
    out: List[int] = []
    for t in tensors:
        bits = t.detach().contiguous().reshape(-1).cpu()
        bits = bits.view(_INT_OF_SIZE[bits.element_size()])
        plain = weighted = 0
        for lo in range(0, bits.numel(), block):  # in blocks: a large image set is not copied whole
            part = bits[lo : lo + block].to(torch.int64)
            weights = torch.arange(lo, lo + part.numel(), dtype=torch.int64) % 65521 + 1
            plain += int(part.sum())
            weighted += int((part * weights).sum())
        out += [bits.numel(), plain % (1 << 62), weighted % (1 << 62)]
    return torch.tensor(out, dtype=torch.int64)


def check_same(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Refuse, with one clear error, a job whose processes hold different ``tensors`` (``what`` names them)."""
    if not active():
        return
    mine = _fingerprint(tensors).to(_comm_device())
    ref = mine.clone()
    with _collective(f"comparing the {what}"):
        dist.broadcast(ref, 0)
        same = torch.tensor([int(torch.equal(ref, mine))], device=mine.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if not int(same):
        raise DfquantError(f"the processes of the job hold different {what}: every process must be given the same model, data and settings")
