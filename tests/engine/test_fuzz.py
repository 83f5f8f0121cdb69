"""Fuzzing the loaders of user input: a sway.yaml, a `.dlm` document and an adapter folder each
load or are refused with the project's own error (SpecError, DlmError, AdapterError), never
with a TypeError, KeyError, yaml or pydantic error leaking out.

Inputs are mostly valid files with a few mutations (a field's type or value, a section fence,
a safetensors header), so the generators reach deep into each loader; every fuzz test counts
what was accepted and refused and requires both, so neither side goes untested. An accepted
spec must also hash (`spec_hash`), as every run does first.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sway_engine.adapters import CONFIG, WEIGHTS, read_adapter
from sway_engine.dlm import DlmError, load_dlm, parse_dlm
from sway_engine.errors import AdapterError, SpecError
from sway_engine.suite import load_spec, parse_spec

# Hypothesis's caches (unicode tables, constants read from the source) go to the temp folder,
# not into the repository; `database=None` keeps it from storing examples at all.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "sway-hypothesis")
)
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def tally(counts: Counter[str], load: Callable[[], object], refusal: type[Exception]) -> None:
    """Run one load: count it accepted or refused; any other exception fails the test."""
    counts["tried"] += 1
    try:
        load()
    except refusal:
        counts["refused"] += 1
    else:
        counts["accepted"] += 1


def report(loader: str, counts: Counter[str]) -> None:
    print(
        f"\nfuzz {loader}: {counts['tried']} tried, "
        f"{counts['accepted']} accepted, {counts['refused']} refused"
    )
    assert counts["accepted"] > 0 and counts["refused"] > 0, (loader, counts)


# ---- values a mutation writes into a structured input ----

TEMPLATES = [
    "{message}",
    "User: {message}\nAssistant:",
    "{message.upper}",
    "{message[x]}",
    "{message[0]}",
    "{message!z}",
    "{message:%}",
    "{}",
    "{tools}\n{prompt}",
    "{tools.x}{prompt}",
    "{tools[a]}{prompt}",
    "{tools[0]}{prompt}",
]
ODD_STRINGS = [
    "",
    " ",
    "~",
    "~nobody-here/x",
    "./a\x00b",
    "~\x00",
    "../doc.dlm",
    "/",
    "2020-13-01",
    "hf",
    "object",
    "null",
    "\ufeff",
    "x" * 300,
]
# Format-string pieces, for templates: fields with attributes and keys, positional, stray braces.
PIECES = ["{message}", "{tools}", "{prompt}", "{message.x}", "{message[x]}", "{tools[a]}"]
PIECES += ["{prompt.x}", "{0}", "{}", "{", "}", "{message!z}", "x"]
NUMBERS = [0, -1, 1, 2, 3, 4, 8, 64, 65, 10**20, 10**400, -(10**400), 0.5, 1.5, 1e-300, 1e300]
NUMBERS += [float("nan"), float("inf"), float("-inf")]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**3), 10**3),
    st.sampled_from(NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(TEMPLATES + ODD_STRINGS),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.none(), st.integers()), inner, max_size=4
        ),
    ),
    max_leaves=8,
)


def similar(value: Any, depth: int = 3) -> st.SearchStrategy[Any]:
    """A value of the same shape as `value`: what a user gets slightly wrong. `depth` bounds
    the descent: a list that holds itself (a "cycle" edit) would otherwise never end."""
    if depth == 0:
        return VALUES
    if isinstance(value, str):
        templates = st.lists(st.sampled_from(PIECES), max_size=4).map("".join)
        edited = st.sampled_from(PIECES).map(value.__add__)  # a template with one more field
        return st.sampled_from(ODD_STRINGS) | templates | edited | edited
    if isinstance(value, int | float) and not isinstance(value, bool):
        return st.sampled_from(NUMBERS)
    if isinstance(value, list) and value:
        return st.lists(similar(value[0], depth - 1) | st.sampled_from(value), max_size=4)
    if isinstance(value, dict) and value:
        return st.dictionaries(st.sampled_from(list(value)), VALUES, max_size=len(value))
    return VALUES


def paths_of(
    tree: Any, prefix: tuple[Any, ...] = (), above: frozenset[int] = frozenset()
) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists (the root is `()`); a container
    that holds itself is entered once."""
    out = [prefix]
    if id(tree) in above or not isinstance(tree, dict | list):
        return out
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        out += paths_of(v, (*prefix, k), above | {id(tree)})
    return out


