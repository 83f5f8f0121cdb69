"""`make bench`: sway against dlm-sway 0.1.0, lm-eval 0.4.13 and the machine's own limit.

Everything is a ratio measured in one run, with the tools alternating (machines are noisy):
1. suite (a), upstream's three probes at upstream's defaults (null_adapter with 3 fixed-scale
   nulls, delta_kl, adapter_ablation; top-k 256 + tail divergences), on the tiny fixture and
   on the `bench` model (SmolLM2-135M's shape, random weights, rank-8 LoRA): sway in parity
   mode, sway with its defaults (8 matched nulls, exact divergences) and dlm-sway, each in a
   fresh process per repetition. Parity: our delta_kl per-prompt JS and ablation curve equal
   dlm-sway's within 1e-4; in exact mode they equal a plain full-vocabulary computation
   (transformers + PEFT, no sway code) within 1e-5;
2. suite (b), our default full suite, on the fixture;
3. forward passes, tokens forwarded and padded versus the unique tokens the suite needs;
4. achieved FLOP/s of scoring (2 x parameters x tokens / scoring time) against this
   machine's matmul peak measured in the same run;
5. cost versus null seeds (1, 3, 8, 16) and versus adapters evaluated together (1, 2, 4, 8);
6. rolling log-likelihood throughput against lm-eval's HF model on the same texts;
7. the same on CUDA (bf16) where a GPU is present;
8. start-up: `import sway_dagster`, the code location (`sway_dagster.definitions` plus
   `build_definitions` on the fixture suite) and `import dagster` alone, fresh processes;
9. the upstream README's full suite, `sway run` beside `dlm-sway run` in whole fresh processes
   on both models (bench/full_suite.py).
Writes bench/results/<utc>.json and .md. `python bench/run.py --quick` is a smaller run;
`python -m bench.run --full-suite-only --repeats 2` runs only 9 (results/full-suite-<utc>.*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import full_suite

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WORK = HERE / ".work"
PEERS = HERE / ".peers"
PEER_PINS = ("dlm-sway[hf]==0.1.0", "lm-eval==0.4.13")
SEEDS = (1, 3, 8, 16)
ADAPTER_COUNTS = (1, 2, 4, 8)
PARITY_TOL = 1e-4
EXACT_TOL = 1e-5

Log = Callable[[str], None]


# ---- the machine ----


def matmul_peak(
    n: int = 1024, seconds: float = 1.0, dtype: str = "fp32", device: str = "cpu"
) -> float:
    """Best FLOP/s of an n x n matmul over about `seconds` (the machine's practical peak)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, dtype=dt, device=device)
    b = torch.randn(n, n, dtype=dt, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
    }


# ---- specs ----


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def warm_page_cache(*dirs: Path) -> None:
    """Read every file under `dirs` once, so no tool's first repetition pays a cold disk read
    of the model for the others (the alternation always starts with the same tool)."""
    for d in dirs:
        for path in Path(d).rglob("*"):
            if path.is_file():
                with path.open("rb") as fh:
                    while fh.read(1 << 24):
                        pass


def suite_specs(fixture_suite: Path, base: Path, adapter: Path, out: Path) -> dict[str, Path]:
    """Write suite (a) for both tools and our variants, with the fixture suite's prompts.

    Returns paths: `parity` (ours, upstream settings and formula), `exact` (ours, upstream
    null settings, exact divergences), `default` (ours, our defaults: 8 matched nulls,
    exact) and `upstream` (dlm-sway's own spec, null cache off).
    """
    src = _load_yaml(fixture_suite)
    entries = {e["kind"]: e for e in src["suite"]}
    delta, ablation = entries["delta_kl"], entries["adapter_ablation"]
    models = {
        "base": {"kind": "hf", "base": str(base)},
        "ft": {"kind": "hf", "base": str(base), "adapter": str(adapter)},
    }

    def write(name: str, data: dict[str, Any]) -> Path:
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    suite_a = [
        {"name": "null_baseline", "kind": "null_adapter", "runs": 3},
        {"name": "delta_kl_doc", "kind": "delta_kl", "prompts": list(delta["prompts"])},
        {"name": "ablation", "kind": "adapter_ablation", "prompts": list(ablation["prompts"])},
    ]
    upstream_null = {"mode": "fixed", "seeds": 3, "init_scale": 0.02}
    out.mkdir(parents=True, exist_ok=True)
    ours = {"version": 1, "models": models}
    return {
        "parity": write(
            "a-parity",
            {
                **ours,
                "defaults": {
                    "seed": 0,
                    "top_k": 256,
                    "divergence_mode": "topk_tail",
                    "null": upstream_null,
                },
                "suite": suite_a,
            },
        ),
        "exact": write(
            "a-exact",
            {**ours, "defaults": {"seed": 0, "null": upstream_null}, "suite": suite_a},
        ),
        "default": write(
            "a-default",
            {
                **ours,
                "defaults": {"seed": 0},
                "suite": [{"name": "null_baseline", "kind": "null_adapter"}, *suite_a[1:]],
            },
        ),
        "upstream": write(
            "a-upstream",
            {
                "version": 1,
                "models": models,
                "defaults": {"seed": 0, "top_k": 256},
                "suite": [{**suite_a[0], "cache": False}, *suite_a[1:]],
            },
        ),
    }


def full_suite_spec(fx: Any, out: Path) -> Path:
    """Suite (b): the fixture battery, `sway autogen` of the fixture document (every probe)."""
    from sway_engine.fixtures.battery import write_battery

    return write_battery(fx, out / "b-full.yaml")


def seeds_spec(fixture_suite: Path, seeds: int, out: Path) -> Path:
    """The fixture suite with `seeds` matched nulls (1: no null entry at all)."""
    data = _load_yaml(fixture_suite)
    if seeds == 1:
        data["suite"] = [e for e in data["suite"] if e["kind"] != "null_adapter"]
    else:
        data.setdefault("defaults", {})["null"] = {"seeds": seeds}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"seeds-{seeds}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- running measured jobs in fresh processes ----


def run_job(python: Path | str, script: list[str], job: dict[str, Any], timeout: float) -> dict:
    """Run one job in a fresh process; its last stdout line is its JSON result."""
    t = time.perf_counter()
    proc = subprocess.run(
        [str(python), *script, json.dumps(job)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"},
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"{job['tool']} job failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def ours(job: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    return run_job(sys.executable, ["-m", "bench.work"], job, timeout)


def alternate(
    jobs: dict[str, Callable[[], dict[str, Any]]], repeats: int, log: Log
) -> dict[str, list[dict[str, Any]]]:
    """Run each job `repeats` times, interleaved (a b c a b c ...), so noise hits all alike."""
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in jobs}
    for rep in range(repeats):
        for name, job in jobs.items():
            try:
                res = job()
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                res = {"error": str(exc)[-1500:]}
            out[name].append(res)
            took = res.get("suite_s", res.get("score_s"))
            log(
                f"  {name} rep {rep + 1}: "
                + (f"{took:.2f}s" if took else res.get("error", "")[:200])
            )
    return out


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if key in r and r[key] is not None]
    return statistics.median(vals) if vals else None


# ---- the peers' virtualenv ----


def peers_python(log: Log) -> tuple[Path | None, str]:
    """bench/.peers/venv with dlm-sway and lm-eval; torch from the same wheel as ours."""
    import peft
    import torch
    import transformers

    venv = PEERS / "venv"
    python = venv / "bin" / "python"
    pins = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"peft=={peft.__version__}",
        *PEER_PINS,
    ]
    stamp = venv / (".installed-" + "-".join(p.replace("[", "").replace("]", "") for p in pins))
    if stamp.exists():
        return python, "ready"
    log(f"peers: creating {venv} ({', '.join(pins)})")
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, pins[0]], check=True, timeout=900, capture_output=True)
        subprocess.run([*pip, *pins[1:]], check=True, timeout=1200, capture_output=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        text = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        return None, f"peer install failed: {exc} {text[-800:]}"
    stamp.touch()
    return python, "installed"


def peer(python: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def call(job: dict[str, Any], timeout: float = 1200) -> dict[str, Any]:
        return run_job(python, [str(HERE / "peer_worker.py")], job, timeout)

    return call


# ---- comparisons ----


def parity(ours_run: dict[str, Any], up_run: dict[str, Any]) -> dict[str, Any]:
    """Largest |ours - dlm-sway| over delta_kl per-prompt JS and the ablation curve."""
    o, u = ours_run["probes"], up_run["probes"]
    d_kl = max(
        abs(a - b)
        for a, b in zip(o["delta_kl_doc"]["values"], u["delta_kl_doc"]["per_prompt"], strict=True)
    )
    d_ab = max(
        abs(a - b) for a, b in zip(o["ablation"]["curve"], u["ablation"]["curve"], strict=True)
    )
    return {
        "delta_kl_mean": [o["delta_kl_doc"]["raw"], u["delta_kl_doc"]["raw"]],
        "delta_kl_max_abs_diff": d_kl,
        "ablation_max_abs_diff": d_ab,
        "ok": max(d_kl, d_ab) <= PARITY_TOL,
    }


def exact_check(run: dict[str, Any]) -> dict[str, Any]:
    """Our exact-mode values against the plain full-vocabulary computation."""
    plain, probes = run["plain"], run["probes"]
    d_kl = max(
        abs(a - b) for a, b in zip(probes["delta_kl_doc"]["values"], plain["delta_kl"], strict=True)
    )
    d_ab = max(
        abs(a - b)
        for a, b in zip(probes["ablation"]["curve"], plain["ablation_curve"], strict=True)
    )
    return {
        "delta_kl_max_abs_diff": d_kl,
        "ablation_max_abs_diff": d_ab,
        "ok": max(d_kl, d_ab) <= EXACT_TOL,
    }


def suite_a(
    label: str,
    specs: dict[str, Path],
    up: Callable[[dict[str, Any]], dict[str, Any]] | None,
    repeats: int,
    threads: int,
    log: Log,
) -> dict[str, Any]:
    log(f"suite (a) on {label}: sway (parity, default 8 matched) vs dlm-sway, x{repeats}")
    jobs: dict[str, Callable[[], dict[str, Any]]] = {
        "sway_parity": lambda: ours(
            {"tool": "sway", "spec": str(specs["parity"]), "threads": threads}
        ),
        "sway_default8": lambda: ours(
            {"tool": "sway", "spec": str(specs["default"]), "threads": threads}
        ),
    }
    if up is not None:
        jobs["dlm_sway"] = lambda: up(
            {"tool": "dlm-sway", "spec": str(specs["upstream"]), "threads": threads}
        )
    runs = alternate(jobs, repeats, log)
    exact = ours(
        {"tool": "sway", "spec": str(specs["exact"]), "threads": threads, "plain_check": True}
    )
    out: dict[str, Any] = {"repeats": repeats}
    for name, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        out[name] = {
            "suite_s": median_of(good, "suite_s"),
            "load_s": median_of(good, "load_s"),
            "first_result_s": median_of(good, "first_result_s"),
            "peak_rss_mb": median_of(good, "peak_rss_mb"),
            "runs_s": [r.get("suite_s") for r in rs],
            "errors": [r["error"] for r in rs if "error" in r],
        }
        if good:
            last = good[-1]
            for key in ("counters", "unique_tokens", "unique_rows", "parameters"):
                if key in last:
                    out[name][key] = last[key]
            for key in ("forward_passes", "tokens_forwarded"):
                if key in last:
                    out[name][key] = last[key]
            out[name]["verdicts"] = {k: v["verdict"] for k, v in last["probes"].items()}
    if "dlm_sway" in out and out["dlm_sway"]["suite_s"]:
        up_s = out["dlm_sway"]["suite_s"]
        for name in ("sway_parity", "sway_default8"):
            if out[name]["suite_s"]:
                out[name]["speedup_vs_dlm_sway"] = up_s / out[name]["suite_s"]
        pairs = [
            (o, u)
            for o, u in zip(runs["sway_parity"], runs["dlm_sway"], strict=True)
            if "error" not in o and "error" not in u
        ]
        if pairs:
            out["parity"] = parity(*pairs[-1])
    out["exact"] = exact_check(exact) if "plain" in exact else {"error": "no plain values"}
    good = [r for r in runs["sway_default8"] if "error" not in r]
    out["_last_default"] = good[-1] if good else None
    return out


def work_stats(run: dict[str, Any]) -> dict[str, Any]:
    c = run["counters"]
    unique = run["unique_tokens"]
    return {
        "forward_passes": c["forward_passes"],
        "rows_forwarded": c["rows_forwarded"],
        "unique_rows": run["unique_rows"],
        "tokens_forwarded": c["tokens_forwarded"],
        "padded_tokens": c["padded_tokens"],
        "unique_tokens": unique,
        "forwarded_over_unique": c["tokens_forwarded"] / unique,
        "padded_over_unique": c["padded_tokens"] / unique,
    }


def flops(run: dict[str, Any], peak: float) -> dict[str, Any]:
    """2 x parameters x padded tokens / scoring time (padding is work the machine did)."""
    c = run["counters"]
    achieved = 2 * run["parameters"] * c["padded_tokens"] / run["scoring_s"]
    return {
        "parameters": run["parameters"],
        "scoring_s": run["scoring_s"],
        "tokens_per_s": c["tokens_forwarded"] / run["scoring_s"],
        "achieved_flops": achieved,
        "fraction_of_peak": achieved / peak,
    }


def seeds_sweep(fx: Any, repeats: int, threads: int, log: Log) -> dict[str, Any]:
    log(f"null seeds sweep {SEEDS} on the fixture, x{repeats}")
    specs = {s: seeds_spec(fx.suite, s, WORK / "specs") for s in SEEDS}
    jobs = {
        str(s): (lambda p=p: ours({"tool": "sway", "spec": str(p), "threads": threads}))
        for s, p in specs.items()
    }
    runs = alternate(jobs, repeats, log)
    base = median_of(runs["1"], "suite_s") or float("nan")
    return {
        s: {
            "suite_s": median_of(rs, "suite_s"),
            "ratio_to_1_seed": (median_of(rs, "suite_s") or float("nan")) / base,
            "forward_passes": rs[-1].get("counters", {}).get("forward_passes"),
            "tokens_forwarded": rs[-1].get("counters", {}).get("tokens_forwarded"),
        }
        for s, rs in runs.items()
    }


def extra_adapters(fx: Any, n: int) -> list[Path]:
    """The fixture's healthy adapters plus null-family copies of doc-strong, `n` in all."""
    from sway_engine.fixtures import null_family_adapter

    paths = [fx.adapters[k] for k in ("doc-strong", "doc-weak", "noise", "zero")]
    seed = 100
    while len(paths) < n:
        dst = WORK / "adapters" / f"family-{seed}"
        if not (dst / "adapter_model.safetensors").exists():
            null_family_adapter(fx.adapters["doc-strong"], dst, seed)
        paths.append(dst)
        seed += 1
    return paths[:n]


def adapters_sweep(fx: Any, repeats: int, threads: int, log: Log) -> dict[str, Any]:
    log(f"adapters evaluated together {ADAPTER_COUNTS} on the fixture, x{repeats}")
    pool = extra_adapters(fx, max(ADAPTER_COUNTS))
    jobs = {
        str(n): (
            lambda n=n: ours(
                {
                    "tool": "sway-many",
                    "spec": str(fx.suite),
                    "base": str(fx.base),
                    "adapters": [str(p) for p in pool[:n]],
                    "threads": threads,
                }
            )
        )
        for n in ADAPTER_COUNTS
    }
    runs = alternate(jobs, repeats, log)
    one = runs[str(ADAPTER_COUNTS[0])]
    one_total = (median_of(one, "load_s") or 0) + (median_of(one, "suite_s") or float("nan"))
    one_suite = median_of(one, "suite_s") or float("nan")
    one_process = median_of(one, "process_s") or float("nan")
    out = {}
    for n, rs in runs.items():
        load, suite = median_of(rs, "load_s") or 0.0, median_of(rs, "suite_s") or float("nan")
        out[n] = {
            "load_s": load,
            "suite_s": suite,
            "total_s": load + suite,
            "ratio_total_to_1": (load + suite) / one_total,
            "ratio_suite_to_1": suite / one_suite,
            "process_s": median_of(rs, "process_s"),
            "ratio_process_to_1": (median_of(rs, "process_s") or float("nan")) / one_process,
            "forward_passes": rs[-1].get("counters", {}).get("forward_passes"),
            "rows_forwarded": rs[-1].get("counters", {}).get("rows_forwarded"),
        }
    return out


STARTUP = {
    "import dagster": "import dagster",
    "import sway_dagster": "import sway_dagster",
    "code location": (
        "import os, sys; from sway_dagster.definitions import build_definitions; "
        "from sway_engine.home import Settings; "
        "build_definitions(Settings.from_env({'SWAY_HOME': sys.argv[1]}))"
    ),
}


def startup(fx: Any, repeats: int, log: Log) -> dict[str, Any]:
    """Seconds to run each STARTUP snippet in a fresh interpreter (median of `repeats`)."""
    import shutil

    home = WORK / "startup-home"
    (home / "adapters").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fx.suite, home / "sway.yaml")
    log(f"start-up times, x{repeats}")
    times: dict[str, list[float]] = {k: [] for k in STARTUP}
    for _ in range(repeats):
        for name, code in STARTUP.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, str(home)], check=True, cwd=ROOT)
            times[name].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["code_location_over_dagster"] = out["code location"] / out["import dagster"]
    return out


