"""`make calibration`: the calibration audit of the fixture battery under each null mode.

For every calibrated probe of the fixture battery (`sway autogen` of the fixture document,
16 nulls), `sway_engine.audit` judges `--draws` null-family adapters (default 200) as if
trained, each against a fresh set of other draws and against the suite's own nulls, and the
trained adapter scaled to 100%, 25% and 5% (power). Once per null mode (matched, spectrum).
Then the leaderboard of the five fixture adapters under the evidence score and upstream's.
Writes bench/results/calibration-<utc>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODES = ("matched", "spectrum")


def run(draws: int, modes: tuple[str, ...], work: Path) -> dict[str, Any]:
    import torch

    from sway_engine.audit import audit
    from sway_engine.backends.hf import HFBackend
    from sway_engine.backends.instrumentation import Instrumented
    from sway_engine.fixtures import build_fixtures
    from sway_engine.fixtures.battery import write_battery
    from sway_engine.suite import load_spec

    torch.set_num_threads(1)
    fx = build_fixtures(log=lambda _m: None)
    out: dict[str, Any] = {"draws": draws, "fixtures": str(fx.root), "modes": {}}
    for mode in modes:
        spec, entries = load_spec(write_battery(fx, work / mode / "sway.yaml"))
        null = spec.defaults.null.model_copy(update={"mode": mode})
        spec = spec.model_copy(update={"defaults": spec.defaults.model_copy(update={"null": null})})
        backend = Instrumented(HFBackend(str(fx.base), fx.adapters["doc-strong"]))
        started = time.perf_counter()
        try:
            rows = audit(spec, entries, backend, draws=draws)
        finally:
            backend.close()
        out["modes"][mode] = {
            "seconds": round(time.perf_counter() - started, 1),
            "probes": [r.to_dict() for r in rows],
        }
        print(markdown_audit(mode, out["modes"][mode], draws), flush=True)
    out["leaderboard"] = leaderboard(fx, work)
    return out


def leaderboard(fx: Any, work: Path) -> list[dict[str, Any]]:
    """The five fixture adapters on the battery: evidence score and upstream's, one base load."""
    from sway_engine import score
    from sway_engine.fixtures.battery import write_battery
    from sway_engine.multi import evaluate_many
    from sway_engine.runner import gate
    from sway_engine.suite import load_spec

    spec, entries = load_spec(write_battery(fx, work / "board" / "sway.yaml"))
    names = list(fx.adapters)
    results = evaluate_many(spec, entries, [fx.adapters[n] for n in names])
    rows = []
    for name, r in zip(names, results, strict=True):
        upstream = score.compute(r.probes, spec.weights(), mode="upstream")
        rows.append(
            {
                "adapter": name,
                "overall": r.score.overall,
                "band": r.score.band,
                "gate": gate(spec, r)[0],
                "upstream_overall": upstream.overall,
                "upstream_band": upstream.band,
                "verdicts": {p.name: p.verdict.value for p in r.probes},
            }
        )
    rows.sort(key=lambda x: (not x["gate"], -x["overall"]))
    return rows


def markdown_audit(mode: str, block: dict[str, Any], draws: int) -> str:
    lines = [
        f"### null mode `{mode}` ({draws} draws, {block['seconds']} s)",
        "",
        "| probe | false claim | false (resampled nulls) | rate [95% CI] | mean abs z | KS | "
        "false vs suite nulls | power 100% / 25% / 5% (p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in block["probes"]:
        lo, hi = r["interval_95"]
        power = " / ".join(
            f"{v['verdict'].upper()} ({v['p']:.2g})" if v["p"] is not None else v["verdict"]
            for v in r["power"].values()
        )
        claim = "FAIL" if r["claim"] == "harm" else "PASS"
        lines.append(
            f"| {r['probe']} ({r['kind']}) | {claim} | {r['false']}/{r['draws']} | "
            f"{r['rate']:.1%} [{lo:.1%}, {hi:.1%}] | {r['mean_abs_z']:.2f} | {r['ks']:.3f} | "
            f"{r['false_vs_suite_nulls']}/{r['draws']} | {power} |"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    parts = [f"# Calibration audit, {result['stamp']}", ""]
    for mode, block in result["modes"].items():
        parts += [markdown_audit(mode, block, result["draws"]), ""]
    parts += [
        "### Leaderboard of the fixture adapters (battery)",
        "",
        "| adapter | gate | overall (evidence) | band | upstream overall | upstream band |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["leaderboard"]:
        parts.append(
            f"| {r['adapter']} | {'pass' if r['gate'] else 'fail'} | {r['overall']:.3f} | "
            f"{r['band']} | {r['upstream_overall']:.3f} | {r['upstream_band']} |"
        )
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S%z")
    work = HERE / ".work" / f"calibration-{stamp}"
    result = {"stamp": stamp, **run(args.draws, tuple(args.modes.split(",")), work)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"calibration-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"calibration-{stamp}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
