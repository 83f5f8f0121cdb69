"""The adapter sensor and AdapterStoreResource on real directories and a real Dagster instance."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import save_file

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.partitions import adapters, partition_key, slug, split_key
from sway_dagster.sensors import adapter_sensor, make_adapter_sensor
from sway_engine.adapters import CONFIG, WEIGHTS, read_adapter, weights_sha256
from sway_engine.errors import AdapterError

LORA_CONFIG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj"],
    "base_model_name_or_path": "x",
}
PAST = time.time() - 3600


@dg.asset(partitions_def=adapters, deps=["adapter_files"])
def probe() -> None:
    """Stand-in for the per-adapter evaluation assets."""


DEFS = dg.Definitions(
    assets=[dg.AssetSpec("adapter_files", partitions_def=adapters), probe],
    jobs=[dg.define_asset_job("evaluate_adapter", selection=[probe])],
)


def write_config(path: Path, config: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps(config or LORA_CONFIG), encoding="utf-8")


def write_weights(path: Path, value: float = 1.0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        "q_proj.lora_A.weight": np.full((4, 8), value, dtype=np.float32),
        "q_proj.lora_B.weight": np.full((8, 4), -value, dtype=np.float32),
    }
    save_file(tensors, str(path / WEIGHTS))


def settle(path: Path) -> None:
    for f in path.rglob("*"):
        os.utime(f, (PAST, PAST))


def make_adapter(root: Path, name: str, value: float = 1.0) -> Path:
    path = root / name
    write_config(path)
    write_weights(path, value)
    settle(path)
    return path


@pytest.fixture(scope="module")
def shared_instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def instance(shared_instance: dg.DagsterInstance) -> dg.DagsterInstance:
    """One sqlite instance per module (migrations are slow), emptied before each test."""
    for key in shared_instance.get_dynamic_partitions("adapters"):
        shared_instance.delete_dynamic_partition("adapters", key)
    shared_instance.wipe_assets([dg.AssetKey("adapter_files")])
    return shared_instance


class Ticker:
    """Runs sensor ticks the way the daemon would, carrying the cursor and capturing logs."""

    def __init__(self, instance: dg.DagsterInstance, root: Path, caplog: pytest.LogCaptureFixture):
        self.instance, self.root, self.caplog = instance, root, caplog
        self.cursor: str | None = None

    def context(self) -> dg.SensorEvaluationContext:
        ctx = dg.build_sensor_context(
            instance=self.instance,
            instance_ref=self.instance.get_ref(),
            definitions=DEFS,
            cursor=self.cursor,
            resources={"adapter_store": AdapterStoreResource(root=str(self.root))},
        )
        ctx.log.addHandler(self.caplog.handler)
        return ctx

    def tick(self) -> dg.SensorResult | dg.SkipReason:
        self.caplog.clear()
        ctx = self.context()
        result = adapter_sensor(ctx)
        assert isinstance(result, dg.SensorResult | dg.SkipReason)
        self.cursor = ctx.cursor
        return result

    def new(self) -> dg.SensorResult:
        result = self.tick()
        assert isinstance(result, dg.SensorResult), result
        return result

    def skip(self) -> dg.SkipReason:
        result = self.tick()
        assert isinstance(result, dg.SkipReason), result
        return result

    def apply(self, result: dg.SensorResult) -> None:
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(
                request.partitions_def_name, request.partition_keys
            )
        for event in result.asset_events:
            self.instance.report_runless_asset_event(event)


def runs(result: dg.SensorResult) -> list[dg.RunRequest]:
    return list(result.run_requests or [])


@pytest.fixture
def ticker(instance: dg.DagsterInstance, tmp_path: Path, caplog) -> Ticker:
    return Ticker(instance, tmp_path, caplog)


def test_new_adapter_gives_partition_run_and_observation(ticker: Ticker, tmp_path: Path) -> None:
    path = make_adapter(tmp_path, "My Adapter")
    sha = weights_sha256(path)
    key = f"my-adapter-{sha[:8]}"

    result = ticker.new()

    [add] = result.dynamic_partitions_requests or []
    assert add.partitions_def_name == "adapters" and list(add.partition_keys or []) == [key]
    [run] = runs(result)
    assert run.partition_key == run.run_key == key
    assert run.tags == {"sway/adapter": "My Adapter"}
    [obs] = result.asset_events
    assert isinstance(obs, dg.AssetObservation)
    assert obs.asset_key == dg.AssetKey("adapter_files") and obs.partition == key
    assert obs.metadata["path"].value == str(path)
    assert obs.metadata["sha256"].value == sha
    assert obs.metadata["size_bytes"].value == (path / WEIGHTS).stat().st_size
    assert f"new adapter My Adapter: partition {key}" in ticker.caplog.text


def test_tick_resolves_against_pending_partition_and_records_observation(
    ticker: Ticker, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    make_adapter(tmp_path, "a1")
    data = adapter_sensor.evaluate_tick(ticker.context())

    [run] = data.run_requests or []
    key = str(run.partition_key)
    assert run.tags["dagster/partition"] == key
    assert run.tags["dagster/sensor_name"] == "adapter_sensor"
    assert not instance.has_dynamic_partition("adapters", key)
    assert json.loads(data.cursor or "{}")["a1"][1] == weights_sha256(tmp_path / "a1")
    for event in data.asset_events:
        instance.report_runless_asset_event(event)
    [record] = instance.fetch_observations(dg.AssetKey("adapter_files"), limit=5).records
    assert record.partition_key == key


def test_second_tick_skips_known_partition(ticker: Ticker, tmp_path: Path) -> None:
    make_adapter(tmp_path, "a1")
    ticker.apply(ticker.new())

    assert ticker.skip().skip_message == f"no new adapters in {tmp_path}"
    ticker.cursor = None
    ticker.skip()


def test_retrained_weights_get_a_new_partition(
    ticker: Ticker, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    path = make_adapter(tmp_path, "a1", value=1.0)
    first = ticker.new()
    ticker.apply(first)
    [old] = runs(first)

    write_weights(path, value=2.0)
    settle(path)
    second = ticker.new()

    [run] = runs(second)
    assert run.partition_key == run.run_key == partition_key("a1", weights_sha256(path))
    assert run.partition_key != old.partition_key
    ticker.apply(second)
    assert set(instance.get_dynamic_partitions("adapters")) == {
        old.partition_key,
        run.partition_key,
    }


def test_half_written_adapter_waits_until_settled(ticker: Ticker, tmp_path: Path) -> None:
    path = tmp_path / "a1"
    write_config(path)
    settle(path)
    ticker.skip()
    assert f"waiting for a1: still being written (no {WEIGHTS} yet)" in ticker.caplog.text

    write_weights(path)
    ticker.skip()
    assert f"waiting for a1: still being written ({WEIGHTS} modified" in ticker.caplog.text

    settle(path)
    assert [r.partition_key for r in runs(ticker.new())] == [
        partition_key("a1", weights_sha256(path))
    ]


def test_non_adapter_and_invalid_dirs_are_skipped_and_logged(
    ticker: Ticker, tmp_path: Path
) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    dora = tmp_path / "dora"
    write_config(dora, {**LORA_CONFIG, "use_dora": True})
    write_weights(dora)
    pickled = tmp_path / "pickled"
    write_config(pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\0" * 16)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "stray.txt").write_text("not a directory")
    for p in (tmp_path / "notes", dora, pickled):
        settle(p)

    scan = {c.name: c for c in AdapterStoreResource(root=str(tmp_path)).scan()}
    assert list(scan) == ["dora", "notes", "pickled"]
    assert scan["notes"].status == "not_adapter"
    assert scan["notes"].reason == f"not an adapter (no {CONFIG})"
    assert scan["dora"].status == "invalid" and "DoRA" in scan["dora"].reason
    assert scan["pickled"].status == "invalid" and "safetensors only" in scan["pickled"].reason
    assert all(c.key is None for c in scan.values())

    ticker.skip()
    log = ticker.caplog.text
    assert f"skipping notes: not an adapter (no {CONFIG})" in log
    assert "skipping dora: " in log and "skipping pickled: " in log


def test_missing_root_is_logged_not_raised(
    instance: dg.DagsterInstance, tmp_path: Path, caplog
) -> None:
    root = tmp_path / "nowhere"
    assert AdapterStoreResource(root=str(root)).scan() == []
    Ticker(instance, root, caplog).skip()
    assert f"adapter root {root} does not exist" in caplog.text


def test_slug_collision_is_invalid(tmp_path: Path) -> None:
    make_adapter(tmp_path, "A b")
    make_adapter(tmp_path, "a-b")
    store = AdapterStoreResource(root=str(tmp_path))
    assert {c.status for c in store.scan()} == {"invalid"}
    with pytest.raises(AdapterError, match="all match partition"):
        store.path_for("a-b-0123abcd")


def test_partition_key_slugs_names() -> None:
    sha = "0123456789abcdef" * 4
    assert partition_key("My Adapter,v2!", sha) == "my-adapter-v2-01234567"
    assert partition_key("--llama_3.1 / lora--", sha) == "llama_3-1-lora-01234567"
    assert split_key("my-adapter-v2-01234567") == ("my-adapter-v2", "01234567")
    assert slug("Ünïcode..Name") == "n-code-name"
    with pytest.raises(ValueError):
        partition_key("!!!", sha)
    with pytest.raises(ValueError):
        split_key("no_sha")


def test_path_for_and_verify_round_trip(tmp_path: Path) -> None:
    path = make_adapter(tmp_path, "My Adapter,v2!")
    store = AdapterStoreResource(root=str(tmp_path))
    [candidate] = store.scan()
    key = candidate.key
    assert key == partition_key("My Adapter,v2!", weights_sha256(path))

    assert store.path_for(key) == path
    info = store.verify(key, check_finite=False)
    assert info.sha256 == candidate.sha256 and info.rank == 4

    write_weights(path, value=3.0)
    with pytest.raises(AdapterError, match=f"changed since partition {key} was created"):
        store.verify(key, check_finite=False)
    missing = re.escape(f"no directory in {tmp_path} matches partition gone-01234567")
    with pytest.raises(AdapterError, match=missing):
        store.path_for("gone-01234567")


def test_scan_reuses_known_hash_only_for_unchanged_weights(tmp_path: Path) -> None:
    path = make_adapter(tmp_path, "a1")
    store = AdapterStoreResource(root=str(tmp_path))
    [first] = store.scan()
    assert first.stamp is not None
    fake = "f" * 64
    [cached] = store.scan(known={"a1": (first.stamp, fake)})
    assert cached.sha256 == fake

    write_weights(path, value=5.0)
    settle(path)
    [fresh] = store.scan(known={"a1": (first.stamp, fake)})
    assert fresh.sha256 == weights_sha256(path) != first.sha256


def test_unknown_config_key_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        AdapterStoreResource(root=str(tmp_path), settle_second=1.0)  # type: ignore[call-arg]


def test_sensor_factory_options() -> None:
    sensor = make_adapter_sensor(
        "other_job", minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.STOPPED
    )
    assert sensor.job_name == "other_job"
    assert sensor.minimum_interval_seconds == 5
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.required_resource_keys == {"adapter_store"}
    assert adapter_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert adapter_sensor.job_name == "evaluate_adapter"
    dg.Definitions.validate_loadable(
        dg.Definitions(
            assets=DEFS.assets,
            jobs=DEFS.jobs,
            sensors=[adapter_sensor],
            resources={"adapter_store": AdapterStoreResource(root="/nonexistent")},
        )
    )


BROKEN_CONFIGS = {
    "r-word": json.dumps({**LORA_CONFIG, "r": "sixteen"}).encode(),
    "a-list": b"[]",
    "null": b"null",
    "not-utf8": b'{"r": 4, "name": "\xff\xfe"}',
    "alpha-word": json.dumps({**LORA_CONFIG, "lora_alpha": "eight"}).encode(),
    "fractional-rank": json.dumps({**LORA_CONFIG, "r": 4.7}).encode(),
    "targets-number": json.dumps({**LORA_CONFIG, "target_modules": 7}).encode(),
}


def test_a_malformed_config_is_reported_and_every_other_adapter_still_registers(
    ticker: Ticker, tmp_path: Path
) -> None:
    """Each of these raised out of the tick and stopped the sensor for every adapter."""
    for name, raw in BROKEN_CONFIGS.items():
        path = tmp_path / name
        write_weights(path)
        (path / CONFIG).write_bytes(raw)
        settle(path)
    good = make_adapter(tmp_path, "good")
    result = ticker.new()
    assert [r.partition_key for r in runs(result)] == [f"good-{weights_sha256(good)[:8]}"]
    for name in BROKEN_CONFIGS:
        assert f"skipping {name}:" in ticker.caplog.text, name
    with pytest.raises(AdapterError, match="positive whole number, got 4.7"):
        read_adapter(tmp_path / "fractional-rank")


def test_a_symlink_out_of_the_root_is_never_registered_or_resolved(tmp_path: Path) -> None:
    root, outside = tmp_path / "adapters", tmp_path / "outside"
    root.mkdir()
    secret = make_adapter(outside, "secret_adapter")
    (root / "escape").symlink_to(secret, target_is_directory=True)
    inside = make_adapter(root, "real")
    (root / "alias").symlink_to(inside, target_is_directory=True)
    store = AdapterStoreResource(root=str(root), settle_seconds=0)
    by_name = {c.name: c for c in store.scan()}
    assert by_name["escape"].status == "invalid" and "outside the adapter root" in (
        by_name["escape"].reason
    )
    assert by_name["escape"].key is None and str(secret) not in str(by_name["escape"].key)
    key = f"escape-{weights_sha256(secret)[:8]}"
    with pytest.raises(AdapterError, match="no directory"):
        store.path_for(key)


def test_a_dangling_symlink_inside_an_adapter_does_not_hold_it_back(tmp_path: Path) -> None:
    path = make_adapter(tmp_path, "with-link")
    (path / "notes.txt").symlink_to(tmp_path / "gone.txt")
    (c,) = AdapterStoreResource(root=str(tmp_path), settle_seconds=5).scan()
    assert c.status == "ready", c.reason


def test_a_symlink_to_a_busy_tree_inside_an_adapter_is_not_walked(tmp_path: Path) -> None:
    """A link to a large tree (a dataset, a checkpoint folder) was walked every tick: a file
    being written anywhere in it held the adapter back. Links are not followed now."""
    root = tmp_path / "adapters"
    path = make_adapter(root, "with-data")
    busy = tmp_path / "dataset" / "shard"
    busy.mkdir(parents=True)
    for i in range(200):
        (busy / f"part-{i}.txt").write_text("x")  # fresh mtimes: "being written" if walked
    (path / "data").symlink_to(tmp_path / "dataset", target_is_directory=True)
    (c,) = AdapterStoreResource(root=str(root), settle_seconds=5).scan()
    assert c.status == "ready", c.reason


def test_one_scan_hashes_at_most_its_budget_and_queues_the_rest(tmp_path: Path) -> None:
    """Hashing new weights inside a sensor tick had no bound; a scan now stops hashing new
    adapters past `hash_budget_bytes` (at least one per tick) and the next tick takes them."""
    for name in ("a1", "a2", "a3"):
        make_adapter(tmp_path, name)
    size = (tmp_path / "a1" / WEIGHTS).stat().st_size
    store = AdapterStoreResource(root=str(tmp_path), settle_seconds=0, hash_budget_bytes=size)
    first = store.scan()
    assert [c.status for c in first] == ["ready", "queued", "queued"]
    assert "queued: this tick already hashed" in first[1].reason
    known = {c.name: (str(c.stamp), str(c.sha256)) for c in first if c.status == "ready"}
    second = store.scan(known=known)
    assert [c.status for c in second] == ["ready", "ready", "queued"]  # a1 from the cursor
    tiny = AdapterStoreResource(root=str(tmp_path), settle_seconds=0, hash_budget_bytes=1)
    assert tiny.scan()[0].status == "ready"  # one adapter per tick whatever the budget
