"""OpenAI-compatible `/v1/completions` backend: one served model, scored through log-probs.

What the endpoint can do is discovered at construction with a few small requests (top-k
size cap, which log-prob request style it takes, prompt echo, seeds); only what works is
declared as a capability, so probes needing the rest SKIP. Responses are parsed by their
shape (OpenAI legacy, vLLM echo / prompt_logprobs, mlx-lm and chat-style `content` lists).
One endpoint serves one model: a differential run composes two (`TwoModelBackend`).
The transport (`backends/http.py`) gives every HTTP attempt a deadline for the whole
exchange and the retries of one request a budget, so a stalled or dribbling server cannot hold
a run; the API key comes from the environment, never appears in a message, log or repr, and is
sent only to the configured endpoint, over https unless it is loopback or the spec opts in
(`allow_insecure_http`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from sway_engine.backends.api_shapes import (
    CHOICE,
    AnswerError,
    Position,
    char_spans,
    completion_text,
    first_choice,
    parse_positions,
    parse_prompt_logprobs,
    require_positions,
    top_dist,
)
from sway_engine.backends.base import CONTINUATION, GENERATE, NEXT_TOKEN, ROLLING
from sway_engine.backends.http import HTTPStatusError, JsonClient
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
    RollingResult,
    TokenDist,
)
from sway_engine.views import Base, Finetuned, View, canonical

log = logging.getLogger(__name__)

PROBE_PROMPT = "The quick brown fox jumps over"
TopStyle = Literal["legacy", "chat"]
EchoStyle = Literal["echo", "prompt_logprobs"]


# ---- the backend -------------------------------------------------------------------------


def completions_url(endpoint: str) -> str:
    """`http://host:port`, `.../v1` or the full `.../v1/completions` -> the completions URL."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BackendError(
            f"api endpoint {endpoint!r} is not an http(s) URL; give e.g. http://127.0.0.1:8080"
        )
    if parts.username or parts.password:
        raise BackendError(
            "api endpoint must not embed credentials; put the key in SWAY_API_KEY instead"
        )
    base = endpoint.strip().rstrip("/")
    if base.endswith("/v1/completions"):
        return base
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


