"""Resource classes: one per backend kind, the two-model composition, DuckDB and MLflow.

Heavy state lives in private attributes. A backend loads its base model on the first
`session()` of a run (set up lazily so a run that needs no model, or a nested resource
that a TwoModelResource dedupes, never loads one) and frees it in teardown.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import dagster as dg
from pydantic import ConfigDict, PrivateAttr, model_validator

from sway_engine.backends import deferred
from sway_engine.backends.build import build_kind, build_side, check_one_model
from sway_engine.backends.instrumentation import Instrumented, session
from sway_engine.mirror import Mirror
from sway_engine.score_cache import ScoreCache
from sway_engine.spec import ModelSpec, SuiteSpec
from sway_engine.store import ResultStore as DuckStore
from sway_engine.tracking import MlflowTracking

if TYPE_CHECKING:
    from sway_engine.calibration import NullMatrix
    from sway_engine.suite import Suite

# Logged once per base-model load into the run's event log (from whichever step process
# loads it), so the loads of a run can be counted on every launch path.
LOAD_MESSAGE = "sway: loaded base model"


class _Strict(dg.ConfigurableResource):
    model_config = ConfigDict(extra="forbid")


def note_load(resource: dg.ConfigurableResource, what: str) -> None:
    """Record a model load in the run's event log (a no-op outside a Dagster run)."""
    try:
        log = resource.get_resource_context().log
    except Exception:  # noqa: BLE001 - used directly, outside a run: nothing to record
        return
    if log is not None:
        log.info(f"{LOAD_MESSAGE} {what}")


class ModelResource(_Strict):
    """A backend resource: `session(adapter)` gives an instrumented engine backend."""

    trace_dir: str = ""
    # The persistent scoring cache's folder ("": ScoreCache.open_default's choice); the
    # environment's SWAY_SCORE_CACHE=off turns it off.
    score_cache_dir: str = ""
    _plots: ScoreCache | Literal[False] | None = PrivateAttr(default=None)

    def session(self, adapter_path: str) -> Instrumented:
        raise NotImplementedError

    def model_id(self) -> str:
        raise NotImplementedError

    def counters(self) -> dict[str, float]:
        """Work counters of this run's session (forward passes, tokens, cache hits)."""
        return {}

    def engine(self) -> Any:
        """The loaded engine backend; a TwoModelResource takes its base view from it."""
        raise NotImplementedError

    def served_kind(self) -> str:
        """The engine kind serving this run's session (a fallback list records the one that
        loaded). A run that opened no session (a backfill's score run) gives the configured
        kind: `CONFIGURED_KIND`, or the class name where the kind is only known on load."""
        session = getattr(self, "_session", None)
        if session is not None:
            return str(session.kind)
        return CONFIGURED_KIND.get(type(self).__name__, type(self).__name__)

    def same_model(self, other: ModelResource) -> bool:
        """True when `other` would load the very same model (a TwoModelResource loads once)."""
        return False

    def plot_store(self) -> ScoreCache | None:
        """The persistent scoring cache, for the plots this run draws (`report.plots.kept_in`);
        None where it is off. Opened on first use, closed in teardown."""
        if self._plots is None:
            cache_dir = Path(self.score_cache_dir) if self.score_cache_dir else None
            self._plots = ScoreCache.open_default(cache_dir) or False
        return self._plots or None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._plots:
            self._plots.close()
        self._plots = None

    def _trace(self) -> Path | None:
        return Path(self.trace_dir) / "trace.jsonl" if self.trace_dir else None

    def _session_on(self, engine: Any) -> Instrumented:
        """A run's front on `engine`: trace file and persistent scoring cache."""
        return session(
            engine,
            trace_path=self._trace(),
            cache_dir=Path(self.score_cache_dir) if self.score_cache_dir else None,
        )


