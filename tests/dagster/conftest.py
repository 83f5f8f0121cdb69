"""A temporary sway home per test: adapters folder, suite, DuckDB and MLflow (template copy)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient

from sway_engine.adapters import read_adapter
from sway_engine.home import Settings

T = TypeVar("T")


@pytest.fixture
def home(tmp_path: Path, fx, template_db: Path) -> Settings:  # type: ignore[no-untyped-def]
    root = tmp_path / "home"
    (root / "adapters").mkdir(parents=True)
    shutil.copyfile(fx.suite, root / "sway.yaml")
    shutil.copyfile(template_db, root / "mlflow.db")
    return Settings.from_env({"SWAY_HOME": str(root)})


def add_adapter(settings: Settings, src: Path, name: str | None = None) -> Path:
    dst = settings.adapters_dir / (name or src.name)
    shutil.copytree(src, dst)
    old = 1_000_000_000
    for path in [dst, *dst.iterdir()]:
        import os

        os.utime(path, (old, old))
    return dst


@pytest.fixture
def instance():  # type: ignore[no-untyped-def]
    with dg.instance_for_test() as inst:
        yield inst


# --- `dagster dev` for the slow end-to-end tests (test_e2e.py, test_browser.py) --------------
#
# One server per test session: starting `dagster dev` and evaluating an adapter through it costs
# ~40 s on two cores, so both slow files share it. The sway home starts with an empty adapters
# folder; `doc_strong_run` adds the partition through GraphQL, then copies the adapter in, so the
# adapter sensor always finds the partition already known and never launches a second run.

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    """Call `probe` until it returns something other than None; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _default_signals() -> None:
    """Child side of Popen: a background-launched parent may have left SIGINT/SIGTERM ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _live_members(pgid: int) -> list[int]:
    """Pids of the process group that are not zombies (PID 1 here may never reap them)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: a signal-0 probe is the best we have
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


