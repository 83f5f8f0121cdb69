"""Prompts and the context window (docs/PROBES.md "Prompt length"): a prompt that does not fit
keeps its last tokens, on hf and mlx alike, for scoring and generation; every cut reaches the
probe's evidence; empty prompts are refused in the spec and by the backends."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sway_engine.backends.hf import HFBackend
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.backends.mlx import MLXBackend
from sway_engine.backends.rows import plan, token_ids
from sway_engine.errors import BackendError, SpecError
from sway_engine.fixtures import FixturePaths
from sway_engine.requests import (
    ContinuationLogprob,
    Divergence,
    Generate,
    NextToken,
    Request,
    Result,
)
from sway_engine.runner import evaluate
from sway_engine.suite import load_spec
from sway_engine.views import BASE, FINETUNED

QUESTION = "Q: Where is the island of Quellmoor?\nA:"
# About 3.5 windows of the fixture's 256 positions: far from any boundary.
LONG = " ".join(["the lamp keeper walked along the shore"] * 100) + "\n" + QUESTION
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def hf(fx: FixturePaths) -> HFBackend:
    return HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))


@pytest.fixture(scope="module")
def mlx(fx: FixturePaths, tmp_path_factory: pytest.TempPathFactory) -> MLXBackend:
    cache = tmp_path_factory.mktemp("mlx-adapters")
    return MLXBackend(str(fx.base), str(fx.adapters["doc-strong"]), cache_dir=cache)


def ask(backend: HFBackend | MLXBackend, requests: list[Request]) -> list[Any]:
    """The backend's results (typed loosely: each test knows which kind it asked for)."""
    return list(backend.execute(requests))


def tail_text(backend: Any, prompt: str, keep: int) -> str:
    """The text of the prompt's last `keep` tokens; it must tokenize back to exactly them."""
    ids = token_ids(backend.tokenizer, prompt)
    kept = ids[-keep:]
    text = backend.tokenizer.decode(kept)
    assert token_ids(backend.tokenizer, text) == kept, "the cut must land on a token boundary"
    return text


def scoring_requests(prompt: str) -> list[Request]:
    return [
        NextToken(prompt, FINETUNED, 16),
        Divergence(prompt, BASE, FINETUNED),
        ContinuationLogprob(prompt, " Quellmoor lies north", FINETUNED),
    ]


def assert_same_scores(long: list[Any], short: list[Any], tol: float) -> None:
    nxt, div, cont = long
    s_nxt, s_div, s_cont = short
    assert np.array_equal(nxt.token_ids, s_nxt.token_ids)
    assert float(np.abs(nxt.logprobs - s_nxt.logprobs).max()) < tol
    assert abs(div.js - s_div.js) < tol and abs(div.kl_b_a - s_div.kl_b_a) < tol
    assert cont.num_tokens == s_cont.num_tokens
    assert abs(cont.logprob - s_cont.logprob) < tol


# ---- hf ----


def test_a_long_prompt_is_scored_as_its_last_tokens_and_the_cut_is_counted(hf: HFBackend) -> None:
    n = len(token_ids(hf.tokenizer, LONG))
    assert n > 3 * hf.max_len
    completion = len(token_ids(hf.tokenizer, " Quellmoor lies north", special=False))
    long = ask(hf, scoring_requests(LONG))
    nxt, div, cont = long
    # next-token and divergence rows hold the whole window; a continuation leaves it room
    assert nxt.prompt_cut == div.prompt_cut == n - hf.max_len
    assert cont.prompt_cut == n - (hf.max_len - completion)
    kept_next = tail_text(hf, LONG, hf.max_len)
    kept_cont = tail_text(hf, LONG, hf.max_len - completion)
    short = ask(hf, scoring_requests(kept_next)[:2] + scoring_requests(kept_cont)[2:])
    assert all(r.prompt_cut == 0 for r in short)
    assert_same_scores(long, short, 1e-4)


