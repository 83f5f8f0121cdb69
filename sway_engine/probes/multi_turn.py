"""multi_turn_coherence_decay: does the adapter's effect fade as a dialogue deepens?

Per prompt, each treatment holds a dialogue of its own: turn 1 is the prompt, turn t > 1 adds
the treatment's greedy answer to the previous turn and a follow-up ("Continue.", ...), rendered
with `turn_template`. D(t) = mean over prompts of KL(T || base) (or JS) of the next token at
turn t, on the treatment's history (the base reads the same history; it never generates).
raw = D(N), the effect left at the last turn, z-scored against the null adapters (each with
its own dialogue from the same prompts and follow-ups); persistence = D(N) / D(1) must reach
a threshold (default: what an exponential of half-life `assert_half_life_turns` keeps).
Without `prompts`, the suite's `.dlm` document supplies them (its questions, `!probe` ones
first, else prose openings; see document_inputs.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from sway_engine.backends.base import DIVERGENCE, GENERATE, NEXT_TOKEN
from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec, Prompt
from sway_engine.probes.common.answers import answer_of
from sway_engine.probes.common.divergence import topk_divergence
from sway_engine.probes.common.document_inputs import prompts_or_document
from sway_engine.probes.common.persistence import (
    fit_evidence,
    half_life,
    persistence_judgement,
    persistence_threshold,
)
from sway_engine.probes.common.templates import check_template
from sway_engine.requests import (
    Divergence,
    DivergenceResult,
    Generate,
    GenerationResult,
    NextToken,
    Request,
    Result,
    TokenDist,
)
from sway_engine.result import NullStats
from sway_engine.views import BASE, View

FOLLOW_UPS = (
    "Continue.",
    "Tell me more.",
    "Can you elaborate?",
    "What else?",
    "Go deeper.",
    "Expand on that.",
    "And then?",
)
TRANSCRIPT_CHARS = 2000


class MultiTurnSpec(ProbeSpec):
    kind: Literal["multi_turn_coherence_decay"] = "multi_turn_coherence_decay"
    prompts: tuple[Prompt, ...] = ()  # the first user message of each dialogue
    max_turns: int = Field(4, ge=2, le=8)
    max_new_tokens: int = Field(96, ge=1, le=1024)
    follow_ups: tuple[str, ...] = Field(FOLLOW_UPS, min_length=1)  # cycled
    # One user turn; the model's answer follows it, then `turn_separator`.
    turn_template: str = "User: {message}\nAssistant:"
    turn_separator: str = "\n"
    # An answer ends at the first of these after its first non-blank character.
    stop: tuple[str, ...] = ("\n",)
    divergence: Literal["js", "kl"] = "kl"
    top_k: int | None = Field(None, ge=1)
    min_effect: float = Field(0.02, ge=0)  # nats: the effect at turn 1
    # Fraction of the turn-1 effect that must remain at the last turn; when unset,
    # 2^(-(max_turns - 1) / assert_half_life_turns).
    assert_persistence_gte: float | None = Field(None, gt=0, le=1)
    assert_half_life_turns: float = Field(2.0, gt=0)
    assert_z_gte: float = 3.0

    @field_validator("turn_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template("turn_template", v, ("message",))


def reply(template_text: str, answer: str) -> str:
    """The answer as it follows its user turn: after one space unless the turn ends in one."""
    if not answer or not template_text or template_text[-1].isspace():
        return answer
    return " " + answer


class MultiTurn(Probe):
    kind = "multi_turn_coherence_decay"
    category = "adherence"
    spec_cls = MultiTurnSpec
    needs = frozenset({NEXT_TOKEN, GENERATE})
    scale = "log"

    def measure(
        self, spec: MultiTurnSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        prompts = prompts_or_document(spec.name, self.kind, spec.prompts, ctx)
        spec = spec.model_copy(update={"prompts": prompts})
        turns = spec.max_turns
        history = {
            (t, i): spec.turn_template.format(message=p)
            for t in range(len(treatments))
            for i, p in enumerate(prompts)
        }
        d = np.zeros((len(treatments), len(prompts), turns))
        answers: dict[tuple[int, int, int], str] = {}
        exact = ctx.divergence_mode == "exact" and DIVERGENCE in ctx.capabilities
        for turn in range(turns):
            keys = list(history)
            reqs: list[Request] = []
            for t, i in keys:
                reqs += _divergence_requests(history[t, i], treatments[t], exact, spec, ctx)
            last = turn == turns - 1
            if not last:
                reqs += [
                    Generate(history[t, i], treatments[t], spec.max_new_tokens) for t, i in keys
                ]
            res = ctx.execute(reqs)
            width = 1 if exact else 2
            for n, (t, i) in enumerate(keys):
                d[t, i, turn] = _divergence_value(res[n * width : (n + 1) * width], spec, exact)
            if last:
                break
            follow = spec.follow_ups[turn % len(spec.follow_ups)]
            for n, (t, i) in enumerate(keys):
                gen = res[len(keys) * width + n]
                if not isinstance(gen, GenerationResult):
                    raise ProbeError(spec.name, f"expected a generation, got {type(gen).__name__}")
                answers[t, i, turn] = answer = answer_of(gen.text, spec.stop)
                history[t, i] += (
                    reply(history[t, i], answer)
                    + spec.turn_separator
                    + spec.turn_template.format(message=follow)
                )
        return [
            _measurement(
                spec, d[t], {(i, k): a for (u, i, k), a in answers.items() if u == t}, history[t, 0]
            )
            for t in range(len(treatments))
        ]

    def judge(self, spec: MultiTurnSpec, m: Measurement, null: NullStats | None) -> Judgement:
        threshold = persistence_threshold(
            spec.assert_persistence_gte, spec.max_turns - 1, spec.assert_half_life_turns
        )
        return persistence_judgement(
            raw=m.raw,
            first=float(m.evidence["first"]),
            threshold=threshold,
            sig=self.significance(spec, m, null),
            min_effect=spec.min_effect,
            where=f"at turn {spec.max_turns}",
            unit=f"nats ({spec.divergence})",
        )


def _divergence_requests(
    history: str, view: View, exact: bool, spec: MultiTurnSpec, ctx: Context
) -> list[Request]:
    if exact:
        return [Divergence(history, BASE, view)]
    k = spec.top_k or ctx.top_k
    return [NextToken(history, BASE, k), NextToken(history, view, k)]


def _divergence_value(res: Sequence[Result], spec: MultiTurnSpec, exact: bool) -> float:
    if exact:
        (r,) = res
        if not isinstance(r, DivergenceResult):
            raise ProbeError(spec.name, f"expected a divergence, got {type(r).__name__}")
        return r.js if spec.divergence == "js" else r.kl_b_a
    ref, out = res
    if not (isinstance(ref, TokenDist) and isinstance(out, TokenDist)):
        raise ProbeError(spec.name, "expected two next-token distributions")
    return topk_divergence(ref, out, spec.divergence)


def _measurement(
    spec: MultiTurnSpec, d: np.ndarray, answers: dict[tuple[int, int], str], transcript: str
) -> Measurement:
    """d: [prompt, turn] divergences of one treatment; answers[(prompt, turn)] its replies."""
    curve = d.mean(axis=0)
    axis = list(range(1, spec.max_turns + 1))
    items = tuple(
        {
            "prompt": p,
            "turn": k + 1,
            spec.divergence: float(d[i, k]),
            "answer": answers.get((i, k), ""),
        }
        for i, p in enumerate(spec.prompts)
        for k in range(spec.max_turns)
    )
    first = float(curve[0])
    return Measurement(
        raw=float(curve[-1]),
        values=tuple(float(v) for v in d[:, -1]),
        items=items,
        evidence={
            "divergence": spec.divergence,
            "turns": axis,
            "curve": [float(v) for v in curve],
            "first": first,
            "persistence": float(curve[-1] / first) if first > 0 else 0.0,
            **fit_evidence(half_life(axis, curve), "half_life_turns"),
            "transcript": transcript[-TRANSCRIPT_CHARS:],
        },
    )
