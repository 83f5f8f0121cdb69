"""style_fingerprint: does the adapter's free text read more like the training document?

A fingerprint is five surface statistics of a text (numpy only, any alphabet): mean and std of
sentence length in words, moving-average type-token ratio (MATTR over 25-word windows; plain
TTR falls with length, and views stop at different lengths), mean word length in characters,
punctuation per character. Upstream's sixth dim (paragraph length) is dropped: on generations
it measures where `max_new_tokens` cut the text, not style. Each dim is divided by its spread
over the base's per-prompt outputs (floored at a tenth of its natural unit), so no dim
dominates by its units (upstream hand-scaled them).

Greedy generation per prompt under base and T; per prompt i, the projection shift
s_i = ((f(T_i) - f(base_i)) . g) / |g|^2, g = f(doc) - mean_i f(base_i): 0 = no move,
1 = a full gap toward the document, negative = away. raw = mean_i s_i, z-scored against null
adapters on the same prompts and document (upstream's null used a sentinel document).
PASS needs z >= assert_z_gte and raw >= assert_shift_gte.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from sway_engine import stats
from sway_engine.backends.base import GENERATE
from sway_engine.errors import ProbeError, ProbeSkip
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec, Prompt
from sway_engine.requests import Generate, GenerationResult
from sway_engine.result import NullStats, Verdict
from sway_engine.views import BASE, View

DIMS = ("sentence_len", "sentence_len_std", "type_token", "word_len", "punct_rate")
# Natural unit of each dim (upstream's hand scales); a tenth of it floors the spread.
UNITS = np.asarray([30.0, 30.0, 1.0, 10.0, 0.1])
FLOOR_SHARE = 0.1
MATTR_WINDOW = 25
PUNCT = set(".,:;!?-\u2014()[]\"'/")
_SENTENCE_END = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+")
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")

# Open-ended elicitation prompts used when a spec gives none (written for sway).
DEFAULT_PROMPTS = (
    "Describe a place you know well and what makes it unusual.",
    "Explain an old custom to someone who has never heard of it.",
    "Tell the story of a building and the people who kept it.",
    "Summarize an important idea for a curious newcomer.",
    "Write a short account of a festival and how it is celebrated.",
    "Describe a food or drink and how it is prepared.",
)


class StyleSpec(ProbeSpec):
    kind: Literal["style_fingerprint"] = "style_fingerprint"
    prompts: tuple[Prompt, ...] = DEFAULT_PROMPTS
    # Empty: the document's prose (all of its text when it has no prose section).
    doc_reference: str = ""
    max_new_tokens: int = Field(128, ge=8)
    assert_shift_gte: float = Field(0.25, ge=0)
    assert_z_gte: float = Field(3.0, gt=0)
    # Upstream's spaCy/textstat dims are not built: `on` SKIPs, `auto` and `off` use five dims.
    extended: Literal["auto", "on", "off"] = "auto"


def mattr(words: Sequence[str], window: int = MATTR_WINDOW) -> float:
    """Mean type-token ratio over every `window`-word span (plain TTR when shorter)."""
    if len(words) <= window:
        return len(set(words)) / len(words)
    spans = len(words) - window + 1
    return float(np.mean([len(set(words[i : i + window])) / window for i in range(spans)]))


def fingerprint(text: str) -> np.ndarray | None:
    """The five raw dims of a text, or None when it has no word."""
    words = _WORD.findall(text)
    if not words:
        return None
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if _WORD.search(s)]
    lengths = np.asarray([len(_WORD.findall(s)) for s in sentences], dtype=float)
    chars = max(1, len(text))
    return np.asarray(
        [
            lengths.mean(),
            lengths.std(),
            mattr([w.lower() for w in words]),
            float(np.mean([len(w) for w in words])),
            sum(c in PUNCT for c in text) / chars,
        ]
    )


def reference_text(spec: StyleSpec, ctx: Context) -> str:
    if spec.doc_reference.strip():
        return spec.doc_reference
    if ctx.document is None:
        raise ProbeSkip(spec.name, "no style reference: give `doc_reference` or a dlm_source")
    prose = [p for s in ctx.document.of("prose") for p in s.paragraphs if not p.startswith("#")]
    return "\n\n".join(prose) if prose else ctx.document.text


def shifts(
    base: Sequence[np.ndarray | None], treated: Sequence[np.ndarray | None], doc: np.ndarray
) -> np.ndarray:
    """Per-prompt projection shifts, over prompts where both outputs have words."""
    present = np.asarray([b for b in base if b is not None])
    spread = present.std(axis=0) if len(present) > 1 else np.zeros(len(DIMS))
    scale = np.maximum(spread, FLOOR_SHARE * UNITS)
    gap = (doc - present.mean(axis=0)) / scale
    norm = float(gap @ gap)
    out = [
        float(((t - b) / scale) @ gap / norm) if norm > 0 else 0.0
        for b, t in zip(base, treated, strict=True)
        if b is not None and t is not None
    ]
    return np.asarray(out)


class StyleFingerprint(Probe):
    kind = "style_fingerprint"
    category = "calibration"
    spec_cls = StyleSpec
    needs = frozenset({GENERATE})

    def measure(
        self, spec: StyleSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        if spec.extended == "on":
            raise ProbeSkip(spec.name, "extended (spaCy) dims are not available; use auto or off")
        if not spec.prompts:
            raise ProbeError(spec.name, "no prompts: give style_fingerprint `prompts`")
        doc = fingerprint(reference_text(spec, ctx))
        if doc is None:
            raise ProbeError(spec.name, "the style reference has no words")
        views = [BASE, *treatments]
        n = len(spec.prompts)
        reqs = [Generate(p, v, spec.max_new_tokens) for v in views for p in spec.prompts]
        texts = [r.text if isinstance(r, GenerationResult) else "" for r in ctx.execute(reqs)]
        prints = [fingerprint(t) for t in texts]
        base = prints[:n]
        if all(b is None for b in base):
            raise ProbeError(spec.name, "every base generation is blank: nothing to compare")
        out = []
        for k in range(1, len(views)):
            treated = prints[k * n : (k + 1) * n]
            # A view with no scorable prompt (it stops at once) measured a fact, not a fault:
            # its values are empty, raw 0 (no shift toward the document), and judge FAILs it.
            values = shifts(base, treated, doc)
            out.append(_measurement(spec, texts[k * n : (k + 1) * n], base, treated, doc, values))
        return out

    def judge(self, spec: StyleSpec, m: Measurement, null: NullStats | None) -> Judgement:
        if m.evidence["prompts_scored"] == 0:
            msg = (
                f"no text to fingerprint: {m.evidence['blank_outputs']} of {len(spec.prompts)} "
                "outputs are blank and no prompt has words under both base and the adapter "
                "(the adapter stops at once on open prompts)"
            )
            return Judgement(Verdict.FAIL, msg, 0.0)
        size = f"projection shift {m.raw:+.3f} toward the document (min {spec.assert_shift_gte:g})"
        big = m.raw >= spec.assert_shift_gte
        sig = self.significance(spec, m, null)
        if not sig.calibrated:
            verdict = Verdict.PASS if big else Verdict.FAIL
            fixed = float(np.clip(m.raw, 0.0, 1.0))
            msg = f"{size}; fixed threshold ({sig.uncalibrated})"
            return Judgement(verdict, msg, fixed, sig=sig)
        score = stats.score_from_z(sig.z) or 0.0
        assert null is not None
        vs = f"{sig.describe()} vs null {null.mean:+.3f} ± {null.std:.3g}"
        if sig.significant and big:
            return Judgement(Verdict.PASS, f"{size}; {vs}", score, sig.z, sig.p, sig)
        effect = float(np.clip(m.raw / spec.assert_shift_gte, 0, 1)) if spec.assert_shift_gte else 1
        if sig.significant:
            msg = f"significant but too small: {size}; {vs}"
            return Judgement(Verdict.FAIL, msg, score * effect, sig.z, sig.p, sig)
        msg = f"style indistinguishable from a random adapter: {size}; {vs}"
        return Judgement(Verdict.FAIL, msg, score * effect, sig.z, sig.p, sig)


def _measurement(
    spec: StyleSpec,
    texts: Sequence[str],
    base: Sequence[np.ndarray | None],
    treated: Sequence[np.ndarray | None],
    doc: np.ndarray,
    values: np.ndarray,
) -> Measurement:
    def mean_of(prints: Sequence[np.ndarray | None]) -> dict[str, float]:
        present = np.asarray([f for f in prints if f is not None])
        if not len(present):
            return {}
        return dict(zip(DIMS, (float(x) for x in present.mean(axis=0)), strict=True))

    rows = tuple(
        {"prompt": p, "output": t, "blank": f is None}
        for p, t, f in zip(spec.prompts, texts, treated, strict=True)
    )
    return Measurement(
        raw=float(values.mean()) if values.size else 0.0,
        values=tuple(float(v) for v in values),
        items=rows,
        evidence={
            "fingerprint_base": mean_of(base),
            "fingerprint": mean_of(treated),
            "fingerprint_doc": dict(zip(DIMS, (float(x) for x in doc), strict=True)),
            "prompts_scored": int(values.size),
            "blank_outputs": sum(f is None for f in treated),
        },
    )