class _LocalModel(ModelResource):
    """A base model loaded in this process once per run; adapters swap in place."""

    base: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    batch_tokens: int = 4096
    _backend: Any = PrivateAttr(default=None)
    _session: Instrumented | None = PrivateAttr(default=None)
    _adapter: str | None = PrivateAttr(default=None)
    KIND: ClassVar[Literal["hf", "mlx"]]

    def _load(self) -> Any:
        """Construct the engine backend (heavy imports happen here)."""
        raise NotImplementedError

    def _spec(self, kind: Literal["hf", "mlx"]) -> ModelSpec:
        """The model spec this resource's config describes (no adapter: it swaps per run)."""
        return ModelSpec(
            kind=kind,
            base=self.base,
            dtype=self.dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
        )

    def model_id(self) -> str:
        return self.base

    def same_model(self, other: ModelResource) -> bool:
        keys = ("base", "dtype", "device", "trust_remote_code")
        return type(other) is type(self) and all(
            getattr(self, k) == getattr(other, k) for k in keys
        )

    def engine(self) -> Any:
        """The loaded engine backend (loads the base on first use)."""
        if self._backend is None:
            self._backend = self._load()
            note_load(self, f"{self.base} ({type(self).__name__})")
        return self._backend

    def _shared(self) -> Instrumented:
        """The run's session: the model loads on the first request the persistent scoring
        cache cannot answer (`backends.deferred`; hf only), so an unchanged adapter's run
        loads none."""
        if self._session is None:
            self._session = self._session_on(deferred.for_model(self._spec(self.KIND), self.engine))
        return self._session

    def session(self, adapter_path: str) -> Instrumented:
        session = self._shared()
        if self._adapter != adapter_path:
            self._adapter = None
            cast(Any, session.inner).load_adapter(adapter_path)  # a local backend
            session.reset()
            self._adapter = adapter_path
        return session

    def counters(self) -> dict[str, float]:
        return self._session.counters() if self._session is not None else {}

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        # The session closes its backend and its score cache's connection; a backend that
        # never got a session is closed alone.
        if self._session is not None:
            self._session.close()
        elif self._backend is not None:
            self._backend.close()
        self._backend = None
        self._session = None
        self._adapter = None
        super().teardown_after_execution(context)


class HFModelResource(_LocalModel):
    """torch/transformers/peft: the base loads once per run (on the first result the scoring
    cache lacks); adapters swap in place."""

    KIND: ClassVar[Literal["hf", "mlx"]] = "hf"

    def _load(self) -> Any:
        return build_kind(self._spec("hf"), batch_tokens=self.batch_tokens)


class MLXModelResource(_LocalModel):
    """mlx-lm (Apple silicon, or Linux CPU through mlx[cpu]): the base loads once per run;
    views and adapters swap LoRA weights in place; PEFT adapters are converted (cached)."""

    KIND: ClassVar[Literal["hf", "mlx"]] = "mlx"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    cache_dir: str = ""

    def _load(self) -> Any:
        options = {"batch_tokens": self.batch_tokens, "cache_dir": self.cache_dir or None}
        return build_kind(self._spec("mlx"), **options)


class TwoModelResource(ModelResource):
    """Base view from `base`, fine-tuned view from `ft` (any kinds); one load when both name
    one model."""

    base: ModelResource
    ft: ModelResource
    _session: Instrumented | None = PrivateAttr(default=None)
    _adapter: str | None = PrivateAttr(default=None)

    def model_id(self) -> str:
        return self.ft.model_id()

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


