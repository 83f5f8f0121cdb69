"""Kind -> probe class, and validation of one suite entry with YAML-path errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from sway_engine.probes.adapter_ablation import AdapterAblation
from sway_engine.probes.adapter_revert import AdapterRevert
from sway_engine.probes.base import Probe, ProbeSpec
from sway_engine.probes.calibration_drift import CalibrationDrift
from sway_engine.probes.cluster_kl import ClusterKL
from sway_engine.probes.delta_kl import DeltaKL
from sway_engine.probes.external_perplexity import ExternalPerplexity
from sway_engine.probes.forgetting_budget import ForgettingBudget
from sway_engine.probes.gradient_ghost import GradientGhost
from sway_engine.probes.intruder_dimensions import IntruderDimensions
from sway_engine.probes.leakage import Leakage
from sway_engine.probes.multi_turn import MultiTurn
from sway_engine.probes.null_adapter import NullAdapter
from sway_engine.probes.paraphrase_invariance import ParaphraseInvariance
from sway_engine.probes.preference_flip import PreferenceFlip
from sway_engine.probes.prompt_collapse import PromptCollapse
from sway_engine.probes.section_internalization import SectionInternalization
from sway_engine.probes.style_fingerprint import StyleFingerprint
from sway_engine.probes.tool_use_fidelity import ToolUseFidelity
from sway_engine.probes.training_drift import TrainingDrift
from sway_engine.probes.weight_spectrum import WeightSpectrum
from sway_engine.spec import problems_of

PROBES: dict[str, type[Probe]] = {
    p.kind: p
    for p in (
        NullAdapter,
        DeltaKL,
        AdapterAblation,
        SectionInternalization,
        CalibrationDrift,
        ExternalPerplexity,
        ForgettingBudget,
        ParaphraseInvariance,
        PreferenceFlip,
        ToolUseFidelity,
        StyleFingerprint,
        Leakage,
        TrainingDrift,
        GradientGhost,
        ClusterKL,
        AdapterRevert,
        PromptCollapse,
        MultiTurn,
        WeightSpectrum,
        IntruderDimensions,
    )
}


@dataclass(frozen=True)
class Entry:
    """One validated suite entry: its probe, its spec, its category."""

    probe: Probe
    spec: ProbeSpec
    category: str


def validate_entry(raw: Any, path: str) -> tuple[Entry | None, list[tuple[str, str]]]:
    if not isinstance(raw, dict):
        return None, [(path, "each suite entry must be a mapping with name and kind")]
    kind = raw.get("kind")
    if not isinstance(kind, str):
        return None, [(f"{path}.kind", "missing: every entry needs a kind")]
    if kind not in PROBES:
        known = sorted(PROBES)
        return None, [(f"{path}.kind", f"unknown probe kind {kind!r}; known kinds: {known}")]
    spec_cls: type[ProbeSpec] = PROBES[kind].spec_cls
    try:
        spec = spec_cls.model_validate(raw)
    except ValidationError as exc:
        return None, problems_of(exc, path)
    return Entry(PROBES[kind](), spec, PROBES[kind].category), []
