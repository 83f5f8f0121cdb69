"""prompt_collapse: does the adapter's effect survive a long stretch of irrelevant text?

Each prompt is preceded by L tokens of neutral natural prose (the tail of a corpus passage,
so the text nearest the prompt is the same at every L), for each L in `context_lengths`.
m(L) = mean over prompts of JS(base, T) (or KL(T || base)); lengths are measured with the
backend's tokenizer. raw = m(L_max), the effect left at the longest context, z-scored against
the null adapters on the same contexts; persistence = m(L_max) / m(L_min) must reach a
threshold (default: what an exponential with half-life `assert_half_life_tokens` keeps).
Upstream fitted a half-life and FAILed when the effect did not decay; no decay is healthy.
Without `prompts`, the suite's `.dlm` document supplies them (its questions, `!probe` ones
first, else prose openings; see document_inputs.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, field_validator

from sway_engine.backends.base import NEXT_TOKEN, ROLLING
from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec, Prompt
from sway_engine.probes.common.corpus import load_corpus
from sway_engine.probes.common.divergence import divergences
from sway_engine.probes.common.document_inputs import prompts_or_document
from sway_engine.probes.common.persistence import (
    fit_evidence,
    half_life,
    persistence_judgement,
    persistence_threshold,
)
from sway_engine.requests import RollingLogprob, RollingResult
from sway_engine.result import NullStats
from sway_engine.views import BASE, View

SEPARATOR = "\n\n"  # between the filler and the prompt
MAX_CONTEXT = 32_768
# Characters sampled per requested token when sizing the filler (generous: ~4 is typical).
SAMPLE_CHARS_PER_TOKEN = 8
# A fitted log-slope this close to zero is a flat curve (rounding), not a decay.


class PromptCollapseSpec(ProbeSpec):
    kind: Literal["prompt_collapse"] = "prompt_collapse"
    prompts: tuple[Prompt, ...] = ()
    context_lengths: tuple[int, ...] = (0, 256, 512, 1024)  # filler tokens before each prompt
    # A built-in corpus name or a UTF-8 text file: natural prose unrelated to the prompts.
    filler: str = "public_domain_en"
    divergence: Literal["js", "kl"] = "js"
    top_k: int | None = Field(None, ge=1)
    min_effect: float = Field(0.02, ge=0)  # nats: the effect at the shortest context
    # Fraction of the shortest-context effect that must remain at the longest; when unset,
    # 2^(-span / assert_half_life_tokens) with span the measured token distance.
    assert_persistence_gte: float | None = Field(None, gt=0, le=1)
    assert_half_life_tokens: float = Field(512.0, gt=0)
    assert_z_gte: float = 3.0
    # Upstream's pad-token stuffing switch: accepted so upstream files load, not used.
    legacy_stuffing: bool = False

    @field_validator("context_lengths")
    @classmethod
    def _grid(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        grid = tuple(sorted(set(v)))
        if len(grid) < 2 or grid[0] < 0 or grid[-1] > MAX_CONTEXT:
            raise ValueError(
                f"context_lengths needs >= 2 distinct token counts in [0, {MAX_CONTEXT}]"
            )
        return grid


# ---- the probe ----


def filler_tail(text: str, chars: int) -> str:
    """The last ~`chars` characters of `text`, starting at a word boundary ("" for 0)."""
    if chars <= 0:
        return ""
    if chars >= len(text):
        return text.strip()
    start = len(text) - chars
    space = text.find(" ", start)
    return text[space + 1 if 0 <= space < len(text) - 1 else start :].strip()


class PromptCollapse(Probe):
    kind = "prompt_collapse"
    category = "adherence"
    spec_cls = PromptCollapseSpec
    needs = frozenset({NEXT_TOKEN, ROLLING})
    scale = "log"

    def measure(
        self, spec: PromptCollapseSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        prompts = prompts_or_document(spec.name, self.kind, spec.prompts, ctx)
        spec = spec.model_copy(update={"prompts": prompts})
        fillers = self._fillers(spec, ctx)
        contexts = [f + SEPARATOR + p if f else p for f in fillers for p in spec.prompts]
        # Measured context length: tokens of (filler + prompt) minus tokens of the prompt alone.
        alone, *with_filler = _token_counts(
            spec.name,
            ctx,
            [spec.prompts[0], *(f + SEPARATOR + spec.prompts[0] for f in fillers if f)],
        )
        counted = iter(with_filler)
        tokens = [next(counted) - alone if f else 0 for f in fillers]
        d = divergences(ctx, contexts, BASE, treatments, kind=spec.divergence, top_k=spec.top_k)
        n = len(spec.prompts)
        out = []
        for row in d:
            grid = row.reshape(len(fillers), n)
            curve = grid.mean(axis=1)
            items = tuple(
                {
                    "context_tokens": tokens[i],
                    "prompt": p,
                    spec.divergence: float(grid[i, j]),
                }
                for i in range(len(fillers))
                for j, p in enumerate(spec.prompts)
            )
            out.append(
                Measurement(
                    raw=float(curve[-1]),
                    values=tuple(float(v) for v in grid[-1]),
                    items=items,
                    evidence={
                        "divergence": spec.divergence,
                        "context_lengths": list(spec.context_lengths),
                        "context_tokens": tokens,
                        "curve": [float(v) for v in curve],
                        "first": float(curve[0]),
                        "persistence": float(curve[-1] / curve[0]) if curve[0] > 0 else 0.0,
                        **fit_evidence(half_life(tokens, curve), "half_life_tokens"),
                        "span_tokens": tokens[-1] - tokens[0],
                    },
                )
            )
        return out

    def judge(self, spec: PromptCollapseSpec, m: Measurement, null: NullStats | None) -> Judgement:
        ev = m.evidence
        threshold = persistence_threshold(
            spec.assert_persistence_gte, float(ev["span_tokens"]), spec.assert_half_life_tokens
        )
        return persistence_judgement(
            raw=m.raw,
            first=float(ev["first"]),
            threshold=threshold,
            sig=self.significance(spec, m, null),
            min_effect=spec.min_effect,
            where=f"after {ev['context_tokens'][-1]} tokens of filler",
            unit=f"nats ({spec.divergence})",
        )

    def _fillers(self, spec: PromptCollapseSpec, ctx: Context) -> list[str]:
        """One filler per context length, sized with the backend tokenizer's chars/token."""
        corpus = load_corpus(spec.filler, spec.name)
        longest = spec.context_lengths[-1]
        sample = corpus[: max(1, longest) * SAMPLE_CHARS_PER_TOKEN].strip()
        (sample_tokens,) = _token_counts(spec.name, ctx, [sample])
        if sample_tokens < longest:
            raise ProbeError(
                spec.name,
                f"filler {spec.filler!r} holds {sample_tokens} tokens; context_lengths up to "
                f"{longest} need a longer text",
            )
        per_token = len(sample) / sample_tokens
        return [filler_tail(sample, round(n * per_token)) for n in spec.context_lengths]


def _token_counts(probe: str, ctx: Context, texts: Sequence[str]) -> list[int]:
    """Tokens of each text under the backend's tokenizer (special tokens included)."""
    out = []
    for r in ctx.execute([RollingLogprob(t, BASE) for t in texts]):
        if not isinstance(r, RollingResult):
            raise ProbeError(probe, f"expected a rolling log-prob, got {type(r).__name__}")
        out.append(int(r.token_ids.size))
    return out
