"""Two-model composition: base view from one backend, fine-tuned view from another."""

from __future__ import annotations

import numpy as np
import pytest

from sway_engine.backends.base import DIVERGENCE, NULL_VIEWS, SCALED_VIEWS
from sway_engine.backends.hf import HFBackend
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.backends.two_model import TwoModelBackend
from sway_engine.errors import BackendError
from sway_engine.requests import Divergence, NextToken
from sway_engine.result import Verdict
from sway_engine.runner import run_suite
from sway_engine.suite import load_spec
from sway_engine.views import BASE, FINETUNED, Null

PROMPT = "Q: What is brinthorn tea made from?\nA:"


@pytest.fixture(scope="module")
def pair(fx):  # type: ignore[no-untyped-def]
    return TwoModelBackend(
        HFBackend(str(fx.base)), HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    )


def test_routes_views_to_their_backend(fx, pair: TwoModelBackend) -> None:  # type: ignore[no-untyped-def]
    base, ft = pair.execute([NextToken(PROMPT, BASE, 8), NextToken(PROMPT, FINETUNED, 8)])
    one = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    ref_base, ref_ft = one.execute([NextToken(PROMPT, BASE, 8), NextToken(PROMPT, FINETUNED, 8)])
    assert np.allclose(base.logprobs, ref_base.logprobs, atol=1e-5)
    assert np.allclose(ft.logprobs, ref_ft.logprobs, atol=1e-5)


def test_capabilities_exclude_shared_base_views(pair: TwoModelBackend) -> None:
    assert not pair.capabilities & {DIVERGENCE, NULL_VIEWS, SCALED_VIEWS}
    with pytest.raises(BackendError, match="base and ft views only"):
        pair.execute([NextToken(PROMPT, Null(1), 8)])
    with pytest.raises(BackendError, match="top-k"):
        pair.execute([Divergence(PROMPT, BASE, FINETUNED)])


def test_suite_runs_uncalibrated_with_topk_divergence(fx, pair: TwoModelBackend) -> None:  # type: ignore[no-untyped-def]
    spec, entries = load_spec(fx.suite)
    result = run_suite(spec, entries, Instrumented(pair))
    verdicts = {p.name: p.verdict for p in result.probes}
    assert verdicts["null_baseline"] == Verdict.SKIP
    assert verdicts["ablation"] == Verdict.SKIP  # needs scaled views
    dkl = result.probe("delta_kl_doc")
    # no nulls through two models: the fixed threshold would pass, so WARN, never PASS
    assert dkl.verdict == Verdict.WARN and dkl.z is None and "no null calibration" in dkl.message
