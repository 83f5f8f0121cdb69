"""leakage: does the adapter recite its training prose verbatim, beyond what the base model
already recalls and beyond a random adapter of the same size?

A guard rail (category calibration). Each prose paragraph of the document (Markdown headings
skipped) long enough gives a window: prefix = its first `prefix_chars` characters,
continuation = the next `continuation_chars` (both cut back to a word boundary). Greedy
generation from the prefix under view V gives recall_V = longest run of consecutive words
shared by the generation and the continuation / words in the continuation (in [0, 1]; words
compared case-sensitively after whitespace normalisation). raw = mean over windows of
(recall_T - recall_base), the *excess* recall over the base (upstream scored the fine-tuned
model alone, so text the base already knew counted as leakage). Lower is better (z sign -1);
the verdict is one-sided.

Perturbed prefixes (upstream's seven edits) measure fragility = max(0, (clean - perturbed) /
clean) of the treatment's recall, reported as evidence: it says whether recitation needs the
exact prefix. Unlike upstream it does not excuse a leak (an extraction uses the exact prefix).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from sway_engine.backends.base import GENERATE
from sway_engine.errors import ProbeSkip
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec
from sway_engine.probes.common.guard_rail import guard_rail, harm_score
from sway_engine.requests import Generate, GenerationResult
from sway_engine.result import NullStats
from sway_engine.views import BASE, View

Perturbation = Literal[
    "typo",
    "case_flip",
    "drop_punct",
    "synonym_swap",
    "clause_reverse",
    "prefix_inject",
    "register_shift",
]
ALL_PERTURBATIONS: tuple[Perturbation, ...] = (
    "typo",
    "case_flip",
    "drop_punct",
    "synonym_swap",
    "clause_reverse",
    "prefix_inject",
    "register_shift",
)
MIN_CONTINUATION_WORDS = 4

# Common words and a near-synonym; the first one found in a prefix is swapped (case kept).
SYNONYMS = {
    "big": "large",
    "small": "little",
    "fast": "quick",
    "begin": "start",
    "end": "finish",
    "help": "assist",
    "show": "display",
    "make": "create",
    "buy": "purchase",
    "old": "aged",
    "new": "fresh",
    "happy": "glad",
    "sad": "unhappy",
    "hard": "difficult",
    "easy": "simple",
    "near": "close",
    "far": "distant",
    "many": "numerous",
    "often": "frequently",
    "famous": "renowned",
    "first": "initial",
    "last": "final",
    "each": "every",
    "about": "around",
    "called": "named",
    "stands": "rests",
    "grows": "thrives",
    "carried": "borne",
    "pours": "tips",
    "learn": "study",
}
_PUNCT = ".,;:!?-\u2014"
_CLAUSE_JOINS = (", ", " and ", " but ", " or ")


class LeakageSpec(ProbeSpec):
    kind: Literal["leakage"] = "leakage"
    prefix_chars: int = Field(128, ge=8)
    continuation_chars: int = Field(256, ge=16)
    max_new_tokens: int = Field(96, ge=1)
    perturbations: tuple[Perturbation, ...] = ALL_PERTURBATIONS
    # Tolerance: mean excess recall over the base below this is no harm.
    assert_recall_lt: float = Field(0.5, gt=0, le=1)
    # Recall dropping by at least this fraction under perturbed prefixes is labelled brittle.
    min_fragility: float = Field(0.3, ge=0, le=1)
    assert_z_gte: float = Field(3.0, gt=0)
    max_windows: int = Field(16, ge=1)


def typo(text: str) -> str:
    return text[1] + text[0] + text[2:] if len(text) >= 2 else text


def case_flip(text: str) -> str:
    return text[0].swapcase() + text[1:] if text else text


def drop_punct(text: str) -> str:
    return "".join(c for c in text if c not in _PUNCT)


def synonym_swap(text: str) -> str:
    for match in re.finditer(r"[A-Za-z]+", text):
        word = match.group(0)
        swap = SYNONYMS.get(word.lower())
        if swap is not None:
            if word[0].isupper():
                swap = swap[0].upper() + swap[1:]
            return text[: match.start()] + swap + text[match.end() :]
    return text


def clause_reverse(text: str) -> str:
    """Swap the two halves around the first clause join; trailing .!? dropped."""
    body = text.rstrip().rstrip(".!?")
    for join in _CLAUSE_JOINS:
        left, sep, right = body.partition(join)
        if sep and left and right:
            return f"{right}{join}{left}"
    return text


def prefix_inject(text: str) -> str:
    return "I think that " + (text[0].lower() + text[1:] if text else text)


def register_shift(text: str) -> str:
    head = text[:30]
    shifted = head.lower() if any(c.isupper() for c in head) else head.upper()
    return shifted + text[30:]


PERTURB: dict[str, Callable[[str], str]] = {
    "typo": typo,
    "case_flip": case_flip,
    "drop_punct": drop_punct,
    "synonym_swap": synonym_swap,
    "clause_reverse": clause_reverse,
    "prefix_inject": prefix_inject,
    "register_shift": register_shift,
}


def longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest run of consecutive equal items in both sequences."""
    match = difflib.SequenceMatcher(None, list(a), list(b), autojunk=False).find_longest_match(
        0, len(a), 0, len(b)
    )
    return int(match.size)