def test_generation_keeps_room_for_new_tokens_inside_the_context(hf: HFBackend) -> None:
    positions: list[int] = []

    def spy(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs.get("position_ids") is not None:
            positions.append(int(kwargs["position_ids"].max()))

    handle = hf._base_model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        (long,) = ask(hf, [Generate(LONG, FINETUNED, NEW_TOKENS)])
    finally:
        handle.remove()
    assert positions and max(positions) < hf.max_len  # never past the model's positions
    n = len(token_ids(hf.tokenizer, LONG))
    assert long.prompt_cut == n - (hf.max_len - NEW_TOKENS)
    (short,) = ask(hf, [Generate(tail_text(hf, LONG, hf.max_len - NEW_TOKENS), FINETUNED, 8)])
    assert long.token_ids == short.token_ids and short.prompt_cut == 0


def test_a_prompt_that_fits_is_not_cut(hf: HFBackend) -> None:
    res = ask(hf, scoring_requests(QUESTION) + [Generate(QUESTION, BASE, NEW_TOKENS)])
    assert [r.prompt_cut for r in res] == [0, 0, 0, 0]


def test_what_cannot_fit_at_all_is_an_error_naming_the_request(hf: HFBackend) -> None:
    huge = " the lamp keeper" * 200
    with pytest.raises(BackendError, match="ContinuationLogprob.*context"):
        ask(hf, [ContinuationLogprob(QUESTION, huge, BASE)])
    with pytest.raises(BackendError, match="Generate.*max_new_tokens"):
        ask(hf, [Generate(QUESTION, BASE, hf.max_len)])


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompts_are_refused_by_the_backends(
    hf: HFBackend, mlx: MLXBackend, prompt: str
) -> None:
    for backend in (hf, mlx):
        for req in [*scoring_requests(prompt), Generate(prompt, BASE, 4)]:
            with pytest.raises(BackendError, match=f"{type(req).__name__}.*empty prompt"):
                ask(backend, [req])


def test_the_runner_refuses_empty_prompts_whatever_the_backend() -> None:
    class Remote:  # any backend the runner wraps (api, custom): it must never be asked
        kind = "remote"
        capabilities = frozenset({"generate"})

        def execute(self, requests: Sequence[Request]) -> list[Result]:
            raise AssertionError("an empty prompt reached the backend")

        def close(self) -> None:
            pass

    with pytest.raises(BackendError, match="Generate.*empty prompt"):
        Instrumented(Remote()).execute([Generate(" ", FINETUNED, 4)])


# ---- mlx: the same policy ----


def test_mlx_cuts_long_prompts_as_hf_does(hf: HFBackend, mlx: MLXBackend) -> None:
    reqs = [*scoring_requests(LONG), Generate(LONG, FINETUNED, NEW_TOKENS)]
    got = ask(mlx, reqs)
    want = ask(hf, reqs)
    assert [r.prompt_cut for r in got] == [r.prompt_cut for r in want]
    assert all(r.prompt_cut > 0 for r in got)
    assert_same_scores(got[:3], want[:3], 1e-4)  # two fp32 implementations (test_mlx_backend)
    kept = tail_text(mlx, LONG, mlx.max_len - NEW_TOKENS)
    (short,) = ask(mlx, [Generate(kept, FINETUNED, NEW_TOKENS)])
    assert got[3].token_ids == short.token_ids


def test_mlx_refuses_what_cannot_fit_at_all(mlx: MLXBackend) -> None:
    with pytest.raises(BackendError, match="ContinuationLogprob.*context"):
        ask(mlx, [ContinuationLogprob(QUESTION, " the lamp keeper" * 200, BASE)])
    with pytest.raises(BackendError, match="Generate.*max_new_tokens"):
        ask(mlx, [Generate(QUESTION, BASE, mlx.max_len)])


# ---- the policy on any tokenizer: a leading BOS stays ----


class _BosTokenizer:
    """Character tokenizer that starts every text with BOS (id 1), as Llama's does."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [10 + ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_a_cut_keeps_the_leading_bos_and_the_last_tokens() -> None:
    tok = _BosTokenizer()
    got = plan(NextToken("abcdefghij", BASE), tok, 4, lambda _v: "base")
    (row,) = got.rows
    assert row.ids == (1, 10 + ord("h"), 10 + ord("i"), 10 + ord("j"))
    assert got.cut == 7  # a..g
    cont = plan(ContinuationLogprob("abcdefghij", "xy", BASE), tok, 5, lambda _v: "base")
    assert cont.rows[0].ids == (1, 10 + ord("i"), 10 + ord("j"), 10 + ord("x"), 10 + ord("y"))
    assert cont.cut == 8


# ---- reporting: the count reaches the probe's evidence ----


def test_truncations_reach_the_probe_evidence_and_are_logged(
    fx: FixturePaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    short = ["Q: What is brewed on the island?\nA:", QUESTION]
    spec = {
        "version": 1,
        "models": {
            "base": {"base": str(fx.base)},
            "ft": {"base": str(fx.base), "adapter": str(fx.adapters["doc-strong"])},
        },
        "suite": [
            {"name": "cut", "kind": "delta_kl", "prompts": [LONG, *short]},
            {"name": "fits", "kind": "delta_kl", "prompts": short},
        ],
    }
    path = tmp_path / "sway.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    parsed, entries = load_spec(path)
    with caplog.at_level(logging.WARNING):
        result = evaluate(parsed, entries, spec_path=str(path))
    cut, fits = result.probe("cut"), result.probe("fits")
    assert cut.evidence["prompts_truncated"] == 1, cut
    assert "prompts_truncated" not in fits.evidence
    assert "1 prompt" in cut.message and "context" in cut.message
    assert any("cut" in r.getMessage() and "context" in r.getMessage() for r in caplog.records)


# ---- the spec refuses empty prompts ----


def _suite_file(tmp_path: Path, entry: dict[str, Any]) -> Path:
    data = {
        "version": 1,
        "models": {"base": {"base": "m"}, "ft": {"base": "m", "adapter": "a"}},
        "suite": [{"name": "ok", "kind": "delta_kl", "prompts": ["fine"]}, entry],
    }
    path = tmp_path / "sway.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"name": "d", "kind": "delta_kl", "prompts": ["a prompt", ""]}, "suite[1].prompts[1]"),
        ({"name": "d", "kind": "delta_kl", "prompts": ["  \n "]}, "suite[1].prompts[0]"),
        (
            {
                "name": "p",
                "kind": "paraphrase_invariance",
                "cases": [{"prompt": " ", "gold": " x", "paraphrases": ["y"]}],
            },
            "suite[1].cases[0].prompt",
        ),
        (
            {"name": "c", "kind": "calibration_drift", "items": [["The sky", " is"], ["", " x"]]},
            "suite[1].items",
        ),
    ],
)
def test_an_empty_prompt_in_the_spec_is_refused_naming_entry_and_index(
    tmp_path: Path, entry: dict[str, Any], where: str
) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(_suite_file(tmp_path, entry))
    paths = [p for p, _ in info.value.problems]
    assert where in paths, info.value
    message = dict(info.value.problems)[where]
    assert "empty prompt" in message
