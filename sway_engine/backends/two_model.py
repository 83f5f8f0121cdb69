"""Two-model composition: the base view from one backend, the fine-tuned view from another.

Used when base and fine-tuned models cannot share one load (`defaults.differential: false`,
different model files, an API per side); the two sides may be of any kinds. Capabilities are
the intersection, less null and scaled views (they need a shared base) and exact divergences
(they need both logit rows in one place). An error names the side that failed.
"""

from __future__ import annotations

from collections.abc import Sequence

from sway_engine.backends.base import (
    DIVERGENCE,
    NULL_VIEWS,
    SCALED_VIEWS,
    SEQUENCE_DIVERGENCE,
    Backend,
)
from sway_engine.errors import BackendError
from sway_engine.requests import Divergence, Request, Result, SequenceDivergence, views_of
from sway_engine.views import Base, Finetuned, canonical


class TwoModelBackend:
    kind = "two_model"

    def __init__(self, base: Backend, ft: Backend) -> None:
        self.base = base
        self.ft = ft
        self.capabilities = (base.capabilities & ft.capabilities) - {
            DIVERGENCE,
            SEQUENCE_DIVERGENCE,
            NULL_VIEWS,
            SCALED_VIEWS,
        }

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        routed: dict[int, list[int]] = {0: [], 1: []}
        for i, req in enumerate(requests):
            if isinstance(req, Divergence | SequenceDivergence):
                raise BackendError("two-model backends compare views through top-k requests")
            (view,) = views_of(req)
            view = canonical(view)
            if isinstance(view, Base):
                routed[0].append(i)
            elif isinstance(view, Finetuned):
                routed[1].append(i)
            else:
                raise BackendError(
                    f"two-model backends serve base and ft views only, not {view.key}"
                )
        out: list[Result | None] = [None] * len(requests)
        for side, backend in ((0, self.base), (1, self.ft)):
            idx = routed[side]
            if idx:
                try:
                    answers = backend.execute([requests[i] for i in idx])
                except BackendError as exc:
                    name = "base" if side == 0 else "fine-tuned"
                    raise BackendError(f"{name} side ({backend.kind}): {exc}") from exc
                for i, res in zip(idx, answers, strict=True):
                    out[i] = res
        return [r for r in out if r is not None]

    @property
    def adapter(self) -> object:
        """The fine-tuned side's adapter, where that backend knows it."""
        return getattr(self.ft, "adapter", None)

    def counters(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for backend in (self.base, self.ft):
            get = getattr(backend, "counters", None)
            for k, v in (get() if callable(get) else {}).items():
                merged[k] = merged.get(k, 0.0) + v
        return merged

    def close(self) -> None:
        self.base.close()
        self.ft.close()
