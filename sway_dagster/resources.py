"""Resource classes: one per backend kind, the two-model composition, DuckDB and MLflow.

Heavy state lives in private attributes. A backend loads its base model on the first
`session()` of a run (set up lazily so a run that needs no model, or a nested resource
that a TwoModelBackend dedupes, never loads one) and frees it in teardown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import ConfigDict, PrivateAttr

from sway_engine.backends.instrumentation import Instrumented
from sway_engine.store import ResultStore as DuckStore
from sway_engine.tracking import MlflowTracking


class _Strict(dg.ConfigurableResource):
    model_config = ConfigDict(extra="forbid")


class ModelBackend(_Strict):
    """A backend resource: `session(adapter)` gives an instrumented engine backend."""

    trace_dir: str = ""

    def session(self, adapter_path: str) -> Instrumented:
        raise NotImplementedError

    def model_id(self) -> str:
        raise NotImplementedError

    def counters(self) -> dict[str, float]:
        """Work counters of this run's session (forward passes, tokens, cache hits)."""
        return {}


class HFBackend(ModelBackend):
    """torch/transformers/peft: the base loads once per run; adapters swap in place."""

    base: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    batch_tokens: int = 4096
    _backend: Any = PrivateAttr(default=None)
    _session: Instrumented | None = PrivateAttr(default=None)
    _adapter: str | None = PrivateAttr(default=None)

    def model_id(self) -> str:
        return self.base

    def same_model(self, other: HFBackend) -> bool:
        keys = ("base", "dtype", "device", "trust_remote_code")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def engine(self) -> Any:
        """The loaded engine backend (loads the base on first use)."""
        if self._backend is None:
            from sway_engine.backends.hf import HFBackend as Engine

            self._backend = Engine(
                self.base,
                dtype=self.dtype,
                device=self.device,
                trust_remote_code=self.trust_remote_code,
                batch_tokens=self.batch_tokens,
            )
        return self._backend

    def session(self, adapter_path: str) -> Instrumented:
        engine = self.engine()
        if self._session is None:
            trace = Path(self.trace_dir) / "trace.jsonl" if self.trace_dir else None
            self._session = Instrumented(engine, trace_path=trace)
        if self._adapter != adapter_path:
            self._adapter = None
            engine.load_adapter(adapter_path)
            self._session.reset()
            self._adapter = adapter_path
        return self._session

    def counters(self) -> dict[str, float]:
        return self._session.counters() if self._session is not None else {}

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend = None
        self._session = None
        self._adapter = None


class TwoModelBackend(ModelBackend):
    """Base view from `base`, fine-tuned view from `ft`; one load when both name one model."""

    base: HFBackend
    ft: HFBackend
    _session: Instrumented | None = PrivateAttr(default=None)
    _adapter: str | None = PrivateAttr(default=None)

    def model_id(self) -> str:
        return self.ft.base

    def session(self, adapter_path: str) -> Instrumented:
        if self.base.same_model(self.ft):
            return self.ft.session(adapter_path)
        from sway_engine.backends.two_model import TwoModelBackend as Engine

        ft_session = self.ft.session(adapter_path)
        if self._session is None or self._adapter != adapter_path:
            self._session = Instrumented(Engine(self.base.engine(), ft_session.inner))
            self._adapter = adapter_path
        return self._session

    def counters(self) -> dict[str, float]:
        if self._session is not None:
            return self._session.counters()
        return self.ft.counters()


class ResultStore(_Strict):
    """The DuckDB result store (short connections, retried writes, numbered migrations)."""

    database: str

    def store(self) -> DuckStore:
        return DuckStore(self.database)


class MlflowTracker(_Strict):
    """MLflow through an explicit MlflowClient: one run per (adapter, Dagster run)."""

    tracking_uri: str
    experiment: str = "sway"
    artifact_root: str = ""
    ui_url: str = ""

    def tracking(self) -> MlflowTracking:
        return MlflowTracking(
            tracking_uri=self.tracking_uri,
            experiment=self.experiment,
            artifact_root=self.artifact_root or None,
            ui_url=self.ui_url or None,
        )
