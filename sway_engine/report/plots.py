"""Small PNG plots (matplotlib, Agg): the null histogram and the ablation curve."""

from __future__ import annotations

import io
from collections.abc import Sequence


def _png(fig: object) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return buf.getvalue()


def null_histogram(name: str, samples: Sequence[float], raw: float | None) -> bytes:
    """Histogram of the null raws with the adapter's raw marked as a red line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.4))
    ax.hist(list(samples), bins=max(3, min(12, len(samples))), color="#8899aa", label="null")
    if raw is not None:
        ax.axvline(raw, color="#cc2222", linewidth=2, label="adapter")
    ax.set_title(f"{name}: null vs adapter", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def ablation_curve(name: str, lambdas: Sequence[float], curve: Sequence[float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.4))
    ax.plot(list(lambdas), list(curve), marker="o", color="#2255aa")
    ax.axvline(1.0, color="#999999", linestyle="--", linewidth=1)
    ax.set_xlabel("lambda", fontsize=8)
    ax.set_ylabel("mean divergence (nats)", fontsize=8)
    ax.set_title(f"{name}: ablation curve", fontsize=9)
    return _png(fig)