class _Built(ModelResource):
    """A backend built from a ModelSpec by the engine's factory (`backends.build`).

    The adapter under evaluation is swapped in place where the engine can (`load_adapter`),
    else the engine is rebuilt for it; an API endpoint serves what it serves.
    """

    _backend: Any = PrivateAttr(default=None)
    _loaded: str | None = PrivateAttr(default=None)
    _session: Instrumented | None = PrivateAttr(default=None)
    _adapter: str | None = PrivateAttr(default=None)

    def spec_for(self, adapter: str | None) -> ModelSpec:
        raise NotImplementedError

    def _engine_for(self, adapter: str | None) -> Any:
        if self._backend is None:
            self._backend = build_side(self.spec_for(adapter))
            note_load(self, f"{self.model_id()} ({self._backend.kind})")
            self._loaded = adapter
        elif adapter is not None and adapter != self._loaded and self._backend.kind != "api":
            load = getattr(self._backend, "load_adapter", None)
            if callable(load):
                load(adapter)
            else:
                self._backend.close()
                self._backend = None
                self._backend = build_side(self.spec_for(adapter))
                note_load(self, f"{self.model_id()} ({self._backend.kind}, rebuilt)")
            self._loaded = adapter
        return self._backend

    def engine(self) -> Any:
        return self._engine_for(None)

    def session(self, adapter_path: str) -> Instrumented:
        engine = self._engine_for(adapter_path)
        if self._session is None or self._session.inner is not engine:
            self._session = self._session_on(engine)
        elif self._adapter != adapter_path:
            self._session.reset()
        self._adapter = adapter_path
        return self._session

    def counters(self) -> dict[str, float]:
        return self._session.counters() if self._session is not None else {}

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        # The session closes its backend and its score cache's connection; a backend that
        # never got a session is closed alone.
        if self._session is not None:
            self._session.close()
        elif self._backend is not None:
            self._backend.close()
        self._backend = None
        self._session = None
        self._adapter = self._loaded = None
        super().teardown_after_execution(context)


class ApiModelResource(_Built):
    """An OpenAI-compatible completions endpoint serving one fixed model. The key comes from
    SWAY_API_KEY / OPENAI_API_KEY in the environment, never from config."""

    endpoint: str
    model: str
    timeout_s: float = 60.0
    max_retries: int = 3
    max_top_k: int = 256
    concurrency: int = 4
    allow_insecure_http: bool = False

    def model_id(self) -> str:
        return self.model

    def _engine_for(self, adapter: str | None) -> Any:
        if self._backend is None:
            spec = ModelSpec(
                kind="api",
                base=self.model,
                endpoint=self.endpoint,
                allow_insecure_http=self.allow_insecure_http,
            )
            self._backend = build_kind(
                spec,
                timeout_s=self.timeout_s,
                max_retries=self.max_retries,
                max_top_k=self.max_top_k,
                concurrency=self.concurrency,
            )
            note_load(self, f"{self.model} at {self.endpoint} (api)")
        return self._backend


class CustomModelResource(_Built):
    """A user class (`entry_point: pkg.mod:Class`), built with the partition's adapter."""

    entry_point: str
    base: str

    def model_id(self) -> str:
        return self.base

    def spec_for(self, adapter: str | None) -> ModelSpec:
        return ModelSpec(
            kind="custom", base=self.base, entry_point=self.entry_point, adapter=adapter
        )


class PriorityModelResource(_Built):
    """Kinds tried in order (e.g. ["mlx", "hf"]); the first that loads serves the run."""

    kinds: list[str]
    base: str
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    endpoint: str | None = None
    entry_point: str | None = None

    @model_validator(mode="after")
    def _kinds_are_valid(self) -> PriorityModelResource:
        self.spec_for(None)  # the same rules as a spec's `fallback`, at construction
        return self

    def model_id(self) -> str:
        return self.base

    def spec_for(self, adapter: str | None) -> ModelSpec:
        if not self.kinds:
            raise ValueError("PriorityModelResource needs at least one kind to try")
        return ModelSpec.model_validate(
            {
                "kind": self.kinds[0],
                "fallback": self.kinds[1:],
                "base": self.base,
                "adapter": adapter,
                "dtype": self.dtype,
                "device": self.device,
                "trust_remote_code": self.trust_remote_code,
                "endpoint": self.endpoint,
                "entry_point": self.entry_point,
            }
        )


