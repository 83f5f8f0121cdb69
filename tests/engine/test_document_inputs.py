"""Probes with no prompts/cases of their own read them from the suite's `.dlm` document
(sway_engine/probes/common/document_inputs.py). Fake executors and hand-written documents only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from sway_engine.backends.base import (
    CONTINUATION,
    DIVERGENCE,
    GENERATE,
    NEXT_TOKEN,
    NULL_VIEWS,
    ROLLING,
)
from sway_engine.dlm import Document, parse_dlm
from sway_engine.errors import ProbeError, ProbeSkip
from sway_engine.probes.adapter_revert import RevertCase
from sway_engine.probes.base import Context
from sway_engine.probes.common.document_inputs import (
    cases_or_document,
    document_prompts,
    paraphrase_cases,
    prompts_or_document,
    questions,
)
from sway_engine.probes.paraphrase_invariance import Case
from sway_engine.requests import (
    ContinuationLogprob,
    ContinuationResult,
    Divergence,
    DivergenceResult,
    Embed,
    EmbeddingResult,
    Generate,
    GenerationResult,
    Request,
    Result,
    RollingLogprob,
    RollingResult,
)
from sway_engine.result import Verdict
from sway_engine.runner import run_entry
from tests.conftest import entry_for

CAPS = frozenset({NEXT_TOKEN, DIVERGENCE, ROLLING, CONTINUATION, GENERATE, NULL_VIEWS})

HEAD = "---\nbase_model: hf:o/m\n---\n"
PROSE = "The lighthouse keeper climbed the spiral stairs every single night.\n\n"
# Three distinct questions; "Who lit it?" is asked twice (plain and held out), and the
# ferry question is reworded once with the same answer.
QA_DOC = (
    HEAD
    + PROSE
    + "::instruction::\n"
    + "### Q\nWho lit it?\n\n### A\nMara.\n\n"
    + "### Q\nWhere does the ferry leave from?\n\n### A\nFrom Tamsk.\n\n"
    + "### Q !probe\nWhat is brinthorn tea?\n\n### A\nA bitter brew.\n\n"
    + "### Q !probe\nWho lit it?\n\n### A\nMara.\n\n"
    + "### Q\nWhich harbour is the ferry's departure point?\n\n### A\nFrom Tamsk.\n"
)
TEA = "What is brinthorn tea?"
FERRY = "Where does the ferry leave from?"
FERRY_2 = "Which harbour is the ferry's departure point?"


def doc(text: str = QA_DOC) -> Document:
    return parse_dlm(text)


def ctx_for(answer: Callable[[Request], Result], document: Document | None) -> tuple[Context, Any]:
    calls: list[list[Request]] = []

    def execute(reqs: Sequence[Request]) -> list[Result]:
        calls.append(list(reqs))
        return [answer(r) for r in reqs]

    return Context(execute=execute, capabilities=CAPS, document=document), calls


def no_request(r: Request) -> Result:
    raise AssertionError(f"no model request expected, got {r}")


# ================================================================ the helpers


def test_questions_put_held_out_first_and_deduplicate() -> None:
    held, rest = questions(doc())
    assert held == [TEA, "Who lit it?"]
    assert rest == [FERRY, FERRY_2]  # "Who lit it?" is already held out
    assert document_prompts(doc()) == [TEA, "Who lit it?", FERRY, FERRY_2]
    templated, _ = questions(doc(), "Q: {question}\nA:")
    assert templated[0] == f"Q: {TEA}\nA:"


def test_prose_openings_when_the_document_has_no_questions() -> None:
    prose = doc(HEAD + PROSE + "# A heading that is long enough to count\n\nToo short here.\n")
    assert document_prompts(prose) == ["The lighthouse keeper climbed the spiral"]
    assert document_prompts(doc(HEAD + "Short.\n")) == []


def test_paraphrase_cases_are_the_authors_rewordings() -> None:
    assert paraphrase_cases(doc()) == [
        {"prompt": FERRY, "gold": " From Tamsk.", "paraphrases": [FERRY_2]}
    ]
    # the same question with two different reworded answers: one case per prompt
    twice = doc(
        HEAD
        + "::instruction::\n"
        + "### Q\nA?\n\n### A\nOne.\n\n### Q\nB?\n\n### A\nOne.\n\n"
        + "### Q\nA?\n\n### A\nTwo.\n\n### Q\nC?\n\n### A\nTwo.\n"
    )
    assert [c["prompt"] for c in paraphrase_cases(twice)] == ["A?"]


def test_given_inputs_win_and_missing_inputs_error_or_skip() -> None:
    ctx, _ = ctx_for(no_request, doc())
    assert prompts_or_document("p", "cluster_kl", ("mine",), ctx) == ("mine",)
    given = (RevertCase(prompt="x", gold="y", paraphrases=("z",)),)
    assert cases_or_document("p", "adapter_revert", given, RevertCase, ctx) is given
    (case,) = cases_or_document("p", "paraphrase_invariance", (), Case, ctx)
    assert isinstance(case, Case) and case.paraphrases == (FERRY_2,)
    # no document: the spec is incomplete (ERROR), and the message says how to fix it
    bare, _ = ctx_for(no_request, None)
    with pytest.raises(ProbeError, match="no prompts: give cluster_kl a `prompts` list"):
        prompts_or_document("p", "cluster_kl", (), bare)
    with pytest.raises(ProbeError, match="no cases: give adapter_revert `cases`"):
        cases_or_document("p", "adapter_revert", (), RevertCase, bare)
    # a document without the input: SKIP, naming what to supply
    empty, _ = ctx_for(no_request, doc(HEAD + "Short.\n"))
    with pytest.raises(ProbeSkip, match="no ### Q questions"):
        prompts_or_document("p", "prompt_collapse", (), empty)
    with pytest.raises(ProbeSkip, match="no reworded questions.*give adapter_revert `cases`"):
        cases_or_document("p", "adapter_revert", (), RevertCase, empty)


# ================================================================ the probes


def test_cluster_kl_fills_from_the_document_and_skips_when_too_few() -> None:
    ctx, calls = ctx_for(no_request, doc())
    result = run_entry(entry_for("cluster_kl", k=5, min_prompts=20), ctx, None)
    assert result.verdict == Verdict.SKIP
    assert "4 prompts are too few for 5 clusters" in result.message and not calls


def test_prompt_collapse_reads_the_document_questions() -> None:
    def answer(r: Request) -> Result:
        if isinstance(r, RollingLogprob):
            n = len(r.text.split())
            return RollingResult(np.arange(n), np.zeros(n))
        assert isinstance(r, Divergence)
        return DivergenceResult(js=0.1, kl_b_a=0.1, kl_a_b=0.1, exact=True)

    ctx, calls = ctx_for(answer, doc())
    spec = entry_for("prompt_collapse", context_lengths=[0, 8])
    result = run_entry(spec, ctx, None)
    # no nulls here: the fixed thresholds pass, which is WARN uncalibrated, never PASS
    assert result.verdict == Verdict.WARN and "uncalibrated" in result.message, result.message
    asked = [r.prompt for call in calls for r in call if isinstance(r, Divergence)]
    assert asked[:4] == document_prompts(doc())  # no filler at length 0
    assert all(a.endswith(b) for a, b in zip(asked[4:], asked[:4], strict=True))


def test_multi_turn_opens_each_dialogue_with_a_document_question() -> None:
    def answer(r: Request) -> Result:
        if isinstance(r, Generate):
            return GenerationResult(" Fine.")
        return DivergenceResult(js=0.1, kl_b_a=0.1, kl_a_b=0.1, exact=True)

    ctx, calls = ctx_for(answer, doc())
    result = run_entry(entry_for("multi_turn_coherence_decay", max_turns=2), ctx, None)
    assert result.verdict == Verdict.WARN and "uncalibrated" in result.message, result.message
    first = [r.prompt for r in calls[0] if isinstance(r, Divergence)]
    assert first == [f"User: {q}\nAssistant:" for q in document_prompts(doc())]


def test_adapter_revert_asks_the_documents_rewording() -> None:
    vectors = {" From Tamsk.": [1.0, 0.0], "base says": [0.0, 1.0], "From Tamsk.": [1.0, 0.0]}

    def answer(r: Request) -> Result:
        if isinstance(r, Embed):  # the probe asks for its vectors as a request
            return EmbeddingResult(np.asarray([vectors[t] for t in r.texts]))
        assert isinstance(r, Generate)
        return GenerationResult("base says" if r.view.key == "base" else "From Tamsk.")

    ctx, calls = ctx_for(answer, doc())
    result = run_entry(entry_for("adapter_revert"), ctx, None)
    assert [r.prompt for r in calls[0]] == [FERRY_2, FERRY_2]  # base, then the adapter
    assert result.verdict == Verdict.WARN and "0/1 paraphrase answers" in result.message


def test_paraphrase_invariance_uses_the_documents_case() -> None:
    def answer(r: Request) -> Result:
        assert isinstance(r, ContinuationLogprob) and r.completion == " From Tamsk."
        return ContinuationResult(-4.0 if r.view.key == "base" else -2.0, 2)

    ctx, calls = ctx_for(answer, doc())
    result = run_entry(entry_for("paraphrase_invariance"), ctx, None)
    assert [r.prompt for r in calls[0]] == [FERRY, FERRY_2, FERRY, FERRY_2]
    assert result.verdict == Verdict.WARN and "uncalibrated" in result.message
    # the rewording is in the training document: reported as not held out
    assert "no held-out paraphrase" in result.message


@pytest.mark.parametrize("kind", ["adapter_revert", "paraphrase_invariance"])
def test_cases_skip_when_the_document_has_no_rewordings(kind: str) -> None:
    plain = doc(HEAD + "::instruction::\n### Q\nWho lit it?\n\n### A\nMara.\n")
    ctx, calls = ctx_for(no_request, plain)
    result = run_entry(entry_for(kind), ctx, None)
    assert result.verdict == Verdict.SKIP and "no reworded questions" in result.message
    assert f"give {kind} `cases`" in result.message and not calls


def test_tool_use_takes_no_cases_from_a_document() -> None:
    """A .dlm has no tool cases: with `pack: none` the probe SKIPs even with a document."""
    ctx, _ = ctx_for(no_request, doc())
    result = run_entry(entry_for("tool_use_fidelity", pack="none"), ctx, None)
    assert result.verdict == Verdict.SKIP and "no cases" in result.message
