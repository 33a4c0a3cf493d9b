"""Money as text: exact decimals, never floats, never exponent notation."""
from __future__ import annotations

from decimal import Decimal

# NUMERIC(20, 10): ten digits before the point.
MAX_BUDGET_USD = Decimal("9999999999")


def format_money(value: Decimal) -> str:
    """A plain decimal string ("0.0000123", "100", "12.5"): no exponent, no float rounding."""
    text = format(Decimal(value).normalize(), "f")
    return "0" if text == "-0" else text
