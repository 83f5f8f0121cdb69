"""adapter_revert: asked in other words, does the adapter fall back to what the base says?

For each case's paraphrases, the base and the treatment answer greedily; answers and the gold
are embedded (all-MiniLM-L6-v2, unit vectors). A pair whose base answer already matches the
gold (cos > base_gold_similarity_cap) says nothing and is dropped. A kept pair reverted when
cos(T, base) > cos(T, gold). raw = reverts / kept pairs, lower is better (z uses sign -1),
calibrated against the null adapters on the same paraphrases (a fraction: beta-binomial
predictive, stats.significance). PASS needs p <= alpha and raw < assert_revert_rate_lt;
without a usable null, the rate alone (WARN uncalibrated).
Without `cases`, the suite's `.dlm` document supplies them: questions it asks more than once
with the same answer (see document_inputs.py); a document without any SKIPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from sway_engine import embeddings, stats
from sway_engine.backends.base import GENERATE
from sway_engine.errors import ProbeError, ProbeSkip
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec, Prompt
from sway_engine.probes.common.answers import answer_of
from sway_engine.probes.common.document_inputs import cases_or_document
from sway_engine.probes.common.embedding import embedded
from sway_engine.probes.common.guard_rail import harm_score
from sway_engine.requests import Generate, GenerationResult
from sway_engine.result import NullStats, Verdict
from sway_engine.spec import STRICT
from sway_engine.views import BASE, View


class RevertCase(BaseModel):
    """A question, its gold answer and rewordings of the question (only these are asked)."""

    model_config = STRICT
    prompt: Prompt
    gold: str = Field(min_length=1)
    paraphrases: tuple[Prompt, ...] = Field(min_length=1)


class AdapterRevertSpec(ProbeSpec):
    kind: Literal["adapter_revert"] = "adapter_revert"
    cases: tuple[RevertCase, ...] = ()
    max_new_tokens: int = Field(64, ge=1, le=1024)
    embedding_model: str = embeddings.MODEL_NAMES[0]
    # An answer ends at the first of these after its first non-blank character.
    stop: tuple[str, ...] = ("\n",)
    base_gold_similarity_cap: float = Field(0.75, ge=-1, le=1)
    assert_revert_rate_lt: float = Field(0.25, gt=0, le=1)
    assert_z_gte: float = 3.0

    @field_validator("embedding_model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return embeddings.check_model_name(v)


class AdapterRevert(Probe):
    kind = "adapter_revert"
    category = "adherence"
    spec_cls = AdapterRevertSpec
    needs = frozenset({GENERATE})
    z_sign: ClassVar[int] = -1
    scale = "fraction"

    def measure(
        self, spec: AdapterRevertSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        cases = cases_or_document(spec.name, self.kind, spec.cases, RevertCase, ctx)
        spec = spec.model_copy(update={"cases": cases})
        pairs = [(c, q) for c in spec.cases for q in c.paraphrases]
        views = [BASE, *treatments]
        res = ctx.execute([Generate(q, v, spec.max_new_tokens) for v in views for _, q in pairs])
        texts = []
        for r in res:
            if not isinstance(r, GenerationResult):
                raise ProbeError(spec.name, f"expected a generation, got {type(r).__name__}")
            texts.append(answer_of(r.text, spec.stop))
        answers = np.asarray(texts, dtype=object).reshape(len(views), len(pairs))
        golds = [c.gold for c, _ in pairs]
        vectors = embedded(ctx, [*golds, *texts], spec.name)
        gold_v = vectors[: len(pairs)]
        answer_v = vectors[len(pairs) :].reshape(len(views), len(pairs), -1)
        base_gold = (answer_v[0] * gold_v).sum(-1)
        kept = base_gold <= spec.base_gold_similarity_cap
        if not kept.any():
            raise ProbeSkip(
                spec.name,
                f"the base already answers all {len(pairs)} paraphrases like the gold (cos > "
                f"{spec.base_gold_similarity_cap}); nothing to measure: add cases the base "
                "gets wrong",
            )
        out = []
        for k in range(1, len(views)):
            to_base = (answer_v[k] * answer_v[0]).sum(-1)
            to_gold = (answer_v[k] * gold_v).sum(-1)
            reverted = to_base > to_gold
            items = tuple(
                {
                    "prompt": case.prompt,
                    "paraphrase": q,
                    "gold": case.gold,
                    "base_answer": answers[0, i],
                    "answer": answers[k, i],
                    "cos_base_gold": float(base_gold[i]),
                    "cos_to_base": float(to_base[i]),
                    "cos_to_gold": float(to_gold[i]),
                    "kept": bool(kept[i]),
                    "reverted": bool(reverted[i]) if kept[i] else None,
                }
                for i, (case, q) in enumerate(pairs)
            )
            flags = reverted[kept].astype(float)
            out.append(
                Measurement(
                    raw=float(flags.mean()),
                    values=tuple(flags.tolist()),
                    items=items,
                    trials=int(kept.sum()),
                    evidence={
                        "reverts": int(flags.sum()),
                        "kept": int(kept.sum()),
                        "dropped_trivial": int((~kept).sum()),
                        "mean_margin": float((to_gold - to_base)[kept].mean()),
                    },
                )
            )
        return out

    def judge(self, spec: AdapterRevertSpec, m: Measurement, null: NullStats | None) -> Judgement:
        ev, limit = m.evidence, spec.assert_revert_rate_lt
        low = m.raw < limit
        summary = (
            f"{ev['reverts']}/{ev['kept']} paraphrase answers closer to the base's than to the "
            f"gold (rate {m.raw:.3f}, max {limit:g}; {ev['dropped_trivial']} dropped as trivial)"
        )
        fixed = harm_score(m.raw / limit)
        sig = self.significance(spec, m, null)
        if not sig.calibrated:
            verdict = Verdict.PASS if low else Verdict.FAIL
            why = "" if low else "reverts to the base: "
            msg = f"{why}{summary}; fixed threshold ({sig.uncalibrated})"
            return Judgement(verdict, msg, fixed, sig=sig)
        score = stats.score_from_z(sig.z) or 0.0
        vs = sig.describe() + (f" vs null {null.mean:.3f} ± {null.std:.3f}" if null else "")
        if sig.significant and low:
            return Judgement(Verdict.PASS, f"{summary}; {vs}", score, sig.z, sig.p, sig)
        why = "reverts no less than random adapters" if not sig.significant else "reverts too often"
        msg = f"{why}: {summary}; {vs}"
        return Judgement(Verdict.FAIL, msg, score * min(1.0, fixed), sig.z, sig.p, sig)
