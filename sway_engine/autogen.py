"""`sway autogen`: a calibrated sway.yaml built from a `.dlm` document's sections.

Every probe the document supports gets an entry, null_adapter first and adapter_ablation last
(the most expensive). Prompts are held out where the document marks them (`### Q !probe`);
training answers are never used as prompts. Probes the document cannot feed are listed in a
`# skipped:` header with the reason. The result is validated with the spec loader before it
is written, so a field the probes do not know fails here, not at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from sway_engine import __version__
from sway_engine.dlm import Document, load_dlm
from sway_engine.errors import ProbeSkip, SpecError, SwayError
from sway_engine.probes.common.document_inputs import paraphrase_cases, prose_prompts, questions
from sway_engine.suite import parse_spec

KL_PROMPTS = 16
MIN_KL_PROMPTS = 8
ABLATION_PROMPTS = 6
MULTI_TURN_PROMPTS = 4  # each dialogue generates every turn under every view
CLUSTER_MIN_PROMPTS = 20
LOSS_LOGS = ("logs/train-*.jsonl", "train-*.jsonl", "trainer_state.json")
TRAINING_STATE = "training_state.pt"


class AutogenError(SwayError):
    """The document cannot become a suite (no sections, no base model, no adapter)."""


@dataclass(frozen=True)
class Options:
    document: Path
    output: Path
    base: str | None = None
    adapter: str | None = None
    kind: str = "hf"
    # How a question becomes a prompt; `{question}` is replaced (e.g. "Q: {question}\nA:").
    prompt_template: str = "{question}"
    force: bool = False
    # Null draws per probe (`runs` of the null_adapter entry); None: defaults.null.seeds.
    null_runs: int | None = None


@dataclass
class Plan:
    """Suite entries with a one-line intent each, and the kinds left out with why."""

    entries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, intent: str, entry: dict[str, Any]) -> None:
        self.entries.append((intent, entry))

    def skip(self, kind: str, reason: str) -> None:
        self.skipped.append((kind, reason))


def write_suite(opts: Options) -> Path:
    """Build the suite for `opts.document`, validate it, write it to `opts.output`."""
    if opts.output.exists() and not opts.force:
        raise AutogenError(f"{opts.output} exists; pass --force to overwrite it")
    text = render(opts)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.output.with_name(opts.output.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, opts.output)
    return opts.output


def render(opts: Options) -> str:
    """The YAML text (header comments, one intent comment per entry), already validated."""
    try:
        opts.prompt_template.format(question="")
    except (AttributeError, LookupError, TypeError, ValueError) as exc:
        raise AutogenError(
            f"--prompt-template {opts.prompt_template!r}: only {{question}} may appear in braces"
        ) from exc
    if "{question}" not in opts.prompt_template:
        raise AutogenError(f"--prompt-template {opts.prompt_template!r} lacks {{question}}")
    doc = load_dlm(opts.document)
    if not doc.sections:
        raise AutogenError(
            f"{opts.document} has no sections (only front matter): add prose, ::instruction:: "
            "or ::preference:: content to build a suite from"
        )
    out_dir = opts.output.resolve().parent
    base = resolve_base(opts, doc)
    adapter = resolve_adapter(opts, doc)
    models = {
        "base": {"kind": opts.kind, "base": _portable(base, out_dir)},
        "ft": {
            "kind": opts.kind,
            "base": _portable(base, out_dir),
            "adapter": _portable(adapter, out_dir),
        },
    }
    plan = plan_suite(doc, Path(adapter), opts.prompt_template, opts.null_runs)
    data = {
        "version": 1,
        "dlm_source": _portable(str(opts.document), out_dir),
        "models": models,
        "defaults": {"seed": 0, "differential": True},
        "suite": [entry for _, entry in plan.entries],
    }
    try:
        parse_spec(data, source=str(opts.output), base_dir=out_dir)
    except SpecError as exc:  # a probe renamed a field: say so rather than write a bad file
        raise AutogenError(f"generated suite does not validate (sway bug): {exc}") from exc
    return _yaml(data, plan, opts, doc, base, adapter)


def resolve_base(opts: Options, doc: Document) -> str:
    """--base, else the front matter's base_model (`hf:` prefix stripped, or a local path)."""
    if opts.base:
        return opts.base
    key = doc.front_matter.get("base_model")
    if not isinstance(key, str) or not key.strip():
        raise AutogenError(f"{opts.document}: no base_model in the front matter; pass --base")
    key = key.strip()
    if key.startswith("hf:"):
        return key[3:]
    if "/" in key or Path(key).expanduser().exists():
        return key
    raise AutogenError(
        f"{opts.document}: base_model {key!r} is a dlm registry key, which sway cannot resolve; "
        "pass --base with its Hugging Face id or a local path"
    )