def rolling_texts(fx: Any, n: int) -> list[str]:
    """Document sections and corpus paragraphs: what sway's rolling probes score."""
    from sway_engine.dlm import load_dlm

    doc = load_dlm(str(fx.document))
    texts = [s.content for s in doc.sections if s.content.strip()]
    corpus = (fx.root / "corpus.txt").read_text().split("\n\n")
    texts += [p for p in corpus if len(p) > 200]
    return texts[:n]


def rolling(
    base: Path,
    texts: list[str],
    up: Callable[..., dict[str, Any]] | None,
    repeats: int,
    threads: int,
    log: Log,
) -> dict[str, Any]:
    log(f"rolling log-likelihood on {len(texts)} texts vs lm-eval, x{repeats}")
    jobs: dict[str, Callable[[], dict[str, Any]]] = {
        "sway": lambda: ours(
            {"tool": "sway-rolling", "base": str(base), "texts": texts, "threads": threads}
        )
    }
    if up is not None:
        jobs["lm_eval"] = lambda: up(
            {
                "tool": "lm-eval",
                "base": str(base),
                "texts": texts,
                "batch_size": 16,
                "threads": threads,
            }
        )
    runs = alternate(jobs, repeats, log)
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        out[name] = {
            "score_s": median_of(good, "score_s"),
            "errors": [r["error"] for r in rs if "error" in r],
        }
    s, lm = runs["sway"][-1], runs.get("lm_eval", [{}])[-1]
    if "totals" in s:
        tokens = s["counters"]["tokens_forwarded"]
        out["sway"]["tokens_forwarded"] = tokens
        out["sway"]["tokens_per_s"] = tokens / out["sway"]["score_s"]
    if "totals" in lm and "totals" in s:
        out["lm_eval"]["tokens_forwarded"] = lm["tokens_forwarded"]
        out["speedup_vs_lm_eval"] = out["lm_eval"]["score_s"] / out["sway"]["score_s"]
        out["max_rel_diff_of_totals"] = max(
            abs(a - b) / max(1.0, abs(b)) for a, b in zip(s["totals"], lm["totals"], strict=True)
        )
    return out


