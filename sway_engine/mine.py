"""Mine a suite for the prompts that say the most: where the adapter's effect is largest,
smallest, or least stable across null adapters, written back as suite entries.

Every prompt the suite already names (probe `prompts`, cases' prompts and paraphrases), or
the document's questions when it names none, is scored once: JS(base, adapter) and JS(base,
null) for the suite's null views, over one base load. Per prompt:

- effect: JS of the adapter; z = (effect - mean of the nulls) / their std (ddof 1);
- instability: the nulls' coefficient of variation (std / mean): where random adapters of
  this size disagree most, a prompt calibrates poorly.

`largest` (highest z: the adapter's clearest marks, for a delta_kl entry that should PASS),
`smallest` (lowest z: where training left the model as it was; more data there, or a probe
that checks it did not need to move) and `unstable` (highest instability) become delta_kl
entries, each with its own null_adapter calibration, in a YAML file that can be merged into
the suite.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from sway_engine.backends.build import build_backend
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.calibration import NullPlan, plan_for
from sway_engine.errors import SwayError
from sway_engine.probes.base import Context
from sway_engine.probes.common.divergence import divergences
from sway_engine.probes.common.document_inputs import document_prompts
from sway_engine.probes.null_adapter import NullAdapterSpec
from sway_engine.probes.registry import Entry
from sway_engine.runner import context_for, preflight
from sway_engine.spec import SuiteSpec
from sway_engine.suite import document_of, null_entry
from sway_engine.views import BASE, FINETUNED

GROUPS = ("largest", "smallest", "unstable")
MIN_NULLS = 4


def suite_prompts(spec: SuiteSpec, entries: Iterable[Entry]) -> list[str]:
    """Every prompt the suite names, in order, once: `prompts` of each entry, and the prompt
    and paraphrases of each case; the document's questions when the suite names none."""
    found: list[str] = []
    for entry in entries:
        found += [p for p in getattr(entry.spec, "prompts", None) or () if isinstance(p, str)]
        for case in getattr(entry.spec, "cases", None) or ():
            prompt = getattr(case, "prompt", None)
            found += [prompt] if isinstance(prompt, str) else []
            found += [q for q in getattr(case, "paraphrases", None) or () if isinstance(q, str)]
    if not found and (doc := document_of(spec)) is not None:
        found = document_prompts(doc)
    return [p for p in dict.fromkeys(found) if p.strip()]


def plan_of(spec: SuiteSpec, entries: list[Entry]) -> NullPlan:
    entry = null_entry(entries)
    null_spec = (
        entry.spec if entry is not None else NullAdapterSpec(name="nulls", kind="null_adapter")
    )
    assert isinstance(null_spec, NullAdapterSpec)
    return plan_for(null_spec, spec.defaults.null)


def score_prompts(ctx: Context, prompts: list[str], plan: NullPlan) -> list[dict[str, Any]]:
    """One row per prompt: effect, the nulls' mean and std, z and instability."""
    nulls = plan.views()
    if len(nulls) < MIN_NULLS:
        raise SwayError(
            f"mining needs at least {MIN_NULLS} null views to say what is unusual; the suite's "
            f"null plan has {len(nulls)} (raise runs on its null_adapter entry)"
        )
    d = divergences(ctx, prompts, BASE, [FINETUNED, *nulls])
    rows = []
    for i, prompt in enumerate(prompts):
        effect, null = float(d[0, i]), d[1:, i]
        mean, std = float(null.mean()), float(null.std(ddof=1))
        rows.append(
            {
                "prompt": prompt,
                "effect": effect,
                "null_mean": mean,
                "null_std": std,
                "z": (effect - mean) / std if std > 0 else 0.0,
                "instability": std / mean if mean > 0 else 0.0,
            }
        )
    return rows


def pick(rows: list[dict[str, Any]], top: int) -> dict[str, list[dict[str, Any]]]:
    """The `top` prompts of each group (ties broken by prompt text, so the file is stable)."""
    by_z = sorted(rows, key=lambda r: (-r["z"], r["prompt"]))
    return {
        "largest": by_z[:top],
        "smallest": sorted(rows, key=lambda r: (r["z"], r["prompt"]))[:top],
        "unstable": sorted(rows, key=lambda r: (-r["instability"], r["prompt"]))[:top],
    }


def mine(
    spec: SuiteSpec, entries: list[Entry], *, adapter: str | None = None
) -> list[dict[str, Any]]:
    """Score every prompt of the suite (one base load); rows in the suite's prompt order."""
    prompts = suite_prompts(spec, entries)
    if len(prompts) < 2:
        raise SwayError(
            f"the suite names {len(prompts)} prompt(s) and no document questions: nothing to mine"
        )
    model = spec.models.ft
    if adapter is not None:
        model = model.model_copy(update={"adapter": adapter})
    backend = Instrumented(build_backend(model))
    try:
        preflight(backend)
        return score_prompts(context_for(spec, backend), prompts, plan_of(spec, entries))
    finally:
        backend.close()


def mined_yaml(groups: dict[str, list[dict[str, Any]]], runs: int) -> str:
    """Suite entries for the picked prompts: one null_adapter and one delta_kl per group."""
    suite: list[dict[str, Any]] = [{"name": "mined_nulls", "kind": "null_adapter", "runs": runs}]
    for group in GROUPS:
        if groups[group]:
            suite.append(
                {
                    "name": f"mined_{group}",
                    "kind": "delta_kl",
                    "prompts": [r["prompt"] for r in groups[group]],
                }
            )
    head = (
        "# sway mine: prompts of this suite where the adapter's effect is largest, smallest,\n"
        "# or least stable across null adapters. Merge the entries you want into the suite.\n"
    )
    body = yaml.dump(
        {"suite": suite}, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
    )
    return head + body


class _Dumper(yaml.SafeDumper):
    """Prompts with line breaks as one double-quoted line ("Q: ...\\nA:"), as suites write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def check_output(path: Path, *, force: bool) -> None:
    """Refuse, before any model loads, an output that exists (without force) or has no folder."""
    if path.exists() and not force:
        raise SwayError(f"{path} exists; choose another --output or pass --force")
    if not path.parent.is_dir():
        raise SwayError(f"{path}: its folder {path.parent} does not exist; create it")
