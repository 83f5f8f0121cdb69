"""The persistent scoring cache (score_cache.py): an unchanged adapter re-evaluated forwards
nothing and gets the same numbers, a new adapter of a scored base forwards no base row, a changed
prompt recomputes only its own requests, a changed adapter misses, and a corrupted, foreign or
full cache is never trusted and never loses the run. Every run here goes through `evaluate`,
the CLI's path, on the tiny fixture model."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sway_engine import score_cache, torch_env
from sway_engine.backends.hf import HFBackend
from sway_engine.fixtures import FixturePaths
from sway_engine.fixtures.battery import write_battery
from sway_engine.probes.base import Context, Measurement, ProbeSpec
from sway_engine.probes.common.stored import stored_measure
from sway_engine.requests import (
    ContinuationResult,
    DivergenceResult,
    GenerationResult,
    RollingResult,
    TokenDist,
)
from sway_engine.result import SuiteResult
from sway_engine.runner import CALIBRATION_LABEL, evaluate
from sway_engine.safe_yaml import load as load_yaml
from sway_engine.suite import load_spec
from sway_engine.views import Finetuned

# A small suite with each operation the battery sends: null calibration, divergences
# (delta_kl), rolling log-probs (external_perplexity), generation (style_fingerprint) and
# scaled views (adapter_ablation).
KEEP = ("null_baseline", "delta_kl_doc", "style_shift", "external_ppl", "ablation")


@pytest.fixture(scope="module")
def suite_file(fx: FixturePaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cached")
    battery = load_yaml(write_battery(fx, folder / "battery.yaml").read_text())
    battery["suite"] = [e for e in battery["suite"] if e["name"] in KEEP]
    for entry in battery["suite"]:
        if entry["kind"] == "null_adapter":
            entry["runs"] = 4
    assert [e["name"] for e in battery["suite"]] == list(KEEP)
    path = folder / "sway.yaml"
    path.write_text(json.dumps(battery))
    return path


@pytest.fixture
def cache_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAY_SCORE_CACHE", "on")


def run(spec_file: Path, cache: Path | None, adapter: Path | None = None, **kw: Any) -> SuiteResult:
    spec, entries = load_spec(spec_file)
    return evaluate(
        spec,
        entries,
        adapter=None if adapter is None else str(adapter),
        cache_dir=cache,
        **kw,
    )


def numbers(result: SuiteResult) -> dict[str, Any]:
    """Every measured value of a result (timings and counters left out)."""
    out = {}
    for p in result.probes:
        out[p.name] = {
            "verdict": p.verdict.value,
            "raw": p.raw,
            "z": p.z,
            "p": p.p,
            "evidence": json.dumps(p.evidence, sort_keys=True, default=str),
        }
    out["score"] = {"overall": result.score.overall, "band": result.score.band}
    return out


def assert_same_numbers(a: SuiteResult, b: SuiteResult, tol: float = 0.0) -> None:
    na, nb = numbers(a), numbers(b)
    assert na.keys() == nb.keys()
    for name in na:
        for field, va in na[name].items():
            vb = nb[name][field]
            if isinstance(va, float) and isinstance(vb, float) and tol:
                assert abs(va - vb) <= tol * max(1.0, abs(va)), (name, field, va, vb)
            elif tol and field == "evidence":
                continue  # compared through raw, z and p within tol
            else:
                assert va == vb, (name, field, va, vb)


def test_an_unchanged_adapter_re_evaluated_forwards_nothing(
    suite_file: Path, tmp_path: Path, cache_on: None
) -> None:
    first = run(suite_file, tmp_path)
    assert first.backend_stats["forward_passes"] > 0 and first.backend_stats["stored_hits"] == 0
    again = run(suite_file, tmp_path)
    stats = again.backend_stats
    assert stats["forward_passes"] == 0, stats
    assert stats["generate_row_steps"] == 0, stats
    assert stats["views_registered"] == 0, stats  # no null adapter was even built
    assert stats["stored_hits"] >= 100, stats
    assert_same_numbers(first, again)  # bit for bit: every number, every evidence field


def test_cached_numbers_equal_a_run_without_the_cache(
    suite_file: Path, tmp_path: Path, cache_on: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(suite_file, tmp_path)
    cached = run(suite_file, tmp_path)
    monkeypatch.setenv("SWAY_SCORE_CACHE", "off")
    plain = run(suite_file, tmp_path / "unused")
    assert not (tmp_path / "unused").exists()  # off means no file at all
    assert plain.backend_stats["forward_passes"] > 0
    assert_same_numbers(plain, cached)


def test_a_new_adapter_of_a_scored_base_forwards_no_base_row(
    suite_file: Path,
    tmp_path: Path,
    cache_on: None,
    fx: FixturePaths,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run(suite_file, tmp_path)  # doc-strong: the base rows are stored
    forwarded: list[str] = []
    real = HFBackend._forward

    def spy(self: HFBackend, batch: list[Any], last: bool) -> Any:
        forwarded.extend(r.adapter for r in batch)
        return real(self, batch, last)

    monkeypatch.setattr(HFBackend, "_forward", spy)
    weak = run(suite_file, tmp_path, fx.adapters["doc-weak"])
    assert forwarded, "doc-weak's own rows are new and must be forwarded"
    assert HFBackend.BASE_ROW not in forwarded
    assert weak.backend_stats["stored_rows"] + weak.backend_stats["stored_hits"] > 0
    monkeypatch.setenv("SWAY_SCORE_CACHE", "off")
    plain = run(suite_file, tmp_path, fx.adapters["doc-weak"])
    # base rows were computed in other batches: equal within the batch-invariance bound
    # (`sway doctor check`: 4.8e-6 measured against 1e-4)
    assert_same_numbers(plain, weak, tol=1e-4)


def test_a_changed_prompt_recomputes_only_its_own_probe(
    suite_file: Path, tmp_path: Path, cache_on: None
) -> None:
    run(suite_file, tmp_path)
    data = json.loads(suite_file.read_text())
    delta = next(e for e in data["suite"] if e["name"] == "delta_kl_doc")
    delta["prompts"][0] = "Q: Which keeper last tended the Orrindale Light?\nA:"
    changed = tmp_path / "changed.yaml"
    changed.write_text(json.dumps(data))
    trace = tmp_path / "trace.jsonl"
    run(changed, tmp_path, trace_path=trace)
    computed: dict[str, int] = {}
    for line in trace.read_text().splitlines():
        event = json.loads(line)
        fresh = event["computed"] - event["stored"]
        computed[event["probe"]] = computed.get(event["probe"], 0) + fresh
    recomputed = {probe for probe, n in computed.items() if n}
    # the changed prompt under the adapter and each of the null views, in the calibration
    # (which measures the adapter beside its nulls); the embedding of style's texts is
    # recomputed each run (never stored)
    assert recomputed <= {CALIBRATION_LABEL, "style_shift"}, computed
    assert 1 <= computed[CALIBRATION_LABEL] <= 5  # one prompt: 4 nulls and the adapter


def test_an_adapter_rewritten_in_place_is_not_served_stale_results(
    suite_file: Path, tmp_path: Path, cache_on: None, fx: FixturePaths
) -> None:
    """The key is the adapter's content, not its path: new weights at the same path miss."""
    adapter = tmp_path / "adapter"
    shutil.copytree(fx.adapters["doc-strong"], adapter)
    strong = run(suite_file, tmp_path, adapter)
    shutil.copy(fx.adapters["doc-weak"] / "adapter_model.safetensors", adapter)
    shutil.copy(fx.adapters["doc-weak"] / "adapter_config.json", adapter)
    rewritten = run(suite_file, tmp_path, adapter)
    assert rewritten.backend_stats["forward_passes"] > 0
    assert numbers(rewritten)["delta_kl_doc"]["raw"] != numbers(strong)["delta_kl_doc"]["raw"]
    weak = run(suite_file, tmp_path, fx.adapters["doc-weak"])  # same content, other path
    assert weak.backend_stats["forward_passes"] == 0
    assert_same_numbers(weak, rewritten)