def resolve_adapter(opts: Options, doc: Document) -> str:
    """--adapter, else the adapter dlm's store points at (`<store>/adapter/current.txt`)."""
    if opts.adapter:
        path = Path(opts.adapter).expanduser()
        if not path.is_dir():
            raise AutogenError(f"--adapter {opts.adapter}: not a directory")
        return str(path.resolve())
    dlm_id = doc.front_matter.get("dlm_id")
    home = Path(os.environ.get("DLM_HOME") or "~/.dlm").expanduser()
    if isinstance(dlm_id, str):
        store = home / "store" / dlm_id
        pointer = store / "adapter" / "current.txt"
        if pointer.is_file():
            path = (store / pointer.read_text(encoding="utf-8").strip()).resolve()
            if path.is_dir():
                return str(path)
    raise AutogenError(
        f"{opts.document}: no trained adapter found (looked for {home}/store/{dlm_id}/adapter/"
        "current.txt); train the document first or pass --adapter DIR"
    )


def kl_prompts(doc: Document, template: str) -> tuple[list[str], int]:
    """Held-out (`!probe`) questions first, padded with the other questions (never answers),
    else prose openings; and how many of them are held out."""
    held, rest = questions(doc, template)
    prompts = held[:KL_PROMPTS]
    if len(prompts) < MIN_KL_PROMPTS:
        prompts += rest[: KL_PROMPTS - len(prompts)]
    if not prompts:
        prompts = prose_prompts(doc)[:KL_PROMPTS]
    return prompts, min(len(held), len(prompts))


def training_files(adapter: Path) -> tuple[bool, bool]:
    """(a loss log exists, training_state.pt exists) beside the adapter."""
    logs = any(any(adapter.glob(pattern)) for pattern in LOSS_LOGS)
    versions = adapter.parent
    if not logs and versions.name == "versions" and versions.parent.name == "adapter":
        logs = any((versions.parent.parent / "logs").glob("train-*.jsonl"))
    return logs, (adapter / TRAINING_STATE).is_file()


def plan_suite(doc: Document, adapter: Path, template: str, null_runs: int | None = None) -> Plan:
    plan = Plan()
    prompts, held = kl_prompts(doc, template)
    runs = {} if null_runs is None else {"runs": null_runs}
    plan.add(
        "null adapters of the same size calibrate every z below",
        {"name": "null_baseline", "kind": "null_adapter", **runs},
    )
    if prompts:
        source = f"{held} held-out (!probe)" if held else "no held-out"
        plan.add(
            f"does the adapter move next-token distributions? {source} of {len(prompts)} prompts",
            {"name": "delta_kl_doc", "kind": "delta_kl", "prompts": prompts},
        )
    else:
        plan.skip("delta_kl", "no questions and no prose long enough for a prompt")
    cases = paraphrase_cases(doc, template)
    if cases:
        plan.add(
            "asked in the document's other words, does the adapter fall back to the base?",
            {"name": "revert_check", "kind": "adapter_revert", "cases": cases},
        )
    else:
        plan.skip("adapter_revert", "no question is asked twice with the same answer")
    if prompts:
        plan.add(
            "does the effect survive unrelated text before the prompt?",
            {"name": "prompt_collapse", "kind": "prompt_collapse", "prompts": prompts[:4]},
        )
    topics = list(
        dict.fromkeys([template.format(question=q.question) for q in doc.qa] + prose_prompts(doc))
    )
    if len(topics) >= CLUSTER_MIN_PROMPTS:
        plan.add(
            "is the effect concentrated on the document's topics?",
            {"name": "cluster_kl_topics", "kind": "cluster_kl", "prompts": topics[:64]},
        )
    else:
        plan.skip("cluster_kl", f"{len(topics)} distinct prompts, fewer than {CLUSTER_MIN_PROMPTS}")
    if len(doc.sections) >= 2:
        plan.add(
            "did each section become more likely, and which ones?",
            {"name": "section_attribution", "kind": "section_internalization"},
        )
    else:
        plan.skip("section_internalization", "needs at least 2 sections")
    if cases:
        plan.add(
            "does the lift carry over to the document's own rewordings of a question?",
            {"name": "paraphrase_invariance", "kind": "paraphrase_invariance", "cases": cases},
        )
    else:
        plan.skip(
            "paraphrase_invariance",
            "no question is asked twice with the same answer; add real paraphrases as cases",
        )
    if doc.preferences:
        plan.add(
            "do the ::preference:: triples now favour the chosen answer?",
            {"name": "preference_flip", "kind": "preference_flip"},
        )
    else:
        plan.skip("preference_flip", "no ::preference:: section")
    plan.add(
        "does free text read more like the document?",
        {"name": "style_shift", "kind": "style_fingerprint"},
    )
    plan.add(
        "guard rail: general-knowledge answers did not regress",
        {"name": "general_knowledge", "kind": "calibration_drift"},
    )
    plan.add(
        "guard rail: unrelated English prose did not get less likely",
        {"name": "external_ppl", "kind": "external_perplexity"},
    )
    plan.add(
        "guard rail: what the adapter cost the base on general prose, in nats per token",
        {"name": "forgetting", "kind": "forgetting_budget"},
    )
    leak = leakage_fields(doc)
    if leak is None:
        plan.skip("leakage", "no prose paragraph long enough to split into prefix and continuation")
    else:
        plan.add(
            "guard rail: the adapter does not recite its training prose verbatim",
            {"name": "verbatim_leak", "kind": "leakage", **leak},
        )
    logs, state = training_files(adapter)
    if logs:
        plan.add(
            "was the loss curve healthy? (reads the training log, no model)",
            {"name": "training_curve", "kind": "training_drift"},
        )
    else:
        plan.skip("training_drift", f"no loss log beside {adapter}")
    if state:
        plan.add(
            "did training run long enough for every layer? (reads training_state.pt)",
            {"name": "gradient_ghost", "kind": "gradient_ghost"},
        )
    else:
        plan.skip("gradient_ghost", f"no {TRAINING_STATE} in {adapter}")
    plan.add(
        "is the update more concentrated than a random one of its size? (weights, no forward)",
        {"name": "weight_spectrum", "kind": "weight_spectrum"},
    )
    plan.add(
        "does the update create dominant directions the base did not have? (weights only)",
        {"name": "intruder_dimensions", "kind": "intruder_dimensions"},
    )
    plan.add(
        "guard rail: tool calls still parse and name the right tool (built-in pack of "
        "8 tools; put your own under `cases`)",
        {"name": "tool_use", "kind": "tool_use_fidelity"},
    )
    if prompts:
        plan.add(
            "does the effect last as a dialogue goes on? (questions open the dialogues)",
            {
                "name": "multi_turn",
                "kind": "multi_turn_coherence_decay",
                "prompts": prompts[:MULTI_TURN_PROMPTS],
            },
        )
        plan.add(
            "does the effect scale smoothly with the adapter's strength? (most expensive)",
            {"name": "ablation", "kind": "adapter_ablation", "prompts": prompts[:ABLATION_PROMPTS]},
        )
    else:
        plan.skip("multi_turn_coherence_decay", "no questions or prose to open a dialogue")
    return plan


