"""The LoRA factors and base weights the `weights` probes read, checked, one request per view."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context
from sway_engine.requests import AdapterWeights, AdapterWeightsResult, ModuleWeights
from sway_engine.views import Null, View

ZERO = "the adapter's update is zero in every module (||s·B·A||_F = 0): it changes nothing"


def weights_of(ctx: Context, probe: str, treatments: Sequence[View]) -> list[list[ModuleWeights]]:
    """Each treatment's adapted modules (sorted by name), with shapes and finiteness checked."""
    results = ctx.execute([AdapterWeights(v) for v in treatments])
    checked: set[int] = set()
    out = []
    for view, res in zip(treatments, results, strict=True):
        if not isinstance(res, AdapterWeightsResult):
            raise ProbeError(
                probe, f"the backend answered AdapterWeights with {type(res).__name__}"
            )
        if not res.modules:
            raise ProbeError(probe, f"view {view.key} adapts no module")
        for m in res.modules:
            _check(probe, view, m, checked)
        out.append(list(res.modules))
    return out


def _check(probe: str, view: View, m: ModuleWeights, checked: set[int]) -> None:
    out_f, in_f = m.weight.shape
    r = m.a.shape[0]
    if m.a.shape != (r, in_f) or m.b.shape != (out_f, r):
        raise ProbeError(
            probe,
            f"{m.name}: LoRA factors A {m.a.shape}, B {m.b.shape} do not fit the base weight "
            f"{m.weight.shape} (the adapter belongs to another model)",
        )
    if not (np.all(np.isfinite(m.a)) and np.all(np.isfinite(m.b)) and np.isfinite(m.scaling)):
        raise ProbeError(
            probe, f"{m.name}: view {view.key} has non-finite LoRA factors; the adapter is corrupt"
        )
    if id(m.weight) not in checked:  # one base weight serves every view
        if not np.all(np.isfinite(m.weight)):
            raise ProbeError(probe, f"{m.name}: the base weight has non-finite entries")
        checked.add(id(m.weight))


def spectrum_nulls(treatments: Sequence[View]) -> bool:
    """Whether any treatment is a spectrum null (it copies each module's singular values)."""
    return any(isinstance(v, Null) and v.mode == "spectrum" for v in treatments)


def per_layer(rows: Sequence[dict[str, Any]], key: str, how: str = "mean") -> list[list[Any]]:
    """[[layer, mean (or sum) of `key` over the layer's modules], ...] for rows with a layer and
    a value; modules outside numbered blocks are left out."""
    groups: dict[int, list[float]] = {}
    for row in rows:
        value = row.get(key)
        if row.get("layer") is not None and value is not None:
            groups.setdefault(int(row["layer"]), []).append(float(value))
    agg = np.sum if how == "sum" else np.mean
    return [[layer, float(agg(vs))] for layer, vs in sorted(groups.items())]