def test_a_corrupted_cache_file_is_ignored_and_left_alone(
    suite_file: Path, tmp_path: Path, cache_on: None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / score_cache.FILE_NAME
    junk = b"not a database\n" * 100
    path.write_bytes(junk)
    with caplog.at_level(logging.WARNING):
        result = run(suite_file, tmp_path)
    assert result.backend_stats["forward_passes"] > 0  # computed, not trusted
    assert all(p.verdict.value != "ERROR" for p in result.probes)
    assert path.read_bytes() == junk  # never rewritten
    assert "score cache" in caplog.text and "computes every result" in caplog.text


def test_a_foreign_sqlite_file_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / score_cache.FILE_NAME
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('mine')")
    before = path.read_bytes()
    cache = score_cache.ScoreCache(path)
    assert not cache.usable
    cache.put({b"k" * 32: b"v"})
    assert cache.get([b"k" * 32]) == {}
    with pytest.raises(ValueError, match="not a usable sway score cache"):
        cache.clear()
    assert path.read_bytes() == before


def test_an_entry_failing_its_checksum_is_recomputed(
    suite_file: Path, tmp_path: Path, cache_on: None, caplog: pytest.LogCaptureFixture
) -> None:
    first = run(suite_file, tmp_path)
    with sqlite3.connect(tmp_path / score_cache.FILE_NAME) as db:
        # flip one byte in the last byte of every stored value: each fails its digest
        rows = db.execute("SELECT key, value FROM results").fetchall()
        db.executemany(
            "UPDATE results SET value = ? WHERE key = ?",
            [(v[:-1] + bytes([v[-1] ^ 0xFF]), k) for k, v in rows],
        )
    with caplog.at_level(logging.WARNING):
        again = run(suite_file, tmp_path)
    assert again.backend_stats["stored_hits"] == 0
    assert "failed their checksum" in caplog.text
    assert_same_numbers(first, again)
    third = run(suite_file, tmp_path)  # the recomputed values replaced the bad ones
    assert third.backend_stats["forward_passes"] == 0


def test_the_cache_stays_within_its_bound_evicting_least_recently_used(tmp_path: Path) -> None:
    cache = score_cache.ScoreCache(tmp_path / "c.sqlite", capacity_bytes=10_000)
    blob = bytes(1000)
    for i in range(8):
        cache.put({bytes([i]) * 32: blob})
    assert cache.get([bytes([0]) * 32])  # 0 is now the most recently used
    for i in range(8, 14):
        cache.put({bytes([i]) * 32: blob})
    info = cache.info()
    assert info["entries"] * 1000 <= 10_000
    kept = cache.get([bytes([i]) * 32 for i in range(14)])
    assert bytes([0]) * 32 in kept and bytes([1]) * 32 not in kept
    assert bytes([13]) * 32 in kept
    assert cache.stats["evicted"] >= 4


def test_every_result_type_round_trips_exactly() -> None:
    decoder = lambda ids: [f"<{i}>" for i in ids]  # noqa: E731
    results = [
        TokenDist(
            token_ids=np.array([5, 2, 9], dtype=np.int64),
            logprobs=np.array([-0.1, -2.5, -7.25], dtype=np.float64),
            vocab_size=512,
            tail_mass=0.0123,
            vocabulary="tok:512",
            prompt_cut=3,
        ),
        DivergenceResult(
            js=0.25,
            kl_b_a=1e-300,
            kl_a_b=float("inf"),
            exact=True,
            top_a=(("a", 0.5), ("b", 0.25)),
            top_b=(("c", 1.0),),
            prompt_cut=1,
        ),
        RollingResult(np.arange(4, dtype=np.int64), np.array([-1.5, -0.25, -3.0], np.float32)),
        ContinuationResult(logprob=-12.375, num_tokens=7, prompt_cut=0),
        GenerationResult(text="é\x00 ünïcode\n", token_ids=(1, 2, 3), prompt_cut=2),
    ]
    for result in results:
        blob = score_cache.encode(result)
        assert blob is not None
        back = score_cache.decode(blob, decoder)
        assert type(back) is type(result)
        for name, value in vars(result).items():
            got = getattr(back, name)
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and np.array_equal(got, value), name
            elif name != "decode":
                assert got == value, name
    dist = score_cache.decode(score_cache.encode(results[0]) or b"", decoder)
    assert isinstance(dist, TokenDist) and dist.texts() == ("<5>", "<2>", "<9>")
    with pytest.raises((ValueError, KeyError)):
        score_cache.decode(b'\x05\x00\x00\x00{"t":', decoder)


def test_a_bad_size_setting_is_named_and_the_default_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"SWAY_SCORE_CACHE_MB": "lots", "SWAY_SCORE_CACHE_DIR": str(tmp_path)}
    with caplog.at_level(logging.WARNING):
        cache = score_cache.ScoreCache.open_default(None, env)
    assert cache is not None and cache.capacity == score_cache.DEFAULT_MB << 20
    assert "SWAY_SCORE_CACHE_MB='lots'" in caplog.text
    assert score_cache.ScoreCache.open_default(tmp_path, {"SWAY_SCORE_CACHE": "off"}) is None


