"""Several trained adapters of one base in one run: their requests share batches.

`run_many` runs the same suite once per adapter, each in its own thread, over one
loaded base. Every suite sees an ordinary single-adapter session (`BoundSession`): the views
its probes name (`Finetuned()`, `Scaled(lam)`, `Null(seed)`) are bound to that adapter's
label on the way to the backend, and the adapter's directory is `ctx.adapter_path`.

The suites run in lockstep (`gather`): each `execute` waits until every live suite has
submitted its next request list, then the calling thread executes all of them as one list.
The backend dedupes base rows across adapters and packs every adapter's rows into the same
batches. A suite that ends (or fails) early leaves the lockstep, so the others never wait
for it. Results equal those of running each adapter alone (a batch's composition changes
only the rounding, well below 1e-6).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sway_engine.backends.build import build_backend
from sway_engine.backends.instrumentation import Instrumented, session
from sway_engine.errors import SwayError
from sway_engine.gather import Execute, gather
from sway_engine.probes.registry import Entry
from sway_engine.progress import Progress
from sway_engine.requests import Divergence, Embed, Request, Result, SequenceDivergence
from sway_engine.result import SuiteResult
from sway_engine.runner import error_results, evaluate, run_suite, suite_result
from sway_engine.spec import SuiteSpec
from sway_engine.suite import document_of
from sway_engine.views import bind

T = TypeVar("T")
log = logging.getLogger(__name__)


def bind_request(request: Request, adapter: str) -> Request:
    """The same request with every view derived from trained adapter `adapter`."""
    if isinstance(request, Embed):
        return request  # no view: embeddings do not depend on the adapter
    if isinstance(request, Divergence | SequenceDivergence):
        return dataclasses.replace(
            request, view_a=bind(request.view_a, adapter), view_b=bind(request.view_b, adapter)
        )
    return dataclasses.replace(request, view=bind(request.view, adapter))


class BoundSession(Instrumented):
    """One adapter's session over a shared one: views bound to `label`, requests gathered.

    `label` "" is the backend's primary adapter. Counters are the shared session's (the
    whole multi-adapter run); `stats` counts this adapter's own requests.
    """

    def __init__(self, shared: Instrumented, submit: Execute, label: str, path: str | Path) -> None:
        super().__init__(shared.inner)
        self.shared = shared
        self._submit = submit
        self.adapter_label = label
        self._path = str(path)

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        self.stats["requests"] += len(requests)
        self.stats["executes"] += 1
        return self._submit([bind_request(r, self.adapter_label) for r in requests])

    @property
    def adapter_path(self) -> str | None:
        return self._path

    def reset(self) -> None:
        self.shared.reset()

    def counters(self) -> dict[str, float]:
        return self.shared.counters()

    def close(self) -> None:
        """The shared session owns the backend; closing one adapter's view of it is a no-op."""


@dataclasses.dataclass(frozen=True)
class Registration:
    """Adapters registered on one loaded base: `labels[i]` is adapter i's view label ("" for
    the primary), or None when it failed to load, with the reason in `errors[i]`."""

    labels: tuple[str | None, ...]
    errors: tuple[str | None, ...]

    @property
    def loaded(self) -> list[int]:
        return [i for i, label in enumerate(self.labels) if label is not None]


def can_hold_many(engine: object) -> bool:
    return hasattr(engine, "load_adapter") and hasattr(engine, "add_adapter")


def register(engine: Any, paths: Sequence[str | Path]) -> Registration:
    """Load the first adapter that fits as the primary and add every other one beside it.

    An adapter that fails (bad weights, another base) is reported, not raised: the others
    still run. `engine` must hold several adapters (`can_hold_many`).
    """
    from sway_engine.errors import SwayError

    labels: list[str | None] = []
    errors: list[str | None] = []
    primary = False
    for i, path in enumerate(paths):
        try:
            if not primary:
                engine.load_adapter(str(path))
                labels.append("")
                primary = True
            else:
                labels.append(engine.add_adapter(str(path), f"a{i}"))
            errors.append(None)
        except SwayError as exc:
            labels.append(None)
            errors.append(f"preflight failed: {exc}")
    return Registration(tuple(labels), tuple(errors))


def each_adapter(
    shared: Instrumented,
    labels: Sequence[str],
    paths: Sequence[str | Path],
    fn: Callable[[int, Instrumented], T],
) -> list[T | Exception]:
    """fn(i, session_i) for every registered adapter, each in its own thread, their requests
    executed together round by round (`gather`: from this thread, a failing round retried
    adapter by adapter). session_i is adapter i's ordinary single-adapter view of `shared`.
    A call that raises gives its exception in its slot; the others run on. One adapter runs
    in this thread on `shared` itself when it is the primary.
    """
    if len(labels) == 1 and labels[0] == "":
        try:
            return [fn(0, shared)]
        except Exception as exc:  # noqa: BLE001 - reported in the slot, as the threaded path does
            return [exc]

    def job(slot: int) -> Callable[[Execute], T]:
        def run(submit: Execute) -> T:
            return fn(slot, BoundSession(shared, submit, labels[slot], paths[slot]))

        return run

    return gather([job(i) for i in range(len(labels))], shared.execute)


