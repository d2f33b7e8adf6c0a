"""The one set of value checks behind every config's ``validate()``, and the field helper configs use.

Each check raises :class:`DfquantError` whose message starts with the API parameter's name and whose
``param`` attribute names it, so the CLI can say the flag instead (``w_bits`` -> ``--w-bits``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple

from .errors import DfquantError


def option(default: Any = None, help: str = "", *, flag: Optional[str] = None, choices: Optional[Sequence[Any]] = None, cli: bool = True, **field_kw: Any):
    """A config field with what the CLI needs to offer it: its help text, flag and choices.

    ``flag`` defaults to ``--name-with-dashes``; ``cli=False`` keeps a field off the command line
    (a tensor, a mapping the CLI builds itself)."""
    meta = dict(help=help, flag=flag, choices=tuple(choices) if choices is not None else None, cli=cli)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **field_kw)
    return dataclasses.field(default=default, metadata=meta, **field_kw)


def fail(param: str, message: str) -> DfquantError:
    """An error about ``param`` (the message should start with the parameter's name)."""
    return DfquantError(message, param=param)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def check_bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise fail(param, f"{param} must be True or False, got {value!r}")
    return value


def check_int(value: Any, param: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An integer (not a bool) within [minimum, maximum]."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if minimum is not None and maximum is not None:
            want = f"an integer between {minimum} and {maximum}"
        elif minimum is not None:
            want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        else:
            want = "an integer"
        raise fail(param, f"{param} must be {want}, got {value!r}")
    return value


def check_bits(value: Any, param: str) -> int:
    """A bit-width dfquant supports: an integer in 2..8."""
    return check_int(value, param, 2, 8)


def check_float(value: Any, param: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> float:
    """A finite number in [lo, hi] (``(lo, hi]`` with ``lo_open``)."""
    ok = is_number(value)
    ok = ok and (float(value) > lo if lo_open else float(value) >= lo) and float(value) <= hi
    if not ok:
        if math.isinf(lo) and math.isinf(hi):
            want = "a finite number"
        elif lo == 0 and lo_open and math.isinf(hi):
            want = "a positive finite number"
        else:
            upper = ")" if math.isinf(hi) else "]"  # a finite number: an infinite bound is open
            want = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{upper}"
        raise fail(param, f"{param} must be {want}, got {value!r}")
    return float(value)


def check_choice(value: Any, param: str, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise fail(param, f"unknown {param} {value!r}; choose {', '.join(str(c) for c in choices)}")
    return value


def check_range(value: Any, param: str) -> Tuple[float, float]:
    """Two finite numbers ``(lo, hi)`` with ``lo < hi``."""
    rng = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(rng) != 2 or not all(is_number(v) for v in rng) or not float(rng[0]) < float(rng[1]):
        raise fail(param, f"{param} must be two finite numbers (lo, hi) with lo < hi, got {value!r}")
    return (float(rng[0]), float(rng[1]))
