"""The one backend factory: a model spec's kind, its fallback kinds, and two-model composition.

The CLI runner and the Dagster resources build every engine backend here. Heavy frameworks
(torch, transformers, peft, mlx) are imported only when a backend of their kind is built.
"""

from __future__ import annotations

import functools
from pathlib import Path

from sway_engine.backends.base import Backend
from sway_engine.errors import BackendError, SwayError
from sway_engine.spec import ModelSpec


def build_backend(model: ModelSpec, *, base: ModelSpec | None = None, **options: object) -> Backend:
    """Construct the backend a model spec names (heavy imports happen here, not at import).

    `base` given (`defaults.differential: false`): the base view comes from a backend built
    from it and the fine-tuned view from `model`'s, of any kinds (TwoModelBackend).
    `model.fallback` lists kinds tried after `model.kind` (PriorityBackend).
    """
    if base is not None:
        from sway_engine.backends.two_model import TwoModelBackend

        base_backend = build_side(base, **options)
        try:
            ft_backend = build_side(model, **options)
        except BaseException:
            base_backend.close()
            raise
        return TwoModelBackend(base_backend, ft_backend)
    check_one_model(model)
    return build_side(model, **options)


def local_model_exists(base: str) -> None:
    """A base written as a path must exist (transformers would report a malformed repo id)."""
    if base.startswith(("/", "./", "../", "~")) and not Path(base).expanduser().exists():
        raise BackendError(
            f"base model {base}: no such directory (a local path; for a hub model give its id, "
            "e.g. HuggingFaceTB/SmolLM2-135M)"
        )


def check_one_model(model: ModelSpec) -> None:
    """Both views from one backend: an API endpoint cannot give them (it serves one model)."""
    if "api" in (model.kind, *model.fallback):
        raise BackendError(
            "an api endpoint serves one fixed model, so its base and fine-tuned views would be "
            "the same model (every divergence 0): set defaults.differential: false and point "
            "models.base and models.ft at two endpoints"
        )


def build_side(model: ModelSpec, **options: object) -> Backend:
    """One model's backend: its kind, else each of its fallback kinds in order."""
    if not model.fallback:
        return build_kind(model, **options)
    from sway_engine.backends.priority import PriorityBackend

    kinds = (model.kind, *model.fallback)
    return PriorityBackend(
        [
            (k, functools.partial(build_kind, model.model_copy(update={"kind": k}), **options))
            for k in kinds
        ]
    )


def build_kind(model: ModelSpec, **options: object) -> Backend:
    """A backend of exactly `model.kind` (no fallback); `options` go to its constructor."""
    if model.kind in ("hf", "mlx"):
        local_model_exists(model.base)
    if model.kind == "api":
        from sway_engine.backends.api import APIBackend

        assert model.endpoint is not None  # the spec requires it for kind api
        settings = {"timeout_s": model.timeout_s, "max_retries": model.max_retries, **options}
        return APIBackend(
            model.endpoint,
            model.base,
            allow_insecure_http=model.allow_insecure_http,
            **settings,  # type: ignore[arg-type]
        )
    if model.kind == "custom":
        from sway_engine.backends.custom import CustomBackend

        return CustomBackend(model)
    if model.kind == "hf":
        from sway_engine.backends.hf import HFBackend

        return HFBackend(
            model.base,
            model.adapter,
            dtype=model.dtype,
            device=model.device,
            trust_remote_code=model.trust_remote_code,
            **options,  # type: ignore[arg-type]
        )
    if model.kind == "mlx":
        from sway_engine.backends.mlx import MLXBackend

        return MLXBackend(
            model.base,
            model.adapter,
            dtype=model.dtype,
            device=model.device,
            trust_remote_code=model.trust_remote_code,
            **options,  # type: ignore[arg-type]
        )
    raise SwayError(f"backend kind {model.kind!r} is not available in this build of sway yet")
