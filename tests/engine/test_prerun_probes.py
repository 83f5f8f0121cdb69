"""training_drift and gradient_ghost: probes that read training files and load no model.

Hand-made loss logs and optimizer states in tmp_path pin the numbers (upstream's cases,
adapted where our statistics differ); the fixture adapters show the real files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from sway_engine.errors import ProbeSkip
from sway_engine.fixtures import FixturePaths
from sway_engine.probes.base import Context
from sway_engine.probes.gradient_ghost import GradientGhost, GradientGhostSpec, layer_label
from sway_engine.probes.registry import PROBES
from sway_engine.probes.training_drift import (
    TrainingDrift,
    TrainingDriftSpec,
    rolling_median,
    smoothness,
    spike_indices,
)
from sway_engine.result import ProbeResult, Verdict
from sway_engine.runner import evaluate, needs_model, run_entry
from sway_engine.suite import load_spec, parse_spec
from sway_engine.views import FINETUNED
from tests.conftest import entry_for as shared_entry


def no_model(_requests: Sequence[Any]) -> list[Any]:
    raise AssertionError("a pre-run probe asked the model for something")


def ctx_for(adapter: Path | None) -> Context:
    return Context(
        execute=no_model, capabilities=frozenset(), adapter_path=str(adapter) if adapter else None
    )


def entry_for(kind: str, **fields: Any) -> Any:
    return shared_entry(kind, kind, **fields)


def run(kind: str, adapter: Path | None, **fields: Any) -> ProbeResult:
    return run_entry(entry_for(kind, **fields), ctx_for(adapter), None)


# ---- training_drift --------------------------------------------------------------------


def write_log(
    folder: Path,
    losses: Sequence[float],
    *,
    name: str = "train-000001-x.jsonl",
    start: int = 1,
    extra_lines: Sequence[str] = (),
) -> Path:
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"type": "banner", "run": 1})]
    lines += [
        json.dumps({"type": "step", "step": start + i, "loss": loss, "lr": 1e-3})
        for i, loss in enumerate(losses)
    ]
    lines += list(extra_lines)
    path = logs / name
    path.write_text("\n".join(lines) + "\n")
    return path


def decay(n: int) -> list[float]:
    return [5 * math.exp(-i / 20) + 0.1 for i in range(n)]


def test_smooth_exponential_decay_passes(tmp_path: Path) -> None:
    write_log(tmp_path, decay(60))
    r = run("training_drift", tmp_path)
    assert r.verdict is Verdict.PASS, r.message
    assert r.raw == pytest.approx(1.0)  # monotone: the rolling median is the curve itself
    assert r.score == pytest.approx(1.0)
    e = r.evidence
    assert e["first_loss"] == pytest.approx(5.1)
    # initial/final are medians of the first and last 10 losses (robust to one noisy step)
    assert e["initial_loss"] == pytest.approx(np.median(decay(60)[:10]))
    assert e["convergence_ratio"] < 0.2
    assert e["instability_events"] == 0
    assert e["num_steps"] == 60 and e["num_files"] == 1


def test_smoothness_does_not_depend_on_how_densely_the_curve_was_logged() -> None:
    dense = np.array([5 * math.exp(-i / 200) for i in range(1000)])
    sparse = dense[::100]  # 10 points of the same curve
    assert smoothness(dense, 10) == pytest.approx(1.0)
    assert smoothness(sparse, 10) == pytest.approx(1.0)
    # upstream's 1 - var(dL)/var(L): 1.000 on the dense curve, 0.840 on the sparse one
    upstream = [1 - np.var(np.diff(c)) / np.var(c) for c in (dense, sparse)]
    assert upstream[0] == pytest.approx(1.0, abs=1e-4)
    assert upstream[1] == pytest.approx(0.840, abs=1e-3)


def test_noisy_curve_is_less_smooth_and_warns(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = [v + float(rng.normal(0, 1.0)) for v in decay(80)]
    write_log(tmp_path, noisy)
    r = run("training_drift", tmp_path)
    assert r.raw is not None and 0 < r.raw < 0.7
    assert r.verdict is Verdict.WARN and "smoothness < 0.7" in r.message
    assert r.score == pytest.approx(r.raw / 2)


def test_one_spiked_step_is_an_instability_event(tmp_path: Path) -> None:
    losses = decay(60)
    losses[30] *= 5
    write_log(tmp_path, losses)
    r = run("training_drift", tmp_path)
    assert r.verdict is Verdict.WARN
    assert r.evidence["spike_steps"] == [31]  # 1-based step of the jump
    assert "instability events > 0" in r.message


def test_spike_rule_counts_one_rise_and_ignores_drops() -> None:
    deltas = np.full(40, -0.05)
    deltas[20] = 1.5
    losses = np.concatenate([[10.0], 10 + np.cumsum(deltas)])
    assert spike_indices(losses, 10, 6.0) == (20,)
    deltas[20] = -2.0
    losses = np.concatenate([[10.0], 10 + np.cumsum(deltas)])
    assert spike_indices(losses, 10, 6.0) == ()


def test_minibatch_noise_is_not_counted_as_spikes() -> None:
    """Upstream's 3 x median|dL| (about 2 sigma) flags ~2% of pure-noise steps; ours 6 sigma."""
    rng = np.random.default_rng(1)
    losses = 3 + rng.normal(0, 0.1, 2000)
    assert len(spike_indices(losses, 10, 6.0)) == 0
    deltas = np.diff(losses)
    upstream = sum(
        d > 3 * np.median(np.abs(np.delete(deltas[max(0, i - 5) : i + 6], min(i, 5))))
        for i, d in enumerate(deltas)
    )
    assert upstream > 20


