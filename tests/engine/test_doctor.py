"""`sway doctor check`: the backend checks itself, passes on the fixtures, and catches a
backend that is broken in each way it checks (injected here)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from sway_engine import doctor
from sway_engine.backends.hf import HFBackend
from sway_engine.cli import main
from sway_engine.requests import NextToken, Request, Result, RollingResult, TokenDist

PROMPTS = ["Q: Where is the island of Quellmoor?\nA:", "The Orrindale Light stands on the"]


class Broken:
    """A working backend with one fault: results that depend on the batch's size (batch),
    results that differ on every call (drift), or a cache whose rows are corrupt (cache)."""

    def __init__(self, inner: HFBackend, fault: str) -> None:
        self.inner, self.fault, self.kind = inner, fault, inner.kind
        self.capabilities = inner.capabilities
        self.calls = 0
        self.stale: dict[Request, Result] = {}

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        self.calls += 1
        out = self.inner.execute(requests)
        if self.fault == "cache":  # a repeat is served from a cache that holds corrupt rows
            served = []
            for req, res in zip(requests, out, strict=True):
                served.append(self.stale.get(req, res))
                self.stale.setdefault(req, _shifted(res, 1e-2))
            return served
        shift = 1e-3 * len(requests) if self.fault == "batch" else 1e-9 * self.calls
        return [_shifted(r, shift) for r in out]

    def forget_rows(self) -> None:
        self.inner.forget_rows()
        self.stale.clear()

    def close(self) -> None:
        pass


def _shifted(result: Result, by: float) -> Result:
    if isinstance(result, RollingResult | TokenDist):
        return replace(result, logprobs=np.asarray(result.logprobs) + by)
    return result


@pytest.fixture(scope="module")
def hf(fx) -> HFBackend:  # type: ignore[no-untyped-def]
    return HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))


def test_the_fixture_backend_passes_every_check(fx, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["doctor", "check", str(fx.suite), "--json"]) == 0
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert set(checks) >= {"batch invariance", "determinism", "cache integrity", "hf vs mlx"}
    assert all(c["passed"] for c in checks.values()), checks
    assert checks["batch invariance"]["measured"] < doctor.BATCH_BOUND
    assert checks["determinism"]["measured"] == 0.0


@pytest.mark.parametrize(
    ("fault", "fails"),
    [
        ("batch", {"batch invariance"}),
        ("drift", {"determinism", "cache integrity"}),  # every repeat differs, cached ones too
        ("cache", {"cache integrity"}),
    ],
)
def test_a_broken_backend_fails_the_checks_for_its_fault(
    hf: HFBackend, fault: str, fails: set[str]
) -> None:
    checks = {c.name: c for c in doctor.check(Broken(hf, fault), PROMPTS)}
    assert {name for name, c in checks.items() if not c.passed} == fails, checks


def test_the_command_exits_1_on_a_broken_backend(fx, hf: HFBackend, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import sway_engine.backends.build as build

    monkeypatch.setattr(build, "build_backend", lambda *a, **k: Broken(hf, "batch"))
    assert main(["doctor", "check", str(fx.suite)]) == 1
    assert "batch invariance  FAILED" in capsys.readouterr().out


def test_stored_results_are_audited_and_a_wrong_stored_value_fails(
    fx, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The persistent cache holds what the backend computes; the doctor finds it equal. A value
    stored under the wrong key (checksum intact: what a key missing a factor would serve) is
    caught."""
    from sway_engine import score_cache
    from sway_engine.backends.instrumentation import Instrumented

    store = score_cache.ScoreCache(tmp_path / score_cache.FILE_NAME)
    backend = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    reqs = doctor.requests_for(PROMPTS, [doctor.BASE, doctor.FINETUNED])
    Instrumented(backend, store=store).execute(reqs)  # what a run stores
    (ok,) = [c for c in doctor.check(backend, PROMPTS, store=store) if c.name == "stored results"]
    assert ok.passed and ok.detail.startswith(f"{len(reqs)} of "), ok

    identity = backend.cache_identity(store)
    assert identity is not None
    # the base's next-token top-k of one prompt, and the adapter's (same shape, other values)
    pair = [r for r in reqs if isinstance(r, NextToken) and r.prompt == PROMPTS[0]]
    assert [r.view for r in pair] == [doctor.BASE, doctor.FINETUNED]
    a, b = (score_cache.request_key(identity, r) for r in pair)
    assert a is not None and b is not None
    swapped = store.get([b])[b]  # b's value under a's key, with a valid checksum
    store.put({a: swapped})
    (bad,) = [c for c in doctor.check(backend, PROMPTS, store=store) if c.name == "stored results"]
    assert not bad.passed and bad.measured > doctor.BATCH_BOUND, bad


def test_calibration_rows_fail_only_when_false_claims_are_surely_above_the_bound() -> None:
    from sway_engine.audit import ProbeAudit

    def row(false: int, interval: tuple[float, float]) -> ProbeAudit:
        return ProbeAudit("p", "delta_kl", "effect", 50, false, interval, 1.0, 0.1)

    honest, leaky = doctor.calibration_checks([row(0, (0.0, 0.071)), row(9, (0.085, 0.31))])
    assert honest.passed and honest.measured == 0.0
    # 9 of 50 random adapters PASSed: a probe that PASSes noise 18% of the time fails the check.
    assert not leaky.passed and leaky.measured == pytest.approx(0.18)
    assert "9/50 random adapters got a false PASS" in leaky.detail


def test_check_with_calibration_audits_the_suites_probes(fx, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import yaml

    spec = yaml.safe_load(fx.suite.read_text())
    spec["suite"] = [e for e in spec["suite"] if e["kind"] in ("null_adapter", "delta_kl")]
    spec["suite"][0]["runs"] = 4  # the audit's cost grows with the nulls per draw
    (tmp_path / "sway.yaml").write_text(yaml.safe_dump(spec))
    code = main(["doctor", "check", str(tmp_path / "sway.yaml"), "--calibration", "10", "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert code == (0 if all(c["passed"] for c in checks.values()) else 1)
    audited = {n for n in checks if n.startswith("calibration ")}
    assert audited == {"calibration delta_kl_doc"}
    for name in audited:
        assert 0.0 <= checks[name]["measured"] <= 1.0
        assert checks[name]["bound"] == doctor.FALSE_RATE_BOUND


def test_too_few_calibration_draws_is_refused(fx, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["doctor", "check", str(fx.suite), "--calibration", "3"]) == 2
    assert "at least 10 draws" in capsys.readouterr().err
