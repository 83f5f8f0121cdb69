"""gradient_ghost: was the adapter trained long enough, judged from its saved Adam state.

Reads `training_state.pt` beside the adapter with `torch.load(weights_only=True)` only: a file
that needs a full (code-executing) unpickle is refused, never loaded. Per optimizer parameter:
numel, mean of exp_avg_sq (Adam's running second moment of the gradient) and |exp_avg|.
Parameters map to transformer layers by name: from the optimizer's own `param_names` when it
saved them (exact), else from the adapter's safetensors keys, assuming the optimizer saw the
parameters layer by layer in model order and checking each layer's tensor sizes against it.

Per layer l, v_l = mean of exp_avg_sq over its elements. A layer is still high-variance when
v_l > undertrained_layer_ratio * min_l v_l; frac = flagged / layers = raw.
FAIL (0) when global_step < min_steps_threshold or any moment is non-finite; FAIL (0.3) when
frac > layer_failure_frac; WARN (0.7) when some layer is flagged or layers cannot be mapped;
PASS (0.9) otherwise.
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sway_engine.adapters import file_sha256
from sway_engine.errors import ProbeError, ProbeSkip
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec
from sway_engine.probes.common.stored import stored_measure
from sway_engine.result import NullStats, Verdict
from sway_engine.views import View

STATE_FILE = "training_state.pt"
WEIGHTS = "adapter_model.safetensors"
# `...layers.3.` (Llama, Mistral), `h.3.` (GPT-2), `layer.3.` (BERT), `blocks.3.`
_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block))\.(\d+)\.")


class GradientGhostSpec(ProbeSpec):
    kind: Literal["gradient_ghost"] = "gradient_ghost"
    # directory holding training_state.pt; None: the adapter under test
    adapter_path: str | None = None
    min_steps_threshold: int = Field(50, ge=1)
    undertrained_layer_ratio: float = Field(2.0, gt=1)
    layer_failure_frac: float = Field(0.3, ge=0, le=1)


@dataclass(frozen=True)
class ParamMoments:
    """One optimizer parameter's Adam moments, summarised."""

    index: int
    numel: int
    mean_sq: float  # mean of exp_avg_sq
    avg_norm: float  # ||exp_avg||_2
    finite: bool


@dataclass(frozen=True)
class TrainingState:
    global_step: int
    epoch: float | None
    params: tuple[ParamMoments, ...]
    names: tuple[str, ...] | None  # per optimizer position, when the optimizer saved them
    extras: dict[str, Any]


@dataclass(frozen=True)
class LayerMap:
    """Optimizer position -> layer label (e.g. `base_model.model.model.layers.3`)."""

    layer_of: dict[int, str]
    source: str  # "param_names" | "safetensors order"
    problem: str | None = None  # why no per-layer analysis


