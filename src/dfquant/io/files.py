"""Writing output files so that an interrupted run (Ctrl-C, a kill, a full disk) never leaves half
a file: each file is written under a hidden temporary name beside its target and renamed over it
only when every file of the group is complete (``os.replace`` is atomic on one file system).

The finished files get the mode an ordinary ``open(path, "w")`` would give them (``0o666`` less the
process umask): some writers (safetensors) create their temporary file private (``0o600``), which
would leave a model unreadable to others while its ``.json`` sidecar is readable."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence, Tuple

from ..errors import DfquantError

Writer = Callable[[Path], object]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then restore it at once
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a newly created regular file gets: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def check_writable(path: "str | Path", what: str = "output") -> None:
    """Refuse, before any work, an output ``path`` that could not be written: its folder missing,
    not a folder or refusing files (tried with a real write: permissions are not the only way,
    e.g. /proc or a read-only mount), or ``path`` itself an existing directory. ``what`` names the
    output in the message (a flag, say)."""
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        raise DfquantError(f"{what} {p}: that is a folder; give a file name (in it, if you like)")
    if not parent.exists():
        raise DfquantError(f"{what} {p}: output folder does not exist: {parent}")
    if not parent.is_dir():
        raise DfquantError(f"{what} {p}: {parent} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".dfquant-probe-"):
            pass
    except OSError as exc:
        raise DfquantError(f"{what} {p}: cannot write in {parent}: {exc.strerror or exc}") from None


def temp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under: hidden, and unique per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_all(targets: Sequence[Tuple["str | Path", Writer]]) -> None:
    """Write each ``(path, write)`` pair via ``write(temporary_path)``, then rename them all.

    Nothing is renamed until every writer has finished, so a group (a model and its sidecar) is
    replaced together or not at all; the temporary files are removed whatever happens.
    """
    pairs = [(Path(p), temp_path(Path(p)), w) for p, w in targets]
    mode = default_file_mode()
    try:
        for _, tmp, write in pairs:
            write(tmp)
            os.chmod(tmp, mode)
        for path, tmp, _ in pairs:
            os.replace(tmp, path)
    finally:
        for _, tmp, _ in pairs:
            if tmp.exists():
                tmp.unlink()


def atomic_write(path: "str | Path", write: Writer) -> None:
    """Write one file atomically (see :func:`atomic_write_all`)."""
    atomic_write_all([(path, write)])
