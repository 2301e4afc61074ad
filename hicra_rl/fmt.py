"""Number formatting for the console and the report tables."""
from __future__ import annotations

import math


def fmt_float(value: float, spec: str = ".3f") -> str:
    """``format(value, spec)`` without a negative zero: a finite value that rounds to zero prints as zero
    (``-1e-9`` with ``.3f`` is ``0.000``, with ``+.3f`` ``+0.000``), never ``-0.000``."""
    text = format(value, spec)
    mantissa = text.lower().split("e")[0]
    if text.startswith("-") and math.isfinite(value) and not any(c in "123456789" for c in mantissa):
        return format(0.0, spec)
    return text
