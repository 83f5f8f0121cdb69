"""section_internalization: hand-computed lifts, the upstream zero-sum fault, the fixtures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

from sway_engine.backends.base import ALL_CAPABILITIES
from sway_engine.cli import main
from sway_engine.dlm import parse_dlm
from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context
from sway_engine.probes.section_internalization import SectionInternalization, SectionSpec
from sway_engine.requests import (
    ContinuationLogprob,
    ContinuationResult,
    Request,
    Result,
    RollingLogprob,
    RollingResult,
)
from sway_engine.result import Verdict
from sway_engine.runner import evaluate
from sway_engine.stats import null_stats
from sway_engine.suite import parse_spec
from sway_engine.views import Base, Finetuned
from tests.conftest import like_a_null, show

DOC = parse_dlm(
    "---\n---\nThe harbour has nine piers.\n\n::instruction::\n### Q\nWhere?\n### A\nTamsk.\n"
)
# per-token NLL: prose base 3.0 / ft 1.0; instruction base 3.0 / ft 2.5
NLL = {("prose", "base"): 3.0, ("prose", "ft"): 1.0, ("qa", "base"): 3.0, ("qa", "ft"): 2.5}


def fake_execute(requests: Sequence[Request]) -> list[Result]:
    out: list[Result] = []
    for r in requests:
        view = "base" if isinstance(r.view, Base) else "ft"  # type: ignore[union-attr]
        if isinstance(r, RollingLogprob):
            out.append(
                RollingResult(np.zeros(5, dtype=np.int64), np.full(4, -NLL[("prose", view)]))
            )
        else:
            assert isinstance(r, ContinuationLogprob)
            out.append(ContinuationResult(logprob=-2 * NLL[("qa", view)], num_tokens=2))
    return out


CTX = Context(execute=fake_execute, capabilities=ALL_CAPABILITIES, document=DOC)
SPEC = SectionSpec(name="s")


def test_own_lift_and_effective_by_hand() -> None:
    (m,) = SectionInternalization().measure(SPEC, CTX, [Finetuned()])
    own = [it["own"] for it in m.items]
    assert own == pytest.approx([2 / 3, 1 / 6])
    assert [it["effective"] for it in m.items] == pytest.approx([0.5, -0.5])
    assert m.raw == pytest.approx((2 / 3 + 1 / 6) / 2)
    assert m.evidence["passing_frac"] == 1.0


def test_upstream_statistic_is_identically_zero_ours_is_not() -> None:
    (m,) = SectionInternalization().measure(SPEC, CTX, [Finetuned()])
    assert sum(it["effective"] for it in m.items) == pytest.approx(0.0, abs=1e-12)
    assert m.raw > 0.4


def test_verdicts_from_null_and_fallback() -> None:
    probe = SectionInternalization()
    (m,) = probe.measure(SPEC, CTX, [Finetuned()])
    assert probe.judge(SPEC, m, null_stats([0.0, 0.01, 0.02, 0.015, 0.005])).verdict == Verdict.PASS
    assert probe.judge(SPEC, m, null_stats([0.4, 0.5, 0.45, 0.42, 0.48])).verdict == Verdict.FAIL
    fallback = probe.judge(SPEC, m, None)
    assert fallback.verdict == Verdict.PASS and fallback.z is None


def test_needs_a_document_with_two_sections() -> None:
    probe = SectionInternalization()
    with pytest.raises(ProbeError, match="dlm_source"):
        probe.measure(SPEC, Context(fake_execute, ALL_CAPABILITIES), [Finetuned()])
    one = Context(fake_execute, ALL_CAPABILITIES, document=parse_dlm("---\n---\nJust prose.\n"))
    with pytest.raises(ProbeError, match=">= 2 eligible sections, found 1"):
        probe.measure(SPEC, one, [Finetuned()])


@pytest.fixture(scope="module")
def suite(fx):  # type: ignore[no-untyped-def]
    data = yaml.safe_load(fx.suite.read_text())
    data["dlm_source"] = str(fx.document)
    data["suite"] = [data["suite"][0], {"name": "sections", "kind": "section_internalization"}]
    return parse_spec(data)


@pytest.mark.parametrize("adapter", ["doc-strong", "noise", "zero"])
def test_fixture_adapters(fx, suite, adapter: str) -> None:  # type: ignore[no-untyped-def]
    spec, entries = suite
    result = evaluate(spec, entries, adapter=str(fx.adapters[adapter])).probe("sections")
    if adapter == "doc-strong":
        assert result.verdict.value == "pass" and result.p is not None and result.p < 1e-3, show(
            result
        )
        assert all(it["own"] > 0.3 for it in result.items), show(result)
    if adapter == "noise":
        assert like_a_null(result), show(result)
    if adapter == "zero":
        assert result.verdict.value == "fail" and result.p == 1.0, show(result)


def test_missing_document_is_a_clear_error_before_any_model_loads(
    fx, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "sway.yaml"
    spec.write_text(
        fx.suite.read_text().replace("version: 1\n", "version: 1\ndlm_source: nope.dlm\n")
    )
    assert main(["run", str(spec)]) == 2
    assert f"{tmp_path / 'nope.dlm'}: cannot read the document" in capsys.readouterr().err
