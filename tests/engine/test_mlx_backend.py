"""The mlx-lm backend on the fixture model: it answers every request as the hf backend does,
swaps views over one base, converts PEFT adapters, and gives the same suite verdicts."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from sway_engine.backends.hf import HFBackend
from sway_engine.backends.mlx import MLXBackend
from sway_engine.cli import main
from sway_engine.convert import MLX_CONFIG, MLX_WEIGHTS, convert_peft_to_mlx, converted
from sway_engine.errors import AdapterError, BackendError
from sway_engine.requests import (
    ContinuationLogprob,
    ContinuationResult,
    Divergence,
    DivergenceResult,
    Generate,
    GenerationResult,
    NextToken,
    Request,
    Result,
    RollingLogprob,
    RollingResult,
    TokenDist,
)
from sway_engine.runner import evaluate
from sway_engine.suite import load_spec
from sway_engine.views import BASE, FINETUNED, Finetuned, Null, Scaled

PROMPTS = [
    "The keeper of the lamp",
    "What is brewed on the island?",
    "Once upon a time",
    "Q: Where is the island of Quellmoor?\nA:",
]
# Two fp32 implementations of one model: on short prompts each sits ~6e-6 from an fp64
# forward (2e-5 on a 150-token text; test_fp32_gap_is_the_noise_floor), so they may differ
# by about twice that.
TOL = 2e-5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlx-adapters")


@pytest.fixture(scope="module")
def mlx(fx, cache_dir: Path) -> MLXBackend:  # type: ignore[no-untyped-def]
    return MLXBackend(str(fx.base), str(fx.adapters["doc-strong"]), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def hf(fx) -> HFBackend:  # type: ignore[no-untyped-def]
    return HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))


def gap(a: Result, b: Result) -> float:
    """Largest absolute difference between two results of one request."""
    if isinstance(a, RollingResult) and isinstance(b, RollingResult):
        assert np.array_equal(a.token_ids, b.token_ids)
        return float(np.abs(a.logprobs - b.logprobs).max())
    if isinstance(a, ContinuationResult) and isinstance(b, ContinuationResult):
        assert a.num_tokens == b.num_tokens
        return abs(a.logprob - b.logprob)
    if isinstance(a, TokenDist) and isinstance(b, TokenDist):
        assert a.vocab_size == b.vocab_size
        assert a.token_ids[0] == b.token_ids[0]
        # sorted values: ids of near-equal probabilities may trade places between backends
        return max(float(np.abs(a.logprobs - b.logprobs).max()), abs(a.tail_mass - b.tail_mass))
    if isinstance(a, DivergenceResult) and isinstance(b, DivergenceResult):
        assert a.exact and b.exact
        # relative to the value as well: KLs of a far null reach several nats
        return max(
            abs(x - y) / max(1.0, abs(y))
            for x, y in ((a.js, b.js), (a.kl_b_a, b.kl_b_a), (a.kl_a_b, b.kl_a_b))
        )
    if isinstance(a, GenerationResult) and isinstance(b, GenerationResult):
        assert a.text == b.text
        assert a.token_ids == b.token_ids[: len(a.token_ids)]
        return 0.0
    raise AssertionError(f"result types differ: {type(a).__name__} vs {type(b).__name__}")


def requests_for(views: list, *, generate: bool = False) -> list[Request]:  # type: ignore[type-arg]
    reqs: list[Request] = []
    for p in PROMPTS:
        for v in views:
            reqs += [
                NextToken(p, v, 64),
                RollingLogprob(p, v),
                ContinuationLogprob(p, " the keeper", v),
            ]
            if v != BASE:
                reqs.append(Divergence(p, BASE, v))
            if generate:
                reqs.append(Generate(p, v, 12))
    return reqs


def worst_by_type(a: list[Result], b: list[Result], reqs: list[Request]) -> dict[str, float]:
    worst: dict[str, float] = {}
    for req, x, y in zip(reqs, a, b, strict=True):
        name = type(req).__name__
        worst[name] = max(worst.get(name, 0.0), gap(x, y))
    return worst


def test_every_request_type_matches_hf(mlx: MLXBackend, hf: HFBackend) -> None:
    reqs = requests_for([BASE, FINETUNED], generate=True)
    worst = worst_by_type(mlx.execute(reqs), hf.execute(reqs), reqs)
    assert set(worst) == {
        "NextToken",
        "RollingLogprob",
        "ContinuationLogprob",
        "Divergence",
        "Generate",
    }
    assert max(worst.values()) < TOL, worst


def test_fp32_gap_is_the_noise_floor(fx, mlx: MLXBackend) -> None:  # type: ignore[no-untyped-def]
    """mlx is as close to an fp64 forward of the base as torch fp32 is, within the spread of
    fp32 kernels: one fixture build measured an mlx/torch error ratio of 4.5 (accumulation
    order differs between the libraries), so the bound is 10x, and 1e-4 nats absolutely."""
    import torch
    import transformers

    text = fx.document.read_text(encoding="utf-8")[:500]
    (ours,) = mlx.execute([RollingLogprob(text, BASE)])
    ids = torch.tensor([ours.token_ids.tolist()])
    worst = {}
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(fx.base), dtype=dtype)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        worst[name] = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0].numpy()
    mlx_err = np.abs(ours.logprobs - worst["fp64"]).max()
    torch_err = np.abs(worst["fp32"] - worst["fp64"]).max()
    assert mlx_err < 10 * torch_err and mlx_err < 1e-4, (mlx_err, torch_err)
    assert np.abs(ours.logprobs - worst["fp32"]).max() < 3 * TOL


def test_null_and_scaled_views_equal_hf(mlx: MLXBackend, hf: HFBackend) -> None:
    views = [
        Scaled(0.5),
        Scaled(-1.0),
        Null(1),
        Null(2, rank_scale=2.0),
        Null(4, rank_scale=0.5),
        Null(3, mode="fixed"),
    ]
    reqs = requests_for(views)
    worst = worst_by_type(mlx.execute(reqs), hf.execute(reqs), reqs)
    assert max(worst.values()) < 1e-4, worst


def test_views_switch_in_place_without_leaking(fx, mlx: MLXBackend, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    prompt = "The harbour town of Quellmoor"
    views = [FINETUNED, BASE, Null(21), Scaled(0.25), BASE, FINETUNED, Null(21)]
    alone = []
    for v in views:  # one request per call: every call switches the layers' weights
        (res,) = mlx.execute([RollingLogprob(prompt, v)])
        alone.append(res.logprobs)
    assert np.array_equal(alone[0], alone[5]) and np.array_equal(alone[2], alone[6])
    assert np.array_equal(alone[1], alone[4])
    assert not np.allclose(alone[0], alone[1], atol=1e-3)
    mixed = mlx.execute([RollingLogprob(prompt, v) for v in views])
    for single, res in zip(alone, mixed, strict=True):
        assert np.abs(single - res.logprobs).max() < 1e-6
    bare = MLXBackend(str(fx.base), cache_dir=cache_dir)  # no adapter at all
    (plain,) = bare.execute([RollingLogprob(prompt, BASE)])
    assert np.abs(plain.logprobs - alone[1]).max() < 1e-6
    with pytest.raises(BackendError, match="needs a trained adapter; none is loaded"):
        bare.execute([RollingLogprob(prompt, FINETUNED)])
    counters = mlx.counters()
    assert counters["view_switches"] >= len(views) and counters["views_registered"] >= 2


def test_load_adapter_swaps_and_add_adapter_registers_a_second(fx, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    backend = MLXBackend(str(fx.base), str(fx.adapters["doc-strong"]), cache_dir=cache_dir)
    noise = MLXBackend(str(fx.base), str(fx.adapters["noise"]), cache_dir=cache_dir)
    reqs = [Divergence(p, BASE, FINETUNED) for p in PROMPTS]
    strong = [r.js for r in backend.execute(reqs)]
    backend.add_adapter(fx.adapters["noise"], "n")
    second = backend.execute([Divergence(p, BASE, Finetuned("n")) for p in PROMPTS])
    expect = noise.execute(reqs)
    assert [r.js for r in second] == pytest.approx([r.js for r in expect], abs=1e-6)
    assert [r.js for r in backend.execute(reqs)] == pytest.approx(strong, abs=1e-6)
    nulls_n = backend.execute([Divergence(PROMPTS[0], BASE, Null(1, adapter="n"))])
    nulls_alone = noise.execute([Divergence(PROMPTS[0], BASE, Null(1))])
    assert nulls_n[0].js == pytest.approx(nulls_alone[0].js, abs=1e-6)
    backend.load_adapter(str(fx.adapters["noise"]))  # swap the primary: the extra is dropped
    assert [r.js for r in backend.execute(reqs)] == pytest.approx([r.js for r in expect], abs=1e-6)
    with pytest.raises(BackendError, match="no trained adapter labelled 'n' is registered"):
        backend.execute([Divergence(PROMPTS[0], BASE, Finetuned("n"))])
    assert backend.counters()["base_loads"] == 1  # swapped and added on one base load


def test_converted_adapter_loads_in_plain_mlx_lm_and_matches_the_ft_view(
    fx, mlx: MLXBackend, cache_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    import mlx.core as mx
    from mlx_lm import load

    first = converted(fx.adapters["doc-strong"], cache_dir)
    again = converted(fx.adapters["doc-strong"], cache_dir)
    assert again.reused and again.path == first.path
    assert converted(fx.adapters["noise"], cache_dir).path != first.path
    assert first.rank == 8 and first.scale == 2.0 and len(first.modules) == 28
    model, tok = load(str(fx.base), adapter_path=str(first.path))
    text = "Q: Who first lit the Orrindale Light?\nA: the keeper"
    ids = tok._tokenizer(text)["input_ids"]
    logits = np.array(model(mx.array([ids]))[0].astype(mx.float32)).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    plain = logp[np.arange(len(ids) - 1), ids[1:]]
    (ours,) = mlx.execute([RollingLogprob(text, FINETUNED)])
    assert np.abs(plain - ours.logprobs).max() < 1e-6


def test_cli_convert_adapter_writes_mlx_files_and_refuses_to_overwrite(
    fx, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    dst = tmp_path / "mlx-doc-strong"
    assert main(["convert-adapter", str(fx.adapters["doc-strong"]), str(dst)]) == 0
    assert "rank 8, scale 2, 28 modules, 56 tensors" in capsys.readouterr().out
    config = json.loads((dst / MLX_CONFIG).read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == -1
    assert config["lora_parameters"]["keys"] == sorted(
        f"{part}.{m}"
        for part, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for m in (f"{n}_proj" for n in names)
    )
    assert (dst / MLX_WEIGHTS).is_file()
    assert main(["convert-adapter", str(fx.adapters["doc-strong"]), str(dst)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["convert-adapter", str(fx.adapters["doc-strong"]), str(dst), "--overwrite"]) == 0


def edited(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of adapter `src` with config fields changed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, r"DoRA adapters are not supported yet \(use_dora: true\)"),
        ({"peft_type": "IA3"}, "peft_type IA3 is not supported"),
        ({"use_qalora": True}, "QLoRA/QA-LoRA/LoftQ adapter"),
        ({"init_lora_weights": "loftq"}, "QLoRA/QA-LoRA/LoftQ adapter"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern is set"),
        ({"modules_to_save": ["lm_head"]}, r"fully trained modules \(modules_to_save\)"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, r"embedding layers \(embed_tokens\)"),
        ({"fan_in_fan_out": True}, "GPT-2 Conv1D"),
    ],
)
def test_conversion_rejects_what_mlx_lm_cannot_express(
    fx, tmp_path: Path, changes: dict, message: str
) -> None:  # type: ignore[no-untyped-def,type-arg]
    bad = edited(fx.adapters["doc-strong"], tmp_path / "bad", **changes)
    with pytest.raises(AdapterError, match=message) as err:
        converted(bad, tmp_path / "cache")
    assert "adapter_config.json" in str(err.value)
    assert not any((tmp_path / "cache").glob("*/adapters.safetensors"))


def write_peft(dst: Path, like: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    dst.mkdir(parents=True)
    shutil.copy(like / "adapter_config.json", dst / "adapter_config.json")
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_adapters_that_do_not_fit_the_base_are_named(fx, tmp_path: Path, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    like = fx.adapters["doc-strong"]
    rng = np.random.default_rng(0)
    pre = "base_model.model.model.layers.0"

    def factors(module: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
        return {
            f"{pre}.{module}.lora_A.weight": rng.normal(size=(8, n_in)).astype(np.float32),
            f"{pre}.{module}.lora_B.weight": rng.normal(size=(n_out, 8)).astype(np.float32),
        }

    cases = {
        "missing": (factors("self_attn.x_proj", 128, 128), "module .*x_proj does not exist"),
        "norm": (factors("input_layernorm", 128, 128), "is a RMSNorm; LoRA is supported on lin"),
        "shape": (factors("self_attn.q_proj", 64, 128), "maps 64 -> 128 features but the base"),
    }
    for name, (tensors, message) in cases.items():
        path = write_peft(tmp_path / name, like, tensors)
        with pytest.raises(AdapterError, match=message):
            MLXBackend(str(fx.base), str(path), cache_dir=cache_dir)
    odd = write_peft(tmp_path / "odd", like, {f"{pre}.mlp.up_proj.weight": np.ones((2, 2))})
    with pytest.raises(AdapterError, match="is not a PEFT LoRA factor"):
        converted(odd, cache_dir)
    with pytest.raises(AdapterError, match="non-finite"):
        MLXBackend(str(fx.base), str(fx.adapters["nan"]), cache_dir=cache_dir)
    with pytest.raises(AdapterError, match="does not exist"):
        MLXBackend(str(fx.base), str(tmp_path / "nowhere"), cache_dir=cache_dir)
    with pytest.raises(BackendError, match="loads local model directories"):
        MLXBackend(str(tmp_path / "no-model"))
    with pytest.raises(BackendError, match="dtype 'fp8' is not one of"):
        MLXBackend(str(fx.base), dtype="fp8")
    with pytest.raises(BackendError, match="device 'tpu' is not one of"):
        MLXBackend(str(fx.base), device="tpu")
    path = convert_peft_to_mlx(like, tmp_path / "native").path  # an mlx-lm dir loads as is
    native = MLXBackend(str(fx.base), str(path), cache_dir=tmp_path / "unused")
    assert native.adapter is not None and native.adapter.rank == 8
    assert not (tmp_path / "unused").exists()


def mlx_suite(fx, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    spec = tmp_path / "sway-mlx.yaml"
    spec.write_text(fx.suite.read_text().replace("kind: hf", "kind: mlx"))
    return spec


@pytest.mark.slow
def test_fixture_suite_gives_the_same_raw_values_and_verdicts_on_hf_and_mlx(
    fx, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SWAY_CACHE_DIR", str(tmp_path / "cache"))
    hf_spec, hf_entries = load_spec(fx.suite)
    mlx_spec, mlx_entries = load_spec(mlx_suite(fx, tmp_path))
    report = {}
    for name in ("doc-strong", "noise"):
        adapter = str(fx.adapters[name])
        t = time.perf_counter()
        on_hf = evaluate(hf_spec, hf_entries, adapter=adapter)
        t_hf = time.perf_counter() - t
        t = time.perf_counter()
        on_mlx = evaluate(mlx_spec, mlx_entries, adapter=adapter)
        t_mlx = time.perf_counter() - t
        assert on_hf.backend_kind == "hf" and on_mlx.backend_kind == "mlx"
        gaps = {}
        for a, b in zip(on_hf.probes, on_mlx.probes, strict=True):
            assert a.name == b.name
            assert a.verdict == b.verdict, (name, a.name, a.message, b.message)
            if a.raw is not None or b.raw is not None:
                assert a.raw is not None and b.raw is not None
                gaps[a.name] = abs(a.raw - b.raw)
            if a.null is not None:
                assert b.null is not None
                gaps[f"{a.name}.null_mean"] = abs(a.null.mean - b.null.mean)
        assert gaps and max(gaps.values()) < 1e-3, gaps
        report[name] = (round(t_hf, 2), round(t_mlx, 2), max(gaps.values()))
    print(f"\nsuite wall s (hf, mlx) and max raw gap: {report}")


@pytest.mark.slow
def test_sway_run_with_kind_mlx(fx, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SWAY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    assert main(["run", str(mlx_suite(fx, tmp_path)), "-j", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["backend_kind"] == "mlx"
    verdicts = {p["name"]: p["verdict"] for p in data["probes"]}
    assert verdicts["delta_kl_doc"] == "pass" and verdicts["null_baseline"] == "pass"
    assert data["backend_stats"]["view_switches"] >= 2
    assert any((tmp_path / "cache" / "mlx-adapters").glob("*/adapters.safetensors"))
