"""sway's side of the benchmark: one measured job per process (`python -m bench.work JOB`).

Jobs (JSON):
- {"tool": "sway", "spec": path, ...}: load the backend, run the suite once; times, counters,
  the rows the suite needed (unique tokens), probe values; with "plain_check", the same
  delta_kl and ablation divergences from a plain transformers + PEFT computation (full
  vocabulary, no sway code) for the exact-mode check.
- {"tool": "sway-many", "spec": path, "base": path, "adapters": [...]}: one base load, the
  suite for every adapter in shared batches (`multi.run_many`).
- {"tool": "sway-rolling", "base": path, "texts": [...]}: rolling log-probs of the texts on
  the base (each prefixed with the end-of-text token, as lm-eval scores them).
The last stdout line is the result as JSON.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

T_START = time.perf_counter()


def _rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited on exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _backend(job: dict[str, Any], adapter: str | None) -> Any:
    """An HFBackend that also records every row the suite asked for (before any cache)."""
    from sway_engine.backends.hf import HFBackend

    class Counting(HFBackend):
        needed: set[tuple[str, tuple[int, ...], bool]]

        def _forward_all(self, rows: dict[Any, Any]) -> None:
            for row in rows:
                self.needed.add((row.adapter, row.ids, row.last))
            super()._forward_all(rows)

    options = {k: job[k] for k in ("batch_tokens", "max_batch_rows") if k in job}
    backend = Counting(
        job["base"],
        adapter,
        dtype=job.get("dtype", "fp32"),
        device=job.get("device", "cpu"),
        **options,
    )
    backend.needed = set()
    return backend


def _probe_values(result: Any) -> dict[str, Any]:
    out = {}
    for p in result.probes:
        out[p.name] = {
            "verdict": p.verdict.value,
            "raw": p.raw,
            "z": p.z,
            "duration_s": p.duration_s,
            "values": [
                float(v) for item in p.items for k, v in item.items() if k in ("js", "kl", "raw")
            ],
            "curve": p.evidence.get("curve"),
            "message": p.message,
        }
    return out


def sway(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(job.get("threads", torch.get_num_threads())))
    from sway_engine.backends.instrumentation import Instrumented
    from sway_engine.runner import run_suite
    from sway_engine.suite import load_spec

    t_import = time.perf_counter() - T_START
    spec, entries = load_spec(job["spec"])
    job = {**job, "base": spec.models.ft.base}
    t = time.perf_counter()
    backend = _backend(job, spec.models.ft.adapter)
    t_load = time.perf_counter() - t
    session = Instrumented(backend)
    t = time.perf_counter()
    result = run_suite(spec, entries, session)
    t_suite = time.perf_counter() - t
    counters = session.counters()
    out: dict[str, Any] = {
        "import_s": t_import,
        "load_s": t_load,
        "suite_s": t_suite,
        "scoring_s": counters["wall_s"],
        "first_result_s": t_load + (result.probes[0].duration_s or 0.0),
        "peak_rss_mb": _rss_mb(),
        "threads": torch.get_num_threads(),
        "counters": counters,
        "unique_rows": len(backend.needed),
        "unique_tokens": sum(len(ids) for _, ids, _ in backend.needed),
        "parameters": sum(
            p.numel() for n, p in backend._base_model.named_parameters() if "lora_" not in n
        ),
        "probes": _probe_values(result),
    }
    if job.get("plain_check"):
        out["plain"] = plain_divergences(spec, backend.device)
    return out


def plain_divergences(spec: Any, device: str) -> dict[str, Any]:
    """delta_kl per-prompt JS and the ablation curve, from transformers + PEFT directly.

    Full-vocabulary JS in float64 from each view's fp32 log-softmax, one prompt at a time;
    the ablation scales every LoRA layer's scaling by lambda (upstream's method).
    """
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ft = spec.models.ft
    tok = AutoTokenizer.from_pretrained(ft.base)
    base = AutoModelForCausalLM.from_pretrained(ft.base, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, ft.adapter).eval()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

    def logp(prompt: str, lam: float | None) -> Any:
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            if lam is None:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits[0, -1]
            else:
                saved = [dict(layer.scaling) for layer in layers]
                for layer in layers:
                    for k in layer.scaling:
                        layer.scaling[k] = layer.scaling[k] * lam
                try:
                    logits = model(input_ids=ids).logits[0, -1]
                finally:
                    for layer, s in zip(layers, saved, strict=True):
                        layer.scaling.update(s)
        return torch.log_softmax(logits.float(), -1).double().cpu()

    def js(a: Any, b: Any) -> float:
        m = torch.logaddexp(a, b) - torch.log(torch.tensor(2.0, dtype=torch.float64))
        pa, pb = a.exp(), b.exp()
        return float(0.5 * (pa * (a - m)).sum() + 0.5 * (pb * (b - m)).sum())

    out: dict[str, Any] = {}
    for entry in spec.suite:
        kind, prompts = entry.get("kind"), entry.get("prompts") or []
        if kind == "delta_kl":
            out["delta_kl"] = [js(logp(p, None), logp(p, 1.0)) for p in prompts]
        elif kind == "adapter_ablation":
            lams = sorted(set(entry.get("lambdas") or (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)))
            refs = [logp(p, None) for p in prompts]
            out["ablation_curve"] = [
                sum(js(r, logp(p, lam)) for r, p in zip(refs, prompts, strict=True)) / len(prompts)
                for lam in lams
            ]
    return out


def sway_many(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(job.get("threads", torch.get_num_threads())))
    from sway_engine.backends.instrumentation import Instrumented
    from sway_engine.multi import run_many
    from sway_engine.suite import load_spec

    t_import = time.perf_counter() - T_START
    spec, entries = load_spec(job["spec"])
    t = time.perf_counter()
    backend = _backend(job, None)
    t_load = time.perf_counter() - t
    session = Instrumented(backend)
    t = time.perf_counter()
    results = run_many(spec, entries, session, job["adapters"])
    t_suite = time.perf_counter() - t
    return {
        "import_s": t_import,
        "load_s": t_load,
        "suite_s": t_suite,
        "adapters": len(job["adapters"]),
        "counters": session.counters(),
        "peak_rss_mb": _rss_mb(),
        "verdicts": [[p.verdict.value for p in r.probes] for r in results],
    }


def sway_rolling(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(job.get("threads", torch.get_num_threads())))
    from sway_engine.requests import RollingLogprob, RollingResult
    from sway_engine.views import BASE

    t_import = time.perf_counter() - T_START
    t = time.perf_counter()
    backend = _backend(job, None)
    t_load = time.perf_counter() - t
    eot = backend.tokenizer.eos_token
    t = time.perf_counter()
    res = backend.execute([RollingLogprob(eot + text, BASE) for text in job["texts"]])
    t_score = time.perf_counter() - t
    totals = [r.total for r in res if isinstance(r, RollingResult)]
    return {
        "import_s": t_import,
        "load_s": t_load,
        "score_s": t_score,
        "totals": totals,
        "counters": backend.counters(),
        "peak_rss_mb": _rss_mb(),
    }


def main() -> int:
    job = json.loads(sys.argv[1])
    tools = {"sway": sway, "sway-many": sway_many, "sway-rolling": sway_rolling}
    print(json.dumps(tools[job["tool"]](job)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
