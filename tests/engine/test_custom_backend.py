"""`kind: custom`: user classes in both protocol shapes, checked when built."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from sway_engine.backends.base import (
    CONTINUATION,
    GENERATE,
    NEXT_TOKEN,
    NULL_VIEWS,
    ROLLING,
    SCALED_VIEWS,
)
from sway_engine.backends.build import build_backend
from sway_engine.backends.custom import CustomBackend, load_entry_point
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.errors import BackendError
from sway_engine.requests import (
    ContinuationLogprob,
    ContinuationResult,
    Generate,
    GenerationResult,
    NextToken,
    Request,
    Result,
    RollingLogprob,
    TokenDist,
)
from sway_engine.result import Verdict
from sway_engine.runner import run_suite
from sway_engine.spec import ModelSpec
from sway_engine.suite import parse_spec
from sway_engine.views import BASE, FINETUNED, Null, Scaled

HERE = __name__
VOCAB = 50
PROMPTS = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa"]


def toy_logits(prompt: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(prompt.encode())).normal(size=VOCAB)


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


SHIFT = np.zeros(VOCAB)
SHIFT[7] = 3.0  # the "adapter" strongly promotes token 7


# ---- a class in the batched protocol ---------------------------------------------------------


class BatchedToy:
    capabilities = frozenset({NEXT_TOKEN, GENERATE})

    def __init__(self, base_spec: ModelSpec, adapter_path: str | None) -> None:
        self.base_spec = base_spec
        self.adapter_path = adapter_path
        self.closed = False

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        out: list[Result] = []
        for req in requests:
            if isinstance(req, NextToken):
                lp = log_softmax(toy_logits(req.prompt))
                top = np.argsort(-lp)[: req.top_k]
                out.append(TokenDist(top, lp[top], VOCAB, float(1 - np.exp(lp[top]).sum())))
            elif isinstance(req, Generate):
                out.append(GenerationResult(text=f"<{req.view.key}>"))
        return out

    def close(self) -> None:
        self.closed = True


class MissesOne(BatchedToy):
    def execute(self, requests: Sequence[Request]) -> list[Result]:
        return super().execute(requests)[:-1]


class UnknownCaps(BatchedToy):
    capabilities = frozenset({NEXT_TOKEN, "telepathy"})


class NoArgs:
    capabilities = frozenset({NEXT_TOKEN})

    def __init__(self) -> None:
        pass

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        return []

    def close(self) -> None:
        pass


class HalfViews:
    def __init__(self, base_spec: ModelSpec, adapter_path: str | None) -> None:
        pass

    def as_base(self) -> Any:
        return None


def not_a_class(base_spec: ModelSpec, adapter_path: str | None) -> None:
    return None


# ---- a class in upstream dlm-sway's view protocol ---------------------------------------------


@dataclass(frozen=True)
class UpTokenDist:
    """Upstream's TokenDist: float32 log-probs and a log tail (None: no tail)."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    vocab_size: int
    tail_logprob: float | None


@dataclass(frozen=True)
class UpRolling:
    token_ids: np.ndarray
    logprobs: np.ndarray
    num_tokens: int


class _ViewModel:
    def __init__(self, delta: np.ndarray, per_token: float) -> None:
        self.delta = delta
        self.per_token = per_token

    def next_token_dist(self, prompt: str, *, top_k: int = 256) -> UpTokenDist:
        lp = log_softmax(toy_logits(prompt) + self.delta)
        top = np.argsort(-lp)[:top_k]
        return UpTokenDist(top, lp[top].astype(np.float32), VOCAB, None)

    def rolling_logprob(self, text: str) -> UpRolling:
        n = len(text.split())
        return UpRolling(np.arange(n), np.full(max(n - 1, 0), self.per_token, np.float32), n)

    def logprob_of(self, prompt: str, completion: str) -> float:
        return self.per_token * len(completion.split())

    def generate(self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0) -> str:
        return " w7" * max_new_tokens if self.delta[7] > 1 else " w0" * max_new_tokens


