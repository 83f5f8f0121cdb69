"""external_perplexity: did the adapter make unrelated English prose less likely?

A guard rail (category calibration). Per chunk of a general-English corpus,
delta = mean log-prob per token under the treatment - the same under the base (nats/token);
raw = mean of delta over chunks (negative: the adapter made general text less likely).
Token counts come from the backend's tokenizer (the scored positions of RollingLogprob).

Verdict (docs/PROBES.md): a healthy adapter cannot be "3 sigma better than random" at not
forgetting, so the test is one-sided. It FAILs only when the loss is significantly worse than
the null adapters' (z <= -assert_z_gte) *and* beyond the fixed tolerance
(raw < assert_mean_delta_gte); otherwise it PASSes. Without a usable null it applies the
tolerance alone (probes/common/guard_rail.py, shared with calibration_drift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from sway_engine.backends.base import ROLLING
from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context, Judgement, Measurement, Probe
from sway_engine.probes.common.corpus import CorpusSpec, chunk_text, chunk_values, load_corpus
from sway_engine.probes.common.guard_rail import guard_rail, harm_score
from sway_engine.requests import RollingLogprob, RollingResult
from sway_engine.result import NullStats
from sway_engine.views import BASE, View


class ExternalPerplexitySpec(CorpusSpec):
    kind: Literal["external_perplexity"] = "external_perplexity"
    # Tolerated loss in nats/token (<= 0): the fallback gate and the calibrated FAIL floor.
    assert_mean_delta_gte: float = Field(-0.1, le=0)
    assert_z_gte: float = Field(3.0, gt=0)


# ---- the probe ----


class ExternalPerplexity(Probe):
    kind = "external_perplexity"
    category = "calibration"
    spec_cls = ExternalPerplexitySpec
    needs = frozenset({ROLLING})
    claim = "harm"

    def measure(
        self, spec: ExternalPerplexitySpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        text = load_corpus(spec.corpus, spec.name)
        chunks = chunk_text(text, spec.chunk_chars, spec.max_chunks)
        if not chunks:
            raise ProbeError(spec.name, f"corpus {spec.corpus!r} gives no chunk to score")
        n = len(chunks)
        reqs = [RollingLogprob(c, BASE) for c in chunks]
        reqs += [RollingLogprob(c, t) for t in treatments for c in chunks]
        res = ctx.execute(reqs)
        base = [_scored(spec.name, r, i, BASE) for i, r in enumerate(res[:n])]
        out = []
        for k, view in enumerate(treatments):
            rows = res[n * (k + 1) : n * (k + 2)]
            treated = [_scored(spec.name, r, i, view) for i, r in enumerate(rows)]
            out.append(_measurement(spec, chunks, base, treated))
        return out

    def judge(
        self, spec: ExternalPerplexitySpec, m: Measurement, null: NullStats | None
    ) -> Judgement:
        tol = spec.assert_mean_delta_gte
        summary = (
            f"mean delta {m.raw:+.4f} nats/token over {len(m.values)} chunks (tolerance {tol:+.3g})"
        )
        return guard_rail(
            harm=self.significance(spec, m, null, harm=True),
            null=null,
            within_tolerance=m.raw >= tol,
            fixed_score=harm_score(max(0.0, -m.raw) / max(-tol, 1e-9)),
            summary=summary,
            unit="nats/token",
        )


def _scored(probe: str, r: object, i: int, view: View) -> np.ndarray:
    """The scored per-token log-probs of chunk i under one view (at least one, all finite)."""
    if not isinstance(r, RollingResult):
        raise ProbeError(probe, f"chunk {i}: expected a rolling log-prob, got {type(r).__name__}")
    return chunk_values(probe, r.logprobs, "log-prob", i, view)


def _measurement(
    spec: ExternalPerplexitySpec,
    chunks: list[str],
    base: list[np.ndarray],
    treated: list[np.ndarray],
) -> Measurement:
    deltas, items = [], []
    for i, (chunk, b, t) in enumerate(zip(chunks, base, treated, strict=True)):
        mb, mt = float(b.mean()), float(t.mean())
        deltas.append(mt - mb)
        items.append(
            {
                "chunk": i,
                "chars": len(chunk),
                "tokens": int(b.size),
                "base": mb,
                "ft": mt,
                "delta": mt - mb,
                "ppl_base": math.exp(-mb),
                "ppl_ft": math.exp(-mt),
            }
        )
    tokens = sum(int(b.size) for b in base)
    pooled_base = float(sum(b.sum() for b in base) / tokens)
    pooled_ft = float(sum(t.sum() for t in treated) / sum(int(t.size) for t in treated))
    worst = min(range(len(deltas)), key=lambda i: deltas[i])
    return Measurement(
        raw=float(np.mean(deltas)),
        values=tuple(deltas),
        items=tuple(items),
        evidence={
            "corpus": spec.corpus,
            "chunks": len(chunks),
            "chunk_chars": spec.chunk_chars,
            "scored_tokens": tokens,
            "chars_per_scored_token": sum(len(c) for c in chunks) / tokens,
            "base_nats_per_token": pooled_base,
            "ft_nats_per_token": pooled_ft,
            "pooled_delta": pooled_ft - pooled_base,
            "worst_chunk": {"chunk": worst, "delta": deltas[worst]},
        },
    )
