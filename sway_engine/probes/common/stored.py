"""Probe measurements kept in the persistent scoring cache by content."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sway_engine.probes.base import Context, Measurement, ProbeSpec
from sway_engine.views import View


def stored_measure(
    ctx: Context,
    spec: ProbeSpec,
    treatments: Sequence[View],
    measure: Callable[[], list[Measurement]],
    inputs: Sequence[str] = (),
) -> list[Measurement]:
    """`measure()` kept in the persistent cache under the probe's spec, the treatments'
    identities and `inputs` (the content hashes of any files it reads): for probes whose
    inputs are never stored themselves, the weights probes (`AdapterWeights` holds the base's
    tensors) and the training-file probes, so an unchanged adapter needs neither the model
    nor torch for them.

    The measurements go through JSON whether stored or computed, so a first run and a
    re-run give identical results. A measurement JSON cannot hold is computed every time."""
    if ctx.remember is None:
        return measure()
    computed: list[list[Measurement]] = []

    def compute() -> bytes:
        computed.append(measure())
        return _measurements_json(computed[0])

    parts = ("measure", spec.kind, spec.model_dump_json(), *inputs)
    try:
        blob = ctx.remember(parts, treatments, compute)
    except _NotJSON:
        return computed[0]
    try:
        return _measurements_of(blob)
    except (ValueError, KeyError, TypeError):
        return measure()  # a stored value of another shape: never trusted


class _NotJSON(TypeError):
    """A measurement holds a value JSON cannot hold faithfully."""


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise _NotJSON(f"{type(value).__name__} is not stored")


def _measurements_json(measured: list[Measurement]) -> bytes:
    rows = [
        {
            "raw": m.raw,
            "values": list(m.values),
            "items": list(m.items),
            "evidence": m.evidence,
            "trials": m.trials,
            "weights": list(m.weights),
        }
        for m in measured
    ]
    return json.dumps(rows, default=_plain, allow_nan=True).encode()


def _measurements_of(blob: bytes) -> list[Measurement]:
    return [
        Measurement(
            raw=row["raw"],
            values=tuple(row["values"]),
            items=tuple(row["items"]),
            evidence=row["evidence"],
            trials=row["trials"],
            weights=tuple(row["weights"]),
        )
        for row in json.loads(blob)
    ]
