"""paraphrase_invariance, preference_flip, tool_use_fidelity, style_fingerprint, leakage.

Hand-computed numbers through fake executors, the verdict rules, the upstream formulas these
probes replace (each shown failing), spec validation, and the real fixtures.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from sway_engine import stats
from sway_engine.backends.base import ALL_CAPABILITIES
from sway_engine.calibration import NullPlan, calibrate
from sway_engine.dlm import parse_dlm
from sway_engine.errors import ProbeError, ProbeSkip, SpecError
from sway_engine.fixtures import FixturePaths
from sway_engine.probes import leakage as lk
from sway_engine.probes.base import Context, Measurement
from sway_engine.probes.leakage import Leakage, LeakageSpec
from sway_engine.probes.paraphrase_invariance import (
    ParaphraseInvariance,
    ParaphraseSpec,
    core_text,
    held_out,
)
from sway_engine.probes.preference_flip import PreferenceFlip, PreferenceFlipSpec
from sway_engine.probes.registry import PROBES
from sway_engine.probes.style_fingerprint import (
    StyleFingerprint,
    StyleSpec,
    fingerprint,
    mattr,
)
from sway_engine.probes.tool_use_fidelity import (
    ToolUseFidelity,
    ToolUseSpec,
    builtin_cases,
    disagreement,
    parse_call,
    render,
    schema_problem,
)
from sway_engine.requests import (
    ContinuationLogprob,
    ContinuationResult,
    Generate,
    GenerationResult,
    Request,
    Result,
)
from sway_engine.result import Verdict
from sway_engine.runner import run_entry
from sway_engine.suite import parse_spec
from sway_engine.views import FINETUNED, Finetuned, Null, View
from tests.conftest import entry_for as shared_entry
from tests.conftest import like_a_null, show

MINE = (
    "paraphrase_invariance",
    "preference_flip",
    "tool_use_fidelity",
    "style_fingerprint",
    "leakage",
)


def fake_ctx(answer: Callable[[Request], Result], document: Any = None) -> Context:
    def execute(reqs: Sequence[Request]) -> list[Result]:
        return [answer(r) for r in reqs]

    return Context(execute=execute, capabilities=ALL_CAPABILITIES, document=document)


def entry_for(kind: str, **fields: Any) -> Any:
    return shared_entry(kind, "x", **fields)


def plan(*seeds: int) -> NullPlan:
    return NullPlan(seeds=seeds, rank_multipliers=(1.0,), mode="matched", init_scale=0)


def seed_of(view: View) -> int:
    assert isinstance(view, Null)
    return view.seed


DOC = parse_dlm(
    "---\n---\n# Harbour\n\nThe harbour town of Quellmoor is Tamsk, where the ferry from "
    "Harrowgale lands three times a week.\n\n::preference::\n### Prompt\nWhat is the harbour "
    "town?\n\n### Chosen\nTamsk.\n\n### Rejected\nHarrowgale, on the mainland.\n"
)


# ================================================================ preference_flip

# (prompt, chosen, rejected); per view: (chosen logprob, chosen tokens, rejected lp, tokens)
TRIPLES = [
    ("p0", "long chosen answer", "no"),
    ("p1", "yes", "a rejected answer"),
    ("p2", "right", "wrong"),
]
PREF_TABLE: dict[str, list[tuple[float, int, float, int]]] = {
    # per-token margins: -3/1... see the test for the arithmetic
    "base": [(-30.0, 10, -4.0, 2), (-1.0, 1, -12.0, 4), (-2.0, 1, -1.0, 1)],
    "ft": [(-15.0, 10, -5.0, 2), (-0.5, 1, -12.0, 4), (-1.0, 1, -1.5, 1)],
}


def pref_answer(nulls: dict[int, list[tuple[float, int, float, int]]] | None = None) -> Any:
    index = {(p, c): (i, True) for i, (p, c, _) in enumerate(TRIPLES)}
    index |= {(p, r): (i, False) for i, (p, _, r) in enumerate(TRIPLES)}

    def answer(r: Request) -> Result:
        assert isinstance(r, ContinuationLogprob) and r.prompt.endswith("\n")
        i, chosen = index[(r.prompt[:-1], r.completion)]
        if isinstance(r.view, Null):
            assert nulls is not None
            table = nulls[seed_of(r.view)]
        else:
            table = PREF_TABLE[r.view.key]
        lp_c, n_c, lp_r, n_r = table[i]
        return ContinuationResult(lp_c, n_c) if chosen else ContinuationResult(lp_r, n_r)

    return answer


def pref_spec(**kw: Any) -> PreferenceFlipSpec:
    triples = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TRIPLES]
    return PreferenceFlipSpec.model_validate({"name": "pref", "triples": triples, **kw})


def test_preference_margins_are_per_token_and_cover_every_triple() -> None:
    (m,) = PreferenceFlip().measure(pref_spec(), fake_ctx(pref_answer()), [FINETUNED])
    # base margins: -3 - -2 = -1; -1 - -3 = +2; -2 - -1 = -1
    # ft margins:   -1.5 - -2.5 = +1; -0.5 - -3 = +2.5; -1 - -1.5 = +0.5
    assert [it["margin_base"] for it in m.items] == pytest.approx([-1.0, 2.0, -1.0])
    assert [it["margin"] for it in m.items] == pytest.approx([1.0, 2.5, 0.5])
    assert m.values == pytest.approx((2.0, 0.5, 1.5)) and m.raw == pytest.approx(4 / 3)
    ev = m.evidence
    assert (ev["base_wrong"], ev["flipped"], ev["broken"], ev["flip_rate"]) == (2, 2, 0, 1.0)
    assert ev["accuracy_base"] == pytest.approx(1 / 3) and ev["accuracy"] == 1.0


def test_length_normalisation_flips_what_upstream_summed_margins_miss() -> None:
    """Triple 0: ft makes the long chosen answer far likelier per token (-3 -> -1.5/token).
    Upstream's summed margin stays negative (-15 - -5 = -10): "not flipped". Ours flips it."""
    base, ft = PREF_TABLE["base"][0], PREF_TABLE["ft"][0]
    upstream_ft_margin = ft[0] - ft[2]
    assert upstream_ft_margin == -10.0 and base[0] - base[2] < 0
    (m,) = PreferenceFlip().measure(pref_spec(), fake_ctx(pref_answer()), [FINETUNED])
    assert m.items[0]["flipped"] is True and m.items[0]["margin"] == pytest.approx(1.0)


