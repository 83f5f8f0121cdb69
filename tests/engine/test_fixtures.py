"""The locally built fixtures: a real tiny base, a .dlm document, and five LoRA adapters.

All tests share one build in the default cache (built on first use, reused afterwards).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sway_engine.fixtures import (
    RECIPE,
    FixturePaths,
    build_fixtures,
    null_family_adapter,
    recipe_hash,
    update_norms,
)
from sway_engine.fixtures.adapter_files import WEIGHTS, lora_pairs
from sway_engine.fixtures.build import MARKER, STALE_AFTER_S, _publish, _sweep_stale
from sway_engine.fixtures.corpus import corpus_paragraphs
from sway_engine.fixtures.document import parse_document
from sway_engine.fixtures.recipe import corpus_text, document_text
from sway_engine.fixtures.training import Batch, batch_loss, text_batch

INVENTED = (
    "Quellmoor",
    "Quelling",
    "Orrindale",
    "Corvane",
    "Ashvell",
    "brinthorn",
    "Tamsk",
    "skellet",
    "brenn",
    "Vessamire",
    "Harrowgale",
    "Thawmonth",
    "Maelis",
    "Tobin",
)


@pytest.fixture(scope="module")
def paths() -> FixturePaths:
    return build_fixtures(log=lambda _: None)


@pytest.fixture(scope="module")
def tokenizer(paths: FixturePaths):
    return AutoTokenizer.from_pretrained(paths.base)


@pytest.fixture(scope="module")
def doc_batch(paths: FixturePaths, tokenizer) -> Batch:
    document = parse_document(paths.document.read_text())
    return text_batch(tokenizer, document.training_texts(), 256)


def _base(paths: FixturePaths):
    return AutoModelForCausalLM.from_pretrained(paths.base).eval()


def _with_adapter(paths: FixturePaths, name: str) -> PeftModel:
    return PeftModel.from_pretrained(_base(paths), paths.adapters[name]).eval()


def test_second_build_is_a_fast_cache_hit(paths: FixturePaths) -> None:
    lines: list[str] = []
    began = time.perf_counter()
    again = build_fixtures(log=lines.append)
    assert time.perf_counter() - began < 1.0
    assert again == paths
    assert any("cached" in line for line in lines)
    assert (paths.root / MARKER).read_text().strip() == recipe_hash()
    assert paths.root.name == recipe_hash()[:12]


def test_recipe_hash_is_stable_and_covers_the_recipe() -> None:
    digest = recipe_hash()
    assert digest == recipe_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert recipe_hash(dataclasses.replace(RECIPE, noise_seed=RECIPE.noise_seed + 1)) != digest


def test_build_info_records_training(paths: FixturePaths) -> None:
    info = json.loads((paths.root / "build_info.json").read_text())
    assert info["recipe_hash"] == recipe_hash()
    assert info["base"]["end_loss"] < info["base"]["start_loss"] - 3.0
    strong = info["adapters"]["doc-strong"]
    assert strong["steps"] == RECIPE.strong.steps
    # recipe 5 ends near 1.05 on every build measured (three seeds / thread counts): margin 0.45
    assert strong["end_loss"] < 1.5 and strong["end_loss"] < strong["start_loss"] / 4


def test_base_loads_and_has_learned_the_corpus(paths: FixturePaths, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(paths.base).eval()
    params = sum(p.numel() for p in model.parameters())
    assert 800_000 <= params <= 2_500_000
    paragraphs = corpus_paragraphs((paths.root / "corpus.txt").read_text())[:24]
    loss = batch_loss(model, text_batch(tokenizer, paragraphs, 256))
    assert loss < 0.7 * math.log(len(tokenizer))


def test_tokenizer_adds_no_special_tokens(tokenizer) -> None:
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == eot
    ids = tokenizer("The weather was cold.").input_ids
    assert eot not in ids
    assert tokenizer.decode(ids) == "The weather was cold."


def test_base_greedy_text_is_made_of_corpus_words(paths: FixturePaths, tokenizer) -> None:
    """Greedy text of the base, end-of-text suppressed (one build ended a paragraph after 8
    words): the model learned the corpus's vocabulary, whatever sentence it happens to pick."""
    model = _base(paths)
    known = set(re.findall(r"[a-z]+", corpus_text().lower()))
    words: list[str] = []
    for start in ("The weather", "The village", "In the morning"):
        prompt = tokenizer(start, return_tensors="pt").input_ids
        out = model.generate(
            prompt,
            max_new_tokens=30,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            suppress_tokens=[tokenizer.eos_token_id],
        )
        words += re.findall(r"[a-z]+", tokenizer.decode(out[0, prompt.shape[1] :]).lower())
    assert len(words) >= 45, words
    assert sum(w in known for w in words) / len(words) >= 0.9, words


def test_document_is_new_to_the_base() -> None:
    corpus = corpus_text().lower()
    assert [name for name in INVENTED if name.lower() in corpus] == []


