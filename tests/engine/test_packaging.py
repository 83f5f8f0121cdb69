"""What pyproject.toml promises an installer: safe floors, one pinned Dagster set."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def requirements(extra: str) -> dict[str, Requirement]:
    data = tomllib.loads(PYPROJECT.read_text())
    listed = data["project"]["optional-dependencies"][extra]
    return {(r := Requirement(line)).name: r for line in listed}


def test_torch_floor_excludes_the_weights_only_bypass() -> None:
    """Issue 14 item 5: torch < 2.6 can run code from a checkpoint loaded with
    weights_only=True (CVE-2025-32434); pyproject allowed 2.4."""
    torch = requirements("hf")["torch"]
    assert not torch.specifier.contains(Version("2.5.1"))
    assert torch.specifier.contains(Version("2.6.0"))


def test_the_dagster_set_is_pinned_together() -> None:
    dagster = requirements("dagster")
    pins = {name: str(dagster[name].specifier) for name in dagster if name.startswith("dagster")}
    assert len(set(pins.values())) == 1 and next(iter(pins.values())).startswith("=="), pins
    assert str(dagster["duckdb"].specifier).startswith("==")
    assert str(dagster["mlflow"].specifier).startswith("==")
