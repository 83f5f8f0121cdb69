"""The upstream README's full suite, sway beside dlm-sway 0.1.0, timed as a user times it.

Each run is a whole fresh `sway run` process of either tool on the same document, adapter and
prompts (tools alternating): wall time of the process, the suite time the tool reports itself
(after the model load), and the verdicts. dlm-sway runs the README's entries whose kinds 0.1.0
registers, minus fields its specs reject (its defaults then), plus the inline inputs (`prompts`,
`cases`) `sway autogen` draws from the document, since dlm-sway reads a `.dlm` only through the
`dlm` package (not on PyPI); its on-disk null cache (in a folder of the bench's own, never the
user's ~/.dlm-sway) is cleared before every run. sway runs the
README file, the same at upstream's settings (3 fixed nulls, top-k + tail) and at its own
defaults (8 matched nulls, exact), its scoring cache empty. `python -m bench.run
--full-suite-only` runs just this comparison.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README_SUITE = ROOT / "tests" / "data" / "upstream_full_suite.yaml"
VERDICTS = ("PASS", "FAIL", "WARN", "SKIP", "ERROR")
UPSTREAM_NULL = {"mode": "fixed", "seeds": 3, "init_scale": 0.02}
INPUT_FIELDS = ("prompts", "cases")
CACHE_FILE = re.compile(r"[0-9a-f]{32}\.json(\.tmp)?")

# tool key -> its row label
TOOLS = {
    "dlm_sway": "dlm-sway 0.1.0, README suite (kinds it has), its settings",
    "sway_file": "sway, README suite file as is",
    "sway_parity": "sway, README suite at upstream settings (3 fixed nulls, top-k)",
    "sway_default8": "sway, README suite at sway defaults (8 matched nulls, exact)",
    "sway_same": "sway, upstream settings, only the probes dlm-sway completes (same work)",
}
# The README kinds dlm-sway 0.1.0 completes here (measured 2026-12-04: adapter_revert and
# cluster_kl need `dlm-sway[semsim]`, section_internalization, preference_flip and leakage
# sections from the `.dlm` bridge, style_fingerprint prompts it does not take). `summarize`
# records any probe name where the two differ (`differs_from_dlm_sway`).
UPSTREAM_COMPLETES = frozenset(
    {
        "null_adapter",
        "delta_kl",
        "prompt_collapse",
        "paraphrase_invariance",
        "calibration_drift",
        "external_perplexity",
        "adapter_ablation",
    }
)

Accepts = Mapping[str, set[str]]


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def document_inputs(battery: Path) -> dict[str, dict[str, Any]]:
    """Per kind, the inline inputs (INPUT_FIELDS) a `sway autogen` suite of the document holds."""
    entries = yaml.safe_load(battery.read_text())["suite"]
    return {e["kind"]: {k: e[k] for k in INPUT_FIELDS if k in e} for e in entries}


def full_suite_specs(
    fixture_suite: Path,
    base: Path,
    adapter: Path,
    document: Path,
    out: Path,
    accepts: Accepts,
    inputs: Mapping[str, dict[str, Any]],
) -> dict[str, Path]:
    """Write the README suite for both tools with our base, adapter, document and prompts.

    `accepts` maps each kind dlm-sway registers to the fields its spec takes (`upstream_accepts`);
    `inputs` (`document_inputs`) fills the inline inputs dlm-sway cannot read from the document.
    Returns paths: `file` (the README suite, sway), `parity` (upstream settings), `same`
    (upstream settings, only UPSTREAM_COMPLETES), `default` (sway's defaults) and `upstream`
    (dlm-sway's).
    """
    readme = yaml.safe_load(README_SUITE.read_text())
    ours = {e["kind"]: e for e in yaml.safe_load(fixture_suite.read_text())["suite"]}
    prompts = {k: list(ours[k]["prompts"]) for k in ("delta_kl", "adapter_ablation")}
    models = {
        "base": {"kind": "hf", "base": str(base)},
        "ft": {"kind": "hf", "base": str(base), "adapter": str(adapter)},
    }
    suite = [
        {**e, "prompts": prompts[e["kind"]]} if e["kind"] in prompts else e for e in readme["suite"]
    ]
    spec = {**readme, "dlm_source": str(document), "models": models, "suite": suite}
    defaults = readme["defaults"]
    null_entry = next(e for e in suite if e["kind"] == "null_adapter")
    sway_defaults = {k: v for k, v in defaults.items() if k != "top_k"}
    upstream_suite = [
        {
            k: v
            for k, v in {**inputs.get(e["kind"], {}), **e}.items()
            if k in ("name", "kind") or k in accepts[e["kind"]]
        }
        for e in suite
        if e["kind"] in accepts
    ]
    parity = {
        **spec,
        "defaults": {**defaults, "divergence_mode": "topk_tail", "null": UPSTREAM_NULL},
    }
    same = [e for e in suite if e["kind"] in UPSTREAM_COMPLETES]
    return {
        "file": _write(out / "full-file.yaml", spec),
        "parity": _write(out / "full-parity.yaml", parity),
        "same": _write(out / "full-same.yaml", {**parity, "suite": same}),
        "default": _write(
            out / "full-default.yaml",
            {
                **spec,
                "defaults": sway_defaults,
                "suite": [
                    {"name": null_entry["name"], "kind": "null_adapter"} if e is null_entry else e
                    for e in suite
                ],
            },
        ),
        "upstream": _write(out / "full-upstream.yaml", {**spec, "suite": upstream_suite}),
    }


def upstream_accepts(python: Path) -> dict[str, set[str]]:
    """The kinds dlm-sway registers and the fields each one's spec takes (in its venv)."""
    code = (
        "import json, dlm_sway.probes; from dlm_sway.probes.base import registry; "
        "print(json.dumps({k: sorted(c.spec_cls.model_fields) for k, c in registry().items()}))"
    )
    proc = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return {k: set(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def dlm_sway_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The folder dlm-sway 0.1.0 keeps its null-stats cache under (`_null_cache._cache_root`
    without the `null-stats` leaf): $XDG_CACHE_HOME/dlm-sway, else ~/.dlm-sway."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() / "dlm-sway" if xdg else Path.home() / ".dlm-sway"


def clear_dlm_sway_cache(folder: Path) -> None:
    """Delete `folder` when it holds only dlm-sway's null-stats files; refuse otherwise."""
    if not folder.exists():
        return
    stray = [
        p
        for p in folder.rglob("*")
        if not (p == folder / "null-stats" and p.is_dir())
        and not (p.parent == folder / "null-stats" and p.is_file() and CACHE_FILE.fullmatch(p.name))
    ]
    if stray:
        raise RuntimeError(
            f"{folder} holds files that are not dlm-sway null-stats ({stray[0]}, ...): "
            "not deleting it; move them away and rerun"
        )
    shutil.rmtree(folder)


def verdict_counts(verdicts: list[str]) -> dict[str, int]:
    upper = [v.upper() for v in verdicts]
    return {v: upper.count(v) for v in VERDICTS}


def whole_run(
    cmd: list[str], result: Path, threads: int, env: Mapping[str, str], timeout: float
) -> dict[str, Any]:
    """One tool run as a user times it: a fresh process, its wall time, and what its JSON says."""
    result.unlink(missing_ok=True)
    full_env = {
        **env,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    t = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    wall = time.perf_counter() - t
    if not result.exists():
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"{cmd[0]} wrote no result (exit {proc.returncode}):\n{tail}")
    data = json.loads(result.read_text())
    verdicts = {p["name"]: str(p["verdict"]).upper() for p in data["probes"]}
    counts = verdict_counts(list(verdicts.values()))
    return {
        "process_s": wall,
        "suite_s": data.get("wall_s", data.get("wall_seconds")),
        "exit": proc.returncode,
        "probes": len(verdicts),
        "completed": counts["PASS"] + counts["FAIL"] + counts["WARN"],
        "counts": counts,
        "verdicts": verdicts,
        "messages": {
            p["name"]: p.get("message", "")
            for p in data["probes"]
            if str(p["verdict"]).upper() in ("SKIP", "ERROR")
        },
    }


def sway_job(spec: Path, work: Path, threads: int, timeout: float = 1800) -> dict[str, Any]:
    """`sway run` of `spec`, its persistent scoring cache on (the default) but empty."""
    cache = work / "score-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("SWAY_HOME", "SWAY_SCORE_CACHE")}
    env["SWAY_SCORE_CACHE_DIR"] = str(cache)
    out = work / f"{spec.stem}.json"
    cmd = [sys.executable, "-m", "sway_engine.cli", "run", str(spec), "-j", str(out)]
    return whole_run(cmd, out, threads, env, timeout)


def dlm_sway_job(
    python: Path, spec: Path, work: Path, threads: int, timeout: float = 2400
) -> dict[str, Any]:
    """dlm-sway's `sway run` of `spec` (its console script in its venv; its defaults: null
    cache on), its cache under `work`, cleared first."""
    env = {k: v for k, v in os.environ.items() if k != "SWAY_DISABLE_NULL_CACHE"}
    # Its cache in a folder of this bench's own, emptied before each run: a user's own
    # ~/.dlm-sway is never read or deleted.
    env["XDG_CACHE_HOME"] = str(work / "dlm-sway-cache")
    clear_dlm_sway_cache(dlm_sway_cache_dir(env))
    out = work / f"{spec.stem}.json"
    cmd = [str(python.absolute().parent / "sway"), "run", str(spec), "--json", str(out)]
    return whole_run(cmd, out, threads, env, timeout)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per tool, ratios against dlm-sway, and the last good run's verdicts."""
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        row: dict[str, Any] = {
            "process_s": statistics.median(r["process_s"] for r in good) if good else None,
            "suite_s": statistics.median(r["suite_s"] for r in good) if good else None,
            "runs": [{k: r.get(k) for k in ("process_s", "suite_s")} for r in rs],
            "errors": [r["error"] for r in rs if "error" in r],
        }
        if good:
            last = good[-1]
            row.update({k: last[k] for k in ("probes", "completed", "counts", "verdicts")})
            row["not_completed"] = last["messages"]
        out[name] = row
    up = out.get("dlm_sway", {})
    same = out.get("sway_same", {})
    if up.get("verdicts") and same.get("verdicts"):
        done = {n for n, v in up["verdicts"].items() if v not in ("SKIP", "ERROR")}
        same["differs_from_dlm_sway"] = sorted(done ^ set(same["verdicts"]))
    for name, row in out.items():
        if name == "dlm_sway":
            continue
        for key in ("process_s", "suite_s"):
            if up.get(key) and row.get(key):
                row[f"{key}_x"] = up[key] / row[key]
    return out


def jobs(
    specs: dict[str, Path],
    peer_python: Path | None,
    tools: tuple[str, ...],
    threads: int,
    work: Path,
) -> dict[str, Callable[[], dict[str, Any]]]:
    """One whole-process job per tool in `tools` (keys of TOOLS); dlm-sway's only with its venv."""
    work.mkdir(parents=True, exist_ok=True)
    spec_of = {
        "sway_file": "file",
        "sway_parity": "parity",
        "sway_default8": "default",
        "sway_same": "same",
    }
    out: dict[str, Callable[[], dict[str, Any]]] = {}
    for tool in tools:
        if tool == "dlm_sway" and peer_python is not None:
            out[tool] = lambda py=peer_python: dlm_sway_job(py, specs["upstream"], work, threads)
        elif tool != "dlm_sway":
            spec = specs[spec_of[tool]]
            out[tool] = lambda spec=spec: sway_job(spec, work, threads)
    return out


def markdown_rows(full: dict[str, Any]) -> list[str]:
    """The report's section: whole process and in-process suite time, verdicts per tool."""
    lines = [
        "## Full suite (upstream README), whole fresh processes, tools alternating",
        "",
        "`sway run` / `dlm-sway run` as a user runs them; dlm-sway's null cache cleared before "
        "each of its runs, sway's scoring cache empty. process = whole process wall; suite = "
        "the suite time the tool reports itself (in process, after the model load).",
        "",
        "| model | tool | probes | completed | PASS/FAIL/WARN/SKIP/ERROR | process (s) "
        "| x dlm-sway | suite (s) | x dlm-sway |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, res in full.items():
        for tool, label in TOOLS.items():
            t = res.get(tool)
            if not t:
                continue
            if t.get("process_s") is None:
                err = (t.get("errors") or ["not run"])[0].splitlines()[0][:120]
                lines.append(f"| {model} | {label} | failed: {err} | | | | | | |")
                continue
            c = t["counts"]
            counts = "/".join(str(c[v]) for v in VERDICTS)
            px, sx = t.get("process_s_x"), t.get("suite_s_x")
            lines.append(
                f"| {model} | {label} | {t['probes']} | {t['completed']} | {counts} "
                f"| {t['process_s']:.1f} | {f'{px:.2f}x' if px else '—'} "
                f"| {t['suite_s']:.1f} | {f'{sx:.2f}x' if sx else '—'} |"
            )
    notes = []
    for model, res in full.items():
        for tool, t in res.items():
            for name, msg in (t.get("not_completed") or {}).items() if isinstance(t, dict) else ():
                verdict = t["verdicts"][name]
                notes.append(
                    f"- {model}, {tool}: {name} {verdict}: {' '.join(str(msg).split())[:160]}"
                )
    if notes:
        lines += ["", "Probes that did not complete:", "", *notes]
    return [*lines, ""]
