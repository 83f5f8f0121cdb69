"""Session fixtures: the tiny model and adapters are built once per test run (cached)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sway_engine.fixtures import FixturePaths, build_fixtures


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with every migration applied (slow: built once, then copied)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def fx() -> FixturePaths:
    return build_fixtures(log=lambda _msg: None)


def scaled_adapter(src: Path, dst: Path, factor: float) -> Path:
    """Copy an adapter with every lora_B multiplied by `factor` (update scaled by factor)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    scaled = {k: (v * factor if "lora_B" in k else v).contiguous() for k, v in tensors.items()}
    save_file(scaled, str(dst / "adapter_model.safetensors"))
    return dst


def entry_for(kind: str, name: str = "p", **fields: object) -> object:
    """One parsed suite entry of `kind` (fields as in sway.yaml) in a minimal valid suite."""
    from sway_engine.spec import parse_spec

    data = {
        "version": 1,
        "models": {"base": {"base": "m"}, "ft": {"base": "m", "adapter": "a"}},
        "suite": [{"name": name, "kind": kind, **fields}],
    }
    return parse_spec(data)[1][0]
