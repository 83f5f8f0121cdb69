"""training_drift: did training itself look healthy, judged from its loss log (no model).

Reads dlm's loss log (`<store>/logs/train-*.jsonl`, records with type "step", step, loss) or
an HF Trainer `trainer_state.json` (log_history), JSON only. Non-finite losses count as
instability events and are forward-filled. Over the curve L_1..L_n:

- smoothness = 1 - var(L - T) / var(L), with T the centred rolling median (the window shrinks
  symmetrically at the ends), clipped to [0, 1]; 0 for a constant curve. Any monotone curve
  scores 1 however densely it was logged (upstream's 1 - var(dL)/var(L) punished sparse logs).
- convergence = final / initial, each the median of `rolling_window` losses at that end.
- spikes: rises dL_i above the window's median dL by more than `spike_sigma` robust sigmas
  (1.4826 * MAD of dL in a centred window without i, or over the whole curve if larger);
  any rise counts where both are 0.
  Upstream's 3 * median|dL| is about 2 sigma: pure minibatch noise tripped it on ~2% of steps.

PASS when every gate holds (score = smoothness); WARN lists the gates missed (score =
smoothness / 2); FAIL (score 0) when training broke: the last loss is non-finite, or the loss
ended higher than it began (convergence > fail_convergence_ratio_gt). raw = smoothness.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from sway_engine.errors import ProbeError, ProbeSkip
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec
from sway_engine.result import NullStats, Verdict
from sway_engine.views import View

LOG_GLOB = "train-*.jsonl"
TRAINER_STATE = "trainer_state.json"
ROBUST_SIGMA = 1.4826  # MAD -> standard deviation for a normal distribution


class TrainingDriftSpec(ProbeSpec):
    kind: Literal["training_drift"] = "training_drift"
    # dlm store directory (logs/ inside), a logs directory, or one .jsonl/.json file;
    # None: the adapter under test (and dlm's store root when it sits in adapter/versions/).
    store_path: str | None = None
    min_steps: int = Field(10, ge=2)
    rolling_window: int = Field(10, ge=2)
    spike_sigma: float = Field(6.0, gt=0)
    assert_smoothness_gte: float = Field(0.7, ge=0, le=1)
    assert_convergence_ratio_lte: float = Field(0.7, gt=0)
    assert_instability_events_lte: int = Field(0, ge=0)
    fail_convergence_ratio_gt: float = Field(1.0, gt=0)
    max_curve_points: int = Field(512, ge=2)


@dataclass(frozen=True)
class LossLog:
    """The merged curve: step -> loss (later files win for a repeated step)."""

    steps: tuple[int, ...]
    losses: tuple[float, ...]
    files: tuple[str, ...]
    skipped_lines: int


@dataclass(frozen=True)
class CurveStats:
    initial: float
    final: float
    convergence: float | None
    smoothness: float
    spikes: tuple[int, ...]  # steps where the loss jumped
    non_finite: tuple[int, ...]  # steps with a non-finite loss
    last_finite: bool


def log_files(target: Path) -> list[Path]:
    """The log files at `target`: a file itself, dlm's logs/ layout, or a trainer_state.json."""
    if target.is_file():
        return [target]
    for logs in (target / "logs", target):
        found = sorted(p for p in logs.glob(LOG_GLOB) if p.is_file())
        if found:
            return found
    state = target / TRAINER_STATE
    return [state] if state.is_file() else []


def default_targets(adapter_path: str | None) -> list[Path]:
    """The adapter dir, then dlm's store root when the adapter is `<store>/adapter/versions/v`."""
    if adapter_path is None:
        return []
    adapter = Path(adapter_path).expanduser()
    targets = [adapter]
    if adapter.parent.name == "versions" and adapter.parent.parent.name == "adapter":
        targets.append(adapter.parent.parent.parent)
    return targets


def read_loss_log(files: Sequence[Path], probe: str) -> LossLog:
    """Merge step losses from JSONL logs (sorted, later wins) or a trainer_state.json."""
    curve: dict[int, float] = {}
    skipped = 0
    for path in files:
        if path.suffix == ".json":
            records = _trainer_state_records(path, probe)
        else:
            records, bad = _jsonl_records(path, probe)
            skipped += bad
        for step, loss in records:
            curve[step] = loss
    steps = tuple(sorted(curve))
    return LossLog(steps, tuple(curve[s] for s in steps), tuple(str(f) for f in files), skipped)