@dataclass
class Server:
    """A server subprocess in its own session (process group), logging to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @classmethod
    def start(
        cls, name: str, cmd: list[str], *, url: str, cwd: Path, env: dict[str, str], log: Path
    ) -> Server:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_default_signals,
            )
        return cls(name, proc, url, log)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, path: str, timeout: float) -> None:
        """Wait until GET `path` answers 200; fail early if the process died."""

        def probe() -> bool | None:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                    return True if resp.status == 200 else None
            except OSError:
                return None

        wait_until(f"{self.name} at {self.url}{path}", probe, timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the whole process group and wait; SIGKILL and fail if anything outlives it."""
        pgid = self.proc.pid
        if self.proc.poll() is None:
            os.killpg(pgid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
            wait_until(
                f"{self.name}'s children to exit",
                lambda: _live_members(pgid) == [] or None,
                timeout=10,
            )
        except (subprocess.TimeoutExpired, AssertionError):
            left = _live_members(pgid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(
                f"{self.name} did not stop on SIGTERM within {timeout:.0f}s (killed {left})"
            ) from None
        return code


@dataclass
class DagsterDev:
    """A running `dagster dev` for one sway home, and its GraphQL endpoint."""

    settings: Settings
    server: Server
    port: int
    mlflow_port: int  # where SWAY_MLFLOW_UI points (MLflow links in asset metadata)

    @property
    def client(self) -> DagsterGraphQLClient:
        return DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=60)

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        """POST one query to /graphql and return its `data` (fail on GraphQL errors)."""
        body = json.dumps({"query": query, "variables": variables}).encode()
        req = urllib.request.Request(
            f"{self.server.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.load(resp)
        assert not answer.get("errors"), answer["errors"]
        return answer["data"]


REPOSITORIES = """{ repositoriesOrError { __typename
  ... on RepositoryConnection { nodes { name location { name } jobs { name }
      sensors { name sensorState { status } } } }
  ... on PythonError { message } } }"""

ADD_PARTITION = """mutation Add($selector: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name,
                      partitionKey: $key) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionKey }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on DuplicateDynamicPartitionError { partitionName }
  } }"""


def repositories(server: DagsterDev) -> list[dict[str, Any]]:
    """The repositories the webserver has loaded ([] while the workspace is still loading)."""
    answer = server.graphql(REPOSITORIES)["repositoriesOrError"]
    return answer["nodes"] if answer["__typename"] == "RepositoryConnection" else []


@pytest.fixture(scope="session")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory, fx, template_db: Path):  # type: ignore[no-untyped-def]
    """`dagster dev -w workspace.yaml` on a fresh sway home (suite, MLflow db, empty adapters)."""
    root = tmp_path_factory.mktemp("e2e") / "home"
    (root / "adapters").mkdir(parents=True)
    (root / "dagster").mkdir()
    shutil.copyfile(REPO / "dagster.yaml", root / "dagster" / "dagster.yaml")
    shutil.copyfile(fx.suite, root / "sway.yaml")
    shutil.copyfile(template_db, root / "mlflow.db")
    port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWAY_", "MLFLOW_"))}
    env |= {
        "SWAY_HOME": str(root),
        "DAGSTER_HOME": str(root / "dagster"),
        "SWAY_MLFLOW_UI": f"http://127.0.0.1:{mlflow_port}",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    server = Server.start(
        "dagster dev",
        cmd,
        url=f"http://127.0.0.1:{port}",
        cwd=REPO,
        env=env,
        log=root / "dagster-dev.log",
    )
    dev = DagsterDev(Settings.from_env({"SWAY_HOME": str(root)}), server, port, mlflow_port)
    try:
        server.wait_http("/server_info", timeout=120)
        wait_until("the sway code location", lambda: repositories(dev) or None, timeout=60)
        yield dev
    finally:
        server.stop()


@dataclass(frozen=True)
class Evaluation:
    """One evaluate_adapter run launched through GraphQL."""

    key: str
    run_id: str
    status: str
    seconds: float


@pytest.fixture(scope="session")
def doc_strong_run(dagster_dev: DagsterDev, fx) -> Evaluation:  # type: ignore[no-untyped-def]
    """Add doc-strong's partition through GraphQL, then launch evaluate_adapter and wait for it."""
    key = f"doc-strong-{read_adapter(fx.adapters['doc-strong']).sha8}"
    selector = {"repositoryLocationName": "sway", "repositoryName": "__repository__"}
    added = dagster_dev.graphql(ADD_PARTITION, selector=selector, name="adapters", key=key)
    assert added["addDynamicPartition"] == {
        "__typename": "AddDynamicPartitionSuccess",
        "partitionKey": key,
    }, added
    add_adapter(dagster_dev.settings, fx.adapters["doc-strong"])  # after the partition exists

    client = dagster_dev.client
    start = time.monotonic()
    run_id = client.submit_job_execution(
        "evaluate_adapter",
        repository_location_name="sway",
        repository_name="__repository__",
        tags={"dagster/partition": key},
    )

    def finished() -> str | None:
        status = client.get_run_status(run_id).value
        return status if status in TERMINAL else None

    status = wait_until(f"run {run_id}", finished, timeout=240, every=1)
    assert status == "SUCCESS", f"run {run_id} ended {status}:\n{dagster_dev.server.tail(80)}"
    return Evaluation(key, run_id, status, time.monotonic() - start)


def model_loads(instance: dg.DagsterInstance, run_id: str) -> int:
    """Base-model loads a run recorded in its event log, from whichever processes ran it."""
    from sway_dagster.resources import LOAD_MESSAGE

    return sum(LOAD_MESSAGE in (e.user_message or "") for e in instance.all_logs(run_id))


def gate_of(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    """The run's gate check (sway_score also records each probe's verdict check)."""
    (gate,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "gate"]
    return gate


def verdict_checks(
    defs: dg.Definitions, instance: dg.DagsterInstance, key: str
) -> dict[dg.AssetKey, Any]:
    """The latest execution record of every verdict check in partition `key`, by asset."""
    from dagster._core.event_api import PartitionKeyFilter

    from sway_dagster.assets import VERDICT

    checks = [c for c in defs.resolve_asset_graph().asset_check_keys if c.name == VERDICT]
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        checks, partition_filter=PartitionKeyFilter(key=key)
    )
    return {check.asset_key: record for check, record in latest.items()}


def asset_of(row: dict[str, Any]) -> dg.AssetKey:
    """The asset of a stored probe row: its probe's, or null_calibration for the null entry."""
    from sway_dagster.assets import asset_name

    if row["kind"] == "null_adapter":
        return dg.AssetKey("null_calibration")
    return dg.AssetKey(["sway", asset_name(row["probe"])])


# --- run workers: a Dagster run in its own process on an instance shared through sqlite -------

WORKER = """
import sys
import dagster as dg
from sway_dagster.definitions import JOB_NAME, build_definitions
from sway_engine.home import Settings

instance = dg.DagsterInstance.from_config(sys.argv[1])
job = build_definitions(Settings.from_env()).resolve_job_def(JOB_NAME)
for key in sys.argv[2:]:
    assert job.execute_in_process(partition_key=key, instance=instance).success, key
"""


def run_worker(
    home: Settings, dagster_home: Path, keys: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process that evaluates `keys` one after another, as a run worker does (with
    `env` added to a clean environment)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SWAY_", "MLFLOW_"))}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(dagster_home), *keys],
        env=clean | {"SWAY_HOME": str(home.home)} | (env or {}),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
