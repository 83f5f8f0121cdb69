"""Runs inside bench/.peers/venv (dlm-sway 0.1.0, lm-eval 0.4.13): one measured job per process.

    python peer_worker.py '<job json>'

Jobs: {"tool": "dlm-sway", "spec": path} runs upstream's suite once on a freshly loaded
backend; {"tool": "lm-eval", "base": path, "texts": [...], "batch_size": n} scores the texts
with lm-eval's HF model (rolling loglikelihood). The last stdout line is the result as JSON.
This file imports only what the peers' virtualenv holds, never sway.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

T_START = time.perf_counter()


def _rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited on exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _count_forwards(model: object) -> dict[str, int]:
    """Count forward calls and input tokens at the transformer (a pre-hook)."""
    counts = {"forward_passes": 0, "tokens_forwarded": 0}

    def hook(_module: object, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts["forward_passes"] += 1
        if ids is not None:
            counts["tokens_forwarded"] += int(ids.numel())

    model.register_forward_pre_hook(hook, with_kwargs=True)  # type: ignore[attr-defined]
    return counts


def dlm_sway(job: dict) -> dict:
    os.environ["SWAY_DISABLE_NULL_CACHE"] = "1"  # every run calibrates, as ours does
    import torch

    torch.set_num_threads(int(job.get("threads", torch.get_num_threads())))
    from dlm_sway.backends import build
    from dlm_sway.suite.loader import load_spec
    from dlm_sway.suite.runner import run

    t_import = time.perf_counter() - T_START
    spec = load_spec(job["spec"])
    t = time.perf_counter()
    backend = build(spec.models.ft)
    t_load = time.perf_counter() - t
    counts = _count_forwards(backend._peft_model.get_base_model().model)  # noqa: SLF001
    t = time.perf_counter()
    result = run(spec, backend, spec_path=job["spec"])
    t_suite = time.perf_counter() - t
    probes = {}
    for p in result.probes:
        ev = p.evidence or {}
        probes[p.name] = {
            "verdict": str(p.verdict.value),
            "raw": p.raw,
            "z": p.z_score,
            "duration_s": p.duration_s,
            "per_prompt": ev.get("per_prompt"),
            "curve": ev.get("mean_divergence_per_lambda"),
            "message": p.message,
        }
    first = result.probes[0].duration_s if result.probes else 0.0
    return {
        "import_s": t_import,
        "load_s": t_load,
        "suite_s": t_suite,
        "first_result_s": t_load + (first or 0.0),
        "peak_rss_mb": _rss_mb(),
        "threads": torch.get_num_threads(),
        **counts,
        "probes": probes,
    }


def lm_eval(job: dict) -> dict:
    import torch

    torch.set_num_threads(int(job.get("threads", torch.get_num_threads())))
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    t_import = time.perf_counter() - T_START
    t = time.perf_counter()
    lm = HFLM(pretrained=job["base"], batch_size=int(job["batch_size"]), device="cpu")
    t_load = time.perf_counter() - t
    counts = _count_forwards(lm.model)
    reqs = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=i)
        for i, text in enumerate(job["texts"])
    ]
    t = time.perf_counter()
    totals = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    t_score = time.perf_counter() - t
    return {
        "import_s": t_import,
        "load_s": t_load,
        "score_s": t_score,
        "totals": [float(x) for x in totals],
        "peak_rss_mb": _rss_mb(),
        **counts,
    }


def main() -> int:
    job = json.loads(sys.argv[1])
    tools = {"dlm-sway": dlm_sway, "lm-eval": lm_eval}
    out = tools[job["tool"]](job)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