class UpstreamToy:
    """Exclusive views as upstream requires: entering a second view at once is an error."""

    entered: list[str] = []

    def __init__(self, base_spec: ModelSpec, adapter_path: str | None) -> None:
        self.active: str | None = None

    @contextmanager
    def _view(self, name: str, delta: np.ndarray, per_token: float) -> Iterator[_ViewModel]:
        if self.active is not None:
            raise RuntimeError(f"view {name} entered while {self.active} is active")
        self.active = name
        UpstreamToy.entered.append(name)
        try:
            yield _ViewModel(delta, per_token)
        finally:
            self.active = None

    def as_base(self) -> Any:
        return self._view("base", np.zeros(VOCAB), -2.0)

    def as_finetuned(self) -> Any:
        return self._view("ft", SHIFT, -1.5)

    def as_scaled_adapter(self, lam: float) -> Any:
        return self._view(f"scaled_{lam}", lam * SHIFT, -2.0 + 0.5 * lam)

    def as_null_adapter(
        self, seed: int, *, init_scale: float = 0.02, rank_scale: float = 1.0
    ) -> Any:
        noise = np.random.default_rng(seed).normal(size=VOCAB) * init_scale * 10
        return self._view(f"null_{seed}", noise, -2.0)


class UpstreamWithModes(UpstreamToy):
    def as_null_adapter(
        self, seed: int, *, init_scale: float = 0.02, rank_scale: float = 1.0, mode: str = "fixed"
    ) -> Any:
        scale = init_scale * (20 if mode == "matched" else 10)
        noise = np.random.default_rng(seed).normal(size=VOCAB) * scale
        return self._view(f"null_{mode}_{seed}", noise, -2.0)


def custom(cls: str, **kw: Any) -> CustomBackend:
    backend = build_backend(ModelSpec(kind="custom", base="toy", entry_point=f"{HERE}:{cls}", **kw))
    assert isinstance(backend, CustomBackend)
    return backend


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry_point", "message"),
    [
        ("no_colon_here", "must have the form 'pkg.module:Class'"),
        ("pkg.mod:", "must have the form"),
        ("sway_engine.no_such_module:X", "cannot import 'sway_engine.no_such_module'"),
        (f"{HERE}:Nope", "has no 'Nope'"),
        (f"{HERE}:not_a_class", "is not a class"),
    ],
)
def test_bad_entry_points_say_what_is_wrong(entry_point: str, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        load_entry_point(entry_point)


def test_spec_requires_an_entry_point_for_custom() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="kind custom needs `entry_point`"):
        ModelSpec(kind="custom", base="toy")


