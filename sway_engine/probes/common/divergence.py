"""Per-prompt divergence of treatment views from a reference view, in one request list.

Exact (full vocabulary, computed in the backend) by default; the upstream top-k + uniform
tail approximation when the backend only returns top-k or `divergence_mode: topk_tail`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from sway_engine import stats
from sway_engine.backends.base import DIVERGENCE
from sway_engine.probes.base import Context
from sway_engine.requests import Divergence, DivergenceResult, NextToken, TokenDist
from sway_engine.views import View

Kind = Literal["js", "kl"]


def divergences(
    ctx: Context,
    prompts: Sequence[str],
    reference: View,
    treatments: Sequence[View],
    *,
    kind: Kind = "js",
    top_k: int | None = None,
) -> np.ndarray:
    """Array [treatment, prompt]: JS(ref, t), or KL(t || ref) for kind 'kl' (nats)."""
    if ctx.divergence_mode == "exact" and DIVERGENCE in ctx.capabilities:
        reqs = [Divergence(p, reference, t) for t in treatments for p in prompts]
        res = ctx.execute(reqs)
        vals = [r.js if kind == "js" else r.kl_b_a for r in res if isinstance(r, DivergenceResult)]
    else:
        k = top_k or ctx.top_k
        refs = ctx.execute([NextToken(p, reference, k) for p in prompts])
        outs = ctx.execute([NextToken(p, t, k) for t in treatments for p in prompts])
        vals = []
        for i, out in enumerate(outs):
            ref = refs[i % len(prompts)]
            assert isinstance(ref, TokenDist) and isinstance(out, TokenDist)
            vals.append(topk_divergence(ref, out, kind))
    return np.asarray(vals, dtype=float).reshape(len(treatments), len(prompts))


def topk_divergence(ref: TokenDist, out: TokenDist, kind: Kind) -> float:
    """Divergence of two top-k distributions with their tails lumped. One vocabulary (both
    views of a local model): aligned by id; otherwise by decoded token text (API servers, two
    models with different tokenizers), else by id."""
    ids_a: Sequence[object] | np.ndarray
    ids_b: Sequence[object] | np.ndarray
    if ref.vocabulary and ref.vocabulary == out.vocabulary:
        ids_a, ids_b = ref.token_ids, out.token_ids
    else:
        ids_a = ref.texts() or tuple(int(i) for i in ref.token_ids)
        ids_b = out.texts() or tuple(int(i) for i in out.token_ids)
    if kind == "js":
        return stats.topk_tail_js(ids_a, ref.logprobs, ids_b, out.logprobs)
    return stats.topk_tail_kl(ids_a, ref.logprobs, ids_b, out.logprobs)