def mutate(tree: Any, data: st.DataObject, rounds: int, fixed: tuple[str, ...] = ()) -> Any:
    """`rounds` random edits of a JSON-like tree: replace, delete, add, rename or make a
    container hold itself (what a YAML alias can do). Keys in `fixed` are left alone; the
    whole tree is replaced one time in ten."""
    tree = copy.deepcopy(tree)
    for _ in range(rounds):
        paths = [p for p in paths_of(tree)[1:] if p[-1] not in fixed]
        whole = not paths or data.draw(st.integers(0, 9)) == 0
        path = () if whole else data.draw(st.sampled_from(paths))
        if not path:
            tree = data.draw(VALUES)
            continue
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        op = data.draw(st.sampled_from(["replace"] * 4 + ["delete", "add", "rename", "cycle"]))
        if op == "replace":
            parent[key] = data.draw(similar(parent[key]) | VALUES)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["extra", "name", "kind", None, 3]))] = data.draw(
                VALUES
            )
        elif op == "add":
            parent.insert(key, data.draw(VALUES))
        elif op == "rename" and isinstance(parent, dict):
            parent[f"{key}_"] = parent.pop(key)
        elif op == "cycle" and isinstance(parent[key], dict | list):
            node = parent[key]
            if isinstance(node, dict):
                node["properties"] = {"p": node}
            else:
                node.append(node)
    return tree


# ---- sway.yaml ----

ENTRIES: list[dict[str, Any]] = [
    {"name": "nulls", "kind": "null_adapter", "runs": 8, "init_scale": 0.02},
    {"name": "dk", "kind": "delta_kl", "prompts": ["What is Tamsk?"], "top_k": 16},
    {"name": "ab", "kind": "adapter_ablation", "prompts": ["x"], "lambdas": [0, 0.5, 1]},
    {"name": "mt", "kind": "multi_turn_coherence_decay", "turn_template": "U: {message}\nA:"},
    {
        "name": "tu",
        "kind": "tool_use_fidelity",
        "prompt_template": "{tools}\n{prompt}",
        "cases": [
            {
                "prompt": "Weather in Oslo?",
                "tool_spec": {
                    "name": "weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            }
        ],
    },
    {
        "name": "pi",
        "kind": "paraphrase_invariance",
        "cases": [{"prompt": "Q: where?", "gold": " here", "paraphrases": ["Where, then?"]}],
    },
    {
        "name": "cd",
        "kind": "calibration_drift",
        "items": [["p", " g"], {"prompt": "p", "gold": "g"}],
    },
    {"name": "pc", "kind": "prompt_collapse", "context_lengths": [0, 256], "prompts": ["x"]},
    {"name": "ck", "kind": "cluster_kl", "k": 3},
    {"name": "si", "kind": "section_internalization", "threshold": 0.1},
    {
        "name": "pf",
        "kind": "preference_flip",
        "triples": [{"prompt": "p", "chosen": "c", "rejected": "r"}],
    },
    {
        "name": "ar",
        "kind": "adapter_revert",
        "cases": [{"prompt": "p", "gold": "g", "paraphrases": ["q"]}],
    },
    {"name": "sf", "kind": "style_fingerprint", "max_new_tokens": 32},
    {"name": "lk", "kind": "leakage", "prefix_chars": 64},
    {"name": "ep", "kind": "external_perplexity", "max_chunks": 2},
    {"name": "gg", "kind": "gradient_ghost", "adapter_path": "./adapter"},
    {"name": "td", "kind": "training_drift"},
]


def base_spec(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": 1,
        "dlm_source": "doc.dlm",
        "models": {
            "base": {"kind": "hf", "base": "m", "dtype": "fp32"},
            "ft": {"kind": "hf", "base": "m", "adapter": "./adapter", "fallback": ["mlx"]},
        },
        "defaults": {
            "seed": 0,
            "alpha": 0.01,
            "score_weights": {"adherence": 0.5},
            "null": {"mode": "matched", "seeds": 8, "rank_multipliers": [1.0]},
        },
        "suite": entries,
    }


# Raw YAML written over one line of a dumped spec: tags PyYAML cannot build, deep nesting,
# aliases, tabs, duplicate keys.
YAML_TOKENS = [
    "2020-13-01",
    "2021-02-30 10:00:00",
    "!!bool maybe",
    "!!int ''",
    "!!int 0b2",
    "!!float x",
    "!!float ''",
    "!!binary '!'",
    "!!timestamp x",
    "!!set [1]",
    "!!python/object:os.system x",
    "&a [*a]",
    "*nowhere",
    "[" * 400 + "]" * 400,
    "{a: 1, a: 2}",
    "\t1",
    "'unclosed",
    "? [1]\n  : x",
]


ROUNDS = st.sampled_from([0, 0, 1, 2])


@st.composite
def spec_trees(draw: st.DrawFn) -> Any:
    """A valid spec with each probe entry mutated on its own, then the whole spec."""
    data = draw(st.data())
    entries = draw(st.lists(st.sampled_from(ENTRIES), min_size=1, max_size=3, unique_by=str))
    entries = [mutate(entry, data, draw(ROUNDS), fixed=("name", "kind")) for entry in entries]
    return mutate(base_spec(entries), data, draw(ROUNDS))


@st.composite
def spec_texts(draw: st.DrawFn) -> bytes:
    """A dumped spec tree, then (sometimes) a YAML token over one line or random bytes."""
    text = yaml.safe_dump(draw(spec_trees()), allow_unicode=True)
    how = draw(st.sampled_from(["as dumped", "as dumped", "token", "bytes"]))
    if how == "token":
        lines = text.splitlines()
        i = draw(st.integers(0, len(lines) - 1))
        head = lines[i].split(":", 1)[0]
        lines[i] = f"{head}: {draw(st.sampled_from(YAML_TOKENS))}"
        text = "\n".join(lines)
    raw = text.encode()
    if how == "bytes":
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=8)) + raw[cut:]
    return raw