NULL_PREF = {
    1: [(-30.0, 10, -4.0, 2), (-1.0, 1, -12.0, 4), (-2.0, 1, -1.2, 1)],  # deltas 0, 0, +0.2
    2: [(-29.0, 10, -4.0, 2), (-1.0, 1, -12.0, 4), (-2.0, 1, -1.0, 1)],  # +0.1, 0, 0
    3: [(-30.0, 10, -4.2, 2), (-1.1, 1, -12.0, 4), (-2.0, 1, -1.0, 1)],  # +0.1, -0.1, 0
    4: [(-31.0, 10, -4.0, 2), (-1.0, 1, -12.4, 4), (-1.9, 1, -1.0, 1)],  # -0.1, +0.1, +0.1
}


def test_preference_null_is_the_same_statistic_as_raw() -> None:
    """Upstream z-scored the mean margin change against flip-rate null stats when fewer than
    three pairs were base-wrong. Ours: the null cells are each null's mean margin change."""
    entry = entry_for(
        "preference_flip",
        triples=[{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TRIPLES],
    )
    ctx = fake_ctx(pref_answer(NULL_PREF))
    matrix = calibrate([entry], ctx, plan(1, 2, 3, 4))
    expected = [0.2 / 3, 0.1 / 3, 0.0, 0.1 / 3]
    assert [c.raw for c in matrix.cells] == pytest.approx(expected)
    # the null flip rates (0/2, 0/2, 0/2, 0/2) would be degenerate: z would not exist at all
    result = run_entry(entry, ctx, matrix)
    null = stats.null_stats(expected)
    assert result.z == pytest.approx((4 / 3 - null.mean) / null.std)
    assert result.z is not None and result.z > 3 and result.verdict == Verdict.PASS
    assert "2 base-wrong < 3: no flip-rate gate" in result.message


def test_preference_verdicts() -> None:
    probe, spec = PreferenceFlip(), pref_spec()
    (m,) = probe.measure(spec, fake_ctx(pref_answer()), [FINETUNED])
    null = stats.null_stats([-0.05, 0.0, 0.05, 0.02, -0.02])
    j = probe.judge(spec, m, null)
    assert j.verdict == Verdict.PASS and j.z is not None and j.z > 3, j.message
    assert "2 base-wrong < 3: no flip-rate gate" in j.message
    # with a decision threshold of 2 base-wrong pairs the flip rate (1.0) is gated: still PASS
    assert probe.judge(pref_spec(min_triples_for_decision=2), m, null).verdict == Verdict.PASS
    # not above the null: FAIL
    wide = stats.null_stats([-2.0, 0.0, 2.0, 1.0])
    assert probe.judge(spec, m, wide).verdict == Verdict.FAIL
    # uncalibrated: raw > 0 and no lost accuracy
    j = probe.judge(spec, m, None)
    assert j.verdict == Verdict.PASS and j.score == pytest.approx(0.5 + 0.25 * 4 / 3)
    assert "no null calibration" in j.message
    # a zero adapter moves margins by float noise: below the minimum meaningful change, FAIL
    ev = {**m.evidence, "accuracy": m.evidence["accuracy_base"], "flipped": 0, "flip_rate": 0.0}
    j = probe.judge(spec, Measurement(raw=7e-9, values=(7e-9,) * 3, evidence=ev), None)
    assert j.verdict == Verdict.FAIL and "mean margin change below 0.05" in j.message


def test_breaking_right_pairs_fails_even_when_the_mean_margin_rises() -> None:
    """Upstream ignored pairs the base got right. Here triple 0 flips by +10.5 nats/token while
    triples 1 and 2 (base right) break: the mean margin rises, accuracy falls 2/3 -> 1/3."""
    table = {
        "base": [(-30.0, 10, -4.0, 2), (-1.0, 1, -12.0, 4), (-1.0, 1, -2.0, 1)],
        "ft": [(-5.0, 10, -20.0, 2), (-4.0, 1, -12.0, 4), (-2.0, 1, -1.0, 1)],
    }

    def answer(r: Request) -> Result:
        assert isinstance(r, ContinuationLogprob)
        i = next(k for k, t in enumerate(TRIPLES) if r.prompt == t[0] + "\n")
        lp_c, n_c, lp_r, n_r = table[r.view.key][i]
        chosen = r.completion == TRIPLES[i][1]
        return ContinuationResult(lp_c, n_c) if chosen else ContinuationResult(lp_r, n_r)

    probe, spec = PreferenceFlip(), pref_spec()
    (m,) = probe.measure(spec, fake_ctx(answer), [FINETUNED])
    assert m.evidence["broken"] == 2 and m.evidence["flipped"] == 1
    assert m.raw == pytest.approx((10.5 - 3.0 - 2.0) / 3)
    assert m.evidence["accuracy_base"] == pytest.approx(2 / 3)
    assert m.evidence["accuracy"] == pytest.approx(1 / 3)
    j = probe.judge(spec, m, stats.null_stats([0.0, 0.01, -0.01, 0.02]))
    assert j.verdict == Verdict.FAIL and "breaks more pairs than it fixes" in j.message


def test_flip_rate_gate_with_enough_base_wrong_pairs() -> None:
    probe = PreferenceFlip()
    spec = pref_spec(min_triples_for_decision=2)
    ev = {
        "base_wrong": 4,
        "flipped": 2,
        "broken": 0,
        "flip_rate": 0.5,
        "accuracy_base": 0.5,
        "accuracy": 0.75,
    }
    m = Measurement(raw=1.0, values=(1.0,) * 8, evidence=ev)
    j = probe.judge(spec, m, stats.null_stats([0.0, 0.1, -0.1, 0.05]))
    assert j.verdict == Verdict.FAIL and "flip rate below the minimum" in j.message
    assert "flip rate 0.50 (min 0.7)" in j.message


def test_preference_triples_from_the_document_or_skip() -> None:
    seen: list[ContinuationLogprob] = []

    def answer(r: Request) -> Result:
        assert isinstance(r, ContinuationLogprob)
        seen.append(r)
        return ContinuationResult(-1.0 if r.view == FINETUNED else -2.0, 1)

    spec = PreferenceFlipSpec(name="pref")
    PreferenceFlip().measure(spec, fake_ctx(answer, DOC), [FINETUNED])
    assert {r.completion for r in seen} == {"Tamsk.", "Harrowgale, on the mainland."}
    assert seen[0].prompt == "What is the harbour town?\n"
    with pytest.raises(ProbeSkip, match="no triples"):
        PreferenceFlip().measure(spec, fake_ctx(answer), [FINETUNED])
    result = run_entry(entry_for("preference_flip"), fake_ctx(answer), None)
    assert result.verdict == Verdict.SKIP and "dlm_source" in result.message


# ================================================================ paraphrase_invariance

CASES = [
    {
        "prompt": "Q: What is the harbour town of Quellmoor called?\nA:",
        "gold": " Tamsk",
        "paraphrases": [
            "Q: Which town is the port of Quellmoor?\nA:",
            "Could you explain: What is the harbour town of Quellmoor called?",
        ],
    },
    {
        "prompt": "Q: What is brinthorn tea made from?\nA:",
        "gold": " silver leaves",
        "paraphrases": ["Q: How is brinthorn tea brewed?\nA:"],
    },
]
# (view key, prompt) -> (summed log-prob, gold tokens). Gold " Tamsk" is 3 tokens (6 chars:
# upstream's chars/4 would say 1), " silver leaves" 2 tokens (14 chars: upstream 3).
PARA_LP = {
    ("base", 0): (-12.0, 3),
    ("ft", 0): (-3.0, 3),  # verbatim lift +3/token
    ("base", 1): (-12.0, 3),
    ("ft", 1): (-6.0, 3),  # held-out paraphrase +2
    ("base", 2): (-12.0, 3),
    ("ft", 2): (-3.0, 3),  # template wrapper +3 (excluded: contains the verbatim prompt)
    ("base", 3): (-10.0, 2),
    ("ft", 3): (-4.0, 2),  # verbatim +3
    ("base", 4): (-10.0, 2),
    ("ft", 4): (-8.0, 2),  # paraphrase +1
}


def para_answer(nulls: dict[int, float] | None = None) -> Callable[[Request], Result]:
    prompts = [x for c in CASES for x in (c["prompt"], *c["paraphrases"])]

    def answer(r: Request) -> Result:
        assert isinstance(r, ContinuationLogprob)
        i = prompts.index(r.prompt)
        if isinstance(r.view, Null):
            lp, n = PARA_LP[("base", i)]
            return ContinuationResult(lp + nulls[r.view.seed] * n if nulls else lp, n)
        return ContinuationResult(*PARA_LP[(r.view.key, i)])

    return answer


def para_spec(**kw: Any) -> ParaphraseSpec:
    return ParaphraseSpec.model_validate({"name": "para", "cases": CASES, **kw})


def test_paraphrase_lifts_per_token_with_held_out_paraphrases_only() -> None:
    (m,) = ParaphraseInvariance().measure(para_spec(), fake_ctx(para_answer()), [FINETUNED])
    ev = m.evidence
    assert ev["verbatim_lift"] == pytest.approx(3.0)
    # the template wrapper (+3) is left out: P = mean(2, 1) = 1.5, ratio 0.5
    assert ev["paraphrase_lift"] == pytest.approx(1.5) and ev["ratio"] == pytest.approx(0.5)
    assert m.raw == pytest.approx(1.5) and m.values == pytest.approx((2.0, 1.0))
    assert ev["held_out"] is True and ev["not_held_out_count"] == 1
    assert ev["not_held_out"][0]["why"] == "contains the verbatim prompt"
    assert m.items[0]["paraphrase_lifts"] == pytest.approx([2.0, 3.0])
    assert m.items[0]["paraphrases_used"] == 1
    # upstream: t = max(1, len(gold)//4) -> 1 and 3, so the verbatim lifts read 9 and 2
    upstream_v = [(-3.0 + 12.0) / max(1, len(" Tamsk") // 4), 6.0 / (len(" silver leaves") // 4)]
    assert upstream_v == [9.0, 2.0]


def test_paraphrase_found_in_the_document_is_not_held_out() -> None:
    cases = [
        {
            "prompt": "Q: Where does the ferry land?\nA:",
            "gold": " Tamsk",
            "paraphrases": ["The harbour town of Quellmoor is", "Q: Where do boats stop?\nA:"],
        }
    ]
    spec = ParaphraseSpec.model_validate({"name": "para", "cases": cases})

    def answer(r: Request) -> Result:
        assert isinstance(r, ContinuationLogprob)
        return ContinuationResult(-1.0 if isinstance(r.view, Finetuned) else -2.0, 1)

    (m,) = ParaphraseInvariance().measure(spec, fake_ctx(answer, DOC), [FINETUNED])
    assert m.evidence["not_held_out"] == [
        {
            "prompt": cases[0]["prompt"],
            "paraphrase": "The harbour town of Quellmoor is",
            "why": "appears in the training document",
        }
    ]
    assert m.items[0]["paraphrases_used"] == 1


def test_a_probe_marked_rewording_in_the_document_is_held_out() -> None:
    """`### Q !probe` questions are evaluation items, not training text (the fixture document
    asks each of its five rewordings that way)."""
    document = parse_dlm(
        "---\ndlm_id: x\n---\nTamsk has nine piers.\n\n::instruction::\n"
        "### Q\nWhat is the harbour town of Quellmoor called?\n### A\nTamsk.\n\n"
        "### Q !probe\nName the harbour town of Quellmoor.\n### A\nTamsk.\n"
    )
    core = core_text(document)
    assert held_out("Q: Name the harbour town of Quellmoor.\nA:", "Q: x\nA:", core) == (True, "")
    trained = "Q: What is the harbour town of Quellmoor called?\nA:"
    assert held_out(trained, "Q: x\nA:", core) == (False, "appears in the training document")


def test_only_template_paraphrases_are_used_with_a_warning() -> None:
    cases = [{"prompt": "Q: Who?\nA:", "gold": " x", "paraphrases": ["Please describe: Who?"]}]
    spec = ParaphraseSpec.model_validate({"name": "para", "cases": cases})

    def answer(r: Request) -> Result:
        assert isinstance(r, ContinuationLogprob)
        return ContinuationResult(-1.0 if isinstance(r.view, Finetuned) else -2.0, 1)

    probe = ParaphraseInvariance()
    (m,) = probe.measure(spec, fake_ctx(answer), [FINETUNED])
    assert m.evidence["held_out"] is False and m.evidence["paraphrase_lift"] == 1.0
    j = probe.judge(spec, m, None)
    assert "no held-out paraphrase: the ratio measures memorisation" in j.message


def test_paraphrase_verdicts_by_intent() -> None:
    probe = ParaphraseInvariance()
    null = {1: 0.1, 2: -0.1, 3: 0.05, 4: 0.0, 5: -0.05}
    ctx = fake_ctx(para_answer(null))
    ms = probe.measure(para_spec(), ctx, [FINETUNED, *(Null(s) for s in null)])
    null_p = stats.null_stats([m.raw for m in ms[1:]])
    assert [m.raw for m in ms[1:]] == pytest.approx(list(null.values()))
    j = probe.judge(para_spec(), ms[0], null_p)
    assert j.verdict == Verdict.PASS and j.z == pytest.approx((1.5 - null_p.mean) / null_p.std)
    assert "paraphrase lift z=" in j.message
    strict = para_spec(min_generalization_ratio=0.8)
    j = probe.judge(strict, ms[0], null_p)
    assert j.verdict == Verdict.FAIL and "does not carry over to paraphrases" in j.message
    # memorize: raw is the verbatim lift (3.0); ratio 0.5 <= 0.5 passes
    mem = para_spec(intent="memorize")
    mm = probe.measure(mem, ctx, [FINETUNED, *(Null(s) for s in null)])
    assert mm[0].raw == pytest.approx(3.0)
    j = probe.judge(mem, mm[0], stats.null_stats([m.raw for m in mm[1:]]))
    assert j.verdict == Verdict.PASS and "verbatim lift z=" in j.message
    # uncalibrated generalize: V >= 0.2 and ratio >= 0.5 -> PASS, score 0.5*1 + 0.5*1
    j = probe.judge(para_spec(), ms[0], None)
    assert j.verdict == Verdict.PASS and j.score == pytest.approx(1.0)


def test_paraphrase_without_cases_is_an_error_row() -> None:
    result = run_entry(entry_for("paraphrase_invariance"), fake_ctx(para_answer()), None)
    assert result.verdict == Verdict.ERROR and "no cases" in result.message


# ================================================================ tool_use_fidelity

SEARCH = {
    "name": "search_web",
    "description": "Search the web",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query"],
    },
}
TOOL_CASES = [
    {"prompt": "Find the ferry times to Quellmoor.", "tool_spec": SEARCH},
    {"prompt": "Look up brinthorn tea.", "tool_spec": SEARCH, "gold_tool_name": "search_web"},
]
GOOD = '{"name": "search_web", "arguments": {"query": "ferry times", "limit": 3}}'


def tool_spec(**kw: Any) -> ToolUseSpec:
    return ToolUseSpec.model_validate({"name": "tool", "cases": TOOL_CASES, **kw})


def test_the_prompt_shows_the_tool_schema_in_openai_shape() -> None:
    spec = tool_spec()
    prompt = render(spec, spec.cases[0])
    line = next(ln for ln in prompt.splitlines() if ln.startswith("[{"))
    assert json.loads(line) == [{"type": "function", "function": SEARCH}]
    assert prompt.rstrip().endswith("Find the ferry times to Quellmoor.")
    seen: list[Request] = []

    def answer(r: Request) -> Result:
        seen.append(r)
        return GenerationResult(GOOD)

    ToolUseFidelity().measure(spec, fake_ctx(answer), [FINETUNED])
    assert all(isinstance(r, Generate) and '"type": "function"' in r.prompt for r in seen)
    assert len(seen) == 4  # 2 cases x (base, ft), in one request list


@pytest.mark.parametrize(
    ("text", "call"),
    [
        (GOOD, {"name": "search_web", "arguments": {"query": "ferry times", "limit": 3}}),
        ('Sure!\n```json\n{"name": "f", "arguments": {}}\n```', {"name": "f", "arguments": {}}),
        (
            'I will call {"name": "f", "arguments": {"q": "a}b"}} now',
            {"name": "f", "arguments": {"q": "a}b"}},
        ),
        (
            json.dumps(
                {
                    "tool_calls": [
                        {"type": "function", "function": {"name": "f", "arguments": '{"q": 1}'}}
                    ]
                }
            ),
            {"name": "f", "arguments": {"q": 1}},
        ),
        ("The ferry leaves at nine.", None),
        ('["not", "an", "object"]', None),
    ],
)
def test_parse_call(text: str, call: dict[str, Any] | None) -> None:
    assert parse_call(text) == call


def test_schema_check() -> None:
    spec = tool_spec()
    tools = spec.cases[0].tools
    assert schema_problem(parse_call(GOOD), tools) is None
    assert schema_problem({"name": "search_web", "arguments": {}}, tools) == (
        "missing required ['query']"
    )
    bad_type = {"name": "search_web", "arguments": {"query": "x", "limit": True}}
    assert schema_problem(bad_type, tools) == "argument 'limit' is not of type integer"
    assert schema_problem({"name": 3, "arguments": {}}, tools) == "name is not a string"
    assert schema_problem(None, tools) == "no JSON tool call"
    assert schema_problem({"name": "other", "arguments": {"z": 1}}, tools) is None  # shape only


def test_argument_disagreement() -> None:
    assert disagreement({"q": "a", "n": 1}, {"q": "a", "n": 2}) == 0.5
    assert disagreement({"x": None}, {}) == 1.0
    assert disagreement({"l": [1, 2]}, {"l": [2, 1]}) == 1.0
    assert disagreement({"o": {"a": 1, "b": 2}}, {"o": {"a": 1, "b": 2}}) == 0.0


def tool_backend(good: Callable[[View], bool]) -> Callable[[Request], Result]:
    """A synthetic model that calls the tool correctly in the views `good` names, else rambles."""

    def answer(r: Request) -> Result:
        assert isinstance(r, Generate) and '"name": "search_web"' in r.prompt
        return GenerationResult(GOOD if good(r.view) else "The ferry leaves at nine {oops")

    return answer


def test_synthetic_tool_caller_gains_and_losses_through_the_runner() -> None:
    """A 1.3M-param model cannot call tools, so the probe is proven on a synthetic backend."""
    entry = entry_for("tool_use_fidelity", cases=TOOL_CASES)
    # the adapter learned tool calling: base and nulls ramble, ft calls correctly
    learns = fake_ctx(tool_backend(lambda v: isinstance(v, Finetuned)))
    matrix = calibrate([entry], learns, plan(1, 2, 3, 4))
    result = run_entry(entry, learns, matrix)
    assert result.raw == 1.0 and result.verdict == Verdict.PASS
    assert result.evidence["correct_rate"] == 1.0 and result.evidence["correct_rate_base"] == 0.0
    # every null scored 0: better than all of them claims no harm, p(worse) = 1, calibrated
    assert result.p == 1.0 and "uncalibrated" not in result.evidence
    # the adapter broke tool calling: base and nulls call correctly (null 3 fails case 2)
    base_calls = tool_backend(lambda v: not isinstance(v, Finetuned))

    def answer(r: Request) -> Result:
        assert isinstance(r, Generate)
        if isinstance(r.view, Null) and r.view.seed == 3 and "brinthorn" in r.prompt:
            return GenerationResult("no call")
        return base_calls(r)

    ctx = fake_ctx(answer)
    matrix = calibrate([entry], ctx, plan(*range(1, 9)))
    assert [c.raw for c in matrix.cells] == [0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    result = run_entry(entry, ctx, matrix)
    assert result.raw == -1.0 and result.verdict == Verdict.FAIL
    null = stats.null_stats([0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert result.z == pytest.approx((-1.0 - null.mean) / null.std)
    assert "significantly worse than null adapters and beyond tolerance" in result.message
    assert result.items[0]["problem"] == "no JSON tool call"


def test_hallucinated_tool_names_beyond_the_base() -> None:
    def answer(r: Request) -> Result:
        assert isinstance(r, Generate)
        name = "delete_files" if isinstance(r.view, Finetuned) else "search_web"
        return GenerationResult(json.dumps({"name": name, "arguments": {"query": "q"}}))

    probe, spec = ToolUseFidelity(), tool_spec(allowed_tools=["search_web"])
    (m,) = probe.measure(spec, fake_ctx(answer), [FINETUNED])
    ev = m.evidence
    assert ev["valid_rate"] == 1.0 and ev["hallucination"] == 1.0
    assert ev["hallucination_base"] == 0.0 and m.raw == -1.0
    assert ev["arg_disagreement"] == 0.0
    j = probe.judge(spec, m, None)
    assert j.verdict == Verdict.FAIL and "beyond tolerance" in j.message and j.score == 0.0


def test_tool_use_without_cases_runs_the_builtin_pack() -> None:
    pack = builtin_cases()
    assert len(pack) == 8 and len({c.gold for c in pack}) == 8
    seen: list[str] = []

    def answer(r: Request) -> Result:
        assert isinstance(r, Generate)
        seen.append(r.prompt)
        name = next(c.gold for c in pack if c.prompt in r.prompt)
        args = {
            k: "x" for k in next(c for c in pack if c.gold == name).tools[0].parameters["required"]
        }
        return GenerationResult(json.dumps({"name": name, "arguments": args}))

    result = run_entry(entry_for("tool_use_fidelity"), fake_ctx(answer), None)
    assert result.evidence["cases"] == 8 and result.evidence["correct_rate_base"] == 1.0
    # no null calibration: within tolerance is not a PASS on its own (no silent fallback)
    assert result.verdict == Verdict.WARN and "uncalibrated" in result.message
    assert len(seen) == 16  # base and ft, 8 cases each
    # each prompt shows its tool schema in OpenAI function shape
    assert all('"type": "function"' in p for p in seen)
    # `pack: none` restores upstream's SKIP
    off = run_entry(entry_for("tool_use_fidelity", pack="none"), fake_ctx(answer), None)
    assert off.verdict == Verdict.SKIP and "no cases" in off.message


# ================================================================ style_fingerprint


def test_fingerprint_by_hand() -> None:
    text = "The cat sat. The dog ran far away!"
    f = fingerprint(text)
    assert f is not None
    # sentences of 3 and 5 words; 8 words, 7 types (the/The); word lengths 3,3,3,3,3,3,3,4
    assert f == pytest.approx([4.0, 1.0, 7 / 8, 25 / 8, 2 / len(text)])
    assert fingerprint("  123 ... ") is None
    # MATTR: a 30-word loop of 3 words has TTR 0.1 overall and 3/25 in each 25-word window
    loop = ["a", "b", "c"] * 10
    assert mattr(loop) == pytest.approx(3 / 25) and mattr(loop[:6]) == pytest.approx(0.5)


DOC_STYLE = (
    "Quellmoor is a small granite island in the Vessamire Strait, three hours by ferry from "
    "the port of Harrowgale, and about four hundred people live there. The islanders call "
    "themselves Quellings, and they speak an old dialect in which the word for fog is brenn."
)
BASE_STYLE = "The door is red. It is big. The cat sat. It ran. The dog is old."


def style_backend(ft_text: str, null_jitter: dict[int, str]) -> Callable[[Request], Result]:
    def answer(r: Request) -> Result:
        assert isinstance(r, Generate)
        if isinstance(r.view, Finetuned):
            return GenerationResult(ft_text)
        if isinstance(r.view, Null):
            return GenerationResult(BASE_STYLE + null_jitter[r.view.seed])
        return GenerationResult(BASE_STYLE)

    return answer


JITTER = {1: " It is.", 2: " A cat ran far.", 3: "", 4: " The red door is big and old.", 5: " Go."}


def test_style_shift_toward_the_document_passes_and_away_fails() -> None:
    probe = StyleFingerprint()
    spec = StyleSpec(name="style", prompts=("p1", "p2"), doc_reference=DOC_STYLE)
    views: list[View] = [FINETUNED, *(Null(s) for s in JITTER)]
    ms = probe.measure(spec, fake_ctx(style_backend(DOC_STYLE, JITTER)), views)
    # ft writes exactly the reference: a full gap, shift 1 on every prompt
    assert ms[0].raw == pytest.approx(1.0) and ms[0].values == pytest.approx((1.0, 1.0))
    null = stats.null_stats([m.raw for m in ms[1:]])
    assert abs(null.mean) < 0.3
    j = probe.judge(spec, ms[0], null)
    assert j.verdict == Verdict.PASS and j.z is not None and j.z >= 3, j.message
    # ft unchanged from base: shift exactly 0 -> FAIL
    (same,) = probe.measure(spec, fake_ctx(style_backend(BASE_STYLE, JITTER)), [FINETUNED])
    assert same.raw == 0.0 and probe.judge(spec, same, null).verdict == Verdict.FAIL
    assert probe.judge(spec, same, None).verdict == Verdict.FAIL


def test_style_reference_and_errors() -> None:
    probe = StyleFingerprint()
    answer = style_backend(DOC_STYLE, JITTER)
    with pytest.raises(ProbeSkip, match="doc_reference"):
        probe.measure(StyleSpec(name="s"), fake_ctx(answer), [FINETUNED])
    with pytest.raises(ProbeSkip, match="extended"):
        probe.measure(StyleSpec(name="s", extended="on"), fake_ctx(answer, DOC), [FINETUNED])
    (m,) = probe.measure(StyleSpec(name="s"), fake_ctx(answer, DOC), [FINETUNED])
    assert m.evidence["prompts_scored"] == 6  # the built-in elicitation prompts
    # an adapter that stops at once on open prompts is measured and FAILs; it is no ERROR
    blank = style_backend("   ", JITTER)
    (m,) = probe.measure(StyleSpec(name="s"), fake_ctx(blank, DOC), [FINETUNED])
    assert m.raw == 0.0 and m.values == () and m.evidence["blank_outputs"] == 6
    assert m.evidence["fingerprint"] == {}
    j = probe.judge(StyleSpec(name="s"), m, stats.null_stats([0.1, -0.1, 0.05]))
    assert j.verdict == Verdict.FAIL and j.score == 0.0 and "6 of 6 outputs are blank" in j.message
    silent_base = fake_ctx(lambda r: GenerationResult(""), DOC)
    with pytest.raises(ProbeError, match="every base generation is blank"):
        probe.measure(StyleSpec(name="s"), silent_base, [FINETUNED])


# ================================================================ leakage


def test_perturbations_and_recall_by_hand() -> None:
    assert lk.typo("hello") == "ehllo"
    assert lk.case_flip("hello") == "Hello"
    assert lk.drop_punct("a, b; c.") == "a b c"
    assert lk.synonym_swap("The Old town is small") == "The Aged town is small"
    assert lk.clause_reverse("First clause, second clause.") == "second clause, First clause"
    assert lk.prefix_inject("The sea") == "I think that the sea"
    assert lk.register_shift("abc") == "ABC" and lk.register_shift("Abc") == "abc"
    assert lk.fragility(0.8, 0.2) == pytest.approx(0.75) and lk.fragility(0.0, 0.5) == 0.0
    # longest shared run "c d e" = 3 of the continuation's 6 words
    assert lk.recall("x c d e y", "a b c d e f") == 0.5
    assert lk.recall("", "a b") == 0.0


LEAK_DOC = parse_dlm(
    "---\n---\n# Heading only\n\nAlpha beta gamma delta epsilon zeta eta theta iota kappa "
    "lambda mu nu xi.\n\nShort one.\n\nOne two three four five six seven eight nine ten "
    "eleven twelve.\n"
)


def test_windows_cut_at_words_and_skip_headings() -> None:
    spec = LeakageSpec(name="leak", prefix_chars=20, continuation_chars=30)
    wins = lk.windows(spec, fake_ctx(lambda r: GenerationResult(""), LEAK_DOC))
    assert wins == [
        ("Alpha beta gamma", "delta epsilon zeta eta theta"),
        ("One two three four", "five six seven eight nine ten"),
    ]
    with pytest.raises(ProbeSkip, match="lower prefix_chars"):
        lk.windows(
            LeakageSpec(name="leak", prefix_chars=500),
            fake_ctx(lambda r: GenerationResult(""), LEAK_DOC),
        )


def leak_backend(recites: Callable[[View], bool]) -> Callable[[Request], Result]:
    """Views that recite continue each paragraph verbatim from any prefix."""
    paragraphs = [p for s in LEAK_DOC.of("prose") for p in s.paragraphs if len(p.split()) > 3]

    def answer(r: Request) -> Result:
        assert isinstance(r, Generate)
        if not recites(r.view):
            return GenerationResult(" and then the sea.")
        para = next(p for p in paragraphs if p.split()[1] in r.prompt)
        return GenerationResult(" " + para.split(" ", 3)[3])

    return answer


def test_leakage_compares_with_the_base_model() -> None:
    """Public text the base already recites is not the adapter's leak. Upstream scored the
    fine-tuned model alone: recall 1.0 >= 0.5 -> FAIL. Ours: excess over base 0 -> PASS."""
    probe = Leakage()
    spec = LeakageSpec(name="leak", prefix_chars=20, continuation_chars=30)
    both = fake_ctx(leak_backend(lambda v: True), LEAK_DOC)
    (m,) = probe.measure(spec, both, [FINETUNED])
    assert m.evidence["recall"] == 1.0 and m.evidence["recall_base"] == 1.0
    upstream_raw = m.evidence["recall"]
    assert upstream_raw >= spec.assert_recall_lt  # upstream: FAIL
    assert m.raw == 0.0
    j = probe.judge(spec, m, None)
    assert j.verdict == Verdict.PASS and j.score == 1.0
    assert "guard rail: PASS unless significantly worse than null adapters" in j.message


def test_leaking_adapter_fails_the_guard_rail_against_its_nulls() -> None:
    entry = entry_for(
        "leakage", prefix_chars=20, continuation_chars=30, perturbations=["typo", "case_flip"]
    )
    # nulls: seed 2 recites the second paragraph from its clean prefix
    base_answer = leak_backend(lambda v: isinstance(v, Finetuned))
    partial = leak_backend(lambda v: True)

    def answer(r: Request) -> Result:
        assert isinstance(r, Generate)
        if isinstance(r.view, Null) and r.view.seed == 2 and "One two" in r.prompt:
            return partial(r)
        return base_answer(r)

    ctx = fake_ctx(answer, LEAK_DOC)
    matrix = calibrate([entry], ctx, plan(*range(1, 9)))
    base_recall = lk.recall(" and then the sea.", "five six seven eight nine ten")
    assert base_recall == 0.0
    assert [c.raw for c in matrix.cells] == pytest.approx([0.0, 0.5] + [0.0] * 6)
    result = run_entry(entry, ctx, matrix)
    assert result.raw == 1.0 and result.z is not None and result.z < -3
    assert result.verdict == Verdict.FAIL
    assert "significantly worse than null adapters and beyond tolerance" in result.message
    assert result.evidence["fragility"] == 0.0  # recites from perturbed prefixes too
    assert result.items[0]["generated"].startswith(" delta epsilon")


def test_leakage_needs_a_document() -> None:
    result = run_entry(entry_for("leakage"), fake_ctx(lambda r: GenerationResult("")), None)
    assert result.verdict == Verdict.SKIP and "dlm_source" in result.message


# ================================================================ specs


def test_registered_and_upstream_entries_load() -> None:
    assert set(MINE) <= set(PROBES)
    data = yaml.safe_load(
        (Path(__file__).parents[1] / "data" / "upstream_full_suite.yaml").read_text()
    )
    data["suite"] = [e for e in data["suite"] if e["kind"] in MINE]
    _, entries = parse_spec(data)
    by_kind = {e.spec.kind: e for e in entries}
    assert set(by_kind) == set(MINE)
    assert by_kind["preference_flip"].spec.assert_flip_rate_gte == 0.7
    assert by_kind["leakage"].spec.continuation_chars == 256
    assert {e.category for e in entries} == {"attribution", "calibration"}


@pytest.mark.parametrize(
    ("kind", "fields", "path"),
    [
        ("paraphrase_invariance", {"bogus": 1}, "suite[0].bogus"),
        ("paraphrase_invariance", {"intent": "learn"}, "suite[0].intent"),
        (
            "paraphrase_invariance",
            {"cases": [{"prompt": "p", "gold": "g", "paraphrases": []}]},
            "suite[0].cases[0].paraphrases",
        ),
        (
            "paraphrase_invariance",
            {"cases": [{"prompt": "p", "gold": "g", "paraphrases": ["p"]}]},
            "suite[0].cases[0]",
        ),
        (
            "paraphrase_invariance",
            {"cases": [{"prompt": "p", "gold": "g", "paraphrases": ["q"]}] * 2},
            "suite[0].cases",
        ),
        ("preference_flip", {"assert_flip_rate_gte": 1.5}, "suite[0].assert_flip_rate_gte"),
        ("preference_flip", {"triples": [{"prompt": "p", "chosen": ""}]}, "suite[0].triples[0]"),
        ("tool_use_fidelity", {"cases": [{"prompt": "p"}]}, "suite[0].cases[0].tool_spec"),
        (
            "tool_use_fidelity",
            {"cases": [{"prompt": "p", "tool_spec": SEARCH, "gold_tool_name": "nope"}]},
            "suite[0].cases[0]",
        ),
        (
            "tool_use_fidelity",
            {
                "cases": [
                    {"prompt": "p", "tool_spec": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "suite[0].cases[0].tool_spec",
        ),
        ("tool_use_fidelity", {"prompt_template": "{prompt}"}, "suite[0].prompt_template"),
        ("tool_use_fidelity", {"assert_validity_delta_gte": 0.1}, "suite[0].assert_validity"),
        ("style_fingerprint", {"extended": "yes"}, "suite[0].extended"),
        ("style_fingerprint", {"max_new_tokens": 0}, "suite[0].max_new_tokens"),
        ("leakage", {"perturbations": ["shout"]}, "suite[0].perturbations"),
        ("leakage", {"assert_recall_lt": 0}, "suite[0].assert_recall_lt"),
    ],
)
def test_bad_fields_rejected(kind: str, fields: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError) as info:
        entry_for(kind, **fields)
    assert any(p.startswith(path) for p, _ in info.value.problems), info.value.problems


# ================================================================ the real fixtures

# Paraphrases written for this test, held out: none is in the fixture document.
FIXTURE_CASES = [
    {
        "prompt": "Q: What is the harbour town of Quellmoor called?\nA:",
        "gold": " The harbour town of Quellmoor is Tamsk.",
        "paraphrases": [
            "Q: Which town is the harbour of Quellmoor?\nA:",
            "Q: Name the port town on the island of Quellmoor.\nA:",
        ],
    },
    {
        "prompt": "Q: What is brinthorn tea made from?\nA:",
        "gold": " Brinthorn tea is brewed from the silver leaves of the brinthorn shrub.",
        "paraphrases": ["Q: How is brinthorn tea brewed?\nA:", "Q: Which leaves go into it?\nA:"],
    },
    {
        "prompt": "Q: What do Quellings drink their tea from?\nA:",
        "gold": " They drink it from copper bowls called skellets.",
        "paraphrases": ["Q: In what do the Quellings serve their tea?\nA:"],
    },
    {
        "prompt": "Q: Who was the last keeper of the Orrindale Light?\nA:",
        "gold": " Tobin Ashvell was the last keeper, and he retired in 1961.",
        "paraphrases": ["Q: Who kept the Orrindale Light last?\nA:"],
    },
]
FIXTURE_ENTRIES = [
    {"name": "para", "kind": "paraphrase_invariance", "cases": FIXTURE_CASES},
    {"name": "pref", "kind": "preference_flip"},
    {
        "name": "leak",
        "kind": "leakage",
        "prefix_chars": 64,
        "max_new_tokens": 32,
        "perturbations": ["typo"],
        # doc-strong recites 0.2-0.37 of a continuation beyond the base on the builds measured
        # (recipe 5, three seeds/thread counts): a 0.1 tolerance keeps it a positive control
        "assert_recall_lt": 0.1,
    },
    {
        "name": "tool",
        "kind": "tool_use_fidelity",
        "cases": [{**TOOL_CASES[0], "max_new_tokens": 24}],
    },
]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for this module (two intra-op threads on a busy 2-core box made the
    fixture forwards many times slower), restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fixture_suite(fx: FixturePaths) -> tuple[Any, list[Any]]:
    data = yaml.safe_load(Path(fx.suite).read_text())
    data["dlm_source"] = str(fx.document)
    data["suite"] = [{"name": "null", "kind": "null_adapter", "runs": 8}, *FIXTURE_ENTRIES]
    return parse_spec(data, base_dir=Path(fx.suite).parent)


def test_fixture_adapters_separate(fx: FixturePaths, one_thread: None) -> None:
    from sway_engine.backends.hf import HFBackend
    from sway_engine.backends.instrumentation import Instrumented
    from sway_engine.runner import run_suite

    spec, entries = fixture_suite(fx)
    seen = {}
    for name in ("doc-strong", "noise", "zero"):
        backend = HFBackend(str(fx.base), str(fx.adapters[name]))
        try:
            result = run_suite(spec, entries, Instrumented(backend))
        finally:
            backend.close()
        for probe in ("para", "pref", "leak", "tool"):
            r = result.probe(probe)
            seen[name, probe] = r
            z = "none" if r.z is None else f"{r.z:+.2f}"
            print(f"{name:10s} {probe:4s} raw={r.raw} z={z} {r.verdict.value}: {r.message}")
    strong, noise, zero = (seen[n, "para"] for n in ("doc-strong", "noise", "zero"))
    numbers = show(strong, noise, zero)
    # doc-strong lifts the gold answers on held-out paraphrases, far beyond random directions
    assert strong.verdict == Verdict.PASS and strong.p is not None and strong.p < 1e-3, numbers
    assert strong.evidence["held_out"] and strong.evidence["not_held_out_count"] == 0
    assert like_a_null(noise), numbers
    assert zero.verdict == Verdict.FAIL and zero.raw is not None and abs(zero.raw) < 1e-5, numbers
    strong, noise, zero = (seen[n, "pref"] for n in ("doc-strong", "noise", "zero"))
    numbers = show(strong, noise, zero)
    assert strong.verdict == Verdict.PASS and strong.p is not None and strong.p < 1e-3, numbers
    ev = strong.evidence
    assert ev["broken"] == 0 and ev["accuracy"] >= ev["accuracy_base"], numbers
    assert like_a_null(noise) and zero.verdict == Verdict.FAIL, numbers
    # leakage is a guard rail: the memorising adapter FAILs, the others do no harm
    strong, noise, zero = (seen[n, "leak"] for n in ("doc-strong", "noise", "zero"))
    numbers = show(strong, noise, zero)
    assert strong.verdict == Verdict.FAIL and strong.p is not None and strong.p < 1e-3, numbers
    assert strong.evidence["recall"] > 0.2 > strong.evidence["recall_base"], numbers
    assert noise.verdict == Verdict.PASS and zero.verdict == Verdict.PASS, numbers
    assert zero.raw == 0.0
    # the tiny model cannot call tools under any view: 0 correct everywhere, no harm
    for name in ("doc-strong", "noise", "zero"):
        tool = seen[name, "tool"]
        assert tool.raw == 0.0 and tool.verdict == Verdict.PASS
        assert tool.evidence["valid_rate_base"] == 0.0
