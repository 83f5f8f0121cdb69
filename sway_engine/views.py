"""Views of one loaded base model: values, not context managers.

A view names which weights answer a request. The backend registers each as a named
adapter on the base and evaluates rows of different views in one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

NullMode = Literal["matched", "fixed"]


@dataclass(frozen=True)
class Base:
    """The base model, adapter disabled."""

    @property
    def key(self) -> str:
        return "base"


@dataclass(frozen=True)
class Finetuned:
    """The trained adapter under test."""

    @property
    def key(self) -> str:
        return "ft"


@dataclass(frozen=True)
class Scaled:
    """The trained adapter's update (alpha/r)*B*A multiplied by `lam`."""

    lam: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam):
            raise ValueError(f"Scaled view needs a finite lambda, got {self.lam}")

    @property
    def key(self) -> str:
        return f"scaled_{self.lam!r}"


@dataclass(frozen=True)
class Null:
    """A random adapter with the trained adapter's structure.

    `matched`: per module, the update has the trained adapter's Frobenius norm in a seeded
    random direction. `fixed`: lora_A and lora_B filled with N(0, init_scale^2) (upstream).
    `rank_scale` builds the null at rank round(r * rank_scale) (a real rank, not a rescale).
    """

    seed: int
    rank_scale: float = 1.0
    mode: NullMode = "matched"
    init_scale: float = 0.02

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rank_scale) and self.rank_scale > 0):
            raise ValueError(f"Null view needs rank_scale > 0, got {self.rank_scale}")

    @property
    def key(self) -> str:
        tail = f"_is{self.init_scale!r}" if self.mode == "fixed" else ""
        return f"null_{self.mode}_{self.seed}_r{self.rank_scale!r}{tail}"


View = Base | Finetuned | Scaled | Null

BASE = Base()
FINETUNED = Finetuned()


def canonical(view: View) -> View:
    """Scaled(0) is the base and Scaled(1) the trained adapter: one name for each."""
    if isinstance(view, Scaled):
        if view.lam == 0.0:
            return BASE
        if view.lam == 1.0:
            return FINETUNED
    return view
