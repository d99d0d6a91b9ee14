"""How the study's tables print numbers: perplexities, their intervals, compute multiples."""

from __future__ import annotations

import math


def fmt_ppl(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def fmt_ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{fmt_ppl(ci[0])}, {fmt_ppl(ci[1])}]"


def fmt_multiple(x: float | str) -> str:
    """A compute multiple (1.19 -> "1.19x"); one outside the measured range stays as given ("<1x")."""
    return x if isinstance(x, str) else f"{x:.2f}x"
