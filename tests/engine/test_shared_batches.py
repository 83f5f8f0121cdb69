"""Every probe's requests in shared batches: `gather` (the rounds, errors kept to their job),
the null calibration that measures the adapter beside its nulls, the batched LoRA row update,
the decode loop's reserved KV cache, and windows read once for a perplexity and a KL."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from sway_engine.backends.hf import COMPACT_AT, HFBackend
from sway_engine.backends.hf_lora import add_row_updates, row_plan
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.calibration import calibrate
from sway_engine.gather import gather
from sway_engine.requests import (
    Generate,
    NextToken,
    Request,
    Result,
    RollingLogprob,
    SequenceDivergence,
)
from sway_engine.runner import context_for, null_plan, run_entry
from sway_engine.suite import load_spec
from sway_engine.views import BASE, FINETUNED, Null

# ---- gather ----


class Recorder:
    """A backend stand-in: answers a request with its own prompt, records each call."""

    def __init__(self, refuse: str = "") -> None:
        self.calls: list[list[str]] = []
        self.refuse = refuse
        self.threads: set[str] = set()

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        prompts = [r.prompt for r in requests]  # type: ignore[union-attr]
        self.calls.append(prompts)
        self.threads.add(threading.current_thread().name)
        if self.refuse and self.refuse in prompts:
            raise ValueError(f"bad request {self.refuse!r}")
        return prompts  # type: ignore[return-value]


def asking(name: str, rounds: int) -> Any:
    """A job asking `rounds` times, one request each time, returning what it got."""

    def job(execute: Any) -> list[str]:
        got = []
        for i in range(rounds):
            (answer,) = execute([NextToken(f"{name}{i}", BASE)])
            got.append(answer)
        return got

    return job


def test_gather_answers_every_waiting_job_from_one_backend_call_per_round() -> None:
    backend = Recorder()
    ended: list[tuple[int, str]] = []

    def done(i: int) -> None:
        ended.append((i, threading.current_thread().name))

    out = gather([asking("a", 1), asking("b", 3), asking("c", 2)], backend.execute, done)
    assert out == [["a0"], ["b0", "b1", "b2"], ["c0", "c1"]]
    # three rounds, not six calls: a round takes every job still running
    assert backend.calls == [["a0", "b0", "c0"], ["b1", "c1"], ["b2"]]
    here = threading.current_thread().name
    assert backend.threads == {here}  # the model: this thread only
    assert ended == [(0, here), (2, here), (1, here)]  # as they end, heard in this thread


def test_gather_keeps_a_failure_to_the_job_that_caused_it() -> None:
    """Round 2 fails as a whole: it is retried job by job, only the job that asked for the bad
    request sees the error, and that job goes on asking (it caught it)."""
    backend = Recorder(refuse="bad")

    def tolerant(prompts: list[str]) -> Any:
        def job(execute: Any) -> list[str]:
            got = []
            for p in prompts:
                try:
                    got += execute([NextToken(p, BASE)])
                except ValueError as exc:
                    got.append(str(exc))
            return got

        return job

    def raises(execute: Any) -> None:
        raise RuntimeError("no document")

    jobs = [tolerant(["a", "bb", "ccc"]), tolerant(["dd", "bad", "e"]), raises, tolerant(["f"])]
    out = gather(jobs, backend.execute)
    assert out[0] == ["a", "bb", "ccc"] and out[3] == ["f"]
    assert out[1] == ["dd", "bad request 'bad'", "e"]
    assert isinstance(out[2], RuntimeError)
    assert backend.calls == [
        ["a", "dd", "f"],  # round 1: every job that asked, in job order
        ["bb", "bad"],  # round 2 failed as a whole ...
        ["bb"],  # ... and was retried job by job
        ["bad"],
        ["ccc", "e"],  # round 3: the job that met the error asks on
    ]


# ---- the batched LoRA row update ----


class Layer:
    """What add_row_updates reads from a PEFT LoRA layer."""

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        self.lora_A = {
            n: torch.nn.Linear(a.shape[1], a.shape[0], bias=False)
            for n, (a, _, _) in factors.items()
        }
        self.lora_B = {
            n: torch.nn.Linear(b.shape[1], b.shape[0], bias=False)
            for n, (_, b, _) in factors.items()
        }
        self.scaling = {n: s for n, (_, _, s) in factors.items()}
        for n, (a, b, _) in factors.items():
            self.lora_A[n].weight.data.copy_(a)
            self.lora_B[n].weight.data.copy_(b)


@pytest.mark.parametrize(
    "names",
    [
        ["v1", "v1", "v2", "v2"],  # equal blocks in order: no copy
        ["base", "v1", "base", "v2", "v2", "v2", "v1"],  # base rows between, uneven
        ["v3", "v1", "gone", "v2", "base"],  # a view this layer does not adapt
    ],
)
def test_row_update_equals_each_rows_own_lora(names: list[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    factors = {
        name: (torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen), s)
        for name, r, s in [("v1", 2, 0.5), ("v2", 4, 2.0), ("v3", 3, 1.0)]
    }
    layer = Layer(factors)
    x = torch.randn(len(names), 3, 6, generator=gen)
    base_out = torch.randn(len(names), 3, 5, generator=gen)
    want = base_out.clone()
    for i, name in enumerate(names):
        if name in factors:
            a, b, s = factors[name]
            want[i] += s * (x[i] @ a.T @ b.T)
    plan = row_plan(torch, names, "base", "cpu")
    assert plan is not None
    got = add_row_updates(torch, layer, {}, x, base_out.clone(), plan)
    assert torch.allclose(got, want, atol=1e-5)
    assert (plan.src is None) == (names == ["v1", "v1", "v2", "v2"])


def test_a_plan_of_base_rows_only_is_none() -> None:
    assert row_plan(torch, ["base", "base"], "base", "cpu") is None


# ---- generation, KL windows, calibration on the fixture ----


@pytest.fixture(scope="module")
def hf(fx) -> HFBackend:  # type: ignore[no-untyped-def]
    return HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))


def test_a_wide_decode_leaves_rows_in_groups_and_equals_each_view_alone(fx, hf: HFBackend) -> None:  # type: ignore[no-untyped-def]
    """64 rows of 16 views, prompts of two lengths, two length limits: one decode (rows leave
    at their own limit), ended rows dropped in groups (row-steps within 1/(COMPACT_AT-1) of
    the tokens kept), the tokens of each row those of its view decoded alone."""
    views = [FINETUNED, *(Null(s) for s in range(1, 16))]
    prompts = ["Once upon a time", "The keeper of the lamp walked along the shore at night and"]
    reqs = [Generate(p, v, n) for p in prompts for n in (24, 9) for v in views]
    together = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    got = together.execute(reqs)
    c = together.counters()
    assert c["forward_passes"] <= 24  # one call: its longest limit's steps at most
    assert all(len(r.token_ids) <= req.max_new_tokens for req, r in zip(reqs, got, strict=True))
    assert c["generate_row_steps"] <= c["generated_tokens"] * COMPACT_AT / (COMPACT_AT - 1)
    assert len({len(r.token_ids) for r in got}) > 1  # rows end at different steps
    for view in views[:4]:
        mine = [(req, res) for req, res in zip(reqs, got, strict=True) if req.view == view]
        alone = hf.execute([req for req, _ in mine])
        assert [res.token_ids for _, res in mine] == [a.token_ids for a in alone], view


def test_a_window_asked_for_its_kl_and_its_logprobs_is_forwarded_once(fx, hf: HFBackend) -> None:  # type: ignore[no-untyped-def]
    text = "The keeper of the lamp walked along the shore, counting the boats. " * 3
    views = [FINETUNED, Null(1), Null(2)]
    kl_only = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    kl_only.execute([SequenceDivergence(text, BASE, v) for v in views])
    both = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    reqs: list[Any] = [SequenceDivergence(text, BASE, v) for v in views]
    reqs += [RollingLogprob(text, v) for v in [BASE, *views]]
    got = both.execute(reqs)
    assert both.counters()["tokens_forwarded"] == kl_only.counters()["tokens_forwarded"]
    for req, res in zip(reqs[3:], got[3:], strict=True):
        (alone,) = hf.execute([req])
        assert np.allclose(res.logprobs, alone.logprobs, atol=1e-5), req.view


def test_null_calibration_shares_batches_and_leaves_the_adapter_run_nothing_to_forward(fx) -> None:  # type: ignore[no-untyped-def]
    spec, entries = load_spec(fx.suite)
    backend = Instrumented(HFBackend(str(fx.base), str(fx.adapters["doc-strong"])))
    ctx = context_for(spec, backend)
    plan = null_plan(spec, entries, ctx)
    assert plan is not None
    matrix = calibrate(entries, ctx, plan)
    calibrated = {c.probe for c in matrix.cells}
    assert len(calibrated) >= 2 and not matrix.skipped
    passes = backend.counters()["forward_passes"]
    for entry in entries:
        if entry.spec.name in calibrated:
            run_entry(entry, ctx, matrix)
    assert backend.counters()["forward_passes"] == passes  # every adapter row was computed

    # each probe calibrated alone (its own batches, nulls only) gives the same cells
    for entry in entries:
        if entry.spec.name not in calibrated:
            continue
        fresh = Instrumented(HFBackend(str(fx.base), str(fx.adapters["doc-strong"])))
        alone = calibrate([entry], context_for(spec, fresh), plan)
        for a, b in zip(
            alone.cells, [c for c in matrix.cells if c.probe == entry.spec.name], strict=True
        ):
            assert (a.seed, a.rank_scale) == (b.seed, b.rank_scale)
            assert a.raw == pytest.approx(b.raw, rel=1e-5, abs=1e-9), entry.spec.name