class APIBackend:
    """Scores one served model through an OpenAI-compatible completions endpoint.

    Base and fine-tuned views both name the served model; scaled and null views need the
    weights, so they are rejected. `features` records what discovery found. `timeout_s` bounds
    each HTTP attempt from connect to last byte; one request with its retries ends within
    RETRY_BUDGET (backends/http.py) * timeout_s.
    """

    kind = "api"

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_top_k: int = 256,
        concurrency: int = 4,
        vocab_size: int = 0,
        allow_insecure_http: bool = False,
    ) -> None:
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_top_k < 1:
            raise BackendError(
                "api backend needs timeout_s > 0, max_retries >= 0, backoff_s >= 0, max_top_k >= 1"
            )
        self.url = completions_url(endpoint)
        self.model = model
        self.concurrency = max(1, concurrency)
        self.vocab_size = vocab_size
        self._http = JsonClient(
            self.url,
            api_key=api_key,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            allow_insecure_http=allow_insecure_http,
        )
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.top_style: TopStyle | None = None
        self.top_k_cap = 0
        self.echo_style: EchoStyle | None = None
        self.seeds = False
        self.unsupported: dict[str, str] = {}
        self._discover(max_top_k)
        caps = {GENERATE}
        if self.top_style is not None:
            caps.add(NEXT_TOKEN)
        if self.echo_style is not None:
            caps |= {ROLLING, CONTINUATION}
        self.capabilities = frozenset(caps)
        log.info(
            "api backend %s (model %s): capabilities %s; top-k cap %d; unsupported %s",
            self.url,
            model,
            sorted(self.capabilities),
            self.top_k_cap,
            self.unsupported or "none",
        )

    def __repr__(self) -> str:
        return f"APIBackend(url={self.url!r}, model={self.model!r})"

    @property
    def timeout_s(self) -> float:
        return self._http.timeout_s

    @property
    def max_retries(self) -> int:
        return self._http.max_retries

    @property
    def features(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "top_logprobs_style": self.top_style,
            "top_k_cap": self.top_k_cap,
            "echo": self.echo_style,
            "seed": self.seeds,
        }

    # ---- discovery ----

    def _discover(self, max_top_k: int) -> None:
        """Probe what the endpoint supports; a dead or unauthorised endpoint raises here, and so
        does one whose answers are not JSON objects with choices. Log-probs in a shape that
        cannot be read only mean that request style is unsupported."""
        self._post({"prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0})
        for style in ("legacy", "chat"):
            cap = self._top_k_cap(style, max_top_k)
            if cap:
                self.top_style, self.top_k_cap = style, cap
                break
        if self.top_style is None:
            self.unsupported[NEXT_TOKEN] = "the endpoint returns no top log-probs"
        self.echo_style = self._echo_style()
        if self.echo_style is None:
            why = "the endpoint does not echo prompt log-probs (echo / prompt_logprobs)"
            self.unsupported[ROLLING] = self.unsupported[CONTINUATION] = why
        try:
            self._post({"prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0, "seed": 0})
            self.seeds = True
        except HTTPStatusError:
            self.seeds = False

    def _top_k_cap(self, style: TopStyle, max_top_k: int) -> int:
        """Largest top-k the endpoint answers in `style` (0: none), by bisection on 4xx."""

        def returned(k: int) -> int:
            try:
                body = self._post(self._next_payload(PROBE_PROMPT, k, style))
                positions = parse_positions(self._choice(body))
            except (HTTPStatusError, AnswerError):
                return 0
            return min(k, len(positions[0].top)) if positions else 0

        best = returned(max_top_k)
        if best or max_top_k == 1:
            return best
        best = returned(1)
        lo, hi = 1, max_top_k  # lo answers, hi does not
        while best and hi - lo > 1:
            mid = (lo + hi) // 2
            got = returned(mid)
            if got:
                lo, best = mid, got
            else:
                hi = mid
        return best

    def _echo_style(self) -> EchoStyle | None:
        styles: tuple[EchoStyle, ...] = ("echo", "prompt_logprobs")
        for style in styles:
            try:
                prompt = self._prompt_positions(PROBE_PROMPT, style)
            except (HTTPStatusError, AnswerError):
                continue
            if len(prompt) >= 2 and any(p.logprob is not None for p in prompt):
                return style
        return None

    # ---- request payloads ----

    def _next_payload(self, prompt: str, k: int, style: TopStyle) -> dict[str, Any]:
        payload: dict[str, Any] = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
        if style == "legacy":
            payload["logprobs"] = k
        else:
            payload["logprobs"] = True
            payload["top_logprobs"] = k
        return payload

    def _prompt_positions(self, text: str, style: EchoStyle) -> list[Position]:
        """The positions of `text` itself (its tokens and their log-probs), echoed back."""
        payload: dict[str, Any] = {"prompt": text, "max_tokens": 1, "temperature": 0}
        if style == "echo":
            payload["echo"] = True
            if self.top_style == "chat":
                payload["logprobs"] = True
            else:
                payload["logprobs"] = 0
        else:
            payload["prompt_logprobs"] = 0
        body = self._post(payload)
        choice = self._choice(body)
        if style == "prompt_logprobs":
            positions = parse_prompt_logprobs(choice)
            if positions is None:
                raise AnswerError(
                    f"{CHOICE}.prompt_logprobs", "is missing or does not name the prompt tokens"
                )
            return positions
        positions = parse_positions(choice)
        usage = body.get("usage") if isinstance(body.get("usage"), Mapping) else {}
        n_prompt = usage.get("prompt_tokens") if isinstance(usage, Mapping) else None
        n_gen = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
        if isinstance(n_prompt, int) and isinstance(n_gen, int):
            if len(positions) != n_prompt + n_gen:
                raise AnswerError(
                    f"{CHOICE}.logprobs",
                    f"has {len(positions)} positions for {n_prompt} prompt + {n_gen} generated "
                    "tokens (usage): the prompt was not echoed",
                )
            return positions[:n_prompt]
        inside = [p for p in positions if p.offset is not None and p.offset < len(text)]
        if len(inside) < 2 or positions[0].logprob is not None:
            raise AnswerError(f"{CHOICE}.logprobs", "does not echo the prompt's log-probs")
        return inside

    # ---- execution ----

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        jobs: list[Callable[[], Result]] = [self._job(req) for req in requests]
        if len(jobs) <= 1 or self.concurrency == 1:
            return [job() for job in jobs]
        pool = self._executor()
        futures = [pool.submit(job) for job in jobs]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="sway-api")
            return self._pool

    def _job(self, req: Request) -> Callable[[], Result]:
        view = getattr(req, "view", None)
        if view is None:
            raise BackendError(
                f"api backend at {self.url} cannot answer {type(req).__name__} "
                "(no full-vocabulary logits over HTTP); use top-k divergences"
            )
        self._check_view(view)
        answer = self._answerer(req)
        return lambda: self._explained(answer, req)

    def _answerer(self, req: Request) -> Callable[[], Result]:
        if isinstance(req, NextToken):
            return lambda: self._next_token(req)
        if isinstance(req, RollingLogprob):
            return lambda: self._rolling(req)
        if isinstance(req, ContinuationLogprob):
            return lambda: self._continuation(req)
        if isinstance(req, Generate):
            return lambda: self._generate(req)
        raise BackendError(f"api backend at {self.url} cannot answer {type(req).__name__}")

    def _explained(self, answer: Callable[[], Result], req: Request) -> Result:
        """Run one request; a malformed answer becomes an error naming the endpoint and request."""
        try:
            return answer()
        except AnswerError as exc:
            text = getattr(req, "prompt", None) or getattr(req, "text", "")
            raise self._http.bad_answer(
                exc, f"{type(req).__name__} on {str(text)[:40]!r}"
            ) from None

    def _check_view(self, view: View) -> None:
        if not isinstance(canonical(view), Base | Finetuned):
            raise BackendError(
                f"api backend at {self.url} serves one fixed model; view {view.key} needs "
                "the adapter weights (use an hf or mlx backend for null and scaled views)"
            )

    def _next_token(self, req: NextToken) -> TokenDist:
        if self.top_style is None:
            raise BackendError(f"{self.url}: {self.unsupported[NEXT_TOKEN]}")
        k = max(1, min(req.top_k, self.top_k_cap))
        body = self._post(self._next_payload(req.prompt, k, self.top_style))
        positions = require_positions(self._choice(body))
        return top_dist(positions[0], k, self.vocab_size)

    def _scored(self, text: str) -> tuple[list[Position], list[tuple[int, int]]]:
        if self.echo_style is None:
            raise BackendError(f"{self.url}: {self.unsupported[ROLLING]}")
        positions = self._prompt_positions(text, self.echo_style)
        return positions, char_spans(positions, text)

    def _rolling(self, req: RollingLogprob) -> RollingResult:
        positions, _ = self._scored(req.text)
        lps = np.asarray([p.logprob for p in positions if p.logprob is not None], dtype=float)
        _finite(lps, self.url, req.view, req.text)
        ids = [p.id if p.id is not None else -1 for p in positions]
        return RollingResult(token_ids=np.asarray(ids, dtype=np.int64), logprobs=lps)

    def _continuation(self, req: ContinuationLogprob) -> ContinuationResult:
        """Sum of log-probs of the tokens carrying completion characters.

        Prompt and completion go as one text; a token straddling the boundary carries
        completion characters and is counted with the completion.
        """
        if not req.completion:
            raise BackendError(f"{self.url}: empty completion for prompt {req.prompt[:40]!r}")
        text = req.prompt + req.completion
        positions, spans = self._scored(text)
        boundary = len(req.prompt)
        chosen = [
            p.logprob
            for p, (_, end) in zip(positions, spans, strict=True)
            if end > boundary and p.logprob is not None
        ]
        if not chosen:
            raise BackendError(
                f"{self.url}: no scored token covers completion {req.completion[:40]!r}"
            )
        lps = np.asarray(chosen, dtype=float)
        _finite(lps, self.url, req.view, req.prompt)
        return ContinuationResult(logprob=float(lps.sum()), num_tokens=len(chosen))

    def _generate(self, req: Generate) -> GenerationResult:
        body = self._post(
            {"prompt": req.prompt, "max_tokens": req.max_new_tokens, "temperature": 0}
        )
        return GenerationResult(text=completion_text(self._choice(body)))

    # ---- HTTP ----

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self._http.post({"model": self.model, **payload})

    def _choice(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        try:
            return first_choice(body)
        except AnswerError as exc:
            raise self._http.bad_answer(exc) from None

    def counters(self) -> dict[str, float]:
        return self._http.counters()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _finite(lps: np.ndarray, url: str, view: View, text: str) -> None:
    if lps.size == 0 or not np.all(np.isfinite(lps)):
        raise BackendError(
            f"{url}: view {view.key} gave no or non-finite log-probs on {text[:40]!r}"
        )