SPEC_COUNTS: Counter[str] = Counter()


@settings(FUZZ, max_examples=2000)
@given(tree=spec_trees(), base_dir=st.sampled_from([None, Path("/tmp")]))
def fuzz_parse_spec(tree: Any, base_dir: Path | None) -> None:
    tally(SPEC_COUNTS, lambda: parse_spec(tree, base_dir=base_dir)[0].spec_hash(), SpecError)


@settings(FUZZ, max_examples=800)
@given(raw=spec_texts())
def fuzz_load_spec(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sway.yaml"
        path.write_bytes(raw)
        tally(SPEC_COUNTS, lambda: load_spec(path)[0].spec_hash(), SpecError)


def test_spec_loader_accepts_or_refuses_with_spec_error() -> None:
    SPEC_COUNTS.clear()
    fuzz_parse_spec()
    fuzz_load_spec()
    report("spec (parse_spec + load_spec)", SPEC_COUNTS)


# ---- .dlm documents ----

FENCES = [
    "::instruction::",
    "::preference::",
    "::instruction#style::",
    "::preference#a.b-c_1::",
    "::instruction",
    ":: instruction ::",
    "::prose::",
    "::instruction#::",
    "::preference#a b::",
    "  ::instruction::  ",
    "```",
    "```python",
]
HEADERS = [
    "### Q",
    "### A",
    "### Q !probe",
    "### Prompt",
    "### Chosen",
    "### Rejected",
    "###",
    "### ",
    "#### Q",
    "### X",
]
FRONT = [
    "dlm_id: 01HZ",
    "base_model: hf:org/model",
    "a: 2020-13-01",
    "b: !!bool maybe",
    "c: !!int ''",
    "[1",
    "- x",
    "just text",
    "&a [*a]",
    "d: " + "[" * 400 + "]" * 400,
    "e: &x {k: *x}",
    "---",
    "",
]


@st.composite
def dlm_texts(draw: st.DrawFn) -> str:
    """A valid document (front matter, prose, Q/A and preference sections), then line edits."""
    lines = ["---", "dlm_id: 01HZ", "base_model: hf:org/model", "---", "# Title", "", "Prose."]
    for kind in draw(st.lists(st.sampled_from(["instruction", "preference"]), max_size=3)):
        lines += ["", f"::{kind}::"]
        groups = (["Q", "A"],) if kind == "instruction" else (["Prompt", "Chosen", "Rejected"],)
        for _ in range(draw(st.integers(1, 2))):
            for header in groups[0]:
                lines += [f"### {header}", draw(st.sampled_from(["body", "two words", "```"]))]
            lines.append("")
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(lines)))
        pool = st.sampled_from(
            draw(st.sampled_from([FENCES, HEADERS, FRONT, ["", "stray text", "\r", "\ufeff"]]))
        )
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        if op == "insert" or i == len(lines):
            lines.insert(i, draw(pool | st.text(max_size=10)))
        elif op == "replace":
            lines[i] = draw(pool)
        else:
            del lines[i]
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines)


