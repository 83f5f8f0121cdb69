"""The deferred hf session (backends/deferred.py): nothing loads until a result is computed,
and a backend whose adapter failed to load is never used."""

from __future__ import annotations

import shutil
from pathlib import Path
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


def _gpt2_base(fx: FixturePaths, folder: Path) -> Path:
    """A tiny GPT-2 (its config names the context length `n_positions`, not
    `max_position_embeddings`) with the fixture's tokenizer."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=2000,
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (fx.base / name).is_file():
            shutil.copyfile(fx.base / name, folder / name)
    return folder


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_the_planned_name_is_the_loaded_backends_name(
    fx: FixturePaths, tmp_path: Path, model: str
) -> None:
    """A deferred session stores results under the name it plans before loading; an eagerly
    loaded backend (`sway doctor`, mlx-less fallbacks) must find them under the same name,
    also for a config whose context length has another name (GPT-2's n_positions: the planned
    name once read 2048 from config.json where the loaded model said 64)."""
    from sway_engine.backends.hf import HFBackend, planned_identity
    from sway_engine.score_cache import ScoreCache

    base = fx.base if model == "llama" else _gpt2_base(fx, tmp_path / "gpt2")
    cache = ScoreCache(tmp_path / "scores.sqlite")
    loaded = HFBackend(str(base), device="cpu")
    identity = loaded.cache_identity(cache)
    assert identity is not None
    assert planned_identity(str(base), "auto", "cpu", cache) == identity.backend
    if model == "gpt2":
        assert loaded.max_len == 64  # what rows are cut to: the model's own limit
