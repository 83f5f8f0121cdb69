"""`kind: custom`: a user class named by `entry_point: "pkg.mod:Class"`.

Two shapes are accepted, checked on the class before it is built:
- the batched protocol (`execute(requests) -> results`, `close()`, a `capabilities` set);
- upstream dlm-sway's view protocol: `as_base()` / `as_finetuned()` context managers (plus
  optional `as_scaled_adapter(lam)`, `as_null_adapter(seed, ...)`) yielding a model with
  `next_token_dist`, `rolling_logprob`, `logprob_of`, `generate`. `ViewProtocolAdapter`
  answers batched requests through it, one view entered at a time.
Either way the class is built as `Class(base_spec=<ModelSpec>, adapter_path=<str | None>)`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from sway_engine.backends.base import (
    ALL_CAPABILITIES,
    CONTINUATION,
    GENERATE,
    NEXT_TOKEN,
    NULL_VIEWS,
    ROLLING,
    SCALED_VIEWS,
)
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
    views_of,
)
from sway_engine.spec import ModelSpec
from sway_engine.views import Base, Finetuned, Null, Scaled, View, canonical

log = logging.getLogger(__name__)

BATCHED_METHODS = ("execute", "close")
VIEW_METHODS = ("as_base", "as_finetuned")
# Per-view scoring method -> the capability it provides.
SCORING_METHODS = {
    "next_token_dist": NEXT_TOKEN,
    "rolling_logprob": ROLLING,
    "logprob_of": CONTINUATION,
    "generate": GENERATE,
}


def load_entry_point(entry_point: str) -> type:
    """Import `pkg.mod:Class`; every malformed or missing part is a clear BackendError."""
    module_name, sep, attr = entry_point.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise BackendError(
            f"custom backend entry_point {entry_point!r} must have the form 'pkg.module:Class'"
        )
    try:
        module = importlib.import_module(module_name.strip())
    except ImportError as exc:
        raise BackendError(
            f"custom backend entry_point {entry_point!r}: cannot import {module_name!r}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise BackendError(
                f"custom backend entry_point {entry_point!r}: {module_name!r} has no {attr!r}"
            )
        obj = getattr(obj, part)
    if not inspect.isclass(obj):
        raise BackendError(f"custom backend entry_point {entry_point!r} is not a class")
    return obj


def protocol_of(cls: type, entry_point: str) -> str:
    """'batched' or 'views'; a class that completes neither raises naming what it lacks."""
    lacks_batched = [m for m in BATCHED_METHODS if not callable(getattr(cls, m, None))]
    if not lacks_batched:
        return "batched"
    lacks_views = [m for m in VIEW_METHODS if not callable(getattr(cls, m, None))]
    if not lacks_views:
        return "views"
    raise BackendError(
        f"custom backend {entry_point} implements neither backend protocol: the batched "
        f"protocol needs {', '.join(BATCHED_METHODS)} and a `capabilities` set (missing: "
        f"{', '.join(lacks_batched)}); the view protocol needs {', '.join(VIEW_METHODS)} "
        f"(missing: {', '.join(lacks_views)})"
    )


class CustomBackend:
    """A user class behind the batched protocol, with its entry point and capabilities."""

    kind = "custom"

    def __init__(self, model: ModelSpec) -> None:
        if not model.entry_point:
            raise BackendError("models.*.entry_point is required for kind custom")
        self.entry_point = model.entry_point
        cls = load_entry_point(model.entry_point)
        self.protocol = protocol_of(cls, model.entry_point)
        kwargs = {"base_spec": model, "adapter_path": model.adapter}
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as exc:
            raise BackendError(
                f"custom backend {self.entry_point} must accept "
                f"__init__(self, base_spec, adapter_path): {exc}"
            ) from exc
        instance = cls(**kwargs)
        self.inner: Any = (
            instance
            if self.protocol == "batched"
            else ViewProtocolAdapter(instance, self.entry_point)
        )
        self.capabilities = declared_capabilities(self.inner, self.entry_point)
        log.info(
            "custom backend %s (%s protocol): capabilities %s",
            self.entry_point,
            self.protocol,
            sorted(self.capabilities),
        )

    def __repr__(self) -> str:
        return f"CustomBackend({self.entry_point!r}, protocol={self.protocol!r})"

    @property
    def adapter(self) -> Any:
        return getattr(self.inner, "adapter", None)

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        results = list(self.inner.execute(requests))
        if len(results) != len(requests):
            raise BackendError(
                f"custom backend {self.entry_point} returned {len(results)} results for "
                f"{len(requests)} requests (it must answer each request, in order)"
            )
        return results

    def counters(self) -> dict[str, float]:
        get = getattr(self.inner, "counters", None)
        return dict(get()) if callable(get) else {}

    def close(self) -> None:
        self.inner.close()


def declared_capabilities(backend: Any, entry_point: str) -> frozenset[str]:
    caps = getattr(backend, "capabilities", None)
    if not isinstance(caps, set | frozenset | list | tuple) or not all(
        isinstance(c, str) for c in caps
    ):
        raise BackendError(
            f"custom backend {entry_point} must set `capabilities` to a set of names from "
            f"{sorted(ALL_CAPABILITIES)}"
        )
    unknown = sorted(set(caps) - ALL_CAPABILITIES)
    if unknown:
        raise BackendError(
            f"custom backend {entry_point} declares unknown capabilities {unknown}; "
            f"known: {sorted(ALL_CAPABILITIES)}"
        )
    return frozenset(caps)


class ViewProtocolAdapter:
    """Answers batched requests through upstream's `as_base()` / `as_finetuned()` views.

    Requests are grouped by view; each view is entered once per `execute` (never two at
    a time). A bare-float `logprob_of` is paired with the completion's token count from
    `rolling_logprob(completion)` (the backend's own tokenizer, any BOS included).
    """

    def __init__(self, backend: Any, entry_point: str) -> None:
        self.backend = backend
        self.entry_point = entry_point
        with backend.as_base() as view_model:
            have = [m for m in SCORING_METHODS if callable(getattr(view_model, m, None))]
        if not have:
            raise BackendError(
                f"custom backend {entry_point}: the model its as_base() yields has none of "
                f"{', '.join(SCORING_METHODS)}"
            )
        caps = {SCORING_METHODS[m] for m in have}
        if callable(getattr(backend, "as_scaled_adapter", None)):
            caps.add(SCALED_VIEWS)
        null = getattr(backend, "as_null_adapter", None)
        self._null_modes = False
        if callable(null):
            caps.add(NULL_VIEWS)
            self._null_modes = "mode" in inspect.signature(null).parameters
        self.capabilities = frozenset(caps)
        check = getattr(backend, "preflight_finite_check", None)
        if callable(check):
            ok, reason = check()
            if not ok:
                raise BackendError(f"custom backend {entry_point} failed its preflight: {reason}")

    @property
    def adapter(self) -> Any:
        return getattr(self.backend, "adapter", None)

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        groups: dict[View, list[int]] = {}
        for i, req in enumerate(requests):
            views = views_of(req)
            if len(views) != 1:
                raise BackendError(
                    f"custom backend {self.entry_point} answers one view per request; "
                    f"{type(req).__name__} compares two (use top-k divergences)"
                )
            groups.setdefault(canonical(views[0]), []).append(i)
        out: list[Result | None] = [None] * len(requests)
        for view, idx in groups.items():
            with self._enter(view) as model:
                for i in idx:
                    out[i] = self._answer(model, requests[i])
        return [r for r in out if r is not None]

    def _enter(self, view: View) -> AbstractContextManager[Any]:
        b = self.backend
        if isinstance(view, Base):
            return b.as_base()
        if isinstance(view, Finetuned):
            return b.as_finetuned()
        if isinstance(view, Scaled) and SCALED_VIEWS in self.capabilities:
            return b.as_scaled_adapter(view.lam)
        if isinstance(view, Null) and view.lam != 1.0:
            raise BackendError(
                f"custom backend {self.entry_point}: the view protocol has no scaled null "
                f"({view.key}); adapter_ablation stays uncalibrated on it"
            )
        if isinstance(view, Null) and NULL_VIEWS in self.capabilities:
            kwargs: dict[str, Any] = {"init_scale": view.init_scale, "rank_scale": view.rank_scale}
            if self._null_modes:
                kwargs["mode"] = view.mode
            elif view.mode != "fixed":
                raise BackendError(
                    f"custom backend {self.entry_point}: as_null_adapter takes no `mode`, so it "
                    "draws upstream's fixed-scale nulls; set defaults.null.mode: fixed, or "
                    "accept a mode argument ('matched' | 'fixed')"
                )
            return b.as_null_adapter(view.seed, **kwargs)
        raise BackendError(f"custom backend {self.entry_point} has no view {view.key}")

    def _answer(self, model: Any, req: Request) -> Result:
        method: Callable[..., Any] | None
        if isinstance(req, NextToken):
            method = getattr(model, "next_token_dist", None)
            return _token_dist(self._call(method, req, req.prompt, top_k=req.top_k))
        if isinstance(req, RollingLogprob):
            method = getattr(model, "rolling_logprob", None)
            return _rolling(self._call(method, req, req.text))
        if isinstance(req, ContinuationLogprob):
            method = getattr(model, "logprob_of", None)
            value = self._call(method, req, req.prompt, req.completion)
            return self._continuation(model, req, value)
        if isinstance(req, Generate):
            method = getattr(model, "generate", None)
            text = self._call(method, req, req.prompt, max_new_tokens=req.max_new_tokens)
            return GenerationResult(text=str(text))
        raise BackendError(f"custom backend {self.entry_point} cannot answer {type(req).__name__}")

    def _call(self, method: Callable[..., Any] | None, req: Request, *args: Any, **kw: Any) -> Any:
        if method is None:
            raise BackendError(
                f"custom backend {self.entry_point} has no method for {type(req).__name__}"
            )
        return method(*args, **kw)

    def _continuation(self, model: Any, req: ContinuationLogprob, value: Any) -> Result:
        if isinstance(value, ContinuationResult):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            logprob, n = float(value[0]), int(value[1])
        elif hasattr(value, "num_tokens"):
            logprob = float(getattr(value, "logprob", getattr(value, "total_logprob", math.nan)))
            n = int(value.num_tokens)
        else:
            logprob = float(value)
            rolling = getattr(model, "rolling_logprob", None)
            if not callable(rolling):
                raise BackendError(
                    f"custom backend {self.entry_point}: logprob_of returned a bare number and "
                    "there is no rolling_logprob to count the completion's tokens; return "
                    "(logprob, num_tokens) instead"
                )
            n = len(np.asarray(rolling(req.completion).token_ids))
        if not math.isfinite(logprob) or n < 1:
            raise BackendError(
                f"custom backend {self.entry_point}: logprob_of gave {logprob} over {n} tokens "
                f"for {req.completion[:40]!r}"
            )
        return ContinuationResult(logprob=logprob, num_tokens=n)

    def counters(self) -> dict[str, float]:
        get = getattr(self.backend, "counters", None)
        return dict(get()) if callable(get) else {}

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()


def _token_dist(d: Any) -> TokenDist:
    if isinstance(d, TokenDist):
        return d
    lps = np.asarray(d.logprobs, dtype=np.float64)
    ids = np.asarray(d.token_ids, dtype=np.int64)
    if lps.shape != ids.shape or not np.all(np.isfinite(lps)):
        raise BackendError(
            "custom backend next_token_dist gave mismatched or non-finite top-k "
            f"({ids.shape} ids, {lps.shape} log-probs)"
        )
    return TokenDist(
        token_ids=ids,
        logprobs=lps,
        vocab_size=int(getattr(d, "vocab_size", 0) or 0),
        tail_mass=float(min(1.0, max(0.0, 1.0 - np.exp(lps).sum()))),
        tokens=tuple(getattr(d, "tokens", ()) or ()),
    )


def _rolling(r: Any) -> RollingResult:
    if isinstance(r, RollingResult):
        return r
    return RollingResult(
        token_ids=np.asarray(r.token_ids, dtype=np.int64),
        logprobs=np.asarray(r.logprobs, dtype=np.float64),
    )
