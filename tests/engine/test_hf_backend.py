"""The HF/PEFT backend on the tiny fixture model: batched views equal one-view-at-a-time,
divergences are exact, null adapters match the trained update norm."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sway_engine import stats
from sway_engine.backends.hf import COMPACT_AT, HFBackend
from sway_engine.errors import AdapterError, BackendError
from sway_engine.requests import (
    ContinuationLogprob,
    Divergence,
    Generate,
    NextToken,
    RollingLogprob,
)
from sway_engine.views import BASE, FINETUNED, Finetuned, Null, Scaled, bind
from tests.conftest import scaled_adapter

PROMPTS = ["The keeper of the lamp", "What is brewed on the island?", "Once upon a time"]


@pytest.fixture(scope="module")
def hf(fx) -> HFBackend:  # type: ignore[no-untyped-def]
    return HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))


def test_mixed_batch_equals_each_view_alone(fx, hf: HFBackend) -> None:  # type: ignore[no-untyped-def]
    views = [BASE, FINETUNED, Scaled(0.5), Null(1), Null(2, rank_scale=2.0), Null(3, mode="fixed")]
    reqs = [RollingLogprob(p, v) for p in PROMPTS for v in views]
    reqs += [ContinuationLogprob(p, " the sea", v) for p in PROMPTS for v in views]
    batched = hf.execute(reqs)
    assert hf.counters()["forward_passes"] <= 2  # every view of every prompt in one batch
    alone = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    worst = 0.0
    for req, got in zip(reqs, batched, strict=True):
        (single,) = alone.execute([req])
        a = np.atleast_1d(getattr(got, "logprobs", getattr(got, "logprob", None)))
        b = np.atleast_1d(getattr(single, "logprobs", getattr(single, "logprob", None)))
        worst = max(worst, float(np.abs(a - b).max()))
    assert worst < 1e-4


def test_divergence_is_exact_full_vocabulary(hf: HFBackend) -> None:
    vocab = hf.vocab_size
    for prompt in PROMPTS:
        (div,) = hf.execute([Divergence(prompt, BASE, FINETUNED)])
        base, ft = hf.execute([NextToken(prompt, BASE, vocab), NextToken(prompt, FINETUNED, vocab)])
        lb = np.empty(vocab)
        lf = np.empty(vocab)
        lb[base.token_ids] = base.logprobs
        lf[ft.token_ids] = ft.logprobs
        assert div.exact
        assert div.js == pytest.approx(stats.js(lb, lf), abs=1e-5)
        assert div.kl_b_a == pytest.approx(stats.kl(lf, lb), abs=1e-5)
        assert div.kl_a_b == pytest.approx(stats.kl(lb, lf), abs=1e-5)


def test_scaled_zero_and_one_are_base_and_ft(hf: HFBackend) -> None:
    d0, d1 = hf.execute(
        [Divergence(PROMPTS[0], BASE, Scaled(0.0)), Divergence(PROMPTS[0], FINETUNED, Scaled(1.0))]
    )
    assert d0.js < 1e-12 and d1.js < 1e-12


def test_topk_tail_approximation_is_biased_on_faint_adapters(hf: HFBackend) -> None:
    """Upstream's top-k + uniform tail overstates a faint adapter's JS; exact does not."""
    faint = Scaled(0.05)
    exact, approx = [], []
    for prompt in PROMPTS:
        (d,) = hf.execute([Divergence(prompt, BASE, faint)])
        a, b = hf.execute([NextToken(prompt, BASE, 16), NextToken(prompt, faint, 16)])
        exact.append(d.js)
        approx.append(
            stats.topk_tail_js(tuple(a.token_ids), a.logprobs, tuple(b.token_ids), b.logprobs)
        )
    assert np.mean(approx) > 2 * np.mean(exact)


def _updates(hf: HFBackend, name: str) -> list[float]:
    from peft.tuners.lora import LoraLayer

    norms = []
    for _, layer in hf._peft.named_modules():
        if isinstance(layer, LoraLayer):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            norms.append(float(torch.linalg.matrix_norm(layer.scaling[name] * (b @ a))))
    return norms


def test_matched_null_has_trained_norm_in_random_direction(hf: HFBackend) -> None:
    nulls = [Null(11), Null(12, rank_scale=0.5)]
    hf.execute([NextToken(PROMPTS[0], v, 4) for v in nulls])
    ft = _updates(hf, hf._names["ft"])
    for view in nulls:
        got = _updates(hf, hf._names[view.key])
        assert np.allclose(got, ft, rtol=1e-4)
    a, b = (hf._names[v.key] for v in nulls)
    from peft.tuners.lora import LoraLayer

    layer = next(m for _, m in hf._peft.named_modules() if isinstance(m, LoraLayer))
    assert layer.lora_A[b].weight.shape[0] == max(1, round(layer.r[hf._names["ft"]] * 0.5))
    assert not torch.equal(layer.lora_A[a].weight[:1], layer.lora_A[hf._names["ft"]].weight[:1])


def test_zero_adapter_equals_base(fx) -> None:  # type: ignore[no-untyped-def]
    backend = HFBackend(str(fx.base), str(fx.adapters["zero"]))
    res = backend.execute([Divergence(p, BASE, FINETUNED) for p in PROMPTS])
    assert max(r.js for r in res) < 1e-6  # fp32 noise of mixed sub-batches only


def test_nan_adapter_is_refused_naming_the_tensor(fx) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AdapterError, match=r"tensor .*lora.* non-finite"):
        HFBackend(str(fx.base), str(fx.adapters["nan"]))


def test_truncated_weights_are_refused(fx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = scaled_adapter(fx.adapters["doc-strong"], tmp_path / "cut", 1.0)
    blob = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AdapterError, match="truncated"):
        HFBackend(str(fx.base), str(bad))


def test_swapping_adapters_rebuilds_derived_views(fx) -> None:  # type: ignore[no-untyped-def]
    backend = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    (strong,) = backend.execute([Divergence(PROMPTS[0], BASE, Null(1))])
    backend.load_adapter(str(fx.adapters["zero"]))
    (zero,) = backend.execute([Divergence(PROMPTS[0], BASE, Null(1))])
    assert strong.js > 0.01 and zero.js < 1e-6  # a null matched to a zero update is zero
    assert backend.counters()["adapters_loaded"] == 2


def test_swapped_adapter_scores_like_a_fresh_load(fx) -> None:  # type: ignore[no-untyped-def]
    """After load_adapter, FINETUNED is the new adapter alone: no update of the old one, and
    the batched-LoRA hooks are not stacked (applying the update twice)."""
    reqs = [
        ContinuationLogprob(PROMPTS[0], " Tamsk", FINETUNED),
        Divergence(PROMPTS[1], BASE, FINETUNED),
    ]
    fresh = {
        name: HFBackend(str(fx.base), str(fx.adapters[name])).execute(reqs)
        for name in ("doc-strong", "noise")
    }
    backend = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    for name in ("doc-strong", "noise", "doc-strong", "noise"):
        backend.load_adapter(str(fx.adapters[name]))
        lp, div = backend.execute(reqs)
        assert lp.logprob == pytest.approx(fresh[name][0].logprob, abs=1e-4), name
        assert div.js == pytest.approx(fresh[name][1].js, abs=1e-6), name


def test_generation_of_many_views_in_one_batch_equals_each_view_alone(fx) -> None:  # type: ignore[no-untyped-def]
    views = [BASE, FINETUNED, Null(3), Scaled(0.5)]
    reqs = [Generate(p, v, 12) for p in PROMPTS[:3] for v in views]
    together = HFBackend(str(fx.base), str(fx.adapters["doc-strong"])).execute(reqs)
    alone = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    for req, got in zip(reqs, together, strict=True):
        (want,) = alone.execute([req])
        assert got.token_ids == want.token_ids, req


def test_decoding_drops_ended_rows_and_equals_transformers_generate(fx, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """sway's decode loop drops rows after their end of sequence (in groups: row-steps within
    1/(COMPACT_AT-1) of the tokens kept), and gives generate's greedy tokens, row for row,
    over every view."""
    views = [BASE, FINETUNED, Null(3), Scaled(0.5)]
    prompts = [*PROMPTS[:4], "Q: Who first lit the Orrindale Light?\nA:"]
    reqs = [Generate(p, v, 40) for p in prompts for v in views]
    ours = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    mine = ours.execute(reqs)
    steps = ours.counters()
    assert steps["generate_row_steps"] <= steps["generated_tokens"] * COMPACT_AT / (COMPACT_AT - 1)
    ends = {len(r.token_ids) for r in mine}
    assert len(ends) > 1 and min(ends) < 40, ends  # rows end at different steps: a real test

    monkeypatch.setattr(HFBackend, "_plain_greedy", lambda self, model: False)
    theirs = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    want = theirs.execute(reqs)
    for req, a, b in zip(reqs, mine, want, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text, req
    assert theirs.counters()["generate_row_steps"] > steps["generate_row_steps"]


def test_a_generation_config_with_a_logits_processor_keeps_transformers_generate(fx) -> None:  # type: ignore[no-untyped-def]
    hf = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    assert hf._plain_greedy(hf._base_model)
    hf._base_model.generation_config.repetition_penalty = 1.3  # generate would apply it
    assert not hf._plain_greedy(hf._base_model)


def test_long_text_is_scored_in_windows(hf: HFBackend) -> None:
    text = " ".join(["the lamp keeper walked along the shore"] * 80)
    (res,) = hf.execute([RollingLogprob(text, BASE)])
    n = len(hf.tokenizer(text)["input_ids"])
    assert n > hf.max_len and res.logprobs.size == n - 1
    assert math.isfinite(res.total)


# ---- view registration as slots, and several trained adapters on one base ----


def test_slot_registered_scaled_view_equals_a_peft_loaded_scaled_adapter(
    fx,  # type: ignore[no-untyped-def]
    hf: HFBackend,
    tmp_path: Path,
) -> None:
    """Scaled(0.5) registered as a plain slot answers as PEFT's own load of a B*0.5 copy."""
    half = scaled_adapter(fx.adapters["doc-strong"], tmp_path / "half", 0.5)
    ref = HFBackend(str(fx.base), str(half))
    for prompt in PROMPTS:
        (got,) = hf.execute([NextToken(prompt, Scaled(0.5), 64)])
        (want,) = ref.execute([NextToken(prompt, FINETUNED, 64)])
        assert np.array_equal(got.token_ids, want.token_ids)
        assert np.abs(got.logprobs - want.logprobs).max() < 1e-5