def test_rolling_median_shrinks_at_the_ends() -> None:
    values = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    assert rolling_median(values, 4).tolist() == [5.0, 4.0, 3.0, 3.0, 3.0]


def test_constant_curve_has_zero_smoothness_and_ratio_one(tmp_path: Path) -> None:
    write_log(tmp_path, [2.0] * 20)
    r = run("training_drift", tmp_path)
    assert r.raw == 0.0
    assert r.evidence["convergence_ratio"] == 1.0
    assert r.verdict is Verdict.WARN


def test_nan_step_is_an_event_and_a_nan_ending_fails(tmp_path: Path) -> None:
    losses = decay(40)
    losses[10] = math.nan
    write_log(tmp_path, losses)
    r = run("training_drift", tmp_path)
    assert r.evidence["non_finite_steps"] == [11]
    assert r.evidence["instability_events"] >= 1 and r.verdict is Verdict.WARN

    losses[-1] = math.nan
    write_log(tmp_path, losses)
    r = run("training_drift", tmp_path)
    assert r.verdict is Verdict.FAIL and "non-finite" in r.message and r.score == 0.0


def test_all_nan_curve_fails_with_every_step_counted(tmp_path: Path) -> None:
    write_log(tmp_path, [math.nan] * 10)
    r = run("training_drift", tmp_path)
    assert r.verdict is Verdict.FAIL
    assert r.evidence["instability_events"] == 10


def test_rising_loss_fails(tmp_path: Path) -> None:
    write_log(tmp_path, [1.0 + 0.05 * i for i in range(30)])
    r = run("training_drift", tmp_path)
    assert r.verdict is Verdict.FAIL and "above where it began" in r.message


def test_short_log_and_missing_log_skip(tmp_path: Path) -> None:
    write_log(tmp_path, [3.0, 2.0, 1.0])
    r = run("training_drift", tmp_path)
    assert r.verdict is Verdict.SKIP and "fewer than min_steps=10" in r.message
    r = run("training_drift", tmp_path / "elsewhere")
    assert r.verdict is Verdict.SKIP and "no loss log" in r.message
    r = run("training_drift", None)
    assert r.verdict is Verdict.SKIP


def test_resumed_runs_keep_the_later_value(tmp_path: Path) -> None:
    write_log(tmp_path, decay(30), name="train-000001-a.jsonl")
    write_log(tmp_path, [9.0] + decay(40)[21:], name="train-000002-b.jsonl", start=20)
    r = run("training_drift", tmp_path)
    curve = dict((int(s), v) for s, v in r.evidence["curve"])
    assert curve[20] == 9.0  # the resumed run re-logged step 20
    assert r.evidence["num_files"] == 2 and r.evidence["num_steps"] == 39


def test_long_curve_is_downsampled_for_evidence(tmp_path: Path) -> None:
    write_log(tmp_path, [5 * math.exp(-i / 300) for i in range(1500)])
    r = run("training_drift", tmp_path)
    curve = r.evidence["curve"]
    assert len(curve) <= 512 and curve[0][0] == 1 and curve[-1][0] == 1500