DLM_COUNTS: Counter[str] = Counter()


@settings(FUZZ, max_examples=600)
@given(text=dlm_texts(), encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
def fuzz_dlm(text: str, encoding: str) -> None:
    tally(DLM_COUNTS, lambda: parse_dlm(text, source="doc.dlm"), DlmError)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.dlm"
        path.write_bytes(text.encode(encoding, errors="replace"))
        tally(DLM_COUNTS, lambda: load_dlm(path), DlmError)


@settings(FUZZ, max_examples=300)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def fuzz_dlm_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.dlm"
        path.write_bytes(b"---\n---\n" + raw)
        tally(DLM_COUNTS, lambda: load_dlm(path), DlmError)


def test_dlm_parser_accepts_or_refuses_with_dlm_error() -> None:
    DLM_COUNTS.clear()
    fuzz_dlm()
    fuzz_dlm_bytes()
    report("dlm (parse_dlm + load_dlm)", DLM_COUNTS)


# ---- adapter folders ----

LORA_CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj"],
    "base_model_name_or_path": "m",
    "use_dora": False,
}
JSON_TOKENS = ["Infinity", "-Infinity", "NaN", "1" * 5000, "1" + "0" * 400, "[" * 100_000]
JSON_TOKENS += ["1e400", '"\\ud800"', "{}", "null"]


# safetensors dtype -> bytes per element (F4 and E8M0 are not safetensors dtypes).
DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "U8": 1, "BOOL": 1, "F8_E4M3": 1}
DTYPES |= {"F4": 1, "E8M0": 1}


def safetensors_bytes(header: dict[str, Any], payload: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + payload


@st.composite
def weights_files(draw: st.DrawFn) -> bytes:
    """A small valid safetensors file, then a mutated header, a cut or random bytes."""
    values = draw(
        st.lists(st.floats(width=32, allow_nan=True), min_size=4, max_size=4)
        | st.just([0.5, -1.0, 2.0, 0.25])
    )
    payload = struct.pack("<4f", *values)
    header: dict[str, Any] = {
        "base_model.model.layers.0.q_proj.lora_A.weight": {
            "dtype": "F32",
            "shape": [2, 2],
            "data_offsets": [0, 16],
        }
    }
    how = draw(st.sampled_from(["valid", "valid", "dtype", "dtype", "header", "cut", "random"]))
    if how == "dtype":
        dtype, size = draw(st.sampled_from(sorted(DTYPES.items())))
        payload = draw(st.binary(min_size=4 * size, max_size=4 * size))
        header = {"t": {"dtype": dtype, "shape": [2, 2], "data_offsets": [0, 4 * size]}}
    if how == "header":
        header = mutate(header, draw(st.data()), draw(st.integers(1, 2)))
        try:
            return safetensors_bytes(header, payload)
        except ValueError:  # a cycle: json cannot write it
            how = "valid"
            header = {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    raw = safetensors_bytes(header, payload)
    if how == "cut":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "random":
        return draw(st.binary(max_size=40))
    return raw


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["json"] * 6 + ["token", "token", "bytes"]))
    if how == "bytes":
        return draw(st.binary(max_size=40))
    cfg = mutate(LORA_CONFIG, draw(st.data()), draw(st.sampled_from([0, 0, 1, 2])))
    try:
        text = json.dumps(cfg)
    except ValueError:  # a cycle: json cannot write it
        text = json.dumps(LORA_CONFIG)
    if how == "token":  # a raw JSON token for r (4) or lora_alpha (8)
        text = text.replace(draw(st.sampled_from("48")), draw(st.sampled_from(JSON_TOKENS)), 1)
    return text.encode()


def place(path: Path, what: str, content: bytes) -> None:
    """Put a file, a directory, a symlink loop or nothing at `path`."""
    if what == "file":
        path.write_bytes(content)
    elif what == "directory":
        path.mkdir()
    elif what == "symlink loop":
        os.symlink(path, path)


