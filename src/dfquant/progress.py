"""Progress bars (tqdm on stderr), off when not wanted or when stderr is no terminal and none asked."""
from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def progress_bar(it: Iterable[T], desc: str = "", enable: bool = True, total: Optional[int] = None, leave: bool = False):
    """Wrap an iterable in a tqdm bar on stderr when ``enable`` is true."""
    if not enable:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=leave, file=sys.stderr, dynamic_ncols=True)
