"""`make bench-battery`: where the full battery's time goes, one adapter per fresh process.

For each fixture adapter (doc-strong, noise), `sway run` of the fixture battery with a trace,
as a user times it; then, from the trace, per probe and phase (the adapter's own step, its
null calibration): wall, forward passes, rows and tokens forwarded, and for generation the
decode row-steps computed against the tokens rows kept (up to EOS): anything above 1.0x is
rows computed after they ended. Then the persistent scoring cache: cold, warm (the same adapter
again) and a new adapter on an already-scored base. Ratios only, measured in this run (machines
are noisy). Writes bench/results/battery-<utc>.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sway_engine.fixtures import build_fixtures
from sway_engine.fixtures.battery import write_battery
from sway_engine.runner import CALIBRATION_LABEL
from sway_engine.trace import read_events, summarize

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTERS = ("doc-strong", "noise")


def profile(
    spec: Path, adapter: Path, work: Path, cache: Path | None = None, tag: str = ""
) -> dict[str, Any]:
    """`sway run` of `spec` on `adapter` in a fresh process; `cache`: with the persistent
    scoring cache in that folder (else off)."""
    trace, out = work / f"{adapter.name}{tag}.jsonl", work / f"{adapter.name}{tag}.json"
    env = dict(os.environ)
    if cache is not None:
        env.update(SWAY_SCORE_CACHE="on", SWAY_SCORE_CACHE_DIR=str(cache))
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "sway_engine.cli", "run", str(spec), "--adapter", str(adapter)]
    subprocess.run(
        [*cmd, "--trace", str(trace), "-j", str(out)], check=False, capture_output=True, env=env
    )
    process_s = time.perf_counter() - start
    result = json.loads(out.read_text())
    return {
        "process_s": process_s,
        "suite_s": result["wall_s"],
        "stats": result["backend_stats"],
        "summary": summarize(read_events(trace)),
    }


def cache_table(fx: Any, spec: Path, work: Path) -> list[str]:
    """The persistent scoring cache, whole fresh processes: doc-strong cold (empty cache), the
    same adapter again (warm), then doc-weak on the base doc-strong scored (base rows and
    base-only requests stored), against doc-weak with no cache."""
    cache = work / "cache"
    runs = {
        "doc-strong, cache off": profile(spec, fx.adapters["doc-strong"], work, None, "-off"),
        "doc-strong, empty cache": profile(spec, fx.adapters["doc-strong"], work, cache, "-cold"),
        "doc-strong again (unchanged)": profile(
            spec, fx.adapters["doc-strong"], work, cache, "-warm"
        ),
        "doc-weak, cache off": profile(spec, fx.adapters["doc-weak"], work, None, "-off"),
        "doc-weak on the scored base": profile(spec, fx.adapters["doc-weak"], work, cache, "-new"),
    }
    ref = runs["doc-strong, cache off"]["process_s"]
    lines = [
        "### Persistent scoring cache (whole processes)",
        "",
        "| run | process s | vs doc-strong cache off | forward passes | rows | stored results | "
        "stored base rows | gen row-steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        st = run["stats"]
        lines.append(
            f"| {name} | {run['process_s']:.1f} | {run['process_s'] / ref:.2f}x | "
            f"{int(st.get('forward_passes', 0))} | {int(st.get('rows_forwarded', 0))} | "
            f"{int(st.get('stored_hits', 0))} | {int(st.get('stored_rows', 0))} | "
            f"{int(st.get('generate_row_steps', 0))} |"
        )
    return [*lines, ""]


def phases(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Totals of the null calibration (every calibrated probe under the nulls and the adapter,
    in shared batches) and of the probes' own steps after it (preflight included)."""
    out: dict[str, dict[str, float]] = {}
    for row in summary["probes"]:
        phase = "nulls" if row["probe"] == CALIBRATION_LABEL else "adapter"
        slot = out.setdefault(phase, {})
        for key, value in row.items():
            if isinstance(value, int | float):
                slot[key] = slot.get(key, 0) + value
    return out


def table(name: str, run: dict[str, Any]) -> list[str]:
    lines = [
        f"### {name}: whole process {run['process_s']:.1f} s, suite {run['suite_s']:.1f} s "
        f"({run['suite_s'] / run['process_s']:.0%} of the process)",
        "",
        "| probe | wall s | share | passes | rows | tokens | gen row-steps / kept |",
        "|---|---|---|---|---|---|---|",
    ]
    total = run["summary"]["total"]["wall_s"] or 1.0
    for row in sorted(run["summary"]["probes"], key=lambda r: -r["wall_s"]):
        kept = row.get("generated_tokens", 0)
        waste = f"{row['generate_row_steps'] / kept:.2f}x" if kept else "-"
        lines.append(
            f"| {row['probe']} | {row['wall_s']:.2f} | {row['wall_s'] / total:.0%} | "
            f"{row['forward_passes']} | {row['rows_forwarded']} | {row['tokens_forwarded']} | "
            f"{waste} |"
        )
    split = phases(run["summary"])
    nulls, own = split.get("nulls", {}), split.get("adapter", {})
    gen_kept = sum(p.get("generated_tokens", 0) for p in split.values())
    gen_steps = sum(p.get("generate_row_steps", 0) for p in split.values())
    lines += [
        "",
        f"- null calibration (nulls and adapter, shared batches): {nulls.get('wall_s', 0):.2f} s; "
        f"the probes' own steps after it: {own.get('wall_s', 0):.2f} s, "
        f"{own.get('forward_passes', 0):.0f} forward passes",
        f"- generation: {gen_steps} decode row-steps for {gen_kept} kept tokens "
        f"({gen_steps / max(gen_kept, 1):.2f}x)",
        "",
    ]
    return lines


def main() -> None:
    fx = build_fixtures(log=lambda _m: None)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S%z")
    lines = [f"# Full battery profile, {stamp}", "", f"fixture {fx.root.name}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = write_battery(fx, work / "battery.yaml")
        for name in ADAPTERS:
            lines += table(name, profile(spec, fx.adapters[name], work))
        lines += cache_table(fx, spec, work)
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"battery-{stamp}.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