def test_views_of_an_added_adapter_equal_the_same_views_when_it_is_primary(fx) -> None:  # type: ignore[no-untyped-def]
    multi = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    assert multi.add_adapter(fx.adapters["doc-weak"], "weak") == "weak"
    alone = HFBackend(str(fx.base), str(fx.adapters["doc-weak"]))
    views = [FINETUNED, Scaled(0.5), Null(4), Null(5, rank_scale=2.0), Null(6, mode="fixed")]
    for view in views:
        bound = bind(view, "weak")
        got = multi.execute([Divergence(p, BASE, bound) for p in PROMPTS])
        want = alone.execute([Divergence(p, BASE, view) for p in PROMPTS])
        for g, w in zip(got, want, strict=True):
            assert g.js == pytest.approx(w.js, abs=1e-6), view
    # the primary adapter's views are untouched by the second one
    (strong,) = multi.execute([Divergence(PROMPTS[0], BASE, FINETUNED)])
    (weak,) = multi.execute([Divergence(PROMPTS[0], BASE, Finetuned("weak"))])
    assert strong.js > 10 * weak.js


def test_add_adapter_refuses_bad_labels_and_unknown_adapters(fx) -> None:  # type: ignore[no-untyped-def]
    backend = HFBackend(str(fx.base))
    with pytest.raises(BackendError, match="load the primary adapter"):
        backend.add_adapter(fx.adapters["doc-weak"], "weak")
    backend.load_adapter(str(fx.adapters["doc-strong"]))
    with pytest.raises(BackendError, match="non-empty label"):
        backend.add_adapter(fx.adapters["doc-weak"], "")
    backend.add_adapter(fx.adapters["doc-weak"], "weak")
    with pytest.raises(BackendError, match="already registered"):
        backend.add_adapter(fx.adapters["noise"], "weak")
    with pytest.raises(AdapterError, match="non-finite"):
        backend.add_adapter(fx.adapters["nan"], "nan")
    with pytest.raises(BackendError, match="labelled 'other' is registered"):
        backend.execute([NextToken(PROMPTS[0], Finetuned("other"), 4)])
    with pytest.raises(BackendError, match="derives from adapter 'other'"):
        backend.execute([NextToken(PROMPTS[0], Null(1, adapter="other"), 4)])
    backend.load_adapter(str(fx.adapters["noise"]))  # a new primary drops the added ones
    with pytest.raises(BackendError, match="labelled 'weak'"):
        backend.execute([NextToken(PROMPTS[0], Finetuned("weak"), 4)])


def test_an_adapter_whose_keys_do_not_fit_the_base_is_refused_by_name(fx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Keys renamed on export (model.layers -> model.blocks): PEFT only warned, the adapter ran
    as the base, and delta_kl said FAIL "mean js 0.0000" instead of naming the problem."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "renamed"
    bad.mkdir()
    shutil.copy(fx.adapters["doc-strong"] / "adapter_config.json", bad / "adapter_config.json")
    tensors = load_file(str(fx.adapters["doc-strong"] / "adapter_model.safetensors"))
    renamed = {k.replace("model.layers", "model.blocks"): v for k, v in tensors.items()}
    save_file(renamed, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"no module model\.blocks\.0\..* in the base"):
        HFBackend(str(fx.base), bad)
