"""`python -m bench.backfill`: a Dagster backfill of N fixture adapters with the full battery
against one adapter, each as a backfill runs it (the model assets in one ranged run: one base
load; then sway_score once per partition), each in a fresh process on a fresh instance.

The ratio N-adapter / 1-adapter is the issue's "8 adapters cost at most 3x one" measure, taken
in one run (machines are noisy). The persistent scoring cache is off (bench/__init__.py): every
row is computed; then one adapter is run twice more with it on, the second run being an
unchanged adapter's (the issue's "unchanged adapter re-evaluated" row). Writes
bench/results/backfill-<utc>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.run import extra_adapters, machine
from sway_engine.fixtures import build_fixtures
from sway_engine.fixtures.battery import write_battery

RESULTS = Path(__file__).resolve().parent / "results"

# One backfill, as Dagster's single-run backfill policy launches it: the model assets over the
# whole partition range in one run, then sway_score per partition.
WORKER = """
import json, sys, time
import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG as END, ASSET_PARTITION_RANGE_START_TAG as START,
)
from sway_dagster.definitions import build_definitions
from sway_engine.home import Settings

started = time.perf_counter()
instance = dg.DagsterInstance.from_config(sys.argv[1])
defs = build_definitions(Settings.from_env())
keys = instance.get_dynamic_partitions("adapters")
job = defs.get_implicit_global_asset_job_def()
graph = defs.resolve_asset_graph()
model = [
    k for k in dg.AssetSelection.groups("adapters", "calibration", "probes").resolve(graph)
    if graph.get(k).is_materializable
]
ready = time.perf_counter()
ranged = job.execute_in_process(
    instance=instance, tags={START: keys[0], END: keys[-1]}, asset_selection=model
)
assert ranged.success
models = time.perf_counter()
for key in keys:
    scored = job.execute_in_process(
        instance=instance, partition_key=key, asset_selection=[dg.AssetKey("sway_score")]
    )
    assert scored.success, key
done = time.perf_counter()
print(json.dumps({"setup_s": ready - started, "model_run_s": models - ready,
                  "score_runs_s": done - models, "adapters": len(keys)}))
"""


def backfill(
    fx: Any, adapters: list[Path], work: Path, *, cache: bool = False, home: Path | None = None
) -> dict[str, Any]:
    """One backfill of `adapters` in a fresh process and a fresh sway home and instance;
    `home`: again in that home (same partitions), `cache`: the persistent scoring cache on."""
    if home is None:
        home = _new_home(fx, adapters, work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWAY_", "MLFLOW_"))}
    env |= {
        "SWAY_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "SWAY_SCORE_CACHE": "on" if cache else "off",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(home / "dagster")],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**out, "process_s": wall, "home": home}


def _new_home(fx: Any, adapters: list[Path], work: Path) -> Path:
    """A sway home under `work` with `adapters` registered as partitions."""
    import dagster as dg

    from sway_dagster.adapter_store import AdapterStoreResource

    home = Path(tempfile.mkdtemp(prefix="backfill-", dir=work))
    (home / "adapters").mkdir()
    (home / "dagster").mkdir()
    repo = Path(__file__).resolve().parents[1]
    shutil.copyfile(repo / "dagster.yaml", home / "dagster" / "dagster.yaml")
    write_battery(fx, home / "sway.yaml")
    for path in adapters:
        shutil.copytree(path, home / "adapters" / path.name)
    keys = [
        str(c.key)
        for c in AdapterStoreResource(root=str(home / "adapters"), settle_seconds=0).scan()
        if c.key is not None
    ]
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        instance.add_dynamic_partitions("adapters", keys)
    return home


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--adapters", type=int, default=8)
    args = ap.parse_args(argv)
    fx = build_fixtures(log=lambda _m: None)
    work = Path(tempfile.mkdtemp(prefix="sway-backfill-"))
    many = extra_adapters(fx, args.adapters)
    try:
        one = backfill(fx, many[:1], work)
        all_ = backfill(fx, many, work)
        filled = backfill(fx, many[:1], work, cache=True)
        again = backfill(fx, many[:1], work, cache=True, home=filled["home"])
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the folder this bench made
    ratio = all_["process_s"] / one["process_s"]
    unchanged = again["process_s"] / one["process_s"]
    date = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [
        f"# Backfill of the full battery, {date}",
        "",
        f"machine: {machine()}; persistent scoring cache off; each backfill a fresh process.",
        "",
        "| adapters | process (s) | setup (s) | ranged model run (s) | score runs (s) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['adapters']} | {r['process_s']:.1f} | {r['setup_s']:.1f} "
            f"| {r['model_run_s']:.1f} | {r['score_runs_s']:.1f} |"
            for r in (one, all_)
        ),
        "",
        f"{all_['adapters']} adapters cost {ratio:.2f}x one (the issue's target: at most 3x).",
        "",
        "The same adapter again, unchanged, with the persistent scoring cache on (filled by a "
        "first run in the same home): "
        f"process {again['process_s']:.1f} s, of which the ranged model run "
        f"{again['model_run_s']:.1f} s and the score run {again['score_runs_s']:.1f} s "
        f"({unchanged:.2f}x the cache-off run; the filling run took {filled['process_s']:.1f} s).",
        "",
    ]
    text = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"backfill-{date.replace(':', '')}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