def layer_label(name: str) -> tuple[str, int] | None:
    """(stack path, index) of the transformer block a parameter name lives in."""
    match = _LAYER_RE.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def load_state(path: Path, probe: str) -> dict[str, Any]:
    """torch.load with weights_only=True; refusing anything that needs arbitrary unpickling."""
    try:
        import torch
    except ImportError as exc:
        raise ProbeSkip(probe, f"reading {STATE_FILE} needs torch: pip install 'sway[hf]'") from exc
    import pickle

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path)
        if not unsafe:  # not a torch checkpoint at all, or a damaged one
            raise ProbeError(probe, f"cannot read {path}: not a readable torch file") from exc
        raise ProbeSkip(
            probe,
            f"refusing to load {path}: it holds Python objects ({', '.join(unsafe[:5])}) that "
            "only a full unpickle can rebuild, and unpickling runs arbitrary code. sway reads "
            "it with torch.load(weights_only=True); re-save the state with tensors, numbers, "
            "strings, lists and dicts only (e.g. drop RNG and scaler objects) or disable this "
            "probe",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise ProbeError(probe, f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise ProbeError(probe, f"{path} holds a {type(state).__name__}, expected a dict")
    return state


def _unsafe_globals(path: Path) -> list[str]:
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint

        return list(get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - the names only improve the message
        return []


def parse_state(state: Mapping[str, Any], path: Path, probe: str) -> TrainingState:
    """The fields the probe needs; a missing or mistyped one is an error naming it."""
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step):
        raise ProbeError(probe, f"{path}: global_step missing or not a number ({step!r})")
    opt = state.get("optimizer_state_dict")
    if not isinstance(opt, Mapping) or not isinstance(opt.get("state"), Mapping):
        raise ProbeError(probe, f"{path}: no optimizer_state_dict with a 'state' mapping")
    groups = opt.get("param_groups") or []
    order: list[int] = []
    names: list[str] = []
    for group in groups if isinstance(groups, list) else []:
        if isinstance(group, Mapping):
            order += [int(i) for i in group.get("params", [])]
            names += [str(n) for n in group.get("param_names", [])]
    params = []
    for key, entry in opt["state"].items():
        if isinstance(key, bool) or not isinstance(key, int):
            raise ProbeError(probe, f"{path}: optimizer state key {key!r} is not an integer id")
        moments = _moments(key, entry)
        if moments is not None:
            params.append(moments)
    if not params:
        raise ProbeError(probe, f"{path}: the optimizer state holds no exp_avg_sq tensors")
    epoch = state.get("epoch")
    extras = {  # reported when present as finite numbers (upstream: None when non-finite)
        k: state[k]
        for k in ("best_val_loss", "use_qlora")
        if isinstance(state.get(k), int | float) and math.isfinite(state[k])
    }
    position = {pid: i for i, pid in enumerate(order)}
    ordered = sorted(params, key=lambda p: position.get(p.index, len(order) + p.index))
    name_of = dict(zip(order, names, strict=False)) if len(names) == len(order) else {}
    return TrainingState(
        global_step=int(step),
        epoch=float(epoch) if isinstance(epoch, int | float) else None,
        params=tuple(ordered),
        names=tuple(name_of[p.index] for p in ordered) if name_of else None,
        extras=extras,
    )


def _moments(index: int, entry: Any) -> ParamMoments | None:
    import torch

    if not isinstance(entry, Mapping):
        return None
    sq, avg = entry.get("exp_avg_sq"), entry.get("exp_avg")
    if not isinstance(sq, torch.Tensor) or sq.numel() == 0:
        return None
    sq64 = sq.detach().to(torch.float64)
    mean_sq = float(sq64.mean())
    avg_norm = (
        float(avg.detach().to(torch.float64).norm()) if isinstance(avg, torch.Tensor) else 0.0
    )
    finite = bool(torch.isfinite(sq64).all()) and math.isfinite(avg_norm)
    return ParamMoments(index, int(sq.numel()), mean_sq, avg_norm, finite)


def safetensors_shapes(path: Path, probe: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no tensor data is read)."""
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProbeError(probe, f"cannot read the safetensors header of {path}: {exc}") from exc
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def map_layers(state: TrainingState, shapes: Mapping[str, tuple[int, ...]] | None) -> LayerMap:
    """Assign optimizer positions to layers: by saved names, else by checked model order."""
    if state.names is not None:
        layer_of = {}
        for p, name in zip(state.params, state.names, strict=True):
            if (label := layer_label(name)) is not None:
                layer_of[p.index] = f"{label[0]}.{label[1]}"
        problem = None if layer_of else "no optimizer parameter name carries a layer index"
        return LayerMap(layer_of, "param_names", problem)
    if shapes is None:
        return LayerMap({}, "safetensors order", f"no {WEIGHTS} to take layer names from")
    by_layer: dict[tuple[str, int], list[int]] = defaultdict(list)
    for key, shape in shapes.items():
        if (label := layer_label(key)) is not None:
            by_layer[label].append(math.prod(shape))
    stacks = {stack for stack, _ in by_layer}
    layered = sum(len(v) for v in by_layer.values())
    problem = None
    counts = {len(v) for v in by_layer.values()}
    if not by_layer:
        problem = f"no layer-indexed tensor names in {WEIGHTS}"
    elif len(stacks) > 1:
        problem = f"several layer stacks {sorted(stacks)}: their order in the optimizer is unknown"
    elif len(counts) > 1:
        problem = f"layers hold different tensor counts {sorted(counts)}"
    elif layered != len(state.params):
        problem = (
            f"the optimizer has {len(state.params)} parameters with state but the adapter has "
            f"{layered} layer tensors"
        )
    if problem is not None:
        return LayerMap({}, "safetensors order", problem)
    per = counts.pop()
    layer_of = {}
    for k, label in enumerate(sorted(by_layer, key=lambda lab: lab[1])):
        block = state.params[k * per : (k + 1) * per]
        if sorted(p.numel for p in block) != sorted(by_layer[label]):
            return LayerMap(
                {},
                "safetensors order",
                f"optimizer parameters {k * per}..{(k + 1) * per - 1} do not match the sizes of "
                f"layer {label[0]}.{label[1]}: the optimizer did not see parameters layer by layer",
            )
        layer_of.update({p.index: f"{label[0]}.{label[1]}" for p in block})
    return LayerMap(layer_of, "safetensors order")


def layer_means(state: TrainingState, mapping: LayerMap) -> dict[str, tuple[float, int]]:
    """Layer label -> (element mean of exp_avg_sq, parameter count), in layer order."""
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    params: dict[str, int] = defaultdict(int)
    for p in state.params:
        if (label := mapping.layer_of.get(p.index)) is not None:
            total[label] += p.mean_sq * p.numel
            count[label] += p.numel
            params[label] += 1
    order = sorted(total, key=lambda lab: (lab.rsplit(".", 1)[0], int(lab.rsplit(".", 1)[1])))
    return {lab: (total[lab] / count[lab], params[lab]) for lab in order}


def flagged_layers(means: Mapping[str, float], ratio: float) -> tuple[list[str], float]:
    """Layers whose mean exceeds ratio x the smallest positive layer mean, and that minimum."""
    positive = [v for v in means.values() if v > 0]
    if not positive:
        return [], 0.0
    floor = min(positive)
    return [lab for lab, v in means.items() if v > ratio * floor], floor


class GradientGhost(Probe):
    kind = "gradient_ghost"
    category = "calibration"
    spec_cls = GradientGhostSpec
    calibrated = False

    def measure(
        self, spec: GradientGhostSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        folder = spec.adapter_path or ctx.adapter_path
        if folder is None:
            raise ProbeSkip(spec.name, "no adapter path and no adapter_path field: nothing to read")
        path = Path(folder).expanduser() / STATE_FILE
        if not path.is_file():
            raise ProbeSkip(
                spec.name,
                f"no {STATE_FILE} in {path.parent} (the trainer did not save its optimizer "
                "state there); set adapter_path to the directory that holds it",
            )
        weights = path.parent / WEIGHTS
        files = (file_sha256(path), file_sha256(weights) if weights.is_file() else "-")
        (m,) = stored_measure(
            ctx, spec, [], lambda: [self._measure(spec, path, weights)], inputs=files
        )
        return [m for _ in treatments]

    def _measure(self, spec: GradientGhostSpec, path: Path, weights: Path) -> Measurement:
        state = parse_state(load_state(path, spec.name), path, spec.name)
        shapes = safetensors_shapes(weights, spec.name) if weights.is_file() else None
        mapping = map_layers(state, shapes)
        finite = [p for p in state.params if p.finite]
        means = {lab: m for lab, (m, _) in layer_means(state, mapping).items()}
        flagged, floor = flagged_layers(means, spec.undertrained_layer_ratio)
        frac = len(flagged) / len(means) if means else 0.0
        worst = sorted(means.items(), key=lambda kv: -kv[1])[:3]
        items = tuple(
            {
                "layer": lab,
                "mean_exp_avg_sq": v,
                "ratio_to_min": v / floor if floor > 0 else None,
                "flagged": lab in flagged,
            }
            for lab, v in means.items()
        )
        evidence = {
            "path": str(path),
            "global_step": state.global_step,
            "epoch": state.epoch,
            "num_params": len(state.params),
            "non_finite_params": len(state.params) - len(finite),
            "global_mean_exp_avg_sq": _element_mean(finite),
            "layer_mapping": mapping.source,
            "layer_mapping_problem": mapping.problem,
            "num_layers": len(means),
            "params_per_layer": sorted({n for _, n in layer_means(state, mapping).values()}),
            "min_layer_mean": floor,
            "flagged_layers": flagged,
            "flagged_frac": frac,
            "worst_layers": [
                {"layer": lab, "ratio_to_min": v / floor if floor > 0 else None} for lab, v in worst
            ],
            **state.extras,
        }
        return Measurement(raw=frac, items=items, evidence=evidence)

    def judge(self, spec: GradientGhostSpec, m: Measurement, null: NullStats | None) -> Judgement:
        e = m.evidence
        step, bad = e["global_step"], e["non_finite_params"]
        if step < spec.min_steps_threshold:
            return Judgement(
                Verdict.FAIL,
                f"only {step} optimizer step(s) (< {spec.min_steps_threshold}): undertrained",
                0.0,
            )
        if bad:
            return Judgement(
                Verdict.FAIL,
                f"{bad} of {e['num_params']} parameters have non-finite Adam moments",
                0.0,
            )
        if e["layer_mapping_problem"] is not None:
            return Judgement(
                Verdict.WARN,
                f"{step} steps; no per-layer analysis: {e['layer_mapping_problem']} "
                "(save the optimizer with named parameters to fix the mapping)",
                0.7,
            )
        shape = (
            f"{len(e['flagged_layers'])}/{e['num_layers']} layer(s) with mean exp_avg_sq > "
            f"{spec.undertrained_layer_ratio}x the quietest layer, after {step} steps"
        )
        if m.raw > spec.layer_failure_frac:
            return Judgement(Verdict.FAIL, f"undertrained: {shape}", 0.3)
        if e["flagged_layers"]:
            return Judgement(Verdict.WARN, f"some layers still learning: {shape}", 0.7)
        return Judgement(Verdict.PASS, f"settled: {shape}", 0.9)


def _element_mean(params: Sequence[ParamMoments]) -> float | None:
    n = sum(p.numel for p in params)
    return sum(p.mean_sq * p.numel for p in params) / n if n else None