def leakage_fields(doc: Document) -> dict[str, Any] | None:
    """{} when the probe's defaults find windows, a shorter prefix when paragraphs are short,
    None when no paragraph can be split (asks the probe itself, so the rule stays its own)."""
    from sway_engine.probes.base import Context
    from sway_engine.probes.leakage import LeakageSpec, windows

    ctx = Context(execute=lambda _r: [], capabilities=frozenset(), document=doc)
    longest = max((len(p) for s in doc.of("prose") for p in s.paragraphs), default=0)
    for fields in ({}, {"prefix_chars": max(32, longest // 3)}):
        try:
            windows(LeakageSpec(name="leak", **fields), ctx)
        except ProbeSkip:
            continue
        return fields
    return None


def _portable(path_or_id: str, out_dir: Path) -> str:
    """A local path relative to the suite file (`./` or `../`, at most two levels up and
    never through the filesystem root), else absolute; a model id unchanged."""
    path = Path(path_or_id).expanduser()
    if not path.exists():
        return path_or_id
    target = path.resolve()
    rel = os.path.relpath(target, out_dir)
    shared = Path(os.path.commonpath([target, out_dir]))
    if Path(rel).parts[:3] == (os.pardir,) * 3 or shared == Path(shared.anchor):
        return str(target)
    return rel if rel.startswith(".") else f".{os.sep}{rel}"


def _yaml(
    data: dict[str, Any], plan: Plan, opts: Options, doc: Document, base: str, adapter: str
) -> str:
    head = [
        f"# sway suite generated by `sway autogen` from {opts.document}",
        f"# dlm_id: {doc.front_matter.get('dlm_id', '-')}",
        f"# base: {base}",
        f"# adapter: {adapter}",
        f"# generated {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} by sway {__version__}",
        "# Edit freely: every entry below is an ordinary sway.yaml probe.",
        *(f"# skipped: {kind} ({why})" for kind, why in plan.skipped),
        "",
    ]
    top = {k: v for k, v in data.items() if k != "suite"}
    body = [_dump(top).rstrip(), "suite:"]
    for intent, entry in plan.entries:
        body.append(f"  # {intent}")
        item = _dump([entry]).rstrip()
        body.append("\n".join(("  " + line).rstrip() for line in item.splitlines()))
    return "\n".join(head + body) + "\n"


class _Dumper(yaml.SafeDumper):
    """Block style; strings with a newline double-quoted on one line (`"Q: ...\\nA:"`)."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = '"' if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def _dump(value: Any) -> str:
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