def test_bad_first_line_is_an_error_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    write_log(tmp_path, decay(20), extra_lines=['{"type": "step", "ste'])
    r = run("training_drift", tmp_path)
    assert r.verdict is Verdict.PASS and r.evidence["skipped_lines"] == 1
    (tmp_path / "logs" / "train-000001-x.jsonl").write_text("step 1 loss 3.0\n")
    r = run("training_drift", tmp_path)
    assert r.verdict is Verdict.ERROR and "not JSON" in r.message


def test_store_path_may_name_an_hf_trainer_state(tmp_path: Path) -> None:
    history = [
        {"step": 10 * (i + 1), "loss": v, "learning_rate": 1e-4} for i, v in enumerate(decay(30))
    ]
    history.append({"step": 300, "eval_loss": 0.5})  # eval records carry no `loss`
    state = tmp_path / "checkpoint-300" / "trainer_state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"global_step": 300, "log_history": history}))
    r = run("training_drift", None, store_path=str(state))
    assert r.verdict is Verdict.PASS and r.evidence["num_steps"] == 30
    r = run("training_drift", None, store_path=str(state.parent))
    assert r.verdict is Verdict.PASS


def test_dlm_store_layout_is_found_from_the_adapter_version(tmp_path: Path) -> None:
    store = tmp_path / "store" / "01ABC"
    version = store / "adapter" / "versions" / "v0001"
    version.mkdir(parents=True)
    write_log(store, decay(30))
    r = run("training_drift", version)
    assert r.verdict is Verdict.PASS and str(store / "logs") in r.evidence["files"][0]


# ---- gradient_ghost ----------------------------------------------------------------------


MODULES = ("q_proj", "v_proj")


def lora_names(layers: int, modules: Sequence[str] = MODULES) -> list[str]:
    """PEFT's parameter order: layer by layer, module by module, lora_A then lora_B."""
    return [
        f"base_model.model.model.layers.{layer}.self_attn.{m}.lora_{ab}.weight"
        for layer in range(layers)
        for m in modules
        for ab in ("A", "B")
    ]