def test_batched_class_is_built_with_the_spec_and_adapter(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sway_engine.backends.custom"):
        backend = custom("BatchedToy", adapter="/adapters/a1")
    assert (backend.kind, backend.protocol) == ("custom", "batched")
    assert backend.capabilities == {NEXT_TOKEN, GENERATE}
    inner = backend.inner
    assert isinstance(inner, BatchedToy)
    assert (
        inner.base_spec.entry_point == f"{HERE}:BatchedToy" and inner.adapter_path == "/adapters/a1"
    )
    assert "capabilities ['generate', 'next_token']" in caplog.text
    dist, gen = backend.execute([NextToken("alpha beta", BASE, 3), Generate("x", FINETUNED, 2)])
    assert isinstance(dist, TokenDist) and len(dist.token_ids) == 3
    assert gen == GenerationResult(text="<ft>")
    backend.close()
    assert inner.closed


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (
            "HalfViews",
            "implements neither backend protocol.*missing: execute, close.*missing: as_finetuned",
        ),
        ("NoArgs", r"must accept __init__\(self, base_spec, adapter_path\)"),
        ("UnknownCaps", r"declares unknown capabilities \['telepathy'\]"),
    ],
)
def test_classes_that_break_the_protocol_are_rejected_by_name(cls: str, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        custom(cls)


def test_a_wrong_number_of_results_is_an_error() -> None:
    backend = custom("MissesOne")
    with pytest.raises(BackendError, match="returned 1 results for 2 requests"):
        backend.execute([NextToken("a", BASE, 2), NextToken("b", BASE, 2)])


def test_upstream_views_answer_batched_requests() -> None:
    backend = custom("UpstreamToy")
    assert backend.protocol == "views"
    assert backend.capabilities == {
        NEXT_TOKEN,
        ROLLING,
        CONTINUATION,
        GENERATE,
        SCALED_VIEWS,
        NULL_VIEWS,
    }
    UpstreamToy.entered.clear()
    reqs: list[Request] = [
        NextToken("alpha beta", FINETUNED, 5),
        RollingLogprob("one two three four", BASE),
        ContinuationLogprob("Q:", " yes no maybe", FINETUNED),
        Generate("x", Scaled(1.0), 2),  # canonical: the fine-tuned view
        NextToken("alpha beta", Scaled(0.5), 50),
        NextToken("alpha beta", Null(3, mode="fixed"), 5),
    ]
    ft, rolling, cont, gen, half, null = backend.execute(reqs)
    # One entry per distinct view, in first-seen order, never two at once.
    assert UpstreamToy.entered == ["ft", "base", "scaled_0.5", "null_3"]
    want = log_softmax(toy_logits("alpha beta") + SHIFT)
    assert isinstance(ft, TokenDist) and ft.token_ids[0] == 7
    assert np.allclose(ft.logprobs, np.sort(want)[::-1][:5], atol=1e-6)
    assert ft.tail_mass == pytest.approx(1 - np.exp(ft.logprobs).sum())
    assert rolling.logprobs.tolist() == [-2.0, -2.0, -2.0]
    # logprob_of gives a bare float; the token count comes from rolling_logprob(completion).
    assert cont == ContinuationResult(logprob=-4.5, num_tokens=3)
    assert gen == GenerationResult(text=" w7 w7")
    assert isinstance(half, TokenDist) and half.tail_mass == pytest.approx(0.0, abs=1e-6)
    assert isinstance(null, TokenDist)


def test_upstream_nulls_without_a_mode_serve_fixed_nulls_only() -> None:
    backend = custom("UpstreamToy")
    with pytest.raises(BackendError, match="set defaults.null.mode: fixed"):
        backend.execute([NextToken("alpha beta", Null(1), 5)])
    with_modes = custom("UpstreamWithModes")
    (dist,) = with_modes.execute([NextToken("alpha beta", Null(1), 5)])
    assert isinstance(dist, TokenDist)


def _suite(mode: str, entry: str) -> tuple[Any, Any]:
    return parse_spec(
        {
            "version": 1,
            "models": {
                "base": {"kind": "custom", "base": "toy", "entry_point": f"{HERE}:{entry}"},
                "ft": {"kind": "custom", "base": "toy", "entry_point": f"{HERE}:{entry}"},
            },
            "defaults": {"null": {"mode": mode, "seeds": 6}},
            "suite": [
                {"name": "null_baseline", "kind": "null_adapter"},
                {"name": "dkl", "kind": "delta_kl", "prompts": PROMPTS, "assert_mean_gte": 0.01},
                {"name": "abl", "kind": "adapter_ablation", "prompts": PROMPTS},
            ],
        }
    )


def test_an_upstream_class_runs_a_calibrated_suite() -> None:
    spec, entries = _suite("fixed", "UpstreamToy")
    result = run_suite(spec, entries, Instrumented(build_backend(spec.models.ft)))
    assert result.backend_kind == "custom"
    dkl = result.probe("dkl")
    assert dkl.verdict == Verdict.PASS and dkl.z is not None and dkl.z > 3
    assert result.probe("null_baseline").verdict == Verdict.PASS
    # it ran (scaled views), but the view protocol cannot scale a null: no calibration, WARN
    abl = result.probe("abl")
    assert abl.raw is not None and abl.verdict in (Verdict.WARN, Verdict.FAIL)
    assert "adapter_ablation stays uncalibrated" in abl.evidence["uncalibrated"]


def test_matched_nulls_on_a_modeless_class_are_skipped_with_the_reason() -> None:
    spec, entries = _suite("matched", "UpstreamToy")
    result = run_suite(spec, entries, Instrumented(build_backend(spec.models.ft)))
    null = result.probe("null_baseline")
    assert any("defaults.null.mode: fixed" in reason for _, reason in null.evidence["skipped"])
    dkl = result.probe("dkl")
    assert dkl.z is None and "no null calibration" in dkl.message