def run_many(
    spec: SuiteSpec,
    entries: list[Entry],
    backend: Instrumented,
    adapters: Sequence[str | Path],
    *,
    spec_path: str = "<memory>",
    progress: Progress | None = None,
) -> list[SuiteResult]:
    """Run the suite for every adapter over the backend's one loaded base, in shared batches.

    The backend must hold several trained adapters (`load_adapter` + `add_adapter`, as
    `HFBackend` does). The first adapter that loads becomes the primary; an adapter that
    fails to load gets ERROR rows (as `evaluate` gives), the others still run. Results come
    back in the order of `adapters` and equal running each adapter alone.
    """
    if not can_hold_many(backend.inner):
        raise SwayError(
            f"the {backend.kind} backend holds one adapter at a time; "
            "evaluate the adapters one by one (evaluate) instead"
        )
    backend.reset()
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    reg = register(backend.inner, adapters)
    loaded = reg.loaded
    log.info(
        "%d adapter(s) registered on one base; %d failed",
        len(loaded),
        len(reg.errors) - reg.errors.count(None),
    )
    out: dict[int, SuiteResult] = {
        i: suite_result(
            spec, spec_path, str(adapters[i]), started, t0, error_results(entries, msg), None
        )
        for i, msg in enumerate(reg.errors)
        if msg is not None
    }
    if loaded:

        def one(_slot: int, session: Instrumented) -> SuiteResult:
            path = str(session.adapter_path)
            return run_suite(spec, entries, session, spec_path=spec_path, adapter=path)

        labels = [reg.labels[i] or "" for i in loaded]
        done = each_adapter(backend, labels, [adapters[i] for i in loaded], one)
        for i, result in zip(loaded, done, strict=True):
            if isinstance(result, Exception):
                msg = f"{type(result).__name__}: {result}"
                result = suite_result(
                    spec,
                    spec_path,
                    str(adapters[i]),
                    started,
                    t0,
                    error_results(entries, msg),
                    None,
                )
            out[i] = result
    return [out[i] for i in range(len(adapters))]


def adapterless(
    spec: SuiteSpec, entries: list[Entry], adapters: Sequence[str | Path], spec_path: str
) -> tuple[Any, list[SuiteResult]]:
    """The suite's backend built once without an adapter, or (None, ERROR results for every
    adapter) when it cannot load: what `evaluate_many` and `evaluate_each` start from."""
    document_of(spec)
    model = spec.models.ft.model_copy(update={"adapter": None})
    started, t0 = datetime.now(UTC), time.perf_counter()
    try:
        return build_backend(model), []
    except SwayError as exc:
        rows = error_results(entries, f"preflight failed: {exc}")
        return None, [
            suite_result(spec, spec_path, str(a), started, t0, rows, None) for a in adapters
        ]


def evaluate_many(
    spec: SuiteSpec,
    entries: list[Entry],
    adapters: Sequence[str | Path],
    *,
    spec_path: str = "<memory>",
    trace_path: Path | None = None,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> list[SuiteResult]:
    """Build the backend once (no adapter), run the suite for every adapter in lockstep (their
    requests in shared batches), close it: one base load however many adapters."""
    if not adapters:
        raise SwayError("evaluate_many needs at least one adapter directory")
    inner, failed = adapterless(spec, entries, adapters, spec_path)
    if inner is None:
        return failed
    backend = session(inner, trace_path=trace_path, cache_dir=cache_dir)
    try:
        return run_many(spec, entries, backend, adapters, spec_path=spec_path, progress=progress)
    finally:
        backend.close()


def evaluate_each(
    spec: SuiteSpec,
    entries: list[Entry],
    adapters: Sequence[str | Path],
    *,
    spec_path: str = "<memory>",
    trace_path: Path | None = None,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> list[SuiteResult]:
    """The suite on each adapter in turn over one base load: the adapter is swapped in place
    (`load_adapter`) and the request cache reset between them, so each result equals a run of
    that adapter alone. A backend that cannot swap adapters (api, custom) is built per adapter.
    An adapter that fails to load gets ERROR rows; the others still run."""
    inner, failed = adapterless(spec, entries, adapters, spec_path)
    if inner is None:
        return failed
    if not callable(getattr(inner, "load_adapter", None)):
        inner.close()
        return [
            evaluate(
                spec,
                entries,
                spec_path=spec_path,
                adapter=str(a),
                trace_path=trace_path,
                cache_dir=cache_dir,
            )
            for a in adapters
        ]
    backend = session(inner, trace_path=trace_path, cache_dir=cache_dir)
    started, t0 = datetime.now(UTC), time.perf_counter()
    out = []
    try:
        for adapter in adapters:
            backend.reset()
            try:
                inner.load_adapter(str(adapter))
            except SwayError as exc:
                rows = error_results(entries, f"preflight failed: {exc}")
                out.append(suite_result(spec, spec_path, str(adapter), started, t0, rows, backend))
                continue
            out.append(
                run_suite(
                    spec,
                    entries,
                    backend,
                    spec_path=spec_path,
                    adapter=str(adapter),
                    progress=progress,
                )
            )
    finally:
        backend.close()
    return out