def write_state(
    folder: Path,
    sq: Sequence[float],
    *,
    step: int = 200,
    names: Sequence[str] | None = None,
    shape: tuple[int, int] = (4, 8),
    extra: dict[str, Any] | None = None,
) -> Path:
    """training_state.pt with one Adam entry per value of `sq` (its exp_avg_sq fill)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        i: {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.full(shape, 0.1),
            "exp_avg_sq": torch.full(shape, float(v)),
        }
        for i, v in enumerate(sq)
    }
    group: dict[str, Any] = {"lr": 1e-4, "betas": (0.9, 0.999), "params": list(range(len(sq)))}
    if names is not None:
        group["param_names"] = list(names)
    payload = {
        "global_step": step,
        "epoch": 3,
        "optimizer_state_dict": {"state": state, "param_groups": [group]},
        **(extra or {}),
    }
    torch.save(payload, folder / "training_state.pt")
    return folder / "training_state.pt"


def write_weights(folder: Path, names: Sequence[str], shape: tuple[int, int] = (4, 8)) -> None:
    from safetensors.torch import save_file

    save_file(
        {n.replace(".default", ""): torch.zeros(shape) for n in names},
        str(folder / "adapter_model.safetensors"),
    )


def test_flat_state_passes(tmp_path: Path) -> None:
    names = lora_names(4)
    write_state(tmp_path, [1.0] * 16, names=names)
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.PASS and r.score == 0.9
    assert r.raw == 0.0
    assert r.evidence["num_layers"] == 4 and r.evidence["params_per_layer"] == [4]
    assert r.evidence["layer_mapping"] == "param_names"


def test_too_few_steps_fails(tmp_path: Path) -> None:
    write_state(tmp_path, [1.0] * 16, step=2, names=lora_names(4))
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.FAIL and r.score == 0.0 and "only 2 optimizer step" in r.message


def test_non_finite_moments_fail(tmp_path: Path) -> None:
    write_state(tmp_path, [math.nan] * 16, names=lora_names(4))
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.FAIL and "16 of 16" in r.message
    write_state(tmp_path, [1.0] * 15 + [math.inf], names=lora_names(4))
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.FAIL and "1 of 16" in r.message


def test_one_loud_layer_warns_three_fail(tmp_path: Path) -> None:
    names = lora_names(4)
    write_state(tmp_path, [3.0] * 4 + [1.0] * 12, names=names)
    r = run("gradient_ghost", tmp_path, layer_failure_frac=0.5)
    assert r.verdict is Verdict.WARN and r.raw == 0.25 and r.score == 0.7
    assert r.evidence["flagged_layers"] == ["base_model.model.model.layers.0"]
    assert r.evidence["worst_layers"][0]["ratio_to_min"] == pytest.approx(3.0)
    write_state(tmp_path, [1.0] * 4 + [3.0] * 12, names=names)
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.FAIL and r.raw == 0.75 and r.score == 0.3


def test_layer_order_comes_from_names_not_optimizer_position(tmp_path: Path) -> None:
    """Upstream assigned ids to layers by position; a layer-interleaved order misleads it."""
    names = lora_names(4)
    interleaved = sorted(names, key=lambda n: (n.split(".layers.")[1].split(".", 1)[1], n))
    # layer 2's four tensors are loud; in this order they sit at scattered positions
    sq = [3.0 if ".layers.2." in n else 1.0 for n in interleaved]
    write_state(tmp_path, sq, names=interleaved)
    r = run("gradient_ghost", tmp_path, layer_failure_frac=0.5)
    assert r.evidence["flagged_layers"] == ["base_model.model.model.layers.2"]
    assert r.raw == 0.25


def test_without_names_the_order_is_checked_against_the_adapter_tensors(tmp_path: Path) -> None:
    names = lora_names(3, modules=("q_proj",))
    write_weights(tmp_path, names)
    write_state(tmp_path, [1.0] * 6)
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.PASS
    assert r.evidence["layer_mapping"] == "safetensors order" and r.evidence["num_layers"] == 3
    # an optimizer holding more parameters than the adapter's layers cannot be mapped
    write_state(tmp_path, [1.0] * 7)
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.WARN and "7 parameters" in r.message


def test_mismatched_sizes_refuse_the_positional_mapping(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    # lora_A of layer 0 is 4x8, everything else 4x4: position 0..1 must hold one 32 and one 16
    tensors = {n: torch.zeros(4, 4) for n in lora_names(2, modules=("q_proj",))}
    tensors[lora_names(2, modules=("q_proj",))[0]] = torch.zeros(4, 8)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    write_state(tmp_path, [1.0] * 4, shape=(4, 4))
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.WARN and "do not match the sizes" in r.message


def test_layer_labels_cover_common_architectures() -> None:
    assert layer_label("base_model.model.model.layers.12.mlp.up_proj.lora_A.weight") == (
        "base_model.model.model.layers",
        12,
    )
    assert layer_label("transformer.h.3.attn.c_attn.lora_B.weight") == ("transformer.h", 3)
    assert layer_label("encoder.layer.0.attention.lora_A.weight") == ("encoder.layer", 0)
    assert layer_label("model.decoder.layers.1.q.weight") != layer_label(
        "model.encoder.layers.1.q.weight"
    )
    assert layer_label("lm_head.lora_A.weight") is None


def test_state_needing_full_unpickling_is_refused_not_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Trap:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    write_state(tmp_path, [1.0] * 16, names=lora_names(4), extra={"rng_state": Trap()})
    r = run("gradient_ghost", tmp_path)
    assert not marker.exists()  # the payload never ran
    assert r.verdict is Verdict.SKIP
    assert "refusing to load" in r.message and "weights_only=True" in r.message
    assert "posix.mkdir" in r.message or "mkdir" in r.message


def test_corrupt_or_misshapen_state_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "training_state.pt").write_bytes(b"not a torch file")
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.ERROR and "cannot read" in r.message
    torch.save({"epoch": 1}, tmp_path / "training_state.pt")
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.ERROR and "global_step" in r.message


def test_missing_state_skips(tmp_path: Path) -> None:
    r = run("gradient_ghost", tmp_path)
    assert r.verdict is Verdict.SKIP and "no training_state.pt" in r.message
    other = tmp_path / "other"
    write_state(other, [1.0] * 16, names=lora_names(4))
    r = run("gradient_ghost", tmp_path, adapter_path=str(other))
    assert r.verdict is Verdict.PASS


def test_registered_uncalibrated_and_model_free() -> None:
    for kind, cls in (("training_drift", TrainingDrift), ("gradient_ghost", GradientGhost)):
        assert PROBES[kind] is cls
        assert cls.needs == frozenset() and cls.calibrated is False
        assert cls.category == "calibration"
    assert TrainingDriftSpec(name="t").spike_sigma == 6.0
    with pytest.raises(Exception, match="greater than 1"):
        GradientGhostSpec(name="g", undertrained_layer_ratio=1.0)


# ---- suites without a model, and the fixtures --------------------------------------------


def prerun_suite(tmp_path: Path, adapter: Path) -> Path:
    spec = {
        "version": 1,
        "models": {
            "base": {"base": str(tmp_path / "no-such-model")},
            "ft": {"base": str(tmp_path / "no-such-model"), "adapter": str(adapter)},
        },
        "suite": [
            {"name": "curve", "kind": "training_drift"},
            {"name": "ghost", "kind": "gradient_ghost"},
            {"name": "off", "kind": "delta_kl", "enabled": False, "prompts": ["x"]},
        ],
    }
    path = tmp_path / "sway.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_prerun_only_suite_runs_without_loading_a_model(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    write_log(adapter, decay(60))
    write_state(adapter, [1.0] * 16, names=lora_names(4))
    spec, entries = load_spec(prerun_suite(tmp_path, adapter))
    assert not needs_model(entries)
    result = evaluate(spec, entries)  # the base path does not exist: loading would fail
    verdicts = {p.name: p.verdict for p in result.probes}
    assert verdicts == {
        "curve": Verdict.PASS,
        "ghost": Verdict.PASS,
        "off": Verdict.SKIP,
    }
    assert result.backend_stats == {}


def test_a_null_adapter_entry_still_needs_the_model(tmp_path: Path) -> None:
    spec, entries = load_spec(prerun_suite(tmp_path, tmp_path))
    assert not needs_model(entries)
    data = yaml.safe_load((tmp_path / "sway.yaml").read_text())
    data["suite"].insert(0, {"name": "null", "kind": "null_adapter"})
    assert needs_model(parse_spec(data)[1])


def test_fixture_doc_strong_has_a_healthy_curve_and_settled_state(fx: FixturePaths) -> None:
    strong = fx.adapters["doc-strong"]
    r = run("training_drift", strong)
    assert r.verdict is Verdict.PASS, r.message
    assert r.evidence["num_steps"] == 200
    assert r.raw == pytest.approx(1.0)  # full-batch training: a monotone curve
    assert r.evidence["convergence_ratio"] < 0.3
    g = run("gradient_ghost", strong)
    assert g.evidence["global_step"] == 200 and g.evidence["layer_mapping"] == "param_names"
    assert g.evidence["num_layers"] == 4 and g.evidence["params_per_layer"] == [14]
    # the first block's second moment stays ~15x the quietest block's (layers 1-3: 1.0-1.75x)
    assert "base_model.model.model.layers.0" in g.evidence["flagged_layers"]
    assert g.evidence["worst_layers"][0]["ratio_to_min"] > 10
    assert g.verdict is not Verdict.PASS and g.raw is not None and g.raw >= 0.25
    assert torch.load(strong / "training_state.pt", weights_only=True)["epoch"] == 200


def test_fixture_doc_weak_is_too_short(fx: FixturePaths) -> None:
    weak = fx.adapters["doc-weak"]
    assert run("training_drift", weak).verdict is Verdict.SKIP  # 6 steps < min_steps
    g = run("gradient_ghost", weak)
    assert g.verdict is Verdict.FAIL and "only 6 optimizer step" in g.message


@pytest.mark.parametrize("name", ["noise", "zero", "nan"])
def test_derived_fixture_adapters_have_no_training_record(fx: FixturePaths, name: str) -> None:
    adapter = fx.adapters[name]
    assert run("training_drift", adapter).verdict is Verdict.SKIP
    assert run("gradient_ghost", adapter).verdict is Verdict.SKIP


def test_fixture_adapters_with_training_files_still_read_as_adapters(fx: FixturePaths) -> None:
    from sway_engine.adapters import read_adapter

    info = read_adapter(fx.adapters["doc-strong"])
    assert info.rank == 8 and (info.path / "logs").is_dir()


def test_measure_raises_probe_skip_for_the_runner() -> None:
    with pytest.raises(ProbeSkip, match="nothing to read"):
        TrainingDrift().measure(TrainingDriftSpec(name="t"), ctx_for(None), [FINETUNED])
    with pytest.raises(ProbeSkip, match="nothing to read"):
        GradientGhost().measure(GradientGhostSpec(name="g"), ctx_for(None), [FINETUNED])
