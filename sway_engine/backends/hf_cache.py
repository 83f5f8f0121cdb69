"""A KV cache for sway's decode loop: room for the whole generation reserved up front.

transformers' DynamicCache appends each step's keys and values with `torch.cat`, copying the
whole cache at every step (quadratic in the generated length: on the fixture battery's
shared decode of ~1,100 rows, 7 s of cat); its `batch_select_indices` copies it again each
time rows leave. Here each attention layer writes into a buffer sized for prompt + new tokens
and hands attention a view of the filled part; dropping rows copies only the filled part.
"""

from __future__ import annotations

import functools
from typing import Any


def reserved_cache(config: Any, capacity: int) -> Any:
    """A DynamicCache for `config` whose full-attention layers reserve `capacity` positions
    (sliding-window and other special layers stay transformers' own)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layer_class = _reserved_layer()
    cache = DynamicCache(config=config)
    cache.layers = [
        layer_class(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


@functools.cache
def _reserved_layer() -> type:
    """The layer class, defined once transformers is imported (on first decode)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self._k: Any = None
            self._v: Any = None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.get_seq_length()
            end = n + int(key_states.shape[-2])
            if self._k is None or end > self._k.shape[-2]:
                room = max(self.capacity, end)
                self._k = _grown(self._k, key_states, n, room)
                self._v = _grown(self._v, value_states, n, room)
            self._k[:, :, n:end] = key_states
            self._v[:, :, n:end] = value_states
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: Any) -> None:
            if self._k is None:
                return
            n = self.get_seq_length()
            self._k = _kept(self._k, indices, n)
            self._v = _kept(self._v, indices, n)
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def reset(self) -> None:
            self._k = self._v = None
            super().reset()

    return ReservedLayer


def _grown(buffer: Any, like: Any, filled: int, capacity: int) -> Any:
    """A (batch, heads, capacity, dim) buffer holding the first `filled` positions of `buffer`."""
    out = like.new_empty((*like.shape[:2], capacity, like.shape[-1]))
    if buffer is not None and filled:
        out[:, :, :filled] = buffer[:, :, :filled]
    return out


def _kept(buffer: Any, indices: Any, filled: int) -> Any:
    """`buffer` with only the rows `indices`, copying the filled positions only."""
    out = buffer.new_empty((int(indices.shape[0]), *buffer.shape[1:]))
    out[:, :, :filled] = buffer[indices, :, :filled]
    return out