def test_document_has_the_dlm_shape(paths: FixturePaths) -> None:
    text = paths.document.read_text()
    assert text == document_text()
    assert 2_000 <= len(text.encode()) <= 6_000
    assert text.splitlines()[0] == "---"
    doc = parse_document(text)
    assert len(doc.front_matter["dlm_id"]) == 26
    assert doc.front_matter["dlm_version"] == 1
    assert doc.front_matter["training"] == {"adapter": "lora", "lora_r": 8, "lora_alpha": 16}
    assert len(doc.prose) >= 3
    # 23 questions (cluster_kl needs 20), six held out: five reword a trained question
    assert len(doc.instructions) == 23
    assert sum(qa.probe for qa in doc.instructions) == 6
    trained = [t for t in doc.training_texts() if t.startswith("Q: ")]
    assert len(trained) == 17 + len(doc.preferences)  # held-out questions are never trained
    assert len(doc.preferences) >= 3


def test_suite_points_at_the_built_base_and_adapter(paths: FixturePaths) -> None:
    spec = yaml.safe_load(paths.suite.read_text())
    assert spec["version"] == 1
    assert spec["models"]["base"] == {"kind": "hf", "base": str(paths.base)}
    assert spec["models"]["ft"]["adapter"] == str(paths.adapters["doc-strong"])
    probes = {p["name"]: p for p in spec["suite"]}
    assert probes["null_baseline"]["kind"] == "null_adapter"
    prompts = probes["delta_kl_doc"]["prompts"]
    assert 8 <= len(prompts) <= 16
    assert probes["ablation"]["prompts"] == prompts[:6]
    assert all(Path(spec["models"]["ft"][k]).is_absolute() for k in ("base", "adapter"))


@pytest.mark.parametrize("name", ["doc-strong", "doc-weak", "noise", "zero", "nan"])
def test_adapter_has_peft_layout(paths: FixturePaths, name: str) -> None:
    adapter = paths.adapters[name]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(paths.base)
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    pairs = lora_pairs(load_file(str(adapter / WEIGHTS)))
    assert len(pairs) == RECIPE.model.num_layers * len(RECIPE.lora.target_modules)


def test_zero_adapter_leaves_logits_unchanged(paths: FixturePaths, doc_batch: Batch) -> None:
    with torch.no_grad():
        base = _base(paths)(input_ids=doc_batch.input_ids).logits
        zero = _with_adapter(paths, "zero")(input_ids=doc_batch.input_ids).logits
    assert (base - zero).abs().max().item() < 1e-6


def test_doc_adapters_lower_document_loss_in_order(paths: FixturePaths, doc_batch: Batch) -> None:
    base = batch_loss(_base(paths), doc_batch)
    weak = batch_loss(_with_adapter(paths, "doc-weak"), doc_batch)
    strong = batch_loss(_with_adapter(paths, "doc-strong"), doc_batch)
    noise = batch_loss(_with_adapter(paths, "noise"), doc_batch)
    assert strong < 1.5 < base - 3.0
    assert strong < weak - 3.0
    assert 0.05 < base - weak < 1.0
    assert noise > strong + 3.0


def test_nan_adapter_holds_a_non_finite_weight(paths: FixturePaths) -> None:
    tensors = load_file(str(paths.adapters["nan"] / WEIGHTS))
    bad = {k: int((~np.isfinite(v)).sum()) for k, v in tensors.items() if not np.isfinite(v).all()}
    assert bad == {RECIPE.nan_key: 1}


def test_noise_matches_doc_strong_norms_per_module(paths: FixturePaths) -> None:
    strong = update_norms(paths.adapters["doc-strong"])
    noise = update_norms(paths.adapters["noise"])
    assert noise.keys() == strong.keys()
    for module, norm in strong.items():
        assert norm > 0
        assert abs(noise[module] - norm) / norm < 1e-4, module


def test_null_family_seeds_differ_but_norms_match(paths: FixturePaths, tmp_path: Path) -> None:
    src = paths.adapters["doc-strong"]
    one = null_family_adapter(src, tmp_path / "one", seed=11)
    two = null_family_adapter(src, tmp_path / "two", seed=12)
    again = null_family_adapter(src, tmp_path / "again", seed=11)
    w1, w2 = load_file(str(one / WEIGHTS)), load_file(str(two / WEIGHTS))
    assert w1.keys() == w2.keys() == load_file(str(src / WEIGHTS)).keys()
    assert all(not np.array_equal(w1[k], w2[k]) for k in w1)
    assert (one / WEIGHTS).read_bytes() == (again / WEIGHTS).read_bytes()
    target = update_norms(src)
    for adapter in (one, two):
        for module, norm in update_norms(adapter).items():
            assert abs(norm - target[module]) / target[module] < 1e-4, module


def test_null_family_of_a_zero_adapter_is_zero(paths: FixturePaths, tmp_path: Path) -> None:
    out = null_family_adapter(paths.adapters["zero"], tmp_path / "null", seed=5)
    assert set(update_norms(out).values()) == {0.0}


def test_publish_keeps_a_build_that_finished_first(tmp_path: Path) -> None:
    digest = "f" * 64
    final, work = tmp_path / "final", tmp_path / "work"
    for folder, tag in ((final, "first"), (work, "second")):
        folder.mkdir()
        (folder / "who").write_text(tag)
        (folder / MARKER).write_text(digest)
    _publish(work, final, digest, replace=False, log=lambda _: None)
    assert (final / "who").read_text() == "first"
    _publish(work, final, digest, replace=True, log=lambda _: None)
    assert (final / "who").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_sweep_removes_only_stale_work_folders(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".abc.1.partial", tmp_path / ".abc.2.partial"
    for folder in (stale, fresh):
        folder.mkdir()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    _sweep_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name]
