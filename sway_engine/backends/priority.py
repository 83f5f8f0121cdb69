"""Try backend kinds in order (e.g. mlx, then hf); the first that loads serves the run.

Each failure is logged with its reason and kept in `attempts`; `kind` is the kind that
serves, so the run records it (SuiteResult.backend_kind -> DuckDB runs, MLflow).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from sway_engine.backends.base import Backend
from sway_engine.errors import BackendError
from sway_engine.requests import Request, Result

log = logging.getLogger(__name__)


class PriorityBackend:
    """The first of `candidates` (kind, build) whose build succeeds; attributes delegate to it."""

    def __init__(self, candidates: Sequence[tuple[str, Callable[[], Backend]]]) -> None:
        if not candidates:
            raise BackendError("a priority backend needs at least one kind to try")
        self.attempts: list[tuple[str, str]] = []
        chosen: Backend | None = None
        for kind, build in candidates:
            try:
                chosen = build()
            except Exception as exc:  # noqa: BLE001 - any load failure moves on to the next kind
                reason = f"{type(exc).__name__}: {exc}"
                self.attempts.append((kind, reason))
                log.warning("backend %s could not load (%s); trying the next kind", kind, reason)
                continue
            break
        if chosen is None:
            tried = "\n".join(f"  {kind}: {reason}" for kind, reason in self.attempts)
            raise BackendError(f"no backend kind could load; tried in order:\n{tried}")
        self.chosen = chosen
        self.kind = chosen.kind
        self.capabilities = chosen.capabilities
        self.tried = tuple(kind for kind, _ in candidates)
        if self.attempts:
            log.warning(
                "backend %s serves after %d failed kind(s): %s",
                self.kind,
                len(self.attempts),
                ", ".join(k for k, _ in self.attempts),
            )

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set above: load_adapter, adapter, base_id, ...
        if name == "chosen":
            raise AttributeError(name)
        return getattr(self.chosen, name)

    def __repr__(self) -> str:
        return f"PriorityBackend(kind={self.kind!r}, tried={list(self.tried)!r})"

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        return self.chosen.execute(requests)

    def counters(self) -> dict[str, float]:
        get = getattr(self.chosen, "counters", None)
        inner = get() if callable(get) else {}
        return {**inner, "fallbacks": float(len(self.attempts))}

    def close(self) -> None:
        self.chosen.close()
