"""paraphrase_invariance: does the adapter's lift on a gold answer survive rewordings of the
prompt it never saw (generalisation), or only the verbatim prompt (memorisation)?

Per case and view T, lift_T(x) = (log p_T(gold | x) - log p_base(gold | x)) / n_gold
(nats/token, n_gold from the backend's tokenizer; upstream used chars/4). V = mean over cases
of the verbatim lift, P = mean over cases of the mean lift over the case's *held-out*
paraphrases; ratio = P / V. A paraphrase is not held out when it contains the verbatim prompt
(upstream's template wrappers "Could you explain: Q?") or appears in the training document;
such paraphrases are reported and left out of P while any held-out one remains.

raw (z-scored against the null adapters on the same cases) is what the intent claims:
P for `generalize`/`both` (the adapter lifts prompts it was not trained on, beyond random),
V for `memorize`. PASS needs z >= assert_z_gte, V >= min_verbatim_lift, and the ratio gate
(>= min_generalization_ratio, or <= max_generalization_ratio_if_memorize).
Without `cases`, the suite's `.dlm` document supplies them: questions it asks more than once
with the same answer (see document_inputs.py); a document without any SKIPs. Such rewordings
are training text, hence not held out: the result warns that the ratio measures memorisation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from sway_engine import stats
from sway_engine.backends.base import CONTINUATION
from sway_engine.dlm import Document
from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec, Prompt
from sway_engine.probes.common.document_inputs import cases_or_document
from sway_engine.requests import ContinuationLogprob, ContinuationResult
from sway_engine.result import NullStats, Verdict
from sway_engine.spec import STRICT
from sway_engine.views import BASE, View

ROWS_SHOWN = 8
MIN_DOC_WORDS = 4
# Chat-ish scaffolding stripped before comparing a paraphrase with the verbatim question.
_SCAFFOLD = re.compile(r"^\s*(?:Q|Question|User)\s*:\s*|\s*(?:A|Answer|Assistant)\s*:\s*$")


class Case(BaseModel):
    model_config = STRICT
    prompt: Prompt
    gold: str = Field(min_length=1)
    paraphrases: tuple[Prompt, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> Case:
        if any(p == self.prompt for p in self.paraphrases):
            raise ValueError("a paraphrase equals the prompt; give a reworded prompt")
        return self


class ParaphraseSpec(ProbeSpec):
    kind: Literal["paraphrase_invariance"] = "paraphrase_invariance"
    cases: tuple[Case, ...] = ()
    intent: Literal["generalize", "memorize", "both"] = "generalize"
    min_verbatim_lift: float = Field(0.2, ge=0)  # nats/token
    min_generalization_ratio: float = Field(0.5, ge=0)
    max_generalization_ratio_if_memorize: float = Field(0.5, ge=0)
    assert_z_gte: float = Field(3.0, gt=0)

    @field_validator("cases")
    @classmethod
    def _unique_prompts(cls, v: tuple[Case, ...]) -> tuple[Case, ...]:
        seen = [c.prompt for c in v]
        if len(set(seen)) != len(seen):
            raise ValueError("two cases share a prompt; merge their paraphrases")
        return v


def _core(text: str) -> str:
    """Lower-cased words of a prompt without Q:/A: scaffolding or punctuation."""
    return " ".join(re.findall(r"\w+", _SCAFFOLD.sub("", text).lower()))


def held_out(paraphrase: str, prompt: str, document_core: str | None) -> tuple[bool, str]:
    """Whether a paraphrase is new to the adapter, and why not when it is not.

    `document_core` is `core_text(document)`; phrases under MIN_DOC_WORDS words are not
    looked up in it (any short phrase occurs somewhere).
    """
    core, verbatim = _core(paraphrase), _core(prompt)
    if verbatim and f" {verbatim} " in f" {core} ":
        return False, "contains the verbatim prompt"
    if document_core and len(core.split()) >= MIN_DOC_WORDS and f" {core} " in document_core:
        return False, "appears in the training document"
    return True, ""


def core_text(document: Document) -> str:
    """The words the adapter trained on (held-out `!probe` questions excluded)."""
    return " " + _core(document.training_text) + " "


class ParaphraseInvariance(Probe):
    kind = "paraphrase_invariance"
    category = "attribution"
    spec_cls = ParaphraseSpec
    needs = frozenset({CONTINUATION})

    def measure(
        self, spec: ParaphraseSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        cases = cases_or_document(spec.name, self.kind, spec.cases, Case, ctx)
        spec = spec.model_copy(update={"cases": cases})
        prompts = [(c, x) for c in spec.cases for x in (c.prompt, *c.paraphrases)]
        views = [BASE, *treatments]
        reqs = [ContinuationLogprob(x, c.gold, v) for v in views for c, x in prompts]
        res = ctx.execute(reqs)
        lp = np.empty(len(reqs))
        for i, (req, r) in enumerate(zip(reqs, res, strict=True)):
            if not isinstance(r, ContinuationResult) or r.num_tokens < 1:
                raise ProbeError(spec.name, f"gold {req.completion!r} has no scored token")
            lp[i] = r.logprob / r.num_tokens
            if not np.isfinite(lp[i]):
                raise ProbeError(spec.name, f"non-finite log-prob of {req.completion!r}")
        table = lp.reshape(len(views), len(prompts))
        doc = core_text(ctx.document) if ctx.document is not None else None
        marks = [(True, "") if x == c.prompt else held_out(x, c.prompt, doc) for c, x in prompts]
        return [_measurement(spec, table[k + 1] - table[0], marks) for k in range(len(treatments))]

    def judge(self, spec: ParaphraseSpec, m: Measurement, null: NullStats | None) -> Judgement:
        ev = m.evidence
        verbatim, ratio = float(ev["verbatim_lift"]), float(ev["ratio"])
        memorize = spec.intent == "memorize"
        if memorize:
            ratio_ok = ratio <= spec.max_generalization_ratio_if_memorize
            ratio_rule = f"<= {spec.max_generalization_ratio_if_memorize:g}"
        else:
            ratio_ok = ratio >= spec.min_generalization_ratio
            ratio_rule = f">= {spec.min_generalization_ratio:g}"
        shape = (
            f"verbatim lift {verbatim:+.3f}, paraphrase lift {ev['paraphrase_lift']:+.3f} "
            f"nats/token, ratio {ratio:.2f} (intent {spec.intent}: {ratio_rule})"
        )
        if not ev["held_out"]:
            shape += "; WARNING no held-out paraphrase: the ratio measures memorisation"
        gates = []
        if verbatim < spec.min_verbatim_lift:
            gates.append(f"verbatim lift below {spec.min_verbatim_lift:g}")
        if not ratio_ok:
            gates.append("generalises" if memorize else "does not carry over to paraphrases")
        stat = "verbatim" if memorize else "paraphrase"
        sig = self.significance(spec, m, null)
        if not sig.calibrated:
            note = sig.uncalibrated
            lift_score = float(np.clip(verbatim / max(spec.min_verbatim_lift, 1e-9), 0, 1))
            if memorize:
                fixed = lift_score
            else:
                ratio_score = np.clip(ratio / max(spec.min_generalization_ratio, 1e-9), 0, 1)
                fixed = 0.5 * float(ratio_score) + 0.5 * lift_score
            verdict = Verdict.FAIL if gates else Verdict.PASS
            head = "; ".join(gates) + ": " if gates else ""
            msg = f"{head}{shape}; fixed thresholds ({note})"
            return Judgement(verdict, msg, fixed, sig=sig)
        score = stats.score_from_z(sig.z) or 0.0
        assert null is not None
        vs = f"{stat} lift {sig.describe()} vs null {null.mean:+.4f} ± {null.std:.3g}"
        if not sig.significant:
            gates.insert(0, f"{stat} lift not above random adapters")
        if gates:
            msg = f"{'; '.join(gates)}: {shape}; {vs}"
            return Judgement(Verdict.FAIL, msg, score / 2, sig.z, sig.p, sig)
        return Judgement(Verdict.PASS, f"{shape}; {vs}", score, sig.z, sig.p, sig)


def _measurement(
    spec: ParaphraseSpec, lifts: np.ndarray, marks: Sequence[tuple[bool, str]]
) -> Measurement:
    """Lifts and held-out marks are laid out per case: verbatim prompt, then its paraphrases."""
    groups, cursor = [], 0
    for case in spec.cases:
        groups.append((case, cursor, list(range(cursor + 1, cursor + 1 + len(case.paraphrases)))))
        cursor += 1 + len(case.paraphrases)
    any_held = any(marks[j][0] for _, _, own in groups for j in own)
    verbatim, para, rows, excluded = [], [], [], []
    for case, at, own in groups:
        kept = [j for j in own if marks[j][0]] if any_held else own
        v = float(lifts[at])
        p = float(np.mean(lifts[kept])) if kept else None
        verbatim.append(v)
        if p is not None:
            para.append(p)
        excluded += [
            {"prompt": case.prompt, "paraphrase": text, "why": marks[j][1]}
            for j, text in zip(own, case.paraphrases, strict=True)
            if not marks[j][0]
        ]
        rows.append(
            {
                "prompt": case.prompt,
                "gold": case.gold,
                "verbatim_lift": v,
                "paraphrase_lift": p,
                "paraphrases_used": len(kept),
                "paraphrase_lifts": [float(lifts[j]) for j in own],
            }
        )
    v_mean, p_mean = float(np.mean(verbatim)), float(np.mean(para))
    ratio = p_mean / v_mean if abs(v_mean) > 1e-9 else 0.0
    memorize = spec.intent == "memorize"
    return Measurement(
        raw=v_mean if memorize else p_mean,
        values=tuple(verbatim if memorize else para),
        items=tuple(rows),
        evidence={
            "verbatim_lift": v_mean,
            "paraphrase_lift": p_mean,
            "ratio": ratio,
            "intent": spec.intent,
            "held_out": any_held,
            "not_held_out": excluded[:ROWS_SHOWN],
            "not_held_out_count": len(excluded),
        },
    )
