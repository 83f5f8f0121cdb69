"""The pre-commit hooks (.pre-commit-hooks.yaml): `sway-validate` checks changed suites without a
model, `sway-gate` (sway_engine/pre_commit.py) gates every changed adapter folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sway_engine.fixtures import FixturePaths
from sway_engine.pre_commit import adapter_dirs, main

ROOT = Path(__file__).resolve().parents[2]


def test_adapter_dirs_are_the_nearest_folders_holding_an_adapter_config(tmp_path: Path) -> None:
    for name in ("v1/adapter_config.json", "v1/adapter_model.safetensors", "v1/docs/card.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan/adapter_model.safetensors").write_text("")
    files = [
        tmp_path / "v1/adapter_model.safetensors",
        tmp_path / "orphan/adapter_model.safetensors",  # no config: not an adapter
        tmp_path / "v1/docs/card.md",  # inside v1: gates v1, once
        tmp_path / "v1/adapter_config.json",
        tmp_path / "README.md",
    ]
    assert adapter_dirs(files) == [tmp_path / "v1"]
    assert adapter_dirs([]) == []


def test_gate_changed_gates_each_adapter_and_exits_with_the_worst_code(
    fx: FixturePaths, capsys
) -> None:
    strong, zero = fx.adapters["doc-strong"], fx.adapters["zero"]
    files = [strong / "adapter_model.safetensors", strong / "adapter_config.json"]
    files.append(zero / "adapter_config.json")
    assert main(["--spec", str(fx.suite), *map(str, files)]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("sway-", "gate"))]
    assert [ln.split(" — ")[0] for ln in lines] == [
        f"sway-gate: {strong}",
        "gate passed",
        f"sway-gate: {zero}",
        "gate FAILED",
    ]
    assert main(["--spec", str(fx.suite), str(fx.suite)]) == 0
    assert "no adapter among the changed files" in capsys.readouterr().out
    assert main(["--spec", "missing.yaml", str(zero / "adapter_config.json")]) == 2


def git(*args: str, cwd: Path) -> str:
    ident = ["-c", "user.name=sway tests", "-c", "user.email=tests@sway.invalid"]
    done = subprocess.run(["git", *ident, *args], cwd=cwd, check=True, capture_output=True)
    return done.stdout.decode().strip()


def hook_repo(dest: Path) -> str:
    """This checkout's hooks as a user's pre-commit clones them: a git repository with
    .pre-commit-hooks.yaml and the package committed. Returns the commit."""
    for name in ("pyproject.toml", "README.md", ".pre-commit-hooks.yaml"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "sway_engine", dest / "sway_engine", ignore=shutil.ignore_patterns("__pycache__")
    )
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-q", "-m", "hooks", cwd=dest)
    return git("rev-parse", "HEAD", cwd=dest)


@pytest.mark.slow
def test_hooks_run_from_a_users_pre_commit_config(fx: FixturePaths, tmp_path: Path) -> None:
    """pre-commit itself runs both hooks, configured as README's CI section says. sway-validate
    gets its own environment (pip installs sway's base dependencies from PyPI, no torch);
    sway-gate runs the sway-gate-changed installed beside this Python (language: system)."""
    hooks, user = tmp_path / "hooks", tmp_path / "user"
    hooks.mkdir()
    user.mkdir()
    rev = hook_repo(hooks)
    (user / ".pre-commit-config.yaml").write_text(
        f"repos:\n  - repo: {hooks}\n    rev: {rev}\n    hooks:\n      - id: sway-validate\n"
        f"      - id: sway-gate\n        args: [--spec, {fx.suite}]\n"
    )
    shutil.copy(fx.suite, user / "sway.yaml")
    (user / "evals").mkdir()
    (user / "evals/sway-broken.yaml").write_text("version: 1\nsuite: [{name: d, kind: nope}]\n")
    for name in ("doc-strong", "zero"):
        shutil.copytree(fx.adapters[name], user / "adapters" / name)
    git("init", "-q", cwd=user)
    git("add", "-A", cwd=user)
    env = {
        **os.environ,
        "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }

    def run(hook: str, *files: str) -> tuple[int, str]:
        cmd = [sys.executable, "-m", "pre_commit", "run", hook, "--files", *files]
        done = subprocess.run(cmd, cwd=user, env=env, capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr

    code, out = run("sway-validate", "sway.yaml", "adapters/zero/adapter_config.json")
    assert code == 0, out
    assert "sway validate" in out and "Passed" in out
    code, out = run("sway-validate", "sway.yaml", "evals/sway-broken.yaml")
    assert code == 1, out
    assert "suite[0].kind: unknown probe kind 'nope'" in out and "ok: sway.yaml" in out
    envs = list((tmp_path / "pre-commit-home").glob("repo*/py_env-*"))
    assert envs and not list(envs[0].glob("lib/python*/site-packages/torch"))

    code, out = run(
        "sway-gate",
        "sway.yaml",
        *(f"adapters/{n}/adapter_config.json" for n in ("doc-strong", "zero")),
    )
    assert code == 1, out
    assert "sway-gate: adapters/doc-strong" in out and "gate passed" in out
    assert "sway-gate: adapters/zero" in out and "gate FAILED" in out
