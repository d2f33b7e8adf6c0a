"""The one exception type dfquant raises for bad input, so the CLI can print one clear line."""


class DfquantError(ValueError):
    """Bad input or an unsupported request: the message names the problem and what to do."""


def check_bits(bits: int, what: str = "bit-width") -> int:
    """Validate a bit-width: an int in 2..8 (what dfquant supports)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise DfquantError(f"{what} must be an integer between 2 and 8, got {bits!r}")
    if not 2 <= bits <= 8:
        raise DfquantError(f"{what} must be between 2 and 8, got {bits}")
    return bits
