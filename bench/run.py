"""Engine benchmark on the fixture model: ratios measured in one run (machines are noisy).

Prints and records (bench/results/<utc>.json + .md):
- cost of the fixture suite as the number of matched null seeds grows (1, 3, 8, 16), as a
  ratio to 1 seed;
- tokens forwarded (real and with padding) for the default suite;
- achieved FLOP/s of scoring (2 x parameters x real tokens / scoring time) as a fraction of
  this machine's fp32 matmul peak, measured in the same run.
The peer comparisons of issue 6 (dlm-sway, lm-eval) are not here yet.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from sway_engine.backends.hf import HFBackend
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.fixtures import build_fixtures
from sway_engine.runner import run_suite
from sway_engine.spec import load_spec

RESULTS = Path(__file__).parent / "results"
SEEDS = (1, 3, 8, 16)
REPEATS = 3


def matmul_peak(n: int = 1024, seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of an n x n matmul on this machine, over about `seconds`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def suite_cost(backend: HFBackend, spec_path: Path, adapter: Path, seeds: int) -> dict[str, Any]:
    """Best-of-REPEATS wall time of the fixture suite with `seeds` nulls, cold caches each time."""
    spec, entries = load_spec(spec_path)
    null = spec.defaults.null.model_copy(update={"seeds": max(2, seeds)})
    spec = spec.model_copy(update={"defaults": spec.defaults.model_copy(update={"null": null})})
    if seeds == 1:
        entries = [e for e in entries if e.spec.kind != "null_adapter"]
    best: dict[str, Any] = {}
    for _ in range(REPEATS):
        backend.load_adapter(str(adapter))
        before = backend.counters()
        session = Instrumented(backend)
        t = time.perf_counter()
        run_suite(spec, entries, session)
        wall = time.perf_counter() - t
        after = backend.counters()
        if not best or wall < best["wall_s"]:
            best = {
                "wall_s": wall,
                "scoring_s": session.stats["wall_s"],
                **{
                    k: after[k] - before[k]
                    for k in ("forward_passes", "tokens_forwarded", "padded_tokens")
                },
            }
    return best


def main() -> int:
    fx = build_fixtures()
    backend = HFBackend(str(fx.base))
    params = sum(p.numel() for p in backend._base_model.parameters())
    peak = matmul_peak()
    adapter = fx.adapters["doc-strong"]
    rows = {s: suite_cost(backend, fx.suite, adapter, s) for s in SEEDS}
    base = rows[1]["wall_s"]
    default = rows[8]
    flops = 2 * params * default["tokens_forwarded"] / default["scoring_s"]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "model_parameters": params,
        "matmul_peak_flops": peak,
        "seeds": {str(s): {**r, "ratio_to_1_seed": r["wall_s"] / base} for s, r in rows.items()},
        "default_suite": {
            "tokens_forwarded": default["tokens_forwarded"],
            "padded_tokens": default["padded_tokens"],
            "padding_overhead": default["padded_tokens"] / default["tokens_forwarded"],
            "achieved_flops": flops,
            "fraction_of_peak": flops / peak,
        },
    }
    lines = [
        f"# sway engine bench ({report['date']}, {report['machine']})",
        "",
        "| null seeds | wall (s) | x 1 seed | forward passes | tokens | padded tokens |",
        "|---|---|---|---|---|---|",
    ]
    for s, r in report["seeds"].items():
        lines.append(
            f"| {s} | {r['wall_s']:.3f} | {r['ratio_to_1_seed']:.2f} | {r['forward_passes']} "
            f"| {r['tokens_forwarded']} | {r['padded_tokens']} |"
        )
    d = report["default_suite"]
    lines += [
        "",
        f"Default suite (8 seeds): padding overhead {d['padding_overhead']:.2f}x; scoring at "
        f"{d['achieved_flops'] / 1e9:.2f} GFLOP/s = {d['fraction_of_peak']:.1%} of the "
        f"{peak / 1e9:.1f} GFLOP/s fp32 matmul peak ({params / 1e6:.2f}M-parameter model: "
        "tiny matmuls are overhead-bound).",
    ]
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / report["date"].replace(":", "")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
