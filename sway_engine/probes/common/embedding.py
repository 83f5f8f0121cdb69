"""Sentence vectors for probes, as a request: `ctx.execute([Embed(texts)])`.

The run's `Instrumented` front answers `Embed` with the embedding model, so the vectors are
cached per run and counted and traced like every other request. A missing embedding model is
a SKIP naming what to install, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sway_engine.embeddings import EmbeddingsUnavailable
from sway_engine.errors import ProbeSkip
from sway_engine.probes.base import Context
from sway_engine.requests import Embed, EmbeddingResult


def embedded(ctx: Context, texts: Sequence[str], probe: str) -> np.ndarray:
    """Unit vectors [len(texts), dim] of `texts`, in order; ProbeSkip naming `probe` when the
    embedding model is not installed."""
    try:
        (res,) = ctx.execute([Embed(tuple(texts))])
    except EmbeddingsUnavailable as exc:
        raise ProbeSkip(probe, str(exc)) from exc
    assert isinstance(res, EmbeddingResult)
    return res.vectors
