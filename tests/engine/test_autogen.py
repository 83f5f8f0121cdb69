"""`sway autogen`: a .dlm document becomes a sway.yaml that loads, with held-out prompts first."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sway_engine.autogen import AutogenError, Options, kl_prompts, paraphrase_cases, render
from sway_engine.cli import main
from sway_engine.dlm import parse_dlm
from sway_engine.fixtures import FixturePaths
from sway_engine.probes.registry import PROBES
from sway_engine.suite import load_spec

TEMPLATE = "Q: {question}\nA:"


def autogen(fx: FixturePaths, out: Path, **kw: object) -> str:
    opts = Options(
        document=fx.document,
        output=out,
        base=str(fx.base),
        adapter=str(fx.adapters["doc-strong"]),
        prompt_template=TEMPLATE,
        **kw,  # type: ignore[arg-type]
    )
    return render(opts)


def test_fixture_document_gives_a_suite_that_loads(fx: FixturePaths, tmp_path: Path) -> None:
    out = tmp_path / "suite" / "sway.yaml"
    out.parent.mkdir()
    out.write_text(autogen(fx, out))
    spec, entries = load_spec(out)
    kinds = [e.spec.kind for e in entries]
    assert kinds[0] == "null_adapter" and kinds[-1] == "adapter_ablation"
    # the fixture document feeds every registered kind (rewordings, 23 questions, tool pack)
    assert set(kinds) == set(PROBES)
    assert all(e.probe is not None for e in entries)  # every kind emitted is implemented
    assert Path(spec.dlm_source or "") == fx.document.resolve()
    assert Path(spec.models.ft.adapter or "") == fx.adapters["doc-strong"].resolve()
    assert spec.models.ft.kind == "hf"
    delta = next(e.spec for e in entries if e.spec.kind == "delta_kl")
    # the six `### Q !probe` questions come first; no training answer is a prompt
    assert delta.prompts[0] == "Q: Who first lit the Orrindale Light?\nA:"
    assert delta.prompts[5] == "Q: How do the Quellings say fog?\nA:"
    answers = {qa.answer for qa in parse_dlm(fx.document.read_text()).qa}
    assert not any(a in p for p in delta.prompts for a in answers)
    # reworded questions became cases: the trained wording, the held-out rewording
    revert = next(e.spec for e in entries if e.spec.kind == "adapter_revert")
    assert len(revert.cases) == 5
    assert revert.cases[0].paraphrases == ("Q: Which strait is Quellmoor in?\nA:",)
    text = out.read_text()
    assert "# skipped:" not in text
    assert "# does the adapter move next-token distributions? 6 held-out (!probe)" in text


def test_adapters_without_training_files_get_no_prerun_probes(
    fx: FixturePaths, tmp_path: Path
) -> None:
    out = tmp_path / "sway.yaml"
    opts = Options(fx.document, out, base=str(fx.base), adapter=str(fx.adapters["noise"]))
    out.write_text(render(opts))
    kinds = [e.spec.kind for e in load_spec(out)[1]]
    assert "training_drift" not in kinds and "gradient_ghost" not in kinds
    assert "# skipped: training_drift (no loss log" in out.read_text()


def test_cli_writes_and_refuses_to_overwrite(
    fx: FixturePaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sway.yaml"
    argv = ["autogen", str(fx.document), "-o", str(out), "--base", str(fx.base)]
    argv += ["--adapter", str(fx.adapters["doc-strong"]), "--prompt-template", r"Q: {question}\nA:"]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    first = out.read_text()
    spec, entries = load_spec(out)
    assert "Q: Where is the island of Quellmoor?\nA:" in entries[1].spec.prompts
    assert main(argv) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == first
    assert main([*argv, "--force"]) == 0


def test_document_without_sections_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "empty.dlm"
    doc.write_text("---\ndlm_id: X\nbase_model: hf:org/model\n---\n\n   \n")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    out = tmp_path / "sway.yaml"
    assert main(["autogen", str(doc), "-o", str(out), "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert "has no sections" in err and "::instruction::" in err
    assert not out.exists()


def test_base_and_adapter_resolution_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = tmp_path / "doc.dlm"
    doc.write_text("---\ndlm_id: 01ABC\nbase_model: smollm2-135m\n---\nSome prose here.\n")
    out = tmp_path / "sway.yaml"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(AutogenError, match="dlm registry key"):
        render(Options(doc, out, adapter=str(adapter)))
    monkeypatch.setenv("DLM_HOME", str(tmp_path / "dlm"))
    with pytest.raises(AutogenError, match="no trained adapter found"):
        render(Options(doc, out, base="org/model"))
    # dlm's store pointer: <store>/adapter/current.txt names the version directory
    store = tmp_path / "dlm" / "store" / "01ABC"
    (store / "adapter" / "versions" / "v0001").mkdir(parents=True)
    (store / "adapter" / "current.txt").write_text("adapter/versions/v0001\n")
    data = yaml.safe_load(render(Options(doc, out, base="org/model")))
    assert data["models"]["ft"]["adapter"].endswith("dlm/store/01ABC/adapter/versions/v0001")
    assert data["models"]["base"]["base"] == "org/model"
    with pytest.raises(AutogenError, match="lacks"):
        render(Options(doc, out, base="org/model", prompt_template="Q:"))


@pytest.mark.parametrize("template", ["Q: {question.text}", "Q: {question[x]}"])
def test_prompt_template_with_attribute_or_key_is_an_autogen_error(
    tmp_path: Path, template: str
) -> None:
    """str.format raised AttributeError / TypeError past the AutogenError."""
    opts = Options(tmp_path / "doc.dlm", tmp_path / "sway.yaml", prompt_template=template)
    with pytest.raises(AutogenError, match=r"only \{question\} may appear"):
        render(opts)


def test_prompts_prefer_held_out_questions_then_questions_then_prose() -> None:
    doc = parse_dlm(
        "---\nbase_model: hf:o/m\n---\n"
        "The lighthouse keeper climbed the stairs every single night.\n\n"
        "::instruction::\n### Q\nOne?\n\n### A\nAnswer one.\n\n"
        "### Q !probe\nTwo?\n\n### A\nAnswer two.\n\n"
        "### Q\nAgain one?\n\n### A\nAnswer one.\n"
    )
    prompts, held = kl_prompts(doc, "{question}")
    assert prompts == ["Two?", "One?", "Again one?"] and held == 1
    prose_only = parse_dlm(
        "---\nx: 1\n---\nThe lighthouse keeper climbed the stairs every night.\n"
    )
    assert kl_prompts(prose_only, "{question}") == (["The lighthouse keeper climbed the stairs"], 0)
    # questions the author answered identically are real paraphrases of each other
    assert paraphrase_cases(doc, "{question}") == [
        {"prompt": "One?", "gold": " Answer one.", "paraphrases": ["Again one?"]}
    ]


def test_paraphrase_cases_validate_against_the_probe(tmp_path: Path) -> None:
    doc = tmp_path / "doc.dlm"
    doc.write_text(
        "---\nbase_model: hf:o/m\n---\nProse about a harbour town and its ferry service.\n\n"
        "::instruction::\n### Q\nWhere does the ferry leave from?\n\n### A\nFrom Tamsk.\n\n"
        "### Q\nWhich harbour is the ferry's departure point?\n\n### A\nFrom Tamsk.\n"
    )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    out = tmp_path / "suite" / "sway.yaml"
    out.parent.mkdir()
    text = render(Options(doc, out, base="o/m", adapter=str(adapter)))
    out.write_text(text)
    # paths relative to the suite file, which the loader resolves back
    data = yaml.safe_load(text)
    assert data["dlm_source"] == "../doc.dlm" and data["models"]["ft"]["adapter"] == "../adapter"
    spec, entries = load_spec(out)
    assert spec.dlm_source == str(doc) and spec.models.ft.adapter == str(adapter)
    para = next(e.spec for e in entries if e.spec.kind == "paraphrase_invariance")
    assert para.cases[0].paraphrases == ("Which harbour is the ferry's departure point?",)
    revert = next(e.spec for e in entries if e.spec.kind == "adapter_revert")
    assert revert.cases[0].gold == " From Tamsk."
    assert "paraphrase_invariance" in PROBES


def test_cluster_kl_needs_twenty_distinct_prompts(tmp_path: Path) -> None:
    qa = "".join(f"### Q\nQuestion number {i}?\n\n### A\nAnswer {i}.\n\n" for i in range(20))
    doc = tmp_path / "doc.dlm"
    doc.write_text(f"---\nbase_model: hf:o/m\n---\n::instruction::\n{qa}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    out = tmp_path / "sway.yaml"
    out.write_text(render(Options(doc, out, base="o/m", adapter=str(adapter))))
    cluster = next(e.spec for e in load_spec(out)[1] if e.spec.kind == "cluster_kl")
    assert len(cluster.prompts) == 20 and cluster.prompts[0] == "Question number 0?"