ADAPTER_COUNTS: Counter[str] = Counter()
PLACES = st.sampled_from(["file"] * 12 + ["missing", "directory", "symlink loop"])


@settings(FUZZ, max_examples=1200)
@given(
    folder=st.sampled_from(["directory"] * 12 + ["missing", "file", "symlink loop"]),
    config=config_files(),
    config_as=PLACES,
    weights=weights_files(),
    weights_as=PLACES,
    pickle=st.booleans(),
    check_finite=st.sampled_from([True, True, False]),
    torch=st.booleans(),
)
def fuzz_read_adapter(
    folder: str,
    config: bytes,
    config_as: str,
    weights: bytes,
    weights_as: str,
    pickle: bool,
    check_finite: bool,
    torch: bool,
) -> None:
    """`torch` False: read as an install without torch does (safetensors' numpy loader)."""
    hidden = {} if torch else {"safetensors.torch": None}
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(sys.modules, hidden):
        path = Path(tmp) / "adapter"
        place(path, folder, b"")
        if folder == "directory":
            place(path / CONFIG, config_as, config)
            place(path / WEIGHTS, weights_as, weights)
            if pickle:
                (path / "adapter_model.bin").write_bytes(b"\x80\x04.")
        tally(ADAPTER_COUNTS, lambda: read_adapter(path, check_finite=check_finite), AdapterError)


def test_read_adapter_accepts_or_refuses_with_adapter_error() -> None:
    ADAPTER_COUNTS.clear()
    fuzz_read_adapter()
    report("adapter (read_adapter)", ADAPTER_COUNTS)


# ---- what the fuzzing found, as plain regression tests ----


def adapter_folder(root: Path, config: bytes) -> Path:
    """An adapter folder with `config` and one valid 2x2 float32 tensor."""
    path = root / "adapter"
    path.mkdir()
    (path / CONFIG).write_bytes(config)
    header = {"t.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    (path / WEIGHTS).write_bytes(safetensors_bytes(header, struct.pack("<4f", 1, 2, 3, 4)))
    return path


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b'{"r": Infinity}', "r must be a positive whole number, got inf"),  # OverflowError
        (b'{"r": NaN}', "r must be a positive whole number, got nan"),  # ValueError
        (b'{"r": 4, "lora_alpha": 1' + b"0" * 400 + b"}", "lora_alpha must be a finite number"),
        (b'{"r": 1' + b"0" * 400 + b"}", "lora_alpha must be a finite number"),  # alpha = r
        (b'{"r": ' + b"1" * 5000 + b"}", "is not valid JSON: Exceeds the limit"),  # ValueError
        (b"[" * 100_000, "is not valid JSON: maximum recursion depth"),  # RecursionError
    ],
)
def test_config_values_python_cannot_convert_are_adapter_errors(
    tmp_path: Path, config: bytes, message: str
) -> None:
    """float(10**400), int(inf), int(nan) and json.loads raised past the AdapterError."""
    with pytest.raises(AdapterError, match=message):
        read_adapter(adapter_folder(tmp_path, config))


def test_a_whole_float_rank_still_reads_as_an_int(tmp_path: Path) -> None:
    info = read_adapter(adapter_folder(tmp_path, b'{"r": 4.0, "target_modules": "q_proj"}'))
    assert (info.rank, info.alpha, info.target_modules) == (4, 4.0, ("q_proj",))


def test_unresolvable_adapter_paths_are_adapter_errors(tmp_path: Path) -> None:
    """Path.resolve raised RuntimeError on a symlink loop and ValueError on a NUL byte."""
    loop = tmp_path / "adapter"
    os.symlink(loop, loop)
    with pytest.raises(AdapterError, match="cannot be resolved"):
        read_adapter(loop)
    with pytest.raises(AdapterError, match="cannot be resolved"):
        read_adapter(tmp_path / "adapter\x00")


def test_bf16_weights_without_torch_are_an_adapter_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors' numpy loader raised TypeError: data type 'bfloat16' not understood."""
    path = adapter_folder(tmp_path, b'{"r": 4}')
    header = {"t": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}
    (path / WEIGHTS).write_bytes(safetensors_bytes(header, bytes(8)))
    assert read_adapter(path).num_tensors == 1  # torch reads bf16
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(AdapterError, match="install torch"):
        read_adapter(path)
