"""A temporary sway home per test: adapters folder, suite, DuckDB and MLflow (template copy)."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from sway_dagster.settings import Settings


@pytest.fixture
def home(tmp_path: Path, fx, template_db: Path) -> Settings:  # type: ignore[no-untyped-def]
    root = tmp_path / "home"
    (root / "adapters").mkdir(parents=True)
    shutil.copyfile(fx.suite, root / "sway.yaml")
    shutil.copyfile(template_db, root / "mlflow.db")
    return Settings.from_env({"SWAY_HOME": str(root)})


def add_adapter(settings: Settings, src: Path, name: str | None = None) -> Path:
    dst = settings.adapters_dir / (name or src.name)
    shutil.copytree(src, dst)
    old = 1_000_000_000
    for path in [dst, *dst.iterdir()]:
        import os

        os.utime(path, (old, old))
    return dst


@pytest.fixture
def instance():  # type: ignore[no-untyped-def]
    with dg.instance_for_test() as inst:
        yield inst
