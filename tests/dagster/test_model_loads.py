"""One base-model load per run on every launch path: the job, a UI-style Materialize of one
partition (the implicit asset job), and a Materialize of several partitions at once.

Each path is launched as a user does, through the `dagster` command on a real instance (not
`execute_in_process`, which is in-process whatever the code location says), and the loads are
counted from the run's event log, where every step process records its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from sway_dagster.adapter_store import AdapterStoreResource
from sway_engine.home import Settings
from tests.dagster.conftest import REPO, add_adapter, model_loads

BIN = Path(sys.executable).parent
MODEL_ASSETS = "adapter_manifest,null_calibration,sway/delta_kl_doc,sway/ablation"


@pytest.fixture
def launched(home: Settings, fx, tmp_path: Path):  # type: ignore[no-untyped-def]
    for name in ("doc-strong", "noise", "zero"):
        add_adapter(home, fx.adapters[name])
    dagster_home = home.home / "dagster"
    dagster_home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "SWAY_HOME": str(home.home), "DAGSTER_HOME": str(dagster_home)}
    keys = {
        c.name: str(c.key)
        for c in AdapterStoreResource(root=str(home.adapters_dir), settle_seconds=0).scan()
    }
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.add_dynamic_partitions("adapters", list(keys.values()))

    def launch(*args: str) -> str:
        """Run a `dagster` command on the instance; the id of the run it made."""
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            before = {r.run_id for r in instance.get_runs()}
        done = subprocess.run(
            [str(BIN / "dagster"), *args, "-m", "sway_dagster.definitions"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            (run,) = [r for r in instance.get_runs() if r.run_id not in before]
            assert run.is_success, run.status
            return run.run_id

    def loads(run_id: str) -> int:
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            return model_loads(instance, run_id)

    return keys, launch, loads


@pytest.mark.slow
def test_every_launch_path_loads_the_base_once(launched) -> None:  # type: ignore[no-untyped-def]
    keys, launch, loads = launched
    tags = json.dumps({"dagster/partition": keys["doc-strong"]})
    job = launch("job", "execute", "-j", "evaluate_adapter", "--tags", tags)
    assert loads(job) == 1
    # the UI's Materialize of one partition: the implicit asset job, every model asset
    one = launch(
        "asset",
        "materialize",
        "--select",
        f"{MODEL_ASSETS},sway_score",
        "--partition",
        keys["noise"],
    )
    assert loads(one) == 1
    # several partitions at once (the model assets take a range in one run)
    rng = f"{keys['noise']}...{keys['zero']}"
    many = launch("asset", "materialize", "--select", MODEL_ASSETS, "--partition-range", rng)
    assert loads(many) == 1