def _jsonl_records(path: Path, probe: str) -> tuple[list[tuple[int, float]], int]:
    """(step, loss) of every step record; a bad first line means this is not a JSONL log."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeError(probe, f"cannot read loss log {path}: {exc}") from exc
    out: list[tuple[int, float]] = []
    bad = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if not out and bad == 0 and number == 1:
                raise ProbeError(
                    probe, f"{path}:1 is not JSON ({exc.msg}); expected a JSONL loss log"
                ) from exc
            bad += 1  # e.g. a line cut short by a crash mid-write
            continue
        if isinstance(record, dict) and record.get("type") == "step":
            parsed = _step_loss(record)
            if parsed is None:
                bad += 1
            else:
                out.append(parsed)
    return out, bad


def _trainer_state_records(path: Path, probe: str) -> list[tuple[int, float]]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbeError(probe, f"cannot read {path} as JSON: {exc}") from exc
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ProbeError(probe, f"{path} has no log_history list (not a trainer_state.json?)")
    return [p for r in history if isinstance(r, dict) and (p := _step_loss(r)) is not None]


def _step_loss(record: dict[str, Any]) -> tuple[int, float] | None:
    step, loss = record.get("step"), record.get("loss")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    if isinstance(loss, bool) or not isinstance(loss, int | float | str):
        return None
    try:
        value = float(loss)  # "NaN" / "Infinity" strings and JSON NaN both become non-finite
    except ValueError:
        return None
    return step, value if math.isfinite(value) else math.inf


def forward_fill(losses: Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Replace non-finite losses by the previous finite one (leading ones by the first)."""
    arr = np.asarray(losses, dtype=float)
    bad = ~np.isfinite(arr)
    if bad.all():
        return arr, tuple(range(len(arr)))
    first = float(arr[np.argmax(~bad)])
    filled = arr.copy()
    last = first
    for i, value in enumerate(arr):
        if np.isfinite(value):
            last = float(value)
        else:
            filled[i] = last
    return filled, tuple(int(i) for i in np.flatnonzero(bad))


def rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """Centred median over up to 2*(window//2)+1 points, shrunk symmetrically at the ends."""
    half = max(1, window // 2)
    n = len(values)
    out = np.empty(n)
    for i in range(n):
        h = min(half, i, n - 1 - i)
        out[i] = np.median(values[i - h : i + h + 1])
    return out


def smoothness(losses: np.ndarray, window: int) -> float:
    """1 - var(L - rolling median) / var(L), in [0, 1]; 0 for a constant curve."""
    total = float(np.var(losses))
    if total <= 0.0:
        return 0.0
    residual = float(np.var(losses - rolling_median(losses, window)))
    return min(1.0, max(0.0, 1.0 - residual / total))


def spike_indices(losses: np.ndarray, window: int, sigma: float) -> tuple[int, ...]:
    """Indices i (of dL_i = L_{i+1} - L_i) where the loss rose beyond the local noise.

    The noise scale is the larger of the window's robust sigma and the whole curve's: a
    dozen neighbours alone often underestimate it by chance (false spikes in pure noise).
    """
    deltas = np.diff(losses)
    overall = _robust_sigma(deltas)
    half = max(1, window // 2)
    out = []
    for i, d in enumerate(deltas):
        if d <= 0:
            continue
        if len(deltas) - 1 < window:
            near = np.delete(deltas, i)
        else:
            lo, hi = max(0, i - half), min(len(deltas), i + half + 1)
            near = np.concatenate([deltas[lo:i], deltas[i + 1 : hi]])
        if near.size == 0:
            continue
        centre = float(np.median(near))
        # a noise-free curve (MAD 0): any rise beyond float round-off is a jump
        scale = max(_robust_sigma(near), overall, 1e-9 * max(1.0, abs(float(losses[i]))))
        if d - centre > sigma * scale:
            out.append(i)
    return tuple(out)


def _robust_sigma(values: np.ndarray) -> float:
    return ROBUST_SIGMA * float(np.median(np.abs(values - np.median(values))))


def curve_stats(log: LossLog, spec: TrainingDriftSpec) -> CurveStats:
    filled, non_finite = forward_fill(log.losses)
    steps = log.steps
    last_finite = math.isfinite(log.losses[-1])
    if len(non_finite) == len(filled):
        return CurveStats(math.inf, math.inf, None, 0.0, (), tuple(steps), False)
    k = min(spec.rolling_window, max(1, len(filled) // 2))
    initial, final = float(np.median(filled[:k])), float(np.median(filled[-k:]))
    convergence = final / initial if initial > 0 else None
    spikes = spike_indices(filled, spec.rolling_window, spec.spike_sigma)
    return CurveStats(
        initial=initial,
        final=final,
        convergence=convergence,
        smoothness=smoothness(filled, spec.rolling_window),
        spikes=tuple(steps[i + 1] for i in spikes),
        non_finite=tuple(steps[i] for i in non_finite),
        last_finite=last_finite,
    )


def downsample(steps: Sequence[int], losses: Sequence[float], limit: int) -> list[list[float]]:
    """At most `limit` [step, loss] points, evenly spaced, first and last kept."""
    n = len(steps)
    idx = range(n) if n <= limit else sorted(set(np.linspace(0, n - 1, limit).round().astype(int)))
    return [[int(steps[i]), float(losses[i])] for i in idx]


class TrainingDrift(Probe):
    kind = "training_drift"
    category = "calibration"
    spec_cls = TrainingDriftSpec
    calibrated = False

    def measure(
        self, spec: TrainingDriftSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        if spec.store_path is not None:
            targets = [Path(spec.store_path).expanduser()]
        else:
            targets = default_targets(ctx.adapter_path)
        if not targets:
            raise ProbeSkip(spec.name, "no adapter path and no store_path: nothing to read")
        files = next((f for t in targets if (f := log_files(t))), [])
        if not files:
            where = " or ".join(str(t) for t in targets)
            raise ProbeSkip(
                spec.name,
                f"no loss log under {where} (looked for logs/{LOG_GLOB} and {TRAINER_STATE}); "
                "set store_path to the training run's directory",
            )
        log = read_loss_log(files, spec.name)
        if len(log.steps) < spec.min_steps:
            raise ProbeSkip(
                spec.name,
                f"{len(log.steps)} logged step(s) in {len(files)} file(s), fewer than "
                f"min_steps={spec.min_steps}: too short a curve to judge",
            )
        s = curve_stats(log, spec)
        evidence = {
            "initial_loss": s.initial,
            "final_loss": s.final,
            "first_loss": log.losses[0],
            "last_loss": log.losses[-1],
            "convergence_ratio": s.convergence,
            "smoothness": s.smoothness,
            "instability_events": len(s.spikes) + len(s.non_finite),
            "spike_steps": list(s.spikes[:20]),
            "non_finite_steps": list(s.non_finite[:20]),
            "last_loss_finite": s.last_finite,
            "num_steps": len(log.steps),
            "num_files": len(log.files),
            "files": list(log.files),
            "skipped_lines": log.skipped_lines,
            "curve": downsample(log.steps, log.losses, spec.max_curve_points),
        }
        return [Measurement(raw=s.smoothness, evidence=evidence) for _ in treatments]

    def judge(self, spec: TrainingDriftSpec, m: Measurement, null: NullStats | None) -> Judgement:
        e = m.evidence
        ratio = e["convergence_ratio"]
        events = int(e["instability_events"])
        shape = (
            f"smoothness {m.raw:.3f}, loss {e['initial_loss']:.4g} -> {e['final_loss']:.4g}"
            + (f" (x{ratio:.3f})" if ratio is not None else "")
            + f", {events} instability event(s) over {e['num_steps']} steps"
        )
        if not e["last_loss_finite"]:
            return Judgement(Verdict.FAIL, f"training ended on a non-finite loss; {shape}", 0.0)
        if ratio is not None and ratio > spec.fail_convergence_ratio_gt:
            return Judgement(
                Verdict.FAIL,
                f"loss ended above where it began (> x{spec.fail_convergence_ratio_gt}); {shape}",
                0.0,
            )
        missed = []
        if m.raw < spec.assert_smoothness_gte:
            missed.append(f"smoothness < {spec.assert_smoothness_gte}")
        if ratio is None:
            missed.append("initial loss <= 0: no convergence ratio")
        elif ratio > spec.assert_convergence_ratio_lte:
            missed.append(f"convergence ratio > {spec.assert_convergence_ratio_lte}")
        if events > spec.assert_instability_events_lte:
            missed.append(f"instability events > {spec.assert_instability_events_lte}")
        if missed:
            return Judgement(Verdict.WARN, f"{'; '.join(missed)}: {shape}", m.raw / 2)
        return Judgement(Verdict.PASS, f"healthy curve: {shape}", m.raw)
