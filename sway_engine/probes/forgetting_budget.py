"""forgetting_budget: how much the adapter moved the base model on general text, in nats/token.

A guard rail (category calibration). Over the chunks of a general-English corpus (the one
external_perplexity scores), at every token position t the exact divergence
KL_t = sum_v p_base(v | x<t) (log p_base(v | x<t) - log p_ft(v | x<t)) over the whole vocabulary,
computed in the backend (SequenceDivergence). raw = sum of KL_t / number of scored tokens
(token-weighted; nats per token); the 95% interval is a percentile bootstrap over chunks.

Verdict (docs/PROBES.md): without `max_nats_per_token` the probe reports (PASS, with the null
adapters' spending for context). With a budget it FAILs when raw exceeds it, and says whether the
whole interval lies above it. The nulls never decide the verdict: a budget is absolute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from sway_engine import stats
from sway_engine.backends.base import SEQUENCE_DIVERGENCE
from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context, Judgement, Measurement, Probe
from sway_engine.probes.common.corpus import CorpusSpec, chunk_text, chunk_values, load_corpus
from sway_engine.probes.common.guard_rail import harm_score
from sway_engine.requests import SequenceDivergence, SequenceDivergenceResult
from sway_engine.result import NullStats, Verdict
from sway_engine.views import BASE, View


class ForgettingBudgetSpec(CorpusSpec):
    kind: Literal["forgetting_budget"] = "forgetting_budget"
    # The team's budget in nats/token; None: report the spending, judge nothing.
    max_nats_per_token: float | None = Field(None, gt=0)


class ForgettingBudget(Probe):
    kind = "forgetting_budget"
    category = "calibration"
    spec_cls = ForgettingBudgetSpec
    needs = frozenset({SEQUENCE_DIVERGENCE})
    claim = "harm"
    z_sign = -1  # spending less is better
    scale = "log"  # a positive divergence: the null calibrates on log(raw)

    def measure(
        self, spec: ForgettingBudgetSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        chunks = chunk_text(load_corpus(spec.corpus, spec.name), spec.chunk_chars, spec.max_chunks)
        if not chunks:
            raise ProbeError(spec.name, f"corpus {spec.corpus!r} gives no chunk to score")
        res = ctx.execute([SequenceDivergence(c, BASE, t) for t in treatments for c in chunks])
        n = len(chunks)
        out = []
        for k, view in enumerate(treatments):
            kls = [
                _per_token(spec.name, r, i, view) for i, r in enumerate(res[n * k : n * (k + 1)])
            ]
            out.append(_measurement(spec, ctx.seed, chunks, kls))
        return out

    def judge(
        self, spec: ForgettingBudgetSpec, m: Measurement, null: NullStats | None
    ) -> Judgement:
        harm = self.significance(spec, m, null, harm=True)
        lo, hi = m.evidence["ci_95"]
        summary = f"{m.raw:.4g} nats/token, 95% CI [{lo:.4g}, {hi:.4g}] over {len(m.values)} chunks"
        # oriented good, as every guard rail's z (negative: spends more than the nulls)
        z = None if harm.z is None else 0.0 - harm.z
        if harm.calibrated and null is not None:
            beyond = "more than" if harm.significant else "no more than"
            shown = "" if z is None else f"z={z:+.2f}, "
            context = (
                f"{beyond} random adapters of its size ({null.mean:.4g} ± {null.std:.3g} "
                f"nats/token, n={null.n}; {shown}p={harm.p:.2g})"
            )
        else:
            context = f"no null context ({harm.uncalibrated})"
        budget = spec.max_nats_per_token
        if budget is None:
            msg = f"spends {summary}; {context}; no budget set (report only)"
            return Judgement(Verdict.PASS, msg, 1.0, z, harm.p, harm)
        score = harm_score(m.raw / budget)
        if m.raw > budget:
            where = (
                "the whole interval is above it"
                if lo > budget
                else f"the interval reaches below it ({lo:.4g})"
            )
            msg = f"over budget {budget:g} nats/token ({where}): spends {summary}; {context}"
            return Judgement(Verdict.FAIL, msg, score, z, harm.p, harm)
        where = f"; the interval reaches above it ({hi:.4g})" if hi > budget else ""
        msg = f"within budget {budget:g} nats/token{where}: spends {summary}; {context}"
        return Judgement(Verdict.PASS, msg, score, z, harm.p, harm)


def _per_token(probe: str, r: object, i: int, view: View) -> np.ndarray:
    """The per-token KL(base || view) of chunk i (at least one scored token, all finite)."""
    if not isinstance(r, SequenceDivergenceResult):
        raise ProbeError(
            probe, f"chunk {i}: expected a sequence divergence, got {type(r).__name__}"
        )
    return chunk_values(probe, r.kl, "divergence", i, view)


def _measurement(
    spec: ForgettingBudgetSpec, seed: int, chunks: list[str], kls: list[np.ndarray]
) -> Measurement:
    """raw = total KL / total tokens; values the chunks' means, weighted by their tokens (the
    runner's bootstrap then resamples chunks for the same token-weighted statistic)."""
    tokens = [int(k.size) for k in kls]
    means = [float(k.mean()) for k in kls]
    total = float(sum(k.sum() for k in kls))
    raw = total / sum(tokens)
    ci = stats.bootstrap_ci(means, seed=seed, weights=tokens) or (raw, raw)
    items = tuple(
        {
            "chunk": i,
            "chars": len(c),
            "tokens": t,
            "nats_per_token": mu,
            "max_token_nats": float(k.max()),
        }
        for i, (c, t, mu, k) in enumerate(zip(chunks, tokens, means, kls, strict=True))
    )
    worst = max(range(len(means)), key=lambda i: means[i])
    return Measurement(
        raw=raw,
        values=tuple(means),
        weights=tuple(float(t) for t in tokens),
        items=items,
        evidence={
            "corpus": spec.corpus,
            "chunks": len(chunks),
            "chunk_chars": spec.chunk_chars,
            "scored_tokens": sum(tokens),
            "total_nats": total,
            "ci_95": [ci[0], ci[1]],
            "max_nats_per_token": spec.max_nats_per_token,
            "worst_chunk": {"chunk": worst, "nats_per_token": means[worst]},
        },
    )
