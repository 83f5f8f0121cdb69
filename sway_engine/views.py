"""Views of one loaded base model: values, not context managers.

A view names which weights answer a request. The backend registers each as a named
adapter on the base and evaluates rows of different views in one batch.

Every non-base view derives from one trained adapter, named by its `adapter` field: ""
(the default) is the primary adapter under test, so single-adapter code never spells it;
a multi-adapter run (`multi.run_many`) binds the same views to each of its adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

NullMode = Literal["matched", "spectrum", "fixed"]


@dataclass(frozen=True)
class Base:
    """The base model, adapter disabled."""

    @property
    def key(self) -> str:
        return "base"


def _of(adapter: str) -> str:
    """Key suffix naming the trained adapter a view derives from (none for the primary)."""
    return f"@{adapter}" if adapter else ""


@dataclass(frozen=True)
class Finetuned:
    """The trained adapter under test (`adapter`: which one, "" = the primary)."""

    adapter: str = ""

    @property
    def key(self) -> str:
        return f"ft{_of(self.adapter)}"


@dataclass(frozen=True)
class Scaled:
    """The trained adapter's update (alpha/r)*B*A multiplied by `lam`."""

    lam: float
    adapter: str = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam):
            raise ValueError(f"Scaled view needs a finite lambda, got {self.lam}")

    @property
    def key(self) -> str:
        return f"scaled_{self.lam!r}{_of(self.adapter)}"


@dataclass(frozen=True)
class Null:
    """A random adapter with the trained adapter's structure.

    `matched`: per module, the update has the trained adapter's Frobenius norm in a seeded
    random direction. `spectrum`: the trained update's singular values with random singular
    vectors. `fixed`: lora_A and lora_B filled with N(0, init_scale^2) (upstream).
    `rank_scale` builds the null at rank round(r * rank_scale) (a real rank, not a rescale).
    `lam` scales the null's update as `Scaled` scales the trained one (ablation curves).
    """

    seed: int
    rank_scale: float = 1.0
    mode: NullMode = "matched"
    init_scale: float = 0.02
    adapter: str = ""
    lam: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rank_scale) and self.rank_scale > 0):
            raise ValueError(f"Null view needs rank_scale > 0, got {self.rank_scale}")
        if not math.isfinite(self.lam):
            raise ValueError(f"Null view needs a finite lam, got {self.lam}")

    @property
    def key(self) -> str:
        tail = f"_is{self.init_scale!r}" if self.mode == "fixed" else ""
        tail += f"_x{self.lam!r}" if self.lam != 1.0 else ""
        return f"null_{self.mode}_{self.seed}_r{self.rank_scale!r}{tail}{_of(self.adapter)}"


View = Base | Finetuned | Scaled | Null

BASE = Base()
FINETUNED = Finetuned()


def canonical(view: View) -> View:
    """Scaled(0) is the base and Scaled(1) the trained adapter: one name for each."""
    if isinstance(view, Scaled):
        if view.lam == 0.0:
            return BASE
        if view.lam == 1.0:
            return Finetuned(view.adapter)
    if isinstance(view, Null) and view.lam == 0.0:
        return BASE
    return view


def scaled(view: View, lam: float) -> View:
    """`view`'s update multiplied by `lam`: Scaled for the trained adapter, Null(lam) for a
    null (the base stays the base)."""
    if isinstance(view, Finetuned):
        return canonical(Scaled(lam, view.adapter))
    if isinstance(view, Scaled):
        return canonical(Scaled(view.lam * lam, view.adapter))
    if isinstance(view, Null):
        return canonical(replace(view, lam=view.lam * lam))
    return view


def bind(view: View, adapter: str) -> View:
    """The same view derived from trained adapter `adapter` (the base stays the base)."""
    if isinstance(view, Base) or view.adapter == adapter:
        return view
    return replace(view, adapter=adapter)
