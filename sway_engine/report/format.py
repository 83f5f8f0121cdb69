"""Number formatting shared by every renderer, so the surfaces never disagree."""

from __future__ import annotations

import math

DASH = "—"


def num(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:,.{digits}f}"


def zfmt(z: float | None) -> str:
    if z is None or not math.isfinite(z):
        return DASH
    return f"{z:+,.2f}σ"


def pval(p: float | None) -> str:
    """Two significant digits: a p of 3e-7 must not read as 0.000."""
    if p is None or not math.isfinite(p):
        return DASH
    return f"{p:.2g}"


def ci(ci95: tuple[float, float] | None) -> str:
    if ci95 is None:
        return DASH
    return f"[{ci95[0]:.3f}, {ci95[1]:.3f}]"


def seconds(s: float) -> str:
    if s < 10:
        return f"{s:.2f}s"
    if s < 100:
        return f"{s:.1f}s"
    return f"{s:,.0f}s"
