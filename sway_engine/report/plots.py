"""Small PNG plots (matplotlib, Agg) of a probe result: the null histogram with the adapter's
raw marked, and the ablation curve beside the nulls' D(1). Each is None when there is nothing to
draw or matplotlib is not installed (it comes with the `dagster` extra)."""

from __future__ import annotations

import functools
import hashlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np

from sway_engine import stats
from sway_engine.result import ProbeResult

if TYPE_CHECKING:
    from sway_engine.score_cache import ScoreCache

ADAPTER, NULLS, BAND = "#cf222e", "#8c959f", "#d0d7de"
DPI = 100


def null_plot(result: ProbeResult) -> bytes | None:
    """The null histogram of a calibrated probe, or None."""
    if result.null is None or not result.null.samples:
        return None
    try:
        return _drawn(
            null_histogram,
            result.name,
            tuple(result.null.samples),
            result.raw,
            log=_scale(result) == "log",
        )
    except ImportError:
        return None


def ablation_plot(result: ProbeResult) -> bytes | None:
    """The ablation curve of an adapter_ablation result, or None."""
    if result.kind != "adapter_ablation" or "curve" not in result.evidence:
        return None
    samples = result.null.samples if result.null is not None else ()
    try:
        return _drawn(
            ablation_curve,
            result.name,
            tuple(result.evidence["lambdas"]),
            tuple(result.evidence["curve"]),
            tuple(samples),
            null_band(samples, _scale(result)),
            log=_scale(result) == "log",
        )
    except ImportError:
        return None


# The persistent scoring cache plots are kept in while `kept_in` is active (None: drawn).
_STORE: ContextVar[ScoreCache | None] = ContextVar("sway_plot_store", default=None)


@contextmanager
def kept_in(store: ScoreCache | None) -> Iterator[None]:
    """Plots drawn inside are read from, and written to, `store` (the persistent scoring
    cache), keyed by what they draw, sway's code and matplotlib's version: an unchanged
    adapter's Dagster run draws none (they were ~0.15 s each, a third of such a run)."""
    token = _STORE.set(store)
    try:
        yield
    finally:
        _STORE.reset(token)


@functools.lru_cache(maxsize=256)
def _drawn(draw: Callable[..., bytes], *args: Any, **kwargs: Any) -> bytes:
    """One PNG per distinct plot in a process: a Dagster run draws each probe's plot for the
    probe's metadata, MLflow's preview, the MLflow copy and two HTML pages, and matplotlib's
    rendering was most of an unchanged adapter's run (8.8 s of 11 s, profiled)."""
    store = _STORE.get()
    key = None if store is None else _plot_key(draw, args, kwargs)
    if key is not None:
        assert store is not None
        found = store.get([key]).get(key)
        if found is not None:
            return found
    png = draw(*args, **kwargs)
    if key is not None:
        assert store is not None
        store.put({key: png})
    return png