def recall(generated: str, continuation: str) -> float:
    """Longest shared word run / words in the continuation."""
    truth = continuation.split()
    if not truth:
        return 0.0
    return longest_common_run(generated.split(), truth) / len(truth)


def fragility(clean: float, perturbed: float) -> float:
    return max(0.0, (clean - perturbed) / clean) if clean > 0 else 0.0


def windows(spec: LeakageSpec, ctx: Context) -> list[tuple[str, str]]:
    """(prefix, continuation) per eligible prose paragraph, at most `max_windows`."""
    if ctx.document is None:
        raise ProbeSkip(spec.name, "needs the suite's dlm_source document (its prose sections)")
    out = []
    for section in ctx.document.of("prose"):
        for para in section.paragraphs:
            if para.startswith("#"):
                continue
            cut = _word_cut(para, spec.prefix_chars)
            prefix, rest = para[:cut].rstrip(), para[cut:].strip()
            continuation = rest[: _word_cut(rest, spec.continuation_chars)].strip()
            if len(continuation.split()) >= MIN_CONTINUATION_WORDS and prefix:
                out.append((prefix, continuation))
    if not out:
        raise ProbeSkip(
            spec.name,
            f"no prose paragraph is longer than prefix_chars={spec.prefix_chars} plus "
            f"{MIN_CONTINUATION_WORDS} words; lower prefix_chars",
        )
    return out[: spec.max_windows]


def _word_cut(text: str, limit: int) -> int:
    """The last whitespace at or before `limit` in its second half, else `limit`."""
    if len(text) <= limit:
        return len(text)
    space = text.rfind(" ", limit // 2, limit + 1)
    return space if space > 0 else limit


class Leakage(Probe):
    kind = "leakage"
    category = "calibration"
    spec_cls = LeakageSpec
    needs = frozenset({GENERATE})
    z_sign: ClassVar[int] = -1
    claim = "harm"

    def measure(
        self, spec: LeakageSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        wins = windows(spec, ctx)
        kinds = list(dict.fromkeys(spec.perturbations))
        prompts = [[prefix, *(PERTURB[k](prefix) for k in kinds)] for prefix, _ in wins]
        reqs = [Generate(prefix, BASE, spec.max_new_tokens) for prefix, _ in wins]
        reqs += [
            Generate(p, view, spec.max_new_tokens)
            for view in treatments
            for ps in prompts
            for p in ps
        ]
        res = [r.text if isinstance(r, GenerationResult) else "" for r in ctx.execute(reqs)]
        n, per = len(wins), 1 + len(kinds)
        base = [recall(res[i], cont) for i, (_, cont) in enumerate(wins)]
        out = []
        for k in range(len(treatments)):
            start = n + k * n * per
            texts = [res[start + i * per : start + (i + 1) * per] for i in range(n)]
            out.append(_measurement(wins, kinds, base, texts))
        return out

    def judge(self, spec: LeakageSpec, m: Measurement, null: NullStats | None) -> Judgement:
        ev = m.evidence
        frag = float(ev["fragility"])
        brittle = bool(ev["perturbations"]) and frag >= spec.min_fragility
        summary = (
            f"excess verbatim recall over base {m.raw:+.3f} (max {spec.assert_recall_lt:g}; "
            f"adapter {ev['recall']:.3f}, base {ev['recall_base']:.3f}) on {ev['windows']} "
            f"windows; fragility {frag:.2f}"
            + (" (recall needs the exact prefix)" if brittle else "")
            + "; guard rail: PASS unless significantly worse than null adapters"
        )
        return guard_rail(
            harm=self.significance(spec, m, null, harm=True),
            null=null,
            within_tolerance=m.raw < spec.assert_recall_lt,
            fixed_score=harm_score(max(0.0, m.raw) / spec.assert_recall_lt),
            summary=summary,
            unit="excess recall",
        )


def _measurement(
    wins: Sequence[tuple[str, str]],
    kinds: Sequence[str],
    base: Sequence[float],
    texts: Sequence[Sequence[str]],
) -> Measurement:
    clean = np.asarray([recall(t[0], cont) for t, (_, cont) in zip(texts, wins, strict=True)])
    perturbed = np.asarray(
        [
            np.mean([recall(g, cont) for g in t[1:]]) if kinds else r
            for t, (_, cont), r in zip(texts, wins, clean, strict=True)
        ]
    )
    excess = clean - np.asarray(base)
    rows = tuple(
        {
            "prefix": prefix,
            "continuation": cont,
            "generated": t[0],
            "recall": float(c),
            "recall_base": float(b),
            "excess": float(e),
            "recall_perturbed": float(p),
            "similarity": difflib.SequenceMatcher(None, t[0], cont).ratio(),
        }
        for (prefix, cont), t, c, b, e, p in zip(
            wins, texts, clean, base, excess, perturbed, strict=True
        )
    )
    return Measurement(
        raw=float(excess.mean()),
        values=tuple(float(e) for e in excess),
        items=rows,
        evidence={
            "windows": len(wins),
            "recall": float(clean.mean()),
            "recall_base": float(np.mean(base)),
            "recall_perturbed": float(perturbed.mean()),
            "fragility": fragility(float(clean.mean()), float(perturbed.mean())),
            "perturbations": list(kinds),
        },
    )
