"""Probe inputs read from the suite's `.dlm` document, for probes whose spec gives none.

Shared by `sway autogen` (which writes them into a suite) and by the probes themselves (which
fill an empty `prompts` / `cases` at run time, as upstream's resolver did):

* prompts: the instruction questions, held-out (`### Q !probe`) ones first, deduplicated;
  when the document has no questions, the opening words of each prose paragraph.
* cases: questions the author asked more than once with the same answer. The first wording is
  the prompt, the others its paraphrases, the shared answer the gold. sway never invents
  paraphrases, so a document without such rewordings yields no cases (the probe SKIPs).

Training answers are never used as prompts.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from sway_engine.dlm import Document
from sway_engine.errors import ProbeError, ProbeSkip
from sway_engine.probes.base import Context

PROSE_PROMPT_WORDS = 6  # a prose opening keeps this many words (paragraphs must be longer)

CaseT = TypeVar("CaseT", bound=BaseModel)


def questions(doc: Document, template: str = "{question}") -> tuple[list[str], list[str]]:
    """(held-out `!probe` questions, the other questions), each in document order, rendered
    with `template` and deduplicated (a question in the first list is not repeated in the second).
    """
    held = list(dict.fromkeys(template.format(question=q.question) for q in doc.qa if q.probe))
    seen = set(held)
    rest = [
        p
        for p in dict.fromkeys(template.format(question=q.question) for q in doc.qa if not q.probe)
        if p not in seen
    ]
    return held, rest


def prose_prompts(doc: Document) -> list[str]:
    """The first words of each prose paragraph (headings skipped): mid-sentence openings."""
    out = []
    for section in doc.of("prose"):
        for para in section.paragraphs:
            words = para.split()
            if para.startswith("#") or len(words) <= PROSE_PROMPT_WORDS:
                continue
            out.append(" ".join(words[:PROSE_PROMPT_WORDS]))
    return out


def document_prompts(doc: Document) -> list[str]:
    """Held-out questions, then the other questions; without questions, prose openings."""
    held, rest = questions(doc)
    return held + rest or list(dict.fromkeys(prose_prompts(doc)))


def paraphrase_cases(doc: Document, template: str = "{question}") -> list[dict[str, Any]]:
    """Questions the document answers identically: the first is the case, the rest its
    paraphrases (real rewordings written by the author, not templates). A question already used
    as a case's prompt does not open a second case (two cases may not share a prompt)."""
    by_answer: dict[str, list[str]] = {}
    for qa in doc.qa:
        by_answer.setdefault(qa.answer.strip(), []).append(qa.question)
    cases, prompts = [], set()
    for answer, asked in by_answer.items():
        distinct = list(dict.fromkeys(template.format(question=q) for q in asked))
        if len(distinct) >= 2 and distinct[0] not in prompts:
            prompts.add(distinct[0])
            cases.append({"prompt": distinct[0], "gold": " " + answer, "paraphrases": distinct[1:]})
    return cases


def prompts_or_document(
    name: str, kind: str, prompts: tuple[str, ...], ctx: Context
) -> tuple[str, ...]:
    """`prompts` when given, else the document's (see module docstring).

    ProbeError without either (the spec is incomplete); ProbeSkip when the document has no
    question and no prose paragraph long enough to open a prompt (the input does not exist).
    """
    if prompts:
        return prompts
    if ctx.document is None:
        raise ProbeError(
            name,
            f"no prompts: give {kind} a `prompts` list, or set the suite's `dlm_source` to "
            "take the document's questions",
        )
    derived = document_prompts(ctx.document)
    if not derived:
        raise ProbeSkip(
            name,
            "no prompts: the document has no ### Q questions and no prose paragraph longer "
            f"than {PROSE_PROMPT_WORDS} words; give {kind} a `prompts` list",
        )
    return tuple(derived)


def cases_or_document(
    name: str, kind: str, cases: tuple[CaseT, ...], model: type[CaseT], ctx: Context
) -> tuple[CaseT, ...]:
    """`cases` when given, else the document's reworded questions validated as `model`.

    ProbeError without either; ProbeSkip when the document asks no question twice with the
    same answer (nothing failed: the input does not exist).
    """
    if cases:
        return cases
    how = "`cases` of {prompt, gold, paraphrases}"
    if ctx.document is None:
        raise ProbeError(
            name,
            f"no cases: give {kind} {how}, or set the suite's `dlm_source` to a document that "
            "asks a question in more than one wording with the same answer",
        )
    derived = paraphrase_cases(ctx.document)
    if not derived:
        raise ProbeSkip(
            name,
            "no cases: the document has no reworded questions (no question is asked twice with "
            f"the same ### A answer); give {kind} {how}, with paraphrases written by you",
        )
    return tuple(model.model_validate(c) for c in derived)