def _plot_key(draw: Callable[..., bytes], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """A plot by content: the drawing function and its inputs (floats by their exact repr),
    sway's code digest and matplotlib's version."""
    from sway_engine.score_cache import code_digest

    parts = [
        "sway-plot",
        code_digest(),
        metadata.version("matplotlib"),
        draw.__qualname__,
        repr(args),
        repr(sorted(kwargs.items())),
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def layer_plot(result: ProbeResult) -> bytes | None:
    """A per-layer statistic (evidence `per_layer`: [[layer, value], ...]) with the nulls'
    mean ± 2 sd of the probe's raw as a band (the `weights` probes), or None."""
    rows = result.evidence.get("per_layer")
    if not rows:
        return None
    samples = result.null.samples if result.null is not None else ()
    try:
        return _drawn(
            per_layer_chart,
            result.name,
            tuple(int(layer) for layer, _ in rows),
            tuple(float(value) for _, value in rows),
            str(result.evidence.get("per_layer_label", "per layer")),
            null_band(samples, "linear"),
        )
    except ImportError:
        return None


def plot_of(result: ProbeResult) -> bytes | None:
    """The probe's one plot (ablation curve, else per-layer chart, else null histogram), as
    MLflow and Dagster log."""
    return ablation_plot(result) or layer_plot(result) or null_plot(result)


def trend_plot(name: str, rows: Sequence[dict[str, Any]], budget: float | None) -> bytes | None:
    """forgetting_budget's spending over a lineage's evaluations (`ResultStore.lineage` rows,
    oldest first: `nats_per_token` with its interval), the budget as a line; None with fewer
    than one value or without matplotlib."""
    points = [r for r in rows if r.get("nats_per_token") is not None]
    if not points:
        return None
    labels = tuple(f"{r['adapter_id']}\n{str(r['run_id'])[:8]}" for r in points)
    values = tuple(float(r["nats_per_token"]) for r in points)
    lows = tuple(float(r.get("nats_ci_lo") or v) for r, v in zip(points, values, strict=True))
    highs = tuple(float(r.get("nats_ci_hi") or v) for r, v in zip(points, values, strict=True))
    try:
        return _drawn(trend_chart, name, labels, values, lows, highs, budget)
    except ImportError:
        return None


def trend_chart(
    name: str,
    labels: Sequence[str],
    values: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    budget: float | None,
) -> bytes:
    """Nats per token of each evaluation (dots, 95% interval bars), the budget dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(3.6, 0.9 * len(values) + 1.8), 2.6))
    xs = np.arange(len(values))
    below = np.maximum(0.0, np.subtract(values, lows))
    above = np.maximum(0.0, np.subtract(highs, values))
    ax.errorbar(
        xs, values, yerr=[below, above], fmt="o-", color=ADAPTER, capsize=3, label="nats/token"
    )
    if budget is not None:
        ax.axhline(budget, color=NULLS, linestyle="--", label=f"budget {budget:g}")
    ax.set_xticks(xs, labels, fontsize=6)
    ax.set_ylabel("nats / token", fontsize=7)
    ax.set_title(f"{name}: spending over the lineage", fontsize=9)
    _style(ax)
    return _png(fig)


def null_band(samples: Sequence[float], scale: str) -> tuple[float, float] | None:
    """The nulls' mean +- 2 std, on the scale the probe calibrates on (log: a geometric band,
    as positive right-skewed divergences are judged); None for fewer than two samples."""
    xs = [float(x) for x in samples if math.isfinite(x)]
    if len(xs) < 2:
        return None
    if scale == "log" and all(x > 0 for x in xs):
        s = stats.null_stats(np.log(xs).tolist())
        return math.exp(s.mean - 2 * s.std), math.exp(s.mean + 2 * s.std)
    s = stats.null_stats(xs)
    return s.mean - 2 * s.std, s.mean + 2 * s.std


def null_histogram(
    name: str, samples: Sequence[float], raw: float | None, *, log: bool = False
) -> bytes:
    """Histogram of the null raws with the adapter's raw marked as a red line; `log` bins and
    draws on a log axis (all values positive)."""
    plt = _pyplot()
    xs = np.asarray([x for x in samples if math.isfinite(x)], dtype=float)
    everything = np.append(xs, raw) if raw is not None and math.isfinite(raw) else xs
    log = log and bool(everything.size) and bool(np.all(everything > 0))
    bins: Any = max(3, min(12, len(xs)))
    if log and everything.size:
        bins = np.geomspace(everything.min(), everything.max(), 16)
    fig, ax = plt.subplots(figsize=(4.6, 2.6))
    ax.hist(xs, bins=bins, color=NULLS, edgecolor="white", label=f"{len(xs)} nulls")
    if raw is not None and math.isfinite(raw):
        ax.axvline(raw, color=ADAPTER, linewidth=2, label="adapter")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("raw" + (" (log scale)" if log else ""), fontsize=8)
    ax.set_ylabel("nulls", fontsize=8)
    ax.set_title(f"{name}: null distribution and the adapter", fontsize=9)
    _style(ax)
    return _png(fig)


def ablation_curve(
    name: str,
    lambdas: Sequence[float],
    curve: Sequence[float],
    null_d1: Sequence[float] = (),
    band: tuple[float, float] | None = None,
    *,
    log: bool = False,
) -> bytes:
    """The adapter's D(lambda); at lambda = 1 each null's D(1) as a grey dot and their band as
    a bar (the nulls' whole curves are not kept). `log`: a log y axis, where the nulls' small
    divergences stay visible beside the adapter's (D(0) = 0 is left out there)."""
    plt = _pyplot()
    points = [(x, y) for x, y in zip(lambdas, curve, strict=True) if math.isfinite(y)]
    nulls = [float(y) for y in null_d1 if math.isfinite(y)]
    log = log and all(y > 0 for _, y in points[1:]) and all(y > 0 for y in nulls)
    if log:
        points = [(x, y) for x, y in points if y > 0]
    fig, ax = plt.subplots(figsize=(4.6, 2.6))
    ax.plot(*zip(*points, strict=True), marker="o", color="#0969da", label="adapter D(λ)")
    ax.axvline(1.0, color=BAND, linestyle="--", linewidth=1)
    if band is not None:
        lo, hi = band if log else (max(band[0], 0.0), band[1])
        ax.vlines(1.0, lo, hi, color=NULLS, linewidth=7, alpha=0.45, label="nulls' D(1) ±2σ")
    if nulls:
        jitter = np.linspace(-0.025, 0.025, len(nulls))
        ax.scatter(1.0 + jitter, nulls, s=8, color="#57606a", zorder=3, label="null D(1)")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("λ (scale of the adapter's update)", fontsize=8)
    ax.set_ylabel("mean divergence (nats" + (", log)" if log else ")"), fontsize=8)
    ax.set_title(f"{name}: ablation curve", fontsize=9)
    _style(ax)
    return _png(fig)


def per_layer_chart(
    name: str,
    layers: Sequence[int],
    values: Sequence[float],
    label: str,
    band: tuple[float, float] | None = None,
) -> bytes:
    """The adapter's value per layer (line and dots) over the nulls' band (grey)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 2.6))
    if band is not None:
        ax.axhspan(band[0], band[1], color=BAND, alpha=0.7, label="nulls ±2σ (all layers)")
    ax.plot(layers, values, marker="o", color=ADAPTER, label="adapter")
    ax.xaxis.set_major_locator(_pyplot().MaxNLocator(integer=True))
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel(label, fontsize=7)
    ax.set_title(f"{name}: per layer", fontsize=9)
    _style(ax)
    return _png(fig)


def _scale(result: ProbeResult) -> str:
    return str(result.evidence.get("significance", {}).get("scale", "linear"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(ax: Any) -> None:
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _png(fig: Any) -> bytes:
    """The figure cropped to what it draws (legends sit outside the axes). The crop is
    measured from the text and artist extents, not from a full drawing: `bbox_inches="tight"`
    draws the figure twice, and drawing is most of a plot's cost."""
    buf = io.BytesIO()
    crop = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.1)
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches=crop)
    _pyplot().close(fig)
    return buf.getvalue()
