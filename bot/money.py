"""Money is integer micro-USDC (6 decimals) everywhere; these helpers convert at the edges."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICRO_PER_USD = 1_000_000


def parse_usd(text: str) -> int:
    """Turn a decimal dollar string like ``"0.50"`` into micro-USDC, exactly.

    Raises ValueError for anything that is not a non-negative amount with at most 6 decimals.
    """
    try:
        amount = Decimal(text.strip().removeprefix("$"))
    except (InvalidOperation, AttributeError):
        raise ValueError("not a dollar amount such as 0.50") from None
    if not amount.is_finite():
        raise ValueError("not a dollar amount such as 0.50")
    if amount < 0:
        raise ValueError("must not be negative")
    micro = amount * MICRO_PER_USD
    if micro != micro.to_integral_value():
        raise ValueError("has more than 6 decimal places")
    return int(micro)


def format_usd(micro: int) -> str:
    """Short price for chat: ``$0.0525``, ``$0.021``, ``$1.00``."""
    whole, frac = divmod(micro, MICRO_PER_USD)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"${whole}.{digits}"


def usd_string(micro: int) -> str:
    """Exact 6-place decimal string for reports: ``"0.157500"``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_USD)
    return f"{sign}{whole}.{frac:06d}"
