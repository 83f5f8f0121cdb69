"""The general-English corpus guard rails score (external_perplexity, forgetting_budget):
loading a built-in or user corpus and cutting it into chunks at whitespace."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from sway_engine.errors import ProbeError
from sway_engine.probes.base import ProbeSpec
from sway_engine.views import View

# Corpus names shipped with sway -> file under sway_engine/probes/data/.
BUILTIN_CORPORA = {"public_domain_en": "external_corpus.txt"}
# A trailing piece shorter than this is dropped rather than scored as a chunk of its own.
MIN_CHUNK_CHARS = 64


class CorpusSpec(ProbeSpec):
    """The fields of a probe that scores the corpus in chunks."""

    # A built-in corpus name, or the path of a UTF-8 text file (relative to the working dir).
    corpus: str = "public_domain_en"
    chunk_chars: int = Field(2048, ge=128, le=16384)
    max_chunks: int = Field(16, ge=1, le=128)

    @field_validator("corpus")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"corpus must be one of {sorted(BUILTIN_CORPORA)} or a file path")
        return v


def clean_corpus(text: str) -> str:
    """Drop `#` provenance lines; paragraphs (blank-line separated) joined by one blank line."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


@functools.cache
def _builtin(filename: str) -> str:
    ref = resources.files("sway_engine.probes").joinpath("data", filename)
    return clean_corpus(ref.read_text(encoding="utf-8"))


def load_corpus(name: str, probe: str = "external_perplexity") -> str:
    """The cleaned text of a built-in corpus or of a text file; ProbeError when unreadable."""
    if name in BUILTIN_CORPORA:
        return _builtin(BUILTIN_CORPORA[name])
    path = Path(name).expanduser()
    if not path.is_file():
        known = sorted(BUILTIN_CORPORA)
        raise ProbeError(probe, f"unknown corpus {name!r}: not one of {known} and not a file")
    try:
        return clean_corpus(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeError(probe, f"cannot read corpus file {str(path)!r}: {exc}") from exc


def chunk_text(text: str, chunk_chars: int, max_chunks: int) -> list[str]:
    """Consecutive pieces of at most `chunk_chars` characters, cut at whitespace.

    A piece ends at the last whitespace in its second half (no word is split), or at exactly
    `chunk_chars` when there is none. Pieces are stripped; a tail under 64 chars is dropped.
    """
    chunks: list[str] = []
    start = 0
    while start < len(text) and len(chunks) < max_chunks:
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            window = text[start:end]
            cut = max(window.rfind(" "), window.rfind("\n"))
            if cut > chunk_chars // 2:
                end = start + cut
        piece = text[start:end].strip()
        if len(piece) >= MIN_CHUNK_CHARS:
            chunks.append(piece)
        start = end
    return chunks


def chunk_values(probe: str, values: object, what: str, i: int, view: View) -> np.ndarray:
    """One chunk's per-token `what` under `view` as float64: at least one token, all finite,
    else ProbeError naming the chunk and view."""
    out = np.asarray(values, dtype=float)
    if out.size == 0:
        raise ProbeError(probe, f"chunk {i} has no scored token under view {view.key}")
    if not np.all(np.isfinite(out)):
        raise ProbeError(probe, f"chunk {i}: non-finite {what} under view {view.key}")
    return out