def resource_for(model: ModelSpec, trace_dir: str = "", score_cache_dir: str = "") -> ModelResource:
    """The backend resource for one side of a suite's `models`."""
    common: dict[str, Any] = {"trace_dir": trace_dir, "score_cache_dir": score_cache_dir}
    if model.fallback:
        return PriorityModelResource(
            kinds=[model.kind, *model.fallback],
            base=model.base,
            dtype=model.dtype,
            device=model.device,
            trust_remote_code=model.trust_remote_code,
            endpoint=model.endpoint,
            entry_point=model.entry_point,
            **common,
        )
    if model.kind == "hf":
        return HFModelResource(
            base=model.base,
            dtype=model.dtype,
            device=model.device,
            trust_remote_code=model.trust_remote_code,
            **common,
        )
    if model.kind == "mlx":
        return MLXModelResource(
            base=model.base,
            dtype=model.dtype,
            device=model.device,
            trust_remote_code=model.trust_remote_code,
            **common,
        )
    if model.kind == "api":
        assert model.endpoint is not None  # the spec requires it
        return ApiModelResource(
            endpoint=model.endpoint,
            model=model.base,
            allow_insecure_http=model.allow_insecure_http,
            timeout_s=model.timeout_s,
            max_retries=model.max_retries,
            **common,
        )
    if model.kind == "custom":
        assert model.entry_point is not None  # the spec requires it
        return CustomModelResource(entry_point=model.entry_point, base=model.base, **common)
    raise ValueError(f"backend kind {model.kind!r} has no Dagster resource")


def backend_for(spec: SuiteSpec, trace_dir: str = "", score_cache_dir: str = "") -> ModelResource:
    """The suite's backend resource: one model, or two composed (`differential: false`)."""
    ft = resource_for(spec.models.ft, trace_dir, score_cache_dir)
    if spec.defaults.differential:
        check_one_model(spec.models.ft)
        return ft
    return TwoModelResource(
        base=resource_for(spec.models.base, trace_dir, score_cache_dir),
        ft=ft,
        trace_dir=trace_dir,
        score_cache_dir=score_cache_dir,
    )


# The engine kind each resource class serves, where the class alone decides it.
CONFIGURED_KIND = {
    "HFModelResource": "hf",
    "MLXModelResource": "mlx",
    "ApiModelResource": "api",
    "CustomModelResource": "custom",
    "TwoModelResource": "two_model",
}


class ResultStoreResource(_Strict):
    """The DuckDB result store (short connections, retried writes, numbered migrations), the
    folder sway_score writes each evaluation's HTML page into ("": no pages), and the shared
    folder each completed run is exported to as Parquet ("": none; docs/DEPLOY.md)."""

    database: str
    reports: str = ""
    export_root: str = ""
    _store: DuckStore | None = PrivateAttr(default=None)
    _matrices: dict[str, NullMatrix] = PrivateAttr(default_factory=dict)

    def store(self) -> DuckStore:
        """One store object per run: it checks the schema once, not in every step (each
        transaction still opens a connection of its own)."""
        if self._store is None:
            self._store = DuckStore(self.database)
        return self._store

    def null_matrix(self, key: str, suite: Suite, dagster_run_id: str) -> NullMatrix | None:
        """The adapter's null samples for this Dagster run's probe steps
        (`evaluations.null_matrix_for`), read once per run: null_calibration wrote them before
        any probe step reads them, and nothing in the run writes them again. Read again
        while there are none (a probe materialised without its calibration)."""
        from sway_engine import evaluations  # here: it brings the runner, kept out of this import

        run = evaluations.evaluation_id(dagster_run_id, key)
        kept = self._matrices.get(run)
        if kept is not None:
            return kept
        matrix = evaluations.null_matrix_for(self.store(), key, suite, run)
        if matrix is not None and matrix.cells:
            self._matrices[run] = matrix
        return matrix


class MlflowResource(_Strict):
    """MLflow, the mirror of the result store: one run per (adapter, Dagster run), one client
    per resource. Its faults never fail a step (sway_engine.mirror)."""

    tracking_uri: str
    experiment: str = "sway"
    artifact_root: str = ""
    ui_url: str = ""
    dagster_ui: str = ""  # the Dagster UI's base URL: each copy links its Dagster run
    _tracking: MlflowTracking | None = PrivateAttr(default=None)

    def tracking(self) -> MlflowTracking:
        if self._tracking is None:
            self._tracking = MlflowTracking(
                tracking_uri=self.tracking_uri,
                experiment=self.experiment,
                artifact_root=self.artifact_root or None,
                ui_url=self.ui_url or None,
            )
        return self._tracking

    def mirror(self, store: DuckStore, warn: Callable[[str], None]) -> Mirror:
        return Mirror(self.tracking(), store, warn, dagster_ui=self.dagster_ui or None)
