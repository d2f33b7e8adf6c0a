"""The one exception type dfquant raises for bad input, so the CLI can print one clear line."""
from __future__ import annotations

from typing import Tuple, Union


class DfquantError(ValueError):
    """Bad input or an unsupported request: the message names the problem and what to do.

    ``param`` names the API parameter (or a tuple of them) at fault, when there is one (the CLI
    names its flag instead)."""

    def __init__(self, message: str, param: Union[str, Tuple[str, ...], None] = None):
        super().__init__(message)
        self.param = param


class DfquantNote(UserWarning):
    """Something a user should know that is not an error (the CLI prints it as one ``note:`` line)."""


def note(message: str) -> None:
    """Emit a :class:`DfquantNote` (a warning the caller may silence or turn into an error)."""
    import warnings

    warnings.warn(message, DfquantNote, stacklevel=3)


def check_bits(bits: int, what: str = "bit-width") -> int:
    """Validate a bit-width: an int in 2..8 (what dfquant supports). See :mod:`dfquant.checks`."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise DfquantError(f"{what} must be an integer between 2 and 8, got {bits!r}", param=what)
    if not 2 <= bits <= 8:
        raise DfquantError(f"{what} must be between 2 and 8, got {bits}", param=what)
    return bits


class Stopped(BaseException):
    """SIGTERM arrived (``torchrun`` stops the other processes of a job when one fails); raised by
    :func:`dfquant.distributed.sigterm_stops` so that ``finally`` blocks (temporary files) run."""
