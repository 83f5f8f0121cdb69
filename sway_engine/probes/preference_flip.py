"""preference_flip: on (prompt, chosen, rejected) triples, did the adapter move the model
toward the chosen answers, beyond a random adapter of the same size, without breaking pairs
the base already got right?

Per triple, the length-normalised margin under view T is
    m_T = log p_T(chosen | prompt) / n_chosen - log p_T(rejected | prompt) / n_rejected
(nats/token; n from the backend's tokenizer), so a shorter completion is not favoured for
being short. raw = mean over *all* triples of (m_T - m_base), z-scored against the null
adapters' raw on the same triples (the same statistic). Flip rate (base-wrong pairs the
treatment gets right), break count (base-right pairs it gets wrong) and accuracy before/after
are reported. PASS needs z >= assert_z_gte, raw >= assert_margin_delta_gte (the minimum
meaningful change), no net loss of accuracy and, with at least `min_triples_for_decision`
base-wrong pairs, a flip rate of at least `assert_flip_rate_gte`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from sway_engine import stats
from sway_engine.backends.base import CONTINUATION
from sway_engine.errors import ProbeError, ProbeSkip
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec, Prompt
from sway_engine.requests import ContinuationLogprob, ContinuationResult
from sway_engine.result import NullStats, Verdict
from sway_engine.spec import STRICT
from sway_engine.views import BASE, View

# Upstream's WARN-path score: 0.5 + raw/4; our raw is per token, so the same slope is kept.
MARGIN_SCORE_SLOPE = 0.25


class Triple(BaseModel):
    model_config = STRICT
    prompt: Prompt
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)


class PreferenceFlipSpec(ProbeSpec):
    kind: Literal["preference_flip"] = "preference_flip"
    # Empty: the document's ::preference:: triples.
    triples: tuple[Triple, ...] = ()
    assert_flip_rate_gte: float = Field(0.7, ge=0, le=1)
    assert_z_gte: float = Field(3.0, gt=0)
    # Fewer base-wrong triples than this: the flip rate is not a decision, accuracy is.
    min_triples_for_decision: int = Field(3, ge=1)
    # Text between the prompt and the completion (the document's Q/A rendering: a newline).
    separator: str = "\n"
    # Minimum meaningful mean margin change (nats/token): below it, a significant move is noise.
    assert_margin_delta_gte: float = Field(0.05, ge=0)


def triples_of(spec: PreferenceFlipSpec, ctx: Context) -> list[Triple]:
    if spec.triples:
        return list(spec.triples)
    if ctx.document is None:
        raise ProbeSkip(spec.name, "no triples: give `triples` or a dlm_source with ::preference::")
    found = [
        Triple(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected)
        for p in ctx.document.preferences
    ]
    if not found:
        raise ProbeSkip(spec.name, "the document has no ::preference:: triples and none are given")
    return found


def margins(
    spec: PreferenceFlipSpec, ctx: Context, triples: Sequence[Triple], views: Sequence[View]
) -> np.ndarray:
    """[view, triple] length-normalised margins (nats/token), from one request list."""
    reqs = [
        ContinuationLogprob(t.prompt + spec.separator, text, v)
        for v in views
        for t in triples
        for text in (t.chosen, t.rejected)
    ]
    res = ctx.execute(reqs)
    per_token = np.empty(len(reqs))
    for i, (req, r) in enumerate(zip(reqs, res, strict=True)):
        if not isinstance(r, ContinuationResult):
            raise ProbeError(spec.name, f"expected a continuation log-prob, got {type(r).__name__}")
        if r.num_tokens < 1:
            raise ProbeError(spec.name, f"{req.completion!r} has no scored token")
        per_token[i] = r.logprob / r.num_tokens
        if not np.isfinite(per_token[i]):
            raise ProbeError(
                spec.name, f"non-finite log-prob of {req.completion!r} ({req.view.key})"
            )
    pairs = per_token.reshape(len(views), len(triples), 2)
    return pairs[:, :, 0] - pairs[:, :, 1]


class PreferenceFlip(Probe):
    kind = "preference_flip"
    category = "attribution"
    spec_cls = PreferenceFlipSpec
    needs = frozenset({CONTINUATION})

    def measure(
        self, spec: PreferenceFlipSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        triples = triples_of(spec, ctx)
        m = margins(spec, ctx, triples, [BASE, *treatments])
        base = m[0]
        return [_measurement(spec, triples, base, m[k + 1]) for k in range(len(treatments))]

    def judge(self, spec: PreferenceFlipSpec, m: Measurement, null: NullStats | None) -> Judgement:
        ev = m.evidence
        acc_base, acc = float(ev["accuracy_base"]), float(ev["accuracy"])
        wrong, flipped, broken = int(ev["base_wrong"]), int(ev["flipped"]), int(ev["broken"])
        no_loss = acc >= acc_base
        decided = wrong >= spec.min_triples_for_decision
        rate_ok = not decided or float(ev["flip_rate"]) >= spec.assert_flip_rate_gte
        shape = (
            f"mean margin change {m.raw:+.4f} nats/token; accuracy {acc_base:.0%} -> {acc:.0%} "
            f"({flipped}/{wrong} flipped, {broken} broken)"
        )
        if decided:
            shape += f"; flip rate {ev['flip_rate']:.2f} (min {spec.assert_flip_rate_gte:g})"
        else:
            shape += f"; {wrong} base-wrong < {spec.min_triples_for_decision}: no flip-rate gate"
        gates = [] if no_loss else ["breaks more pairs than it fixes"]
        if not rate_ok:
            gates.append("flip rate below the minimum")
        if m.raw < spec.assert_margin_delta_gte:
            gates.append(f"mean margin change below {spec.assert_margin_delta_gte:g}")
        sig = self.significance(spec, m, null)
        if not sig.calibrated:
            fixed = min(1.0, max(0.0, 0.5 + MARGIN_SCORE_SLOPE * m.raw))
            verdict = Verdict.FAIL if gates else Verdict.PASS
            head = "; ".join(gates) + ": " if gates else ""
            msg = f"{head}{shape}; fixed thresholds ({sig.uncalibrated})"
            return Judgement(verdict, msg, fixed, sig=sig)
        score = stats.score_from_z(sig.z) or 0.0
        assert null is not None
        vs = f"{sig.describe()} vs null {null.mean:+.4f} ± {null.std:.3g}"
        if not sig.significant:
            gates.insert(0, f"not above random adapters (p > {sig.alpha:g})")
        if gates:
            msg = f"{'; '.join(gates)}: {shape}; {vs}"
            return Judgement(Verdict.FAIL, msg, score * acc, sig.z, sig.p, sig)
        return Judgement(Verdict.PASS, f"{shape}; {vs}", score, sig.z, sig.p, sig)


def _measurement(
    spec: PreferenceFlipSpec, triples: Sequence[Triple], base: np.ndarray, treated: np.ndarray
) -> Measurement:
    delta = treated - base
    base_right, right = base > 0, treated > 0
    flipped = int(np.sum(~base_right & right))
    broken = int(np.sum(base_right & ~right))
    wrong = int(np.sum(~base_right))
    rows = tuple(
        {
            "prompt": t.prompt,
            "margin_base": float(b),
            "margin": float(f),
            "delta": float(d),
            "flipped": bool(b <= 0 < f),
            "broken": bool(f <= 0 < b),
        }
        for t, b, f, d in zip(triples, base, treated, delta, strict=True)
    )
    return Measurement(
        raw=float(delta.mean()),
        values=tuple(float(d) for d in delta),
        items=rows,
        evidence={
            "total": len(triples),
            "base_wrong": wrong,
            "flipped": flipped,
            "broken": broken,
            "flip_rate": flipped / wrong if wrong else None,
            "accuracy_base": float(base_right.mean()),
            "accuracy": float(right.mean()),
            "mean_margin_base": float(base.mean()),
            "mean_margin": float(treated.mean()),
            "source": "inline" if spec.triples else "document",
        },
    )
