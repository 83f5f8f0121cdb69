"""The backend protocol: `execute(requests) -> results`, plus declared capabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from sway_engine.requests import Request, Result

# Capability names a backend may declare; probes SKIP when one they need is missing.
NEXT_TOKEN = "next_token"
DIVERGENCE = "divergence"  # exact full-vocabulary divergences inside the backend
ROLLING = "rolling_logprob"
# per-token exact KL between two views over a whole text (SequenceDivergence)
SEQUENCE_DIVERGENCE = "sequence_divergence"
CONTINUATION = "continuation_logprob"
GENERATE = "generate"
SCALED_VIEWS = "scaled_views"
NULL_VIEWS = "null_views"
# the LoRA factors and the base weights they change (AdapterWeights), read without a forward
ADAPTER_WEIGHTS = "adapter_weights"

ALL_CAPABILITIES = frozenset(
    {
        NEXT_TOKEN,
        DIVERGENCE,
        ROLLING,
        SEQUENCE_DIVERGENCE,
        CONTINUATION,
        GENERATE,
        SCALED_VIEWS,
        NULL_VIEWS,
        ADAPTER_WEIGHTS,
    }
)


@runtime_checkable
class Backend(Protocol):
    """Answers requests in order. Implementations dedupe, sort by length and batch."""

    kind: str
    capabilities: frozenset[str]

    def execute(self, requests: Sequence[Request]) -> list[Result]: ...

    def close(self) -> None: ...
