"""Scoring requests a probe sends and the results a backend returns.

A request is a frozen value (hashable: it is its own cache key). `backend.execute(reqs)`
returns one result per request, in order. Log-probabilities are natural-log (nats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sway_engine.errors import BackendError
from sway_engine.views import View


@dataclass(frozen=True)
class NextToken:
    """Top-k of the next-token distribution after `prompt`, with the tail mass."""

    prompt: str
    view: View
    top_k: int = 256


@dataclass(frozen=True)
class Divergence:
    """Compare the next-token distributions of two views after `prompt`.

    Exact over the full vocabulary where the backend holds logits.
    """

    prompt: str
    view_a: View
    view_b: View
    evidence_k: int = 5


@dataclass(frozen=True)
class RollingLogprob:
    """Per-token log-probs of `text`: entry i scores token i+1 given tokens <= i."""

    text: str
    view: View


@dataclass(frozen=True)
class SequenceDivergence:
    """KL(view_a || view_b) of the next-token distributions at every position of `text`:
    entry i compares the two views' distributions of token i+1 given tokens <= i (the
    positions RollingLogprob scores). Exact over the full vocabulary, computed in the backend.
    """

    text: str
    view_a: View
    view_b: View


@dataclass(frozen=True)
class ContinuationLogprob:
    """Summed log-prob of `completion` given `prompt` (prompt tokens are not scored).

    The prompt and completion are tokenised separately and concatenated, so a BPE merge
    across the boundary cannot shift the scored slice.
    """

    prompt: str
    completion: str
    view: View


@dataclass(frozen=True)
class Generate:
    """Greedy continuation of `prompt` (decoded new text only)."""

    prompt: str
    view: View
    max_new_tokens: int = 32


@dataclass(frozen=True)
class Embed:
    """Unit-length sentence vectors of `texts`, from the embedding model (all-MiniLM-L6-v2),
    not from the model under test: `Instrumented` answers it for every backend."""

    texts: tuple[str, ...]


@dataclass(frozen=True)
class AdapterWeights:
    """The LoRA factors of `view` and the base weight W of every module they adapt: read from
    the loaded weights, no forward pass. Never stored in the persistent cache (the result
    holds the base's tensors)."""

    view: View


Request = (
    NextToken
    | Divergence
    | RollingLogprob
    | SequenceDivergence
    | ContinuationLogprob
    | Generate
    | Embed
    | AdapterWeights
)


@dataclass(frozen=True)
class TokenDist:
    """A possibly truncated distribution: ids sorted by descending probability.

    `tail_mass` is the probability outside the listed ids (0 <= tail_mass <= 1).
    `tokens` holds decoded strings where the backend knows them (used to align by text).
    `vocabulary` names the tokenizer the ids come from ("" when unknown): two distributions
    with the same non-empty vocabulary align by id. `decode` turns ids into token strings on
    demand (`texts()`), so a local backend does not decode every top-k list it returns.
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    vocab_size: int
    tail_mass: float
    tokens: tuple[str, ...] = ()
    vocabulary: str = ""
    decode: Callable[[list[int]], list[str]] | None = field(default=None, compare=False, repr=False)
    # Prompt tokens dropped from the left to fit the model's context (PROBES.md "Prompt length").
    prompt_cut: int = 0

    def texts(self) -> tuple[str, ...]:
        """Decoded token strings: `tokens`, else `decode(token_ids)`, else ()."""
        if self.tokens or self.decode is None:
            return self.tokens
        return tuple(self.decode([int(i) for i in self.token_ids]))


@dataclass(frozen=True)
class DivergenceResult:
    """JS(a, b), KL(b || a) ("how far b moved from a") and KL(a || b), in nats.

    `top_a`, `top_b`: a few (token, prob) pairs of each side, for evidence only.
    """

    js: float
    kl_b_a: float
    kl_a_b: float
    exact: bool
    top_a: tuple[tuple[str, float], ...] = ()
    top_b: tuple[tuple[str, float], ...] = ()
    # Prompt tokens dropped from the left to fit the model's context (PROBES.md "Prompt length").
    prompt_cut: int = 0


@dataclass(frozen=True)
class RollingResult:
    token_ids: np.ndarray
    logprobs: np.ndarray

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def mean(self) -> float:
        return float(self.logprobs.mean()) if self.logprobs.size else 0.0


@dataclass(frozen=True)
class SequenceDivergenceResult:
    """Per-position KL(a || b) in nats (float64, one entry per scored token of `token_ids`)."""

    token_ids: np.ndarray
    kl: np.ndarray

    @property
    def total(self) -> float:
        return float(self.kl.sum())

    @property
    def mean(self) -> float:
        return float(self.kl.mean()) if self.kl.size else 0.0


@dataclass(frozen=True)
class ContinuationResult:
    logprob: float
    num_tokens: int
    # Prompt tokens dropped from the left to fit the model's context (PROBES.md "Prompt length").
    prompt_cut: int = 0

    @property
    def mean(self) -> float:
        return self.logprob / self.num_tokens if self.num_tokens else 0.0


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...] = field(default=())
    # Prompt tokens dropped from the left to fit the model's context (PROBES.md "Prompt length").
    prompt_cut: int = 0


@dataclass(frozen=True, eq=False)
class EmbeddingResult:
    vectors: np.ndarray  # [len(texts), dim], unit rows, in the request's order


@dataclass(frozen=True, eq=False)
class ModuleWeights:
    """One adapted module: its backend-neutral name (`nulls.module_key`), the base weight W
    (out, in) and the view's factors A (r, in), B (out, r), all float32; the update is
    `scaling * B @ A`."""

    name: str
    weight: np.ndarray
    a: np.ndarray
    b: np.ndarray
    scaling: float


@dataclass(frozen=True, eq=False)
class AdapterWeightsResult:
    modules: tuple[ModuleWeights, ...]  # sorted by name


Result = (
    TokenDist
    | DivergenceResult
    | RollingResult
    | SequenceDivergenceResult
    | ContinuationResult
    | GenerationResult
    | EmbeddingResult
    | AdapterWeightsResult
)


def views_of(request: Request) -> tuple[View, ...]:
    """Every view a request needs registered on the backend."""
    if isinstance(request, Divergence | SequenceDivergence):
        return (request.view_a, request.view_b)
    if isinstance(request, Embed):
        return ()
    return (request.view,)


def check_prompt(request: Request) -> None:
    """Refuse a request whose prompt is empty or only whitespace (PROBES.md "Prompt length")."""
    prompt = getattr(request, "prompt", None)
    if prompt is not None and not prompt.strip():
        raise BackendError(
            f"{type(request).__name__} has an empty prompt ({prompt!r}); a prompt needs text "
            "(check the probe's prompts or the .dlm document they came from)"
        )
