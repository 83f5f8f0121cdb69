"""Parse `.dlm` documents: YAML front matter, then prose, instruction and preference sections.

Format (upstream DocumentLanguageModel): line 1 is `---`, front matter until the next `---`.
The body is prose until a line that is exactly `::instruction::` or `::preference::`
(optionally `::instruction#adapter::`) starts a new section; fences inside ``` code blocks
do not count. Instruction bodies repeat `### Q` / `### A` headers (`### Q !probe` marks an
evaluation probe, which upstream's parser dropped); preference bodies repeat `### Prompt` /
`### Chosen` / `### Rejected`. A header's body runs to the next header or blank line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from sway_engine import safe_yaml
from sway_engine.errors import SwayError

SectionKind = Literal["prose", "instruction", "preference"]
_FENCE_RE = re.compile(r"^::(instruction|preference)(?:#([A-Za-z0-9_.-]+))?::$")


class DlmError(SwayError):
    """A `.dlm` document is malformed; the message names the file and line."""


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    probe: bool = False


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Section:
    """One section in document order; `id` = sha256(kind + newline + content)[:16]."""

    id: str
    kind: SectionKind
    content: str
    line: int
    adapter: str | None = None
    qa: tuple[QA, ...] = ()
    preferences: tuple[Preference, ...] = ()

    @property
    def paragraphs(self) -> tuple[str, ...]:
        """Blank-line separated blocks of a prose section, each joined to one line."""
        return tuple(_blocks(self.content.splitlines()))


@dataclass(frozen=True)
class Document:
    front_matter: dict[str, Any]
    sections: tuple[Section, ...]

    @property
    def text(self) -> str:
        """Every section's content joined by blank lines (upstream's doc_text)."""
        return "\n\n".join(s.content for s in self.sections)

    @property
    def training_text(self) -> str:
        """What a trainer sees: prose, Q/A pairs other than held-out `!probe` ones (evaluation
        items), and preference triples, joined by blank lines."""
        parts: list[str] = []
        for s in self.sections:
            if s.kind == "instruction":
                parts += [f"{q.question}\n{q.answer}" for q in s.qa if not q.probe]
            elif s.kind == "preference":
                parts += [f"{p.prompt}\n{p.chosen}\n{p.rejected}" for p in s.preferences]
            else:
                parts.append(s.content)
        return "\n\n".join(parts)

    def of(self, kind: SectionKind) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.kind == kind)

    @property
    def qa(self) -> tuple[QA, ...]:
        return tuple(q for s in self.sections for q in s.qa)

    @property
    def preferences(self) -> tuple[Preference, ...]:
        return tuple(p for s in self.sections for p in s.preferences)


def load_dlm(path: str | Path) -> Document:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL byte in the path
        raise DlmError(f"{path}: cannot read the document: {exc}") from exc
    return parse_dlm(text, source=str(path))


def parse_dlm(text: str, *, source: str = "<dlm>") -> Document:
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").split("\n")
    if not lines or lines[0].strip() != "---":
        raise DlmError(f"{source}:1: a .dlm document starts with a '---' front matter line")
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise DlmError(f"{source}: the front matter has no closing '---' line")
    try:
        front = safe_yaml.load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as exc:
        raise DlmError(f"{source}: front matter is not valid YAML: {exc}") from exc
    if not isinstance(front, dict):
        raise DlmError(f"{source}: front matter must be a YAML mapping")
    return Document(front, tuple(_sections(lines, end + 1, source)))


def _sections(lines: list[str], start: int, source: str) -> list[Section]:
    raw: list[tuple[SectionKind, str | None, int, list[str]]] = [("prose", None, start + 1, [])]
    in_code = False
    for number, line in enumerate(lines[start:], start=start + 1):
        if line.strip().startswith("```"):
            in_code = not in_code
        match = None if in_code else _FENCE_RE.match(line.strip())
        if match:
            kind: SectionKind = "instruction" if match.group(1) == "instruction" else "preference"
            raw.append((kind, match.group(2), number + 1, []))
        else:
            raw[-1][3].append(line)
    out = []
    for kind, adapter, first, body in raw:
        content = "\n".join(body).strip()
        if not content:
            continue
        where = f"{source}:{first}"
        qa = tuple(_qa(body, first, source)) if kind == "instruction" else ()
        prefs = tuple(_preferences(body, first, source)) if kind == "preference" else ()
        if kind != "prose" and not (qa or prefs):
            raise DlmError(f"{where}: the {kind} section has no ### entries")
        digest = hashlib.sha256(f"{kind}\n{content}".encode()).hexdigest()[:16]
        out.append(Section(digest, kind, content, first, adapter, qa, prefs))
    return out


def _headed(body: list[str], first: int, source: str) -> list[tuple[str, str, int]]:
    """(header, body text, line) per `### ...` header; a body ends at a blank line."""
    items: list[tuple[str, list[str], int]] = []
    open_body = False
    for number, line in enumerate(body, start=first):
        if line.startswith("### "):
            items.append((line[4:].strip(), [], number))
            open_body = True
        elif not line.strip():
            open_body = False
        elif open_body:
            items[-1][1].append(line.strip())
        else:
            raise DlmError(f"{source}:{number}: text outside a ### entry: {line.strip()!r}")
    for header, text, number in items:
        if not text:
            raise DlmError(f"{source}:{number}: '### {header}' has an empty body")
    return [(header, " ".join(text), number) for header, text, number in items]


def _qa(body: list[str], first: int, source: str) -> list[QA]:
    items = _headed(body, first, source)
    out = []
    for i in range(0, len(items), 2):
        q_header, question, number = items[i]
        words = q_header.split()
        if not words or words[0] != "Q" or i + 1 >= len(items) or items[i + 1][0] != "A":
            raise DlmError(f"{source}:{number}: instruction entries alternate '### Q' and '### A'")
        out.append(QA(question, items[i + 1][1], probe="!probe" in words[1:]))
    return out


def _preferences(body: list[str], first: int, source: str) -> list[Preference]:
    items = _headed(body, first, source)
    order = ("Prompt", "Chosen", "Rejected")
    out = []
    for i in range(0, len(items), 3):
        group = items[i : i + 3]
        if tuple(h for h, _, _ in group) != order:
            raise DlmError(
                f"{source}:{group[0][2]}: preference entries repeat Prompt, Chosen, Rejected"
            )
        out.append(Preference(*(text for _, text, _ in group)))
    return out


def _blocks(lines: list[str]) -> list[str]:
    blocks: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            blocks.append(" ".join(current))
            current = []
    return blocks