def cuda_run(specs: dict[str, Path], log: Log) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "note": "no CUDA device on this machine: not measured"}
    log("CUDA: suite (a) default on the bench model, bf16")
    peak = matmul_peak(8192, 2.0, "bf16", "cuda")
    run = ours(
        {
            "tool": "sway",
            "spec": str(specs["default"]),
            "device": "cuda",
            "dtype": "bf16",
            "batch_tokens": 65536,
            "max_batch_rows": 1024,
        }
    )
    return {
        "available": True,
        "device": torch.cuda.get_device_name(0),
        "bf16_matmul_peak_flops": peak,
        **flops(run, peak),
        "suite_s": run["suite_s"],
    }


# ---- report ----


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# sway bench — {r['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {r['threads']} torch threads, torch "
        f"{m['torch']}; GPU: {m['gpu'] or 'none (CUDA not measured)'}. fp32 matmul peak "
        f"measured in this run: {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s. "
        f"Medians of {r['repeats']} alternating runs, each in a fresh process.",
        "",
        "## Suite (a): null_adapter + delta_kl + adapter_ablation",
        "",
        "| model | tool | suite (s) | x faster than dlm-sway | load (s) | first result (s) "
        "| peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, a in r["suite_a"].items():
        for tool, label in (
            ("dlm_sway", "dlm-sway 0.1.0 (3 fixed nulls, top-k)"),
            ("sway_parity", "sway, same settings (3 fixed nulls, top-k)"),
            ("sway_default8", "sway defaults (8 matched nulls, exact)"),
        ):
            t = a.get(tool)
            if not t or t.get("suite_s") is None:
                lines.append(f"| {model} | {label} | not run | | | | |")
                continue
            sp = t.get("speedup_vs_dlm_sway")
            lines.append(
                f"| {model} | {label} | {t['suite_s']:.2f} | {f'{sp:.2f}x' if sp else '—'} "
                f"| {t['load_s']:.2f} | {t['first_result_s']:.2f} | {t['peak_rss_mb']:.0f} |"
            )
    lines += ["", "Parity (same model, adapter, prompts):", ""]
    for model, a in r["suite_a"].items():
        p, e = a.get("parity"), a.get("exact", {})
        if p:
            ok = "ok" if p["ok"] else "FAILS"
            lines.append(
                f"- {model}: topk_tail vs dlm-sway: delta_kl max |diff| "
                f"{p['delta_kl_max_abs_diff']:.1e}, ablation curve "
                f"{p['ablation_max_abs_diff']:.1e} ({ok} at {PARITY_TOL:g})"
            )
        if "ok" in e:
            ok = "ok" if e["ok"] else "FAILS"
            lines.append(
                f"- {model}: exact vs plain full-vocabulary: delta_kl "
                f"{e['delta_kl_max_abs_diff']:.1e}, ablation "
                f"{e['ablation_max_abs_diff']:.1e} ({ok} at {EXACT_TOL:g})"
            )
    lines += [
        "",
        "## Work done versus work needed (sway, suite (a) defaults)",
        "",
        "| model | forward passes | rows | tokens forwarded | padded | unique needed "
        "| forwarded / unique | padded / unique |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, w in r["work"].items():
        lines.append(
            f"| {model} | {w['forward_passes']} | {w['rows_forwarded']} | {w['tokens_forwarded']} "
            f"| {w['padded_tokens']} | {w['unique_tokens']} | {w['forwarded_over_unique']:.3f} "
            f"| {w['padded_over_unique']:.3f} |"
        )
    up = r["suite_a"].get("bench", {}).get("dlm_sway", {})
    if up.get("tokens_forwarded"):
        lines.append(
            f"\ndlm-sway on the bench model: {up['forward_passes']} forward passes, "
            f"{up['tokens_forwarded']} tokens (one prompt per pass, all positions to the lm_head)."
        )
    f = r["flops"]
    lines += [
        "",
        "## Achieved FLOP/s of scoring (2 x parameters x tokens incl. padding / scoring time)",
        "",
        "| model | parameters | tokens/s | GFLOP/s | of fp32 matmul peak |",
        "|---|---|---|---|---|",
    ]
    for model, x in f.items():
        lines.append(
            f"| {model} | {x['parameters'] / 1e6:.1f}M | {x['tokens_per_s']:.0f} "
            f"| {x['achieved_flops'] / 1e9:.1f} | {x['fraction_of_peak']:.1%} |"
        )
    lines += ["", r["flops_note"], ""]
    lines += [
        "## Cost versus null seeds (fixture suite)",
        "",
        "| seeds | suite (s) | x 1 seed |",
        "|---|---|---|",
    ]
    for s, x in r["seeds"].items():
        lines.append(f"| {s} | {x['suite_s']:.2f} | {x['ratio_to_1_seed']:.2f} |")
    lines += [
        "",
        "## Cost versus adapters evaluated together (fixture suite, one base load)",
        "",
        "| adapters | load (s) | suite (s) | load+suite x 1 adapter | suite x 1 adapter "
        "| whole process (s) | process x 1 adapter |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, x in r["adapters"].items():
        lines.append(
            f"| {n} | {x['load_s']:.2f} | {x['suite_s']:.2f} | {x['ratio_total_to_1']:.2f} "
            f"| {x['ratio_suite_to_1']:.2f} | {x['process_s']:.1f} "
            f"| {x['ratio_process_to_1']:.2f} |"
        )
    lr = r.get("rolling", {})
    if lr.get("sway", {}).get("score_s"):
        lines += ["", "## Rolling log-likelihood throughput (bench model base)", ""]
        s = lr["sway"]
        lines.append(f"- sway: {s['score_s']:.2f}s, {s.get('tokens_per_s', 0):.0f} tokens/s")
        if lr.get("lm_eval", {}).get("score_s"):
            lines.append(
                f"- lm-eval 0.4.13 HFLM (batch 16): {lr['lm_eval']['score_s']:.2f}s "
                f"({lr['speedup_vs_lm_eval']:.2f}x slower); totals agree within "
                f"{lr['max_rel_diff_of_totals']:.1e} (relative)"
            )
        elif lr.get("lm_eval", {}).get("errors"):
            lines.append(f"- lm-eval: failed: {lr['lm_eval']['errors'][0][:300]}")
    st = r.get("startup")
    if st:
        lines += [
            "",
            "## Start-up (fresh interpreter, median)",
            "",
            f"`import sway_dagster` {st['import sway_dagster']:.2f}s; the code location "
            f"(import + `build_definitions` on the fixture suite) {st['code location']:.2f}s, "
            f"{st['code_location_over_dagster']:.2f}x `import dagster` alone "
            f"({st['import dagster']:.2f}s).",
        ]
    b = r.get("suite_b")
    if b:
        lines += [
            "",
            f"Suite (b), our default full suite on the fixture "
            f"({b['probes']} probes): {b['suite_s']:.2f}s, load {b['load_s']:.2f}s, "
            f"{b['forward_passes']} forward passes.",
        ]
    c = r["cuda"]
    lines += ["", "## CUDA", ""]
    if c.get("available"):
        lines.append(
            f"{c['device']}: suite (a) defaults on the bench model in {c['suite_s']:.2f}s, "
            f"{c['tokens_per_s']:.0f} tokens/s, {c['achieved_flops'] / 1e12:.2f} TFLOP/s = "
            f"{c['fraction_of_peak']:.1%} of the bf16 matmul peak."
        )
    else:
        lines.append(c["note"])
    if r.get("full_suite"):
        lines += ["", *full_suite.markdown_rows(r["full_suite"])]
    if r.get("peers_status"):
        lines += ["", f"Peers: {r['peers_status']}"]
    return "\n".join(lines) + "\n"


def full_suite_markdown(r: dict[str, Any]) -> str:
    """The report of `--full-suite-only`."""
    m = r["machine"]
    lines = [
        f"# sway bench, full suite only — {r['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {r['threads']} torch threads, torch "
        f"{m['torch']}. Medians of {r['repeats']} alternating runs (bench model: "
        f"{r['bench_repeats']}), each a fresh process. Peers: {r['peers_status']}.",
        "",
        *full_suite.markdown_rows(r["full_suite"]),
    ]
    return "\n".join(lines) + "\n"


def flops_note(f: dict[str, Any]) -> str:
    return (
        "What limits it: the fixture's ~2M-parameter matmuls are too small to amortise "
        "per-operator overhead (Python, attention masks, rotary embeddings: the model is "
        "overhead-bound); on the bench model the projections run near the matmul peak, and "
        "the gap is the non-matmul work per token (RMSNorm, rotary, softmax over 49,152 "
        "logits per row, LoRA's rank-8 products, which run far below peak), the padding "
        "shown above, and other processes sharing this machine's cores."
    )


# ---- the README full suite, whole processes ----


def full_suite_runs(
    fx: Any,
    bench: Any,
    up_python: Path | None,
    models: list[str],
    repeats: int,
    threads: int,
    log: Log,
) -> dict[str, Any]:
    """The README full suite on each of `models`, whole processes, tools alternating. The
    bench model (~30x the fixture per run) gets one repeat fewer and no `sway_file` run (on
    the fixture it measures the file as is)."""
    accepts = full_suite.upstream_accepts(up_python) if up_python is not None else {}
    inputs = full_suite.document_inputs(full_suite_spec(fx, WORK / "specs" / "fixture"))
    models_of = {
        "fixture": (fx.base, fx.adapters["doc-strong"], tuple(full_suite.TOOLS), repeats),
        "bench": (
            bench.base,
            bench.adapters[0],
            ("dlm_sway", "sway_same", "sway_parity", "sway_default8"),
            max(1, repeats - 1),
        ),
    }
    out: dict[str, Any] = {}
    for model in models:
        base, adapter, tools, reps = models_of[model]
        out_dir = WORK / "specs" / f"full-{model}"
        specs = full_suite.full_suite_specs(
            fx.suite, base, adapter, fx.document, out_dir, accepts, inputs
        )
        log(f"full suite on {model}: {', '.join(tools)}, whole processes, x{reps}")
        jobs = full_suite.jobs(specs, up_python, tools, threads, WORK / "full" / model)
        out[model] = {**full_suite.summarize(alternate(jobs, reps, log)), "repeats": reps}
    return out


def full_suite_only(
    fx: Any,
    bench: Any,
    up_python: Path | None,
    peers_status: str,
    models: list[str],
    repeats: int,
    threads: int,
    log: Log,
) -> int:
    """`--full-suite-only`: the comparison alone, to bench/results/full-suite-<utc>.json/.md."""
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": threads,
        "repeats": repeats,
        "bench_repeats": max(1, repeats - 1),
        "peers_status": peers_status,
    }
    warm_page_cache(fx.base, bench.base, *bench.adapters)
    report["full_suite"] = full_suite_runs(fx, bench, up_python, models, repeats, threads, log)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / ("full-suite-" + report["date"].replace(":", ""))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = full_suite_markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    log(f"wrote {stem}.json and .md")
    return 0


# ---- main ----


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no peers")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--full-suite-only",
        action="store_true",
        help="only the README full suite, sway vs dlm-sway (whole processes)",
    )
    ap.add_argument(
        "--full-suite-models",
        default="fixture,bench",
        help="models for the full suite comparison (fixture, bench or both)",
    )
    args = ap.parse_args(argv)

    import torch

    from sway_engine.fixtures import build_fixtures
    from sway_engine.fixtures.bench_model import build_bench_model

    started = time.perf_counter()
    repeats = args.repeats or (1 if args.quick else 3)
    # On a small shared machine one thread per process: two OpenMP threads on two busy cores
    # spin at barriers and make timings erratic (both tools get the same count).
    cores = os.cpu_count() or 1
    threads = args.threads or (1 if cores <= 2 else torch.get_num_threads())
    torch.set_num_threads(threads)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    fx = build_fixtures(log=log)
    bench = build_bench_model(ROOT / ".sway_cache" / "bench", log=log)
    specs = {
        "fixture": suite_specs(
            fx.suite, fx.base, fx.adapters["doc-strong"], WORK / "specs" / "fixture"
        ),
        "bench": suite_specs(fx.suite, bench.base, bench.adapters[0], WORK / "specs" / "bench"),
    }
    up_python, peers_status = (None, "skipped (--no-peers)")
    if not (args.quick or args.no_peers):
        up_python, peers_status = peers_python(log)
    up = peer(up_python) if up_python is not None else None
    log(f"peers: {peers_status}")

    models = [m.strip() for m in args.full_suite_models.split(",") if m.strip()]
    if args.full_suite_only:
        return full_suite_only(fx, bench, up_python, peers_status, models, repeats, threads, log)

    peak = matmul_peak()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": threads,
        "repeats": repeats,
        "matmul_peak_flops": peak,
        "peers_status": peers_status,
    }
    # the 135M model costs ~30x the fixture per run: one repeat fewer there
    reps = {"fixture": repeats, "bench": max(1, repeats - 1)}
    warm_page_cache(fx.base, bench.base, *bench.adapters)
    report["suite_a"] = {
        model: suite_a(model, specs[model], up, reps[model], threads, log)
        for model in ("fixture", "bench")
    }
    work: dict[str, Any] = {}
    fl: dict[str, Any] = {}
    for model, a in report["suite_a"].items():
        run = a.pop("_last_default") or ours(
            {"tool": "sway", "spec": str(specs[model]["default"]), "threads": threads}
        )
        work[model] = work_stats(run)
        fl[model] = flops(run, peak)
    report["work"], report["flops"] = work, fl
    report["flops_note"] = flops_note(fl)
    b_spec = full_suite_spec(fx, WORK / "specs" / "fixture")
    b = ours({"tool": "sway", "spec": str(b_spec), "threads": threads})
    report["suite_b"] = {
        "suite_s": b["suite_s"],
        "load_s": b["load_s"],
        "probes": len(b["probes"]),
        "forward_passes": b["counters"]["forward_passes"],
        "verdicts": {k: v["verdict"] for k, v in b["probes"].items()},
    }
    report["seeds"] = seeds_sweep(fx, repeats, threads, log)
    report["adapters"] = adapters_sweep(fx, repeats, threads, log)
    report["startup"] = startup(fx, repeats, log)
    report["full_suite"] = full_suite_runs(fx, bench, up_python, models, repeats, threads, log)
    log(f"elapsed so far {time.perf_counter() - started:.0f}s")
    texts = rolling_texts(fx, 24 if args.quick else 48)
    report["rolling"] = rolling(bench.base, texts, up, max(1, repeats - 1), threads, log)
    report["cuda"] = cuda_run(specs["bench"], log)
    report["bench_wall_s"] = time.perf_counter() - started

    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / report["date"].replace(":", "")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    log(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
