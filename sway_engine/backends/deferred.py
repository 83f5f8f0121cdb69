"""A local backend that loads its base model on the first request the persistent scoring
cache cannot answer: re-evaluating an unchanged adapter loads no model, and where the device
is known without it (a CPU-only torch), imports no torch, transformers or PEFT either.

The cache names a backend before it exists (`hf.planned_identity`: the base's files, library
versions, dtype, device, context length); the trained adapter is named by its files as always.
Everything else (a request to compute, another adapter, an attribute only a loaded backend
has) loads it, then loads the adapter it was given. Only a local hf base without fallback is
deferred (`for_model`); every other backend loads at once, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from sway_engine.adapters import AdapterInfo, read_adapter
from sway_engine.backends.base import Backend
from sway_engine.backends.local import COUNTERS, named_view
from sway_engine.requests import Request, Result
from sway_engine.score_cache import Identity, ScoreCache
from sway_engine.spec import ModelSpec
from sway_engine.views import View

log = logging.getLogger(__name__)


class Deferred:
    """`load()` postponed until a result must be computed (see the module docstring)."""

    def __init__(
        self,
        load: Callable[[], Any],
        *,
        kind: str,
        capabilities: frozenset[str],
        plan: Callable[[ScoreCache], str | None],
        tokenizer: Callable[[], Any],
        counters: Sequence[str] = (),
        adapter: str | None = None,
    ) -> None:
        self._load = load
        self._plan = plan
        self._load_tokenizer = tokenizer
        self._tokenizer: Any = None
        self._real: Any = None
        self._path: str | None = None
        self._info: AdapterInfo | None = None
        self._base_rows: tuple[ScoreCache, str] | None = None
        self._idle = {**dict.fromkeys((*COUNTERS, *counters), 0), "base_loads": 0}
        if adapter is not None:  # load() brings it onto the model itself
            self._info = read_adapter(adapter)
        self.kind = kind
        self.capabilities = capabilities

    @property
    def loaded(self) -> bool:
        return self._real is not None

    @property
    def real(self) -> Any:
        """The loaded backend (loading it, and the adapter given so far, on first use). An
        adapter that does not fit the base raises here, and again on every later use: a
        backend without its adapter is never handed out."""
        if self._real is None:
            real = self._load()
            if self._base_rows is not None:
                real.share_base_rows(*self._base_rows)
            if self._path is not None:
                real.load_adapter(self._path)
            self._real = real
        return self._real

    # ---- what works without the model ----

    def load_adapter(self, path: str) -> None:
        """Swap the trained adapter: read and checked now (hash, config, finite weights), put
        on the model when it loads (where an adapter that does not fit the base fails)."""
        if self._real is not None:
            self._real.load_adapter(path)
            return
        self._info = read_adapter(path)
        self._path = str(path)

    @property
    def adapter(self) -> AdapterInfo | None:
        return self._real.adapter if self._real is not None else self._info

    @property
    def extra_adapters(self) -> dict[str, AdapterInfo]:
        return self._real.extra_adapters if self._real is not None else {}

    def cache_identity(self, cache: ScoreCache) -> Identity | None:
        planned = self._plan(cache)
        if planned is None:  # named only once loaded (a hub revision)
            identity: Identity | None = self.real.cache_identity(cache)
            return identity
        return Identity(backend=planned, view=self._view_identity, decode=self._decode)

    def _view_identity(self, view: View) -> str | None:
        return named_view(view, self.adapter, self.extra_adapters)

    def _decode(self, ids: list[int]) -> list[str]:
        """Token strings of a stored distribution: the loaded model's tokenizer, else the
        tokenizer alone (loaded on first use)."""
        if self._real is not None:
            tokens: list[str] = self._real.tokenizer.convert_ids_to_tokens(ids)
            return tokens
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        tokens = self._tokenizer.convert_ids_to_tokens(ids)
        return tokens

    def share_base_rows(self, store: ScoreCache, backend: str) -> None:
        self._base_rows = (store, backend)
        if self._real is not None:
            self._real.share_base_rows(store, backend)

    def counters(self) -> dict[str, float]:
        if self._real is None:
            return dict(self._idle)
        counters: dict[str, float] = self._real.counters()
        return counters

    def forget_rows(self) -> None:
        if self._real is not None:
            self._real.forget_rows()

    def close(self) -> None:
        if self._real is not None:
            self._real.close()

    # ---- what needs it ----

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        results: list[Result] = self.real.execute(requests)
        return results

    def add_adapter(self, path: Any, label: str) -> str:
        label_used: str = self.real.add_adapter(path, label)
        return label_used

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.real, name)


def for_model(model: ModelSpec, load: Callable[[], Backend]) -> Backend | Deferred:
    """`load()` (which builds `model`, its adapter included) deferred where the cache can name
    the backend before it loads (an hf model without fallback kinds); otherwise `load()` now.
    The adapter is read and checked now either way."""
    if model.kind != "hf" or model.fallback:
        return load()
    from sway_engine.backends.build import local_model_exists
    from sway_engine.backends.hf import HF_COUNTERS, HFBackend, planned_identity

    local_model_exists(model.base)

    def plan(cache: ScoreCache) -> str | None:
        return planned_identity(model.base, model.dtype, model.device, cache)

    def tokenizer() -> Any:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(
            model.base, trust_remote_code=model.trust_remote_code
        )

    return Deferred(
        load,
        kind=HFBackend.kind,
        capabilities=HFBackend.capabilities,
        plan=plan,
        tokenizer=tokenizer,
        counters=HF_COUNTERS,
        adapter=model.adapter,
    )
