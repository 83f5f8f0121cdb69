"""The API backend: response shapes, capability discovery, faults, secrecy, real mlx-lm servers."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sway_engine import stats
from sway_engine.backends.api import APIBackend, completions_url
from sway_engine.backends.api_shapes import (
    AnswerError,
    Position,
    char_spans,
    parse_positions,
    parse_prompt_logprobs,
    top_dist,
)
from sway_engine.backends.base import CONTINUATION, GENERATE, NEXT_TOKEN, ROLLING
from sway_engine.backends.build import build_backend, build_kind
from sway_engine.backends.http import RETRY_BUDGET, is_loopback
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.backends.two_model import TwoModelBackend
from sway_engine.cli import main
from sway_engine.errors import BackendError
from sway_engine.probes.common.divergence import topk_divergence
from sway_engine.progress import Step
from sway_engine.requests import (
    ContinuationLogprob,
    Divergence,
    Generate,
    NextToken,
    Request,
    RollingLogprob,
    TokenDist,
)
from sway_engine.result import Verdict
from sway_engine.runner import evaluate, run_suite
from sway_engine.spec import ModelSpec
from sway_engine.suite import parse_spec
from sway_engine.views import BASE, FINETUNED, Null
from tests.engine.api_servers import (
    VOCAB,
    FakeServer,
    MlxServer,
    RedirectServer,
    echo_logprob,
    fake_dist,
)

SECRET = "sk-test-Zq8vY3-never-print-me"
PROMPTS = ["Q: one\nA:", "Q: two\nA:", "Q: three\nA:", "Q: four\nA:"]


def fast(url: str, **kw: Any) -> APIBackend:
    return APIBackend(url, "fake", backoff_s=0.01, **kw)


@pytest.fixture
def legacy() -> Iterator[FakeServer]:
    server = FakeServer(dialect="legacy", cap=20)
    yield server
    server.stop()


@pytest.fixture
def mlxlike() -> Iterator[FakeServer]:
    server = FakeServer(dialect="mlx", cap=11)
    yield server
    server.stop()


# ---- response shapes -----------------------------------------------------------------------


def test_legacy_shape_with_text_offsets_and_top_dicts() -> None:
    choice = {
        "logprobs": {
            "tokens": ["Hello", " world", "!"],
            "token_logprobs": [None, -1.5, -0.25],
            "top_logprobs": [None, {" world": -1.5, " there": -2.0}, {"!": -0.25}],
            "text_offset": [0, 5, 11],
        }
    }
    pos = parse_positions(choice)
    assert [p.token for p in pos] == ["Hello", " world", "!"]
    assert [p.logprob for p in pos] == [None, -1.5, -0.25]
    assert [p.offset for p in pos] == [0, 5, 11]
    assert {a.token: a.logprob for a in pos[1].top} == {" world": -1.5, " there": -2.0}
    assert all(a.id is None for a in pos[1].top)


def test_vllm_token_id_spelling_gives_ids() -> None:
    choice = {
        "logprobs": {
            "tokens": ["token_id:17"],
            "token_logprobs": [-0.5],
            "top_logprobs": [{"token_id:17": -0.5, "token_id:4": -1.25}],
        }
    }
    (pos,) = parse_positions(choice)
    assert pos.id == 17 and sorted(a.id for a in pos.top if a.id is not None) == [4, 17]
    dist = top_dist(pos, 5)
    assert dist.token_ids.tolist() == [17, 4] and dist.tokens == ()


def test_old_mlx_shape_keys_top_dicts_by_token_id() -> None:
    choice = {
        "logprobs": {
            "tokens": [904],
            "token_logprobs": [-0.1],
            "top_logprobs": [{"904": -0.1, "12": -2.5}],
        }
    }
    (pos,) = parse_positions(choice)
    dist = top_dist(pos, 2)
    assert dist.token_ids.tolist() == [904, 12]
    assert dist.tail_mass == pytest.approx(1 - math.exp(-0.1) - math.exp(-2.5))


def test_mlx_content_shape_is_sorted_by_probability() -> None:
    # mlx-lm 0.32 lists top entries in argpartition order, not sorted.
    choice = {
        "logprobs": {
            "content": [
                {
                    "id": 904,
                    "token": "ĠIce",
                    "logprob": -2.57,
                    "top_logprobs": [
                        {"id": 904, "token": "ĠIce", "logprob": -2.57},
                        {"id": 297, "token": "ĠThe", "logprob": -1.01},
                        {"id": 525, "token": "ĠWhen", "logprob": -2.33},
                    ],
                }
            ]
        }
    }
    (pos,) = parse_positions(choice)
    dist = top_dist(pos, 3)
    assert dist.token_ids.tolist() == [297, 525, 904]
    assert dist.logprobs.tolist() == [-1.01, -2.33, -2.57]


def test_bare_number_list_and_missing_logprobs() -> None:
    assert [p.logprob for p in parse_positions({"logprobs": [-0.5, None, -1.0]})] == [
        -0.5,
        None,
        -1.0,
    ]
    assert parse_positions({"text": "hi"}) == []
    with pytest.raises(AnswerError, match="none of the known keys"):
        parse_positions({"logprobs": {"weird": 1}})
    with pytest.raises(AnswerError, match="2 tokens but 1 token_logprobs"):
        parse_positions({"logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0]}})


def test_vllm_prompt_logprobs_with_and_without_token_ids() -> None:
    alone = {
        "prompt_logprobs": [
            None,
            {"42": {"logprob": -3.0, "rank": 7, "decoded_token": " cat"}},
            {"9": {"logprob": -0.5, "rank": 1, "decoded_token": " sat"}},
        ]
    }
    pos = parse_prompt_logprobs(alone)
    assert pos is not None
    assert [(p.id, p.logprob, p.token) for p in pos[1:]] == [(42, -3.0, " cat"), (9, -0.5, " sat")]
    ambiguous = {"prompt_logprobs": [None, {"1": {"logprob": -1.0}, "2": {"logprob": -2.0}}]}
    assert parse_prompt_logprobs(ambiguous) is None
    named = dict(ambiguous, prompt_token_ids=[5, 2])
    pos = parse_prompt_logprobs(named)
    assert pos is not None and (pos[1].id, pos[1].logprob) == (2, -2.0)


def test_top_dist_rejects_values_that_are_not_log_probs() -> None:
    with pytest.raises(AnswerError, match="not valid log-probabilities"):
        top_dist(Position("", None, None, top=(_alt("a", 0.7),)), 3)
    with pytest.raises(AnswerError, match="no top log-probs"):
        top_dist(Position("", None, -1.0), 3)


def _alt(tok: str, lp: float) -> Any:
    from sway_engine.backends.api_shapes import Alt

    return Alt(tok, None, lp)


def test_topk_divergence_aligns_by_identity_never_by_rank() -> None:
    # Same two tokens, swapped ranks: rank alignment would report JS 0.
    a = TokenDist(np.array([7, 3]), np.log([0.6, 0.3]), 0, 0.1)
    b = TokenDist(np.array([3, 7]), np.log([0.6, 0.3]), 0, 0.1)
    p = np.array([0.6, 0.3]) / 0.9  # over (7, 3): no unlisted entry takes the tail
    q = np.array([0.3, 0.6]) / 0.9
    m = (p + q) / 2
    want = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert topk_divergence(a, b, "js") == pytest.approx(want, rel=1e-12)
    assert want > 0.05
    by_text = (
        TokenDist(np.array([-1, -1]), np.log([0.6, 0.3]), 0, 0.1, (" x", " y")),
        TokenDist(np.array([-1, -1]), np.log([0.6, 0.3]), 0, 0.1, (" y", " x")),
    )
    assert topk_divergence(*by_text, "js") == pytest.approx(want, rel=1e-12)


def test_char_spans_from_offsets_tokens_and_a_leading_bos() -> None:
    with_offsets = [Position("Q:", None, None, 0), Position(" yes", None, -1.0, 2)]
    assert char_spans(with_offsets, "Q: yes") == [(0, 2), (2, 6)]
    walked = [Position("Q", None, None), Position(": y", None, -1.0), Position("es", None, -1.0)]
    assert char_spans(walked, "Q: yes") == [(0, 1), (1, 4), (4, 6)]
    bos = [Position("<s>", 1, None), Position("Q:", None, -2.0), Position(" yes", None, -1.0)]
    assert char_spans(bos, "Q: yes") == [(0, 0), (0, 2), (2, 6)]
    with pytest.raises(AnswerError, match="do not spell the text"):
        char_spans([Position("Q", None, None)], "Q: yes")


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/completions"),
        ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1/completions"),
        ("https://api.example.com/v1/completions", "https://api.example.com/v1/completions"),
    ],
)
def test_completions_url(endpoint: str, url: str) -> None:
    assert completions_url(endpoint) == url


def test_bad_endpoints_are_rejected_with_advice() -> None:
    with pytest.raises(BackendError, match="not an http"):
        completions_url("127.0.0.1:8080")
    with pytest.raises(BackendError, match="must not embed credentials"):
        completions_url("http://user:pw@host:1")


# ---- discovery and answers against the scripted fake ----------------------------------------


def test_legacy_endpoint_discovery_top_k_cap_echo_and_seed(legacy: FakeServer) -> None:
    api = fast(legacy.url)
    assert api.capabilities == {NEXT_TOKEN, ROLLING, CONTINUATION, GENERATE}
    assert api.features | {"url": ""} == {
        "url": "",
        "model": "fake",
        "top_logprobs_style": "legacy",
        "top_k_cap": 20,
        "echo": "echo",
        "seed": True,
    }
    assert api.unsupported == {}


def test_mlx_dialect_discovery_has_no_echo_and_cap_11(mlxlike: FakeServer) -> None:
    api = fast(mlxlike.url)
    assert api.capabilities == {NEXT_TOKEN, GENERATE}
    assert (api.top_style, api.top_k_cap, api.echo_style) == ("chat", 11, None)
    assert "echo" in api.unsupported[ROLLING]
    with pytest.raises(BackendError, match="does not echo"):
        api.execute([RollingLogprob("a b c", BASE)])


def test_next_token_is_the_servers_top_k_capped(legacy: FakeServer, mlxlike: FakeServer) -> None:
    prompt = "Q: where\nA:"
    want = fake_dist(prompt, 0.0)
    order = np.argsort(-want)
    (by_text,) = fast(legacy.url).execute([NextToken(prompt, FINETUNED, 256)])
    assert isinstance(by_text, TokenDist)
    assert by_text.tokens == tuple(VOCAB[i] for i in order[:20])
    assert np.allclose(by_text.logprobs, want[order[:20]])
    assert by_text.tail_mass == pytest.approx(1 - np.exp(want[order[:20]]).sum())
    (by_id,) = fast(mlxlike.url).execute([NextToken(prompt, BASE, 5)])
    assert isinstance(by_id, TokenDist)
    assert by_id.token_ids.tolist() == order[:5].tolist() and by_id.tokens == ()


def test_rolling_and_continuation_from_the_echo(legacy: FakeServer) -> None:
    api = fast(legacy.url)
    rolling, cont, gen = api.execute(
        [
            RollingLogprob("a b c d", BASE),
            ContinuationLogprob("Q:", " yes no", FINETUNED),
            Generate("hi", BASE, 2),
        ]
    )
    assert rolling.logprobs.tolist() == pytest.approx([echo_logprob(i, 0) for i in (1, 2, 3)])
    assert rolling.token_ids.tolist() == [-1, -1, -1, -1]  # ids unknown: never invented
    # "Q: yes no" -> ["Q:", " yes", " no"]: the completion is tokens 1 and 2.
    assert (cont.logprob, cont.num_tokens) == (pytest.approx(-0.2 - 0.3), 2)
    assert gen.text == VOCAB[int(np.argmax(fake_dist("hi", 0)))] * 2


def test_views_the_served_model_cannot_give_are_rejected(legacy: FakeServer) -> None:
    api = fast(legacy.url)
    with pytest.raises(BackendError, match="null_matched_1_r1.0 needs the adapter weights"):
        api.execute([NextToken("x", Null(1), 5)])
    with pytest.raises(BackendError, match="cannot answer Divergence"):
        api.execute([Divergence("x", BASE, FINETUNED)])


def test_503_twice_then_200_succeeds(legacy: FakeServer) -> None:
    api = fast(legacy.url, max_retries=3)
    legacy.fail_next = 2
    (dist,) = api.execute([NextToken("Q: x\nA:", BASE, 4)])
    assert isinstance(dist, TokenDist) and len(dist.logprobs) == 4
    assert api.counters()["http_retries"] == 2


def test_persistent_5xx_fails_naming_the_url(legacy: FakeServer) -> None:
    api = fast(legacy.url, max_retries=2)
    legacy.fail_next = 10
    with pytest.raises(BackendError) as err:
        api.execute([NextToken("Q: x\nA:", BASE, 4)])
    assert legacy.url + "/v1/completions" in str(err.value)
    assert "3 attempt(s)" in str(err.value) and "HTTP 503" in str(err.value)


def test_4xx_is_not_retried(legacy: FakeServer) -> None:
    api = fast(legacy.url)
    before = len(legacy.seen)
    legacy.fail_next, legacy.fail_status = 1, 422
    with pytest.raises(BackendError, match="HTTP 422"):
        api.execute([Generate("x", BASE, 1)])
    assert len(legacy.seen) - before == 1


def test_timeout_is_retried_then_reported(legacy: FakeServer) -> None:
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        with pytest.raises(BackendError) as err:
            APIBackend(url, "fake", timeout_s=0.2, max_retries=1, backoff_s=0.01)
        assert time.perf_counter() - start < 5
    assert url in str(err.value) and "2 attempt(s)" in str(err.value)


def _eventually(check: Any, within_s: float = 3.0) -> bool:
    end = time.monotonic() + within_s
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("stall", ["headers", "body"])
def test_a_dribbling_server_is_cut_off_at_the_deadline_within_the_retry_budget(
    stall: str,
) -> None:
    """One byte every 0.1 s: each read succeeds, so only a deadline on the whole exchange
    stops it; five retries of 1 s would take 6 s, the budget allows 2 x timeout_s."""
    server = FakeServer()
    try:
        api = fast(server.url, timeout_s=1.0, max_retries=5)
        server.stall, server.stall_s = stall, 0.1  # a ~400-byte answer would take 40 s
        start = time.perf_counter()
        with pytest.raises(BackendError) as err:
            api.execute([NextToken("Q: x\nA:", BASE, 4)])
        elapsed = time.perf_counter() - start
        budget = RETRY_BUDGET * api.timeout_s
        assert api.timeout_s <= elapsed < budget + 1.5  # 1.5 s of slack for a busy machine
        assert len(server.stalled) >= 2  # it was retried, and the retry was cut short too
        msg = str(err.value)
        assert server.url + "/v1/completions" in msg and "deadline" in msg
        assert "timeout_s = 1 s" in msg and "raise timeout_s" in msg
        # every dribbled answer ended because the backend hung up, not because the server stopped
        assert _eventually(lambda: len(server.hangups) == len(server.stalled))
    finally:
        server.stop()
    assert _eventually(lambda: not server.thread.is_alive())


def _answer(logprobs: Any = None, **choice: Any) -> bytes:
    return json.dumps({"choices": [{"text": " w1", "logprobs": logprobs, **choice}]}).encode()


LEGACY = {"tokens": [" w1"], "token_logprobs": [-0.5], "top_logprobs": [{" w1": -0.5, " w2": -1.5}]}
NEXT = NextToken("Q: x\nA:", BASE, 4)
ROLL = RollingLogprob("a b", BASE)
GEN = Generate("hi", BASE, 2)
ECHO = {
    "tokens": ["a", " b", " w1"],
    "token_logprobs": [None, -0.2, -0.5],
    "text_offset": [0, 1, 3],
}
GARBAGE: dict[str, tuple[bytes, Request, str]] = {
    "token_logprob_is_an_object": (
        _answer({**LEGACY, "token_logprobs": [{}]}),
        NEXT,
        "choices[0].logprobs.token_logprobs[0] is {} (expected a number)",
    ),
    "body_is_a_list": (b'[{"choices": []}]', NEXT, 'the answer is [{"choices": []}] (expected'),
    "no_choices": (b'{"object": "text_completion"}', NEXT, "choices is missing"),
    "error_sent_with_200": (
        b'{"error": {"message": "model fake is loading"}}',
        NEXT,
        "the server said: model fake is loading",
    ),
    "empty_choices": (b'{"choices": []}', GEN, "choices is [] (expected a non-empty list)"),
    "choice_is_a_number": (b'{"choices": [5]}', GEN, "choices[0] is 5 (expected an object)"),
    "logprobs_null": (_answer(None), NEXT, "choices[0].logprobs is null (expected the log-probs"),
    "not_json": (b"<html>502 Bad Gateway</html>", NEXT, "the answer is not valid JSON"),
    "truncated_json": (_answer(LEGACY)[:40], NEXT, "the answer is not valid JSON"),
    "nested_too_deep": (b"[" * 100_000, NEXT, "the answer is nested too deeply"),
    "not_utf8": (b'{"choices": "\xff\xfe"}', NEXT, "the answer is not UTF-8"),
    "integer_too_long": (b'{"choices": [' + b"1" * 5000 + b"]}", NEXT, "is not usable JSON"),
    "text_is_a_number": (
        b'{"choices": [{"text": 7}]}',
        GEN,
        "choices[0].text is 7 (expected a string)",
    ),
    "logprobs_is_a_number": (
        _answer(3),
        NEXT,
        "choices[0].logprobs is 3 (expected an object or a list)",
    ),
    "tokens_is_a_string": (
        _answer({**LEGACY, "tokens": " w1"}),
        NEXT,
        'choices[0].logprobs.tokens is " w1" (expected a list)',
    ),
    "token_is_a_number": (
        _answer({**LEGACY, "tokens": [1.5]}),
        NEXT,
        "choices[0].logprobs.tokens[0] is 1.5 (expected a string or a token id)",
    ),
    "top_is_a_number": (
        _answer({**LEGACY, "top_logprobs": [3]}),
        NEXT,
        "choices[0].logprobs.top_logprobs[0] is 3 (expected an object or a list)",
    ),
    "top_value_is_a_string": (
        _answer({**LEGACY, "top_logprobs": [{" w1": "-0.5"}]}),
        NEXT,
        'choices[0].logprobs.top_logprobs[0][" w1"] is "-0.5" (expected a number)',
    ),
    "nan_logprob": (
        _answer({**LEGACY, "token_logprobs": [math.nan]}),
        NEXT,
        "choices[0].logprobs.token_logprobs[0] is NaN (expected a finite number)",
    ),
    "infinite_top_logprob": (
        _answer({**LEGACY, "top_logprobs": [{" w1": -math.inf}]}),
        NEXT,
        'choices[0].logprobs.top_logprobs[0][" w1"] is -Infinity (expected a finite number)',
    ),
    "huge_integer_logprob": (
        _answer(LEGACY).replace(b"-0.5]", b"-" + b"9" * 400 + b"]"),
        NEXT,
        "choices[0].logprobs.token_logprobs[0] is -999",
    ),
    "positive_top_logprob": (
        _answer({**LEGACY, "top_logprobs": [{" w1": 0.7}]}),
        NEXT,
        "choices[0].logprobs.top_logprobs[0] holds values that are not valid log-probabilities",
    ),
    "chat_top_entry_is_a_string": (
        _answer({"content": [{"token": " w1", "logprob": -0.5, "top_logprobs": ["w1"]}]}),
        NEXT,
        'choices[0].logprobs.content[0].top_logprobs[0] is "w1" (expected an object)',
    ),
    "chat_top_entry_without_logprob": (
        _answer({"content": [{"token": " w1", "logprob": -0.5, "top_logprobs": [{"id": 1}]}]}),
        NEXT,
        "choices[0].logprobs.content[0].top_logprobs[0].logprob is missing",
    ),
    "chat_id_is_a_string": (
        _answer({"content": [{"token": " w1", "id": "x", "logprob": -0.5}]}),
        NEXT,
        'choices[0].logprobs.content[0].id is "x" (expected an integer)',
    ),
    "chat_entry_is_a_list": (
        _answer({"content": [[" w1", -0.5]]}),
        NEXT,
        'choices[0].logprobs.content[0] is [" w1", -0.5] (expected an object)',
    ),
    "id_keyed_top_with_a_word_key": (
        _answer({"tokens": [904], "token_logprobs": [-0.1], "top_logprobs": [{"w1": -0.1}]}),
        NEXT,
        'choices[0].logprobs.top_logprobs[0]["w1"] is not a token id',
    ),
    "echo_offset_is_a_string": (
        _answer({**ECHO, "text_offset": ["0", 1, 3]}),
        ROLL,
        'choices[0].logprobs.text_offset[0] is "0" (expected an integer)',
    ),
    "echo_lengths_disagree": (
        _answer({**ECHO, "token_logprobs": [None, -0.2]}),
        ROLL,
        "choices[0].logprobs has 3 tokens but 2 token_logprobs",
    ),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_a_garbage_answer_is_a_backend_error_naming_what_is_wrong(
    case: str, legacy: FakeServer
) -> None:
    body, request, problem = GARBAGE[case]
    api = fast(legacy.url)  # discovery sees good answers; the garbage comes next
    legacy.raw_next = [body]
    with pytest.raises(BackendError) as err:  # never TypeError, KeyError, ValueError, ...
        api.execute([request])
    msg = str(err.value)
    assert msg.startswith(f"answer from {legacy.url}/v1/completions: "), msg
    assert problem in msg, msg
    assert legacy.raw_next == []  # the garbage was served, and not retried


def test_wrong_key_gives_a_clear_401_without_the_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = FakeServer(key="the-right-key")
    try:
        monkeypatch.setenv("SWAY_API_KEY", SECRET)
        with caplog.at_level(logging.DEBUG), pytest.raises(BackendError) as err:
            fast(server.url)
        msg = str(err.value)
        assert server.url in msg and "HTTP 401" in msg and "SWAY_API_KEY" in msg
        assert "a key was sent" in msg and "Incorrect API key provided" in msg
        assert SECRET not in msg and SECRET not in caplog.text
        assert server.auth_headers[-1] == f"Bearer {SECRET}"  # the server did get it
    finally:
        server.stop()


def test_key_comes_from_env_in_order_and_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(key=SECRET)
    try:
        monkeypatch.delenv("SWAY_API_KEY", raising=False)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        api = fast(server.url)
        assert SECRET not in repr(api) and SECRET not in repr(vars(api))
        assert SECRET not in json.dumps(api.features) and SECRET not in str(api.counters())
        monkeypatch.setenv("SWAY_API_KEY", "sway-key-wins")
        with pytest.raises(BackendError, match="HTTP 401"):
            fast(server.url)
        assert server.auth_headers[-1] == "Bearer sway-key-wins"
    finally:
        server.stop()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_never_carries_the_key_to_another_host(
    status: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """urllib keeps Authorization on a redirect to any host; sway refuses to follow one."""
    other = FakeServer()
    hop = RedirectServer(other.url + "/v1/completions?stolen=" + SECRET, status=status)
    try:
        monkeypatch.setenv("SWAY_API_KEY", SECRET)
        with caplog.at_level(logging.DEBUG), pytest.raises(BackendError) as err:
            fast(hop.url, max_retries=0)
        msg = str(err.value)
        assert f"HTTP {status} redirect" in msg and "final URL" in msg and hop.url in msg
        assert hop.auth_headers == [f"Bearer {SECRET}"]  # the configured endpoint got it
        assert other.auth_headers == [] and other.seen == []  # the other host got nothing
        assert SECRET not in msg and SECRET not in caplog.text
    finally:
        hop.stop()
        other.stop()


def test_a_key_over_plain_http_goes_to_loopback_only_unless_the_spec_opts_in(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("SWAY_API_KEY", raising=False)
    for url in ("http://10.9.8.7:8000", "http://models.example.com/v1", "http://[fd00::1]:80"):
        with pytest.raises(BackendError) as err:  # refused before any connection is made
            fast(url, max_retries=0, timeout_s=0.2)
        msg = str(err.value)
        assert "OPENAI_API_KEY" in msg and "plain http" in msg and "allow_insecure_http" in msg
        assert SECRET not in msg
    with pytest.raises(BackendError) as err:  # opted in: it tries to connect (and fails here)
        fast("http://127.0.0.1:9/v1", max_retries=0, timeout_s=0.2)
    assert "plain http" not in str(err.value)
    with pytest.raises(BackendError) as err:
        fast("http://10.9.8.7:9", max_retries=0, timeout_s=0.2, allow_insecure_http=True)
    # whatever answers (nothing, or a network's interceptor), it was a request, not a refusal
    assert "plain http" not in str(err.value) and "http://10.9.8.7:9/v1" in str(err.value)
    side = ModelSpec(kind="api", base="m", endpoint="http://10.9.8.7:8000")
    with pytest.raises(BackendError, match="allow_insecure_http"):
        build_backend(side, base=side)
    server = FakeServer(key=SECRET)
    try:
        with caplog.at_level(logging.INFO, logger="sway_engine.backends"):
            fast(server.url)
        assert "sending the key from OPENAI_API_KEY" in caplog.text and SECRET not in caplog.text
    finally:
        server.stop()


def test_loopback_hosts() -> None:

    for host in ("localhost", "127.0.0.1", "127.3.4.5", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "localhost.example.com", "0.0.0.0", "example.com", "::ffff:8.8.8.8"):
        assert not is_loopback(host), host


def _fake_spec(tmp_path: Path, base_url: str, ft_url: str) -> Path:
    data = {
        "version": 1,
        "models": {
            "base": {"kind": "api", "base": "fake", "endpoint": base_url},
            "ft": {"kind": "api", "base": "fake", "endpoint": ft_url},
        },
        "defaults": {"differential": False, "top_k": 20},
        "suite": [
            {"name": "null_baseline", "kind": "null_adapter"},
            {"name": "dkl", "kind": "delta_kl", "prompts": PROMPTS, "assert_mean_gte": 0.01},
            {"name": "ablation", "kind": "adapter_ablation", "prompts": PROMPTS},
        ],
    }
    path = tmp_path / "sway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_key_never_reaches_logs_reports_or_the_store(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sway_engine.report.text import to_json, to_markdown
    from sway_engine.store import ResultStore

    base, ft = FakeServer(key=SECRET), FakeServer(key=SECRET, shift=0.5)
    try:
        monkeypatch.setenv("SWAY_API_KEY", SECRET)
        spec_path = _fake_spec(tmp_path, base.url, ft.url)
        out, md = tmp_path / "r.json", tmp_path / "r.md"
        with caplog.at_level(logging.DEBUG):
            code = main(["run", str(spec_path), "--json", str(out), "--markdown", str(md)])
            spec, entries = parse_spec(yaml.safe_load(spec_path.read_text()))
            suite = evaluate(spec, entries)
        assert code == 0
        report = json.loads(out.read_text())
        # two endpoints have no null views: the fixed threshold passes, reported WARN
        assert {p["name"]: p["verdict"] for p in report["probes"]}["dkl"] == "warn"
        db = tmp_path / "sway.duckdb"
        ResultStore(db).write_suite("fake-adapter", suite, True, "run-1")
        printed = capsys.readouterr()
        texts = [
            caplog.text,
            printed.out,
            printed.err,
            out.read_text(),
            md.read_text(),
            to_json(suite),
            to_markdown(suite),
            _all_rows(db),
        ]
        assert all(SECRET not in t for t in texts)
        assert set(base.auth_headers) == {f"Bearer {SECRET}"}  # it was sent every time
    finally:
        base.stop()
        ft.stop()


def _all_rows(db: Path) -> str:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        names = con.execute("select table_name from information_schema.tables").fetchall()
        tables = [t for (t,) in names]
        rows = {t: con.execute(f'select * from "{t}"').fetchall() for t in tables}
    assert rows.get("runs")  # the run row was written
    return repr(rows)


def test_server_killed_mid_run_gives_error_rows_naming_the_url(tmp_path: Path) -> None:
    base, ft = FakeServer(), FakeServer(shift=0.5)
    spec, entries = parse_spec(yaml.safe_load(_fake_spec(tmp_path, base.url, ft.url).read_text()))
    backend = Instrumented(
        TwoModelBackend(fast(base.url, max_retries=1), fast(ft.url, max_retries=1))
    )

    def kill_on_first_probe(step: Step) -> None:
        if step.label.startswith("dkl"):
            ft.stop()

    try:
        result = run_suite(spec, entries, backend, progress=kill_on_first_probe)
    finally:
        base.stop()
    verdicts = {p.name: p.verdict for p in result.probes}
    assert verdicts == {
        "null_baseline": Verdict.SKIP,
        "dkl": Verdict.ERROR,
        "ablation": Verdict.SKIP,
    }
    dkl = result.probe("dkl")
    assert ft.url + "/v1/completions" in dkl.message and "fine-tuned side (api)" in dkl.message
    assert dkl.raw is None and not any(p.verdict == Verdict.PASS for p in result.probes)


def test_api_with_differential_true_is_rejected() -> None:
    model = ModelSpec(kind="api", base="m", endpoint="http://127.0.0.1:9")
    with pytest.raises(BackendError, match="differential: false"):
        build_backend(model)


def test_two_fake_servers_through_the_runner_compose(tmp_path: Path) -> None:
    base, ft = FakeServer(dialect="mlx", cap=11), FakeServer(dialect="mlx", cap=11, shift=0.5)
    try:
        spec, entries = parse_spec(
            yaml.safe_load(_fake_spec(tmp_path, base.url, ft.url).read_text())
        )
        result = evaluate(spec, entries)
    finally:
        base.stop()
        ft.stop()
    assert result.backend_kind == "two_model"
    dkl = result.probe("dkl")
    want = []
    for p in PROMPTS:
        a, b = fake_dist(p, 0.0), fake_dist(p, 0.5)
        ia, ib = np.argsort(-a)[:11], np.argsort(-b)[:11]
        want.append(stats.topk_tail_js(list(ia), a[ia], list(ib), b[ib]))
    assert dkl.raw == pytest.approx(float(np.mean(want)), rel=1e-9)
    assert result.backend_stats["http_requests"] > 0


# ---- real mlx-lm servers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlx_servers(fx, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """`mlx_lm server` for the base and for base + doc-strong (converted to mlx-lm form)."""
    pytest.importorskip("mlx_lm")
    from sway_engine.convert import converted

    root = tmp_path_factory.mktemp("mlx-servers")
    adapter = converted(fx.adapters["doc-strong"], cache_dir=root / "cache").path
    servers = [MlxServer(fx.base).start(root), MlxServer(fx.base, adapter).start(root)]
    try:
        for s in servers:
            s.wait_ready()
        yield {"base": servers[0].url, "ft": servers[1].url}
    finally:
        for s in servers:
            s.stop()


def _server_spec(tmp_path: Path, fx, urls: dict[str, str]) -> Path:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(Path(fx.suite).read_text())
    # mlx-lm serves its --model (and --adapter-path) under the name "default_model".
    data["models"] = {
        side: {"kind": "api", "base": "default_model", "endpoint": urls[side]}
        for side in ("base", "ft")
    }
    data["defaults"] = {**data.get("defaults", {}), "differential": False, "top_k": 11}
    path = tmp_path / "sway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_real_mlx_server_matches_the_hf_backend(fx, mlx_servers: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    from sway_engine.backends.hf import HFBackend

    hf = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]), dtype="fp32")
    base_api = APIBackend(mlx_servers["base"], "default_model")
    ft_api = APIBackend(mlx_servers["ft"], "default_model")
    assert base_api.capabilities == {NEXT_TOKEN, GENERATE} and base_api.top_k_cap == 11
    prompt = "Q: What is brinthorn tea made from?\nA:"
    for api, view in ((base_api, BASE), (ft_api, FINETUNED)):
        (got,) = api.execute([NextToken(prompt, view, 11)])
        (ref,) = hf.execute([NextToken(prompt, view, 11)])
        assert isinstance(got, TokenDist) and isinstance(ref, TokenDist)
        assert got.token_ids.tolist() == ref.token_ids.tolist()
        assert np.allclose(got.logprobs, ref.logprobs, atol=2e-4)
    (gen,) = ft_api.execute([Generate(prompt, FINETUNED, 8)])
    (ref_gen,) = hf.execute([Generate(prompt, FINETUNED, 8)])
    # mlx-lm's detokenizer drops the leading space of a completion; the tokens agree.
    assert gen.text == ref_gen.text.lstrip()


@pytest.mark.slow
def test_delta_kl_through_the_cli_on_two_real_servers(
    fx,
    mlx_servers: dict[str, str],
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    spec_path = _server_spec(tmp_path, fx, mlx_servers)
    out = tmp_path / "result.json"
    assert main(["run", str(spec_path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {p["name"]: p for p in report["probes"]}
    assert rows["null_baseline"]["verdict"] == "skip"  # no null views over HTTP
    assert rows["ablation"]["verdict"] == "skip" and "scaled_views" in rows["ablation"]["message"]
    assert rows["delta_kl_doc"]["verdict"] == "warn"  # uncalibrated: no nulls over HTTP
    # The same top-11 tail approximation on the hf backend gives the same number.
    spec, entries = parse_spec(yaml.safe_load(Path(fx.suite).read_text()))
    spec = spec.model_copy(
        update={
            "defaults": spec.defaults.model_copy(
                update={"divergence_mode": "topk_tail", "top_k": 11}
            )
        }
    )
    hf = evaluate(spec, entries)
    assert rows["delta_kl_doc"]["raw"] == pytest.approx(hf.probe("delta_kl_doc").raw, abs=1e-4)


@pytest.mark.slow
def test_one_dagster_materialization_on_two_real_servers(  # type: ignore[no-untyped-def]
    fx, mlx_servers: dict[str, str], tmp_path: Path, template_db: Path, monkeypatch
) -> None:
    import shutil

    import dagster as dg
    from mlflow import MlflowClient

    from sway_dagster.adapter_store import AdapterStoreResource
    from sway_dagster.definitions import JOB_NAME, build_definitions
    from sway_engine.home import Settings
    from sway_engine.store import ResultStore

    monkeypatch.setenv("SWAY_API_KEY", SECRET)  # mlx-lm ignores it; it must still not leak
    root = tmp_path / "home"
    (root / "adapters").mkdir(parents=True)
    _server_spec(root, fx, mlx_servers)
    shutil.copyfile(template_db, root / "mlflow.db")
    home = Settings.from_env({"SWAY_HOME": str(root)})
    shutil.copytree(fx.adapters["doc-strong"], home.adapters_dir / "doc-strong")
    defs = build_definitions(home)
    (cand,) = AdapterStoreResource(root=str(home.adapters_dir), settle_seconds=0).scan()
    assert cand.key is not None
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("adapters", [cand.key])
        result = defs.resolve_job_def(JOB_NAME).execute_in_process(
            partition_key=cand.key, instance=instance
        )
        assert result.success
        events = [str(e) for e in instance.all_logs(result.run_id)]
    rows = {r["probe"]: r for r in ResultStore(home.database).probe_results(cand.key)}
    assert rows["delta_kl_doc"]["verdict"] == "warn"  # uncalibrated: no nulls over HTTP
    assert rows["null_baseline"]["verdict"] == "skip"
    meta = result.asset_materializations_for_node("sway__delta_kl_doc")[0].metadata
    client = MlflowClient(home.mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sway-sway").experiment_id])
    texts = [*events, str(meta), json.dumps(run.data.params), json.dumps(run.data.tags)]
    assert all(SECRET not in t for t in texts)


def test_dagster_resources_choose_and_compose_api_endpoints(tmp_path: Path) -> None:
    from sway_dagster.resources import ApiModelResource, TwoModelResource, backend_for

    base, ft = FakeServer(), FakeServer(shift=0.5)
    try:
        spec, _ = parse_spec(yaml.safe_load(_fake_spec(tmp_path, base.url, ft.url).read_text()))
        res = backend_for(spec)
        assert isinstance(res, TwoModelResource)
        assert isinstance(res.base, ApiModelResource) and isinstance(res.ft, ApiModelResource)
        assert (res.base.endpoint, res.ft.endpoint, res.model_id()) == (base.url, ft.url, "fake")
        session = res.session("/adapters/a-1")
        assert session.kind == "two_model" and session.capabilities == {
            NEXT_TOKEN,
            ROLLING,
            CONTINUATION,
            GENERATE,
        }
        assert res.session("/adapters/a-1") is session
        a, b = session.execute(
            [NextToken(PROMPTS[0], BASE, 5), NextToken(PROMPTS[0], FINETUNED, 5)]
        )
        assert isinstance(a, TokenDist) and isinstance(b, TokenDist)
        assert a.tokens != b.tokens  # two endpoints, two models
        one = spec.model_copy(
            update={"defaults": spec.defaults.model_copy(update={"differential": True})}
        )
        with pytest.raises(BackendError, match="differential: false"):
            backend_for(one)
    finally:
        base.stop()
        ft.stop()


def test_a_spec_sets_the_api_deadline_and_retries_without_changing_its_hash(
    legacy: FakeServer,
) -> None:
    """timeout_s and max_retries were only reachable from Python and the Dagster resource;
    the error's advice "raise timeout_s in the model settings" now holds for sway.yaml too."""
    from sway_dagster.resources import ApiModelResource, resource_for

    model = ModelSpec(kind="api", base="fake", endpoint=legacy.url, timeout_s=2.5, max_retries=1)
    backend = build_kind(model)
    try:
        assert (backend.timeout_s, backend.max_retries) == (2.5, 1)
    finally:
        backend.close()
    resource = resource_for(model)
    assert isinstance(resource, ApiModelResource)
    assert (resource.timeout_s, resource.max_retries) == (2.5, 1)
    plain = ModelSpec(kind="api", base="fake", endpoint=legacy.url)
    assert plain.model_dump() == model.model_dump()  # how to reach it is not what is measured
    with pytest.raises(ValueError, match="timeout_s"):
        ModelSpec(kind="api", base="fake", endpoint=legacy.url, timeout_s=0)