def test_sway_run_with_a_home_keeps_its_cache_there_and_sway_cache_shows_and_clears_it(
    suite_file: Path, tmp_path: Path, cache_on: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from sway_engine.cli import main

    home = tmp_path / "home"
    home.mkdir()
    for name in ("first", "again"):
        argv = ["run", str(suite_file), "--home", str(home), "--json", str(tmp_path / name)]
        assert main(argv) == 0
    first, again = (json.loads((tmp_path / n).read_text()) for n in ("first", "again"))
    assert first["backend_stats"]["forward_passes"] > 0
    assert again["backend_stats"]["forward_passes"] == 0
    path = home / "cache" / score_cache.FILE_NAME
    capsys.readouterr()
    assert main(["cache", "info", "--home", str(home)]) == 0
    shown = capsys.readouterr().out
    assert str(path) in shown and "stored results" in shown
    assert main(["cache", "clear", "--home", str(home)]) == 0
    assert "removed" in capsys.readouterr().out
    assert score_cache.ScoreCache(path).info()["entries"] == 0
    # a file that is not sway's cache is refused, and stays as it was
    other = tmp_path / "other"
    (other / "cache").mkdir(parents=True)
    (other / "cache" / score_cache.FILE_NAME).write_bytes(b"precious")
    assert main(["cache", "clear", "--home", str(other)]) == 2
    assert "not a usable sway score cache" in capsys.readouterr().err
    assert (other / "cache" / score_cache.FILE_NAME).read_bytes() == b"precious"


def test_a_cache_from_another_schema_is_ignored_then_cleared_whole(tmp_path: Path) -> None:
    path = tmp_path / score_cache.FILE_NAME
    score_cache.ScoreCache(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '999' WHERE name = 'schema'")
    cache = score_cache.ScoreCache(path)
    assert not cache.usable  # never read: its values may mean something else
    assert cache.clear() == 0 and not path.exists()


def _writer(path: str, worker: int, n: int) -> int:
    cache = score_cache.ScoreCache(Path(path))
    for i in range(n):
        key = worker.to_bytes(2, "little") + i.to_bytes(4, "little") + bytes(26)
        cache.put({key: bytes([worker]) * 4000})
        cache.get([key])
    usable = cache.usable
    cache.close()
    return int(usable)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Dagster's step processes, a backfill and `sway run` share one cache: four processes
    creating and writing it at once all stay usable, and every entry is there."""
    import multiprocessing

    path = tmp_path / score_cache.FILE_NAME
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        usable = pool.starmap(_writer, [(str(path), w, 60) for w in range(4)])
    assert usable == [1, 1, 1, 1]
    cache = score_cache.ScoreCache(path)
    assert cache.info()["entries"] == 240


def test_sentence_vectors_are_stored_under_the_embedding_model(
    tmp_path: Path, fx: FixturePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probes that embed texts (cluster_kl, adapter_revert): a later run reads the vectors
    instead of running the embedding model, and they are the same vectors."""
    from sway_engine import embeddings
    from sway_engine.backends.instrumentation import Instrumented
    from sway_engine.requests import Embed, EmbeddingResult

    embedded: list[int] = []
    real = embeddings.embed

    def counting(texts):  # type: ignore[no-untyped-def]
        embedded.append(len(texts))
        return real(texts)

    monkeypatch.setattr(embeddings, "embed", counting)
    req = Embed(("The keeper lit the lamp.", "Tea is brewed on the island."))
    backend = HFBackend(str(fx.base))
    out = []
    for _ in range(2):
        session = Instrumented(backend, store=score_cache.ScoreCache(tmp_path / "c.sqlite"))
        (got,) = session.execute([req])
        assert isinstance(got, EmbeddingResult)
        out.append(got.vectors)
    assert embedded == [2]  # computed once, read the second time
    assert out[0].dtype == out[1].dtype and np.array_equal(out[0], out[1])
    assert out[0].shape == (2, embeddings.DIM)


# The probes whose inputs are never stored themselves: the weights probes read AdapterWeights
# (the base's tensors), gradient_ghost reads training_state.pt with torch.
UNSTORED_INPUTS = ("gradient_ghost", "intruder_dimensions", "weight_spectrum")

AGAIN = """
import json, sys
from pathlib import Path
from sway_engine.runner import evaluate
from sway_engine.suite import load_spec

spec, entries = load_spec(sys.argv[1])
result = evaluate(spec, entries, cache_dir=Path(sys.argv[2]))
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print(json.dumps({"heavy": heavy, "stats": result.backend_stats, "result": result.to_dict()}))
"""


def test_an_unchanged_adapter_re_evaluated_loads_no_model_nor_torch(
    fx: FixturePaths, tmp_path: Path, cache_on: None
) -> None:
    """A fresh process (what a user times) re-evaluating an unchanged adapter finds every
    result stored, weight probes and training-file probes included: it builds no model and,
    on a CPU-only torch, imports neither torch, transformers nor PEFT. The numbers are the
    first run's, bit for bit."""
    battery = load_yaml(write_battery(fx, tmp_path / "battery.yaml").read_text())
    battery["suite"] = [e for e in battery["suite"] if e["name"] in (*KEEP, *UNSTORED_INPUTS)]
    for entry in battery["suite"]:
        if entry["kind"] == "null_adapter":
            entry["runs"] = 4
    spec_file = tmp_path / "sway.yaml"
    spec_file.write_text(json.dumps(battery))
    first = run(spec_file, tmp_path / "cache")
    verdicts = {p.name: p.verdict.value for p in first.probes}
    assert all(verdicts[n] not in ("error", "skip") for n in UNSTORED_INPUTS), verdicts
    out = subprocess.run(
        [sys.executable, "-c", AGAIN, str(spec_file), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    again = json.loads(out.stdout.strip().splitlines()[-1])
    assert again["stats"].get("base_loads") == 0, again["stats"]
    assert again["stats"]["stored_hits"] > 0
    heavy = set(again["heavy"])
    assert not heavy & {"transformers", "peft"}, heavy
    if torch_env.cpu_only():
        assert not heavy, heavy
    fresh = {p["name"]: (p["verdict"], p["raw"], p["z"], p["p"]) for p in again["result"]["probes"]}
    assert fresh == {p.name: (p.verdict.value, p.raw, p.z, p.p) for p in first.probes}


def test_a_measurement_json_cannot_hold_is_computed_every_time(tmp_path: Path) -> None:
    """stored_measure keeps what JSON holds faithfully and nothing else: a value of another
    type is measured again on every call, never stored as a lossy copy."""
    store = score_cache.ScoreCache(tmp_path / "scores.sqlite")
    identity = score_cache.Identity(backend="b", view=lambda v: repr(v))
    kept: dict[bytes, bytes] = {}

    def remember(parts: Any, views: Any, compute: Any) -> bytes:
        key = score_cache.derived_key(identity, parts, views)
        assert key is not None
        if key not in kept:
            kept[key] = compute()
        return kept[key]

    ctx = Context(execute=lambda _r: [], capabilities=frozenset(), remember=remember)
    spec = ProbeSpec(name="p", kind="k")
    calls: list[int] = []

    def plain() -> list[Measurement]:
        calls.append(1)
        return [Measurement(raw=0.5, values=(1.0, np.float64(2.0)), evidence={"n": np.int64(3)})]

    def odd() -> list[Measurement]:
        calls.append(1)
        return [Measurement(raw=0.5, evidence={"when": object()})]

    a = stored_measure(ctx, spec, [Finetuned()], plain)
    b = stored_measure(ctx, spec, [Finetuned()], plain)
    assert len(calls) == 1 and a == b and a[0].values == (1.0, 2.0) and a[0].evidence == {"n": 3}
    calls.clear()
    other = ProbeSpec(name="q", kind="k")
    stored_measure(ctx, other, [Finetuned()], odd)
    stored_measure(ctx, other, [Finetuned()], odd)
    assert len(calls) == 2
    store.close()
