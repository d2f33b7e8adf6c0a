"""Choosing the torch device for the learned methods (synthesis, reconstruction)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .errors import DfquantError


def resolve_device(device: Any) -> torch.device:
    """``"cpu"``, ``"cuda"``/``"cuda:K"`` or ``"auto"`` (CUDA when available) as a torch device."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DfquantError(f"device {name!r} requested but CUDA is not available; use device='cpu' or 'auto'")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise DfquantError(f"unknown device {name!r}; choose cpu, cuda or auto") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DfquantError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    raise DfquantError(f"unknown device {name!r}; choose cpu, cuda or auto")


@contextmanager
def deterministic_cudnn(dev: torch.device) -> Iterator[None]:
    """On CUDA, run the block with cuDNN's deterministic algorithms and no autotuning.

    cuDNN's default backward convolutions accumulate with atomics, so two Genie runs with the same
    seed gave different codes on a GPU (13 % of them, measured on an H100:
    ``benchmarks/results/gpu_equivalence.md``). The caller's flags are restored afterwards. A no-op
    on the CPU, whose kernels are deterministic already.
    """
    if dev.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def cpu_name() -> str:
    """The CPU's model name and the vector instruction set torch's kernels use (float results can
    differ between them), for results that say where they were made."""
    import platform
    from pathlib import Path

    import torch

    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = f"{platform.machine()} {line.split(':', 1)[1].strip()}"
                break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"
