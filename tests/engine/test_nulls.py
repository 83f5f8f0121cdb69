"""Null LoRA weights (sway_engine.nulls): norm-matched, seeded per module, backend-neutral."""

from __future__ import annotations

import numpy as np
import pytest

from sway_engine.nulls import LoraWeights, module_key, null_lora, null_rank, rescaled
from sway_engine.views import Null

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.3.self_attn.v_proj",
]


def trained(module: str, r: int = 8, n_in: int = 128, n_out: int = 352) -> tuple:  # type: ignore[type-arg]
    """A made-up trained adapter module (A (r, in), B (out, r)), different per module."""
    rng = np.random.default_rng(len(module))
    a = rng.normal(0, 0.1, (r, n_in)).astype(np.float32)
    b = rng.normal(0, 0.05, (n_out, r)).astype(np.float32)
    return a, b


def test_matched_null_has_the_trained_update_norm_per_module() -> None:
    scaling = 16 / 8
    for module in MODULES:
        a, b = trained(module)
        target = np.linalg.norm(scaling * (b.astype(np.float64) @ a.astype(np.float64)))
        for view in (Null(1), Null(7, rank_scale=0.5), Null(7, rank_scale=2.0)):
            w = null_lora(a, b, scaling, view, module)
            assert np.linalg.norm(w.update()) == pytest.approx(target, rel=1e-6)
            # a random direction, not the trained one: cosine with the trained update is small
            cos = np.sum(w.update() * scaling * (b @ a)) / target**2
            assert abs(cos) < 0.2


def test_rank_scale_builds_a_real_rank_with_alpha_over_r_scaling() -> None:
    a, b = trained(MODULES[0], r=8)
    for scale, rank in ((0.5, 4), (1.0, 8), (2.0, 16), (0.01, 1), (0.3, 2)):
        w = null_lora(a, b, 2.0, Null(3, rank_scale=scale), MODULES[0])
        assert w.a.shape == (rank, 128) and w.b.shape == (352, rank)
        assert null_rank(8, scale) == rank
        assert np.linalg.matrix_rank(w.update()) == rank
        assert w.scaling == pytest.approx(16 / rank)  # alpha 16 over the null's rank
    rs = null_lora(a, b, 16 / np.sqrt(8), Null(3, rank_scale=2.0), MODULES[0], rslora=True)
    assert rs.scaling == pytest.approx(16 / np.sqrt(16))
    assert rescaled(2.0, 8, 4) == 4.0


def test_same_seed_and_module_give_identical_weights() -> None:
    a, b = trained(MODULES[1])
    first = null_lora(a, b, 2.0, Null(5), MODULES[1])
    again = null_lora(a, b, 2.0, Null(5), MODULES[1])
    assert np.array_equal(first.a, again.a) and np.array_equal(first.b, again.b)
    other_seed = null_lora(a, b, 2.0, Null(6), MODULES[1])
    assert not np.allclose(first.a, other_seed.a)


def test_draws_do_not_depend_on_module_order_or_naming_prefix() -> None:
    def all_nulls(order: list[str]) -> dict[str, LoraWeights]:
        return {m: null_lora(*trained(m), 2.0, Null(11), m) for m in order}

    forward = all_nulls(MODULES)
    backward = all_nulls(MODULES[::-1])
    only_one = all_nulls(MODULES[2:])
    for m in MODULES:
        assert np.array_equal(forward[m].a, backward[m].a)
    assert np.array_equal(forward[MODULES[2]].b, only_one[MODULES[2]].b)
    # PEFT's name for the same module draws the same null (hf and mlx agree)
    peft_name = "base_model.model." + MODULES[0]
    assert module_key(peft_name) == MODULES[0]
    via_peft = null_lora(*trained(MODULES[0]), 2.0, Null(11), peft_name)
    assert np.array_equal(via_peft.a, forward[MODULES[0]].a)
    # different modules of one seed are different draws
    assert not np.allclose(forward[MODULES[0]].a[:, :8], forward[MODULES[2]].a[:, :8])


def test_fixed_null_draws_entries_with_init_scale_std() -> None:
    a, b = trained(MODULES[0], r=8, n_in=512, n_out=512)
    w = null_lora(a, b, 2.0, Null(2, mode="fixed", init_scale=0.02), MODULES[0])
    assert np.std(w.a) == pytest.approx(0.02, rel=0.05)
    assert np.std(w.b) == pytest.approx(0.02, rel=0.05)
    assert w.scaling == 2.0
    # the fixed null ignores the trained norm: a 10x larger adapter gets the same null
    big = null_lora(a * 10, b * 10, 2.0, Null(2, mode="fixed", init_scale=0.02), MODULES[0])
    assert np.array_equal(big.a, w.a)


def test_zero_update_gives_a_zero_matched_null() -> None:
    a, b = trained(MODULES[0])
    w = null_lora(a, np.zeros_like(b), 2.0, Null(1), MODULES[0])
    assert not np.any(w.update())


def test_mismatched_factor_shapes_are_rejected_naming_the_module() -> None:
    a, b = trained(MODULES[0], r=8)
    with pytest.raises(ValueError, match=r"q_proj: LoRA factors must be A \(r, in\)"):
        null_lora(a, b[:, :4], 2.0, Null(1), MODULES[0])
