"""The deferred hf session (backends/deferred.py): nothing loads until a result is computed,
and a backend whose adapter failed to load is never used."""

from __future__ import annotations

from typing import Any

import pytest

from sway_engine.backends.deferred import Deferred
from sway_engine.errors import AdapterError
from sway_engine.fixtures import FixturePaths


class _Backend:
    """Records what it is asked; its adapter load fails while `fits` is False."""

    def __init__(self) -> None:
        self.fits = False
        self.adapter: Any = None
        self.executed = 0

    def load_adapter(self, path: str) -> None:
        if not self.fits:
            raise AdapterError(f"adapter {path} does not fit the base")
        self.adapter = path

    def execute(self, requests: Any) -> list[Any]:
        self.executed += 1
        return [None for _ in requests]


def test_an_adapter_that_does_not_fit_fails_every_use_and_nothing_runs_without_it(
    fx: FixturePaths,
) -> None:
    inner = _Backend()
    loads: list[int] = []

    def load() -> _Backend:
        loads.append(1)
        return inner

    session = Deferred(
        load,
        kind="hf",
        capabilities=frozenset(),
        plan=lambda _cache: None,
        tokenizer=lambda: None,
    )
    session.load_adapter(str(fx.adapters["doc-strong"]))
    assert loads == [] and session.adapter is not None  # read and checked, not loaded
    for _ in range(2):
        with pytest.raises(AdapterError, match="does not fit"):
            session.execute(["request"])
    assert inner.executed == 0 and not session.loaded
    inner.fits = True
    assert session.execute(["request"]) == [None]
    assert inner.executed == 1 and inner.adapter == str(fx.adapters["doc-strong"])
    assert session.loaded and len(loads) == 3
