"""tool_use_fidelity: does the adapter still emit correct tool calls where the base did?

Each case's prompt is rendered with its tool schema in OpenAI function-calling shape (a JSON
list of {"type": "function", "function": {name, description, parameters}}), so the model is
shown the tool it is asked to call (upstream never showed it). Greedy generation per view;
the output is parsed as a JSON object (whole text, a ``` fence, or the first balanced {...}),
unwrapping OpenAI's {"function": {...}} / {"tool_calls": [...]} envelopes and string-encoded
arguments. A call is valid when `name` is a string, `arguments` an object holding every
required key and every declared key has its declared JSON type; correct when also its name is
allowed (`allowed_tools`, else the case's `gold_tool_name`).

raw = correct-call rate(T) - correct-call rate(base), in [-1, 1], higher is better, z-scored
against the null adapters' raw on the same cases. A guard rail (one-sided, see guard_rail.py):
FAIL only when significantly worse than the nulls and beyond tolerance (validity drop below
`assert_validity_delta_gte`, or hallucinated names above `assert_hallucination_lte` more than
the base). A model too small to call tools (the 1.3M fixture) gives 0 everywhere: PASS, "no harm".

Without `cases` the probe checks a built-in pack of eight everyday tools (data/tool_cases.json:
web search, file read, Python, shell, HTTP fetch, SQL, calendar, calculator), written for this
project; upstream SKIPped. `pack: none` restores the SKIP.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from sway_engine.backends.base import GENERATE
from sway_engine.errors import ProbeSkip
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec, Prompt
from sway_engine.probes.common.guard_rail import guard_rail, harm_score
from sway_engine.probes.common.templates import check_template
from sway_engine.requests import Generate, GenerationResult
from sway_engine.result import NullStats
from sway_engine.spec import STRICT
from sway_engine.views import BASE, View

DEFAULT_TEMPLATE = (
    "You can call the following tools. They are given as a JSON list in OpenAI "
    "function-calling format:\n{tools}\n"
    'To call a tool, reply with only a JSON object {{"name": <tool name>, "arguments": '
    "{{<argument>: <value>}}}}.\n\n{prompt}\n"
)
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


class ToolSpec(BaseModel):
    """One function in OpenAI shape; `parameters` is a JSON Schema object."""

    model_config = STRICT
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type", "object") != "object":
            raise ValueError("parameters must be a JSON Schema with type 'object'")
        props = v.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError("parameters.properties must be a mapping of name -> schema")
        for key, schema in props.items():
            kind = schema.get("type") if isinstance(schema, dict) else None
            if kind is not None and (not isinstance(kind, str) or kind not in JSON_TYPES):
                raise ValueError(
                    f"property {key!r}: type must be one of {sorted(JSON_TYPES)}, got {kind!r}"
                )
        required = v.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("parameters.required must be a list of property names")
        return v

    def openai(self) -> dict[str, Any]:
        body = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": body}


class ToolCase(BaseModel):
    model_config = STRICT
    prompt: Prompt
    # One tool (upstream) or several offered together; the first is the one the case expects.
    tool_spec: ToolSpec | tuple[ToolSpec, ...]
    gold_tool_name: str | None = None
    max_new_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _gold_known(self) -> ToolCase:
        names = [t.name for t in self.tools]
        if not names:
            raise ValueError("tool_spec lists no tool")
        if self.gold_tool_name is not None and self.gold_tool_name not in names:
            raise ValueError(f"gold_tool_name {self.gold_tool_name!r} is not one of {names}")
        return self

    @property
    def tools(self) -> tuple[ToolSpec, ...]:
        return self.tool_spec if isinstance(self.tool_spec, tuple) else (self.tool_spec,)

    @property
    def gold(self) -> str:
        return self.gold_tool_name or self.tools[0].name


class ToolUseSpec(ProbeSpec):
    kind: Literal["tool_use_fidelity"] = "tool_use_fidelity"
    cases: tuple[ToolCase, ...] = ()
    pack: Literal["builtin", "none"] = "builtin"  # what runs when `cases` is empty
    allowed_tools: tuple[str, ...] | None = None
    assert_validity_delta_gte: float = Field(-0.05, ge=-1, le=0)
    assert_hallucination_lte: float = Field(0.10, ge=0, le=1)
    assert_z_gte: float = Field(3.0, gt=0)
    # How a case is shown to the model: {tools} (the JSON list) and {prompt} are filled in.
    prompt_template: str = DEFAULT_TEMPLATE

    @field_validator("prompt_template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        return check_template("prompt_template", v, ("tools", "prompt"))


def render(spec: ToolUseSpec, case: ToolCase) -> str:
    tools = json.dumps([t.openai() for t in case.tools], indent=None, ensure_ascii=False)
    return spec.prompt_template.format(tools=tools, prompt=case.prompt)


# ---- parsing and checking a call ----


def extract_json(text: str) -> Any:
    """The whole text as JSON, else a ``` fence's body, else the first balanced {...}."""
    stripped = text.strip()
    for candidate in (stripped, _fence_body(stripped), _first_object(stripped)):
        if candidate:
            try:
                return json.loads(candidate)
            except json.JSONDecodeError:
                continue
    return None


def _fence_body(text: str) -> str | None:
    start = text.find("```")
    if start < 0:
        return None
    body_start = text.find("\n", start)
    end = text.find("```", start + 3)
    if body_start < 0 or end < 0 or end < body_start:
        return None
    return text[body_start + 1 : end].strip()


def _first_object(text: str) -> str | None:
    """The first balanced {...} substring; braces inside string literals do not count."""
    start = text.find("{")
    while start >= 0:
        depth, in_str, escape = 0, False, False
        for i in range(start, len(text)):
            c = text[i]
            if in_str:
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)
    return None


def parse_call(text: str) -> dict[str, Any] | None:
    """{name, arguments} from a model's output, or None when no call object is found."""
    obj = extract_json(text)
    if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list) and obj["tool_calls"]:
        obj = obj["tool_calls"][0]
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    if not isinstance(obj, dict) or "name" not in obj:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return {"name": obj["name"], "arguments": args}
    return {"name": obj["name"], "arguments": args}


def schema_problem(call: dict[str, Any] | None, tools: Sequence[ToolSpec]) -> str | None:
    """Why a call is invalid against the schema of the tool it names, or None when valid."""
    if call is None:
        return "no JSON tool call"
    name, args = call["name"], call["arguments"]
    if not isinstance(name, str):
        return "name is not a string"
    if not isinstance(args, dict):
        return "arguments is not an object"
    tool = next((t for t in tools if t.name == name), None)
    if tool is None:
        return None  # schema unknown: only the shape is checked; the name is judged separately
    props = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", []) if k not in args]
    if missing:
        return f"missing required {missing}"
    for key, value in args.items():
        kind = props.get(key, {}).get("type") if isinstance(props.get(key), dict) else None
        if kind is None:
            continue
        ok = isinstance(value, JSON_TYPES[kind])
        if kind in ("integer", "number") and isinstance(value, bool):
            ok = False
        if not ok:
            return f"argument {key!r} is not of type {kind}"
    return None


def leaf_paths(value: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dicts walked to their leaves; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in value.items():
            out.update(leaf_paths(v, (*path, str(k))))
        return out
    return {path: value}


_ABSENT = object()


def disagreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Fraction of the union of leaf paths whose values differ (absent differs from null)."""
    la, lb = leaf_paths(a), leaf_paths(b)
    union = set(la) | set(lb)
    if not union:
        return 0.0
    return sum(la.get(p, _ABSENT) != lb.get(p, _ABSENT) for p in union) / len(union)


PACK_FILE = "tool_cases.json"


@functools.cache
def builtin_cases() -> tuple[ToolCase, ...]:
    """The packaged tool cases, validated."""
    ref = resources.files("sway_engine.probes").joinpath("data", PACK_FILE)
    return tuple(ToolCase.model_validate(c) for c in json.loads(ref.read_text(encoding="utf-8")))


def cases_of(spec: ToolUseSpec) -> tuple[ToolCase, ...]:
    """The spec's cases, else the built-in pack (unless `pack: none`); SKIP without either."""
    if spec.cases:
        return spec.cases
    if spec.pack == "builtin":
        return builtin_cases()
    raise ProbeSkip(spec.name, "no cases: give tool_use_fidelity `cases`, or drop `pack: none`")


# ---- the probe ----


class ToolUseFidelity(Probe):
    kind = "tool_use_fidelity"
    category = "attribution"
    spec_cls = ToolUseSpec
    needs = frozenset({GENERATE})
    claim = "harm"

    def measure(
        self, spec: ToolUseSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        cases = cases_of(spec)
        prompts = [render(spec, c) for c in cases]
        views = [BASE, *treatments]
        reqs = [
            Generate(p, v, c.max_new_tokens)
            for v in views
            for p, c in zip(prompts, cases, strict=True)
        ]
        texts = [r.text if isinstance(r, GenerationResult) else "" for r in ctx.execute(reqs)]
        n = len(cases)
        base = [_grade(spec, c, t) for c, t in zip(cases, texts[:n], strict=True)]
        out = []
        for k in range(1, len(views)):
            rows = texts[k * n : (k + 1) * n]
            treated = [_grade(spec, c, t) for c, t in zip(cases, rows, strict=True)]
            out.append(_measurement(cases, base, treated, rows))
        return out

    def judge(self, spec: ToolUseSpec, m: Measurement, null: NullStats | None) -> Judgement:
        ev = m.evidence
        validity_delta = float(ev["valid_rate"]) - float(ev["valid_rate_base"])
        excess_halluc = float(ev["hallucination"]) - float(ev["hallucination_base"])
        within = (
            validity_delta >= spec.assert_validity_delta_gte
            and excess_halluc <= spec.assert_hallucination_lte
        )
        ratio = max(
            max(0.0, -validity_delta) / max(-spec.assert_validity_delta_gte, 1e-9),
            max(0.0, excess_halluc) / max(spec.assert_hallucination_lte, 1e-9),
        )
        summary = (
            f"correct calls {ev['correct_rate_base']:.0%} -> {ev['correct_rate']:.0%} "
            f"(delta {m.raw:+.2f}); valid {ev['valid_rate_base']:.0%} -> {ev['valid_rate']:.0%} "
            f"(min delta {spec.assert_validity_delta_gte:+g}); hallucinated names "
            f"{ev['hallucination']:.0%} vs base {ev['hallucination_base']:.0%} "
            f"(max excess {spec.assert_hallucination_lte:g})"
        )
        return guard_rail(
            harm=self.significance(spec, m, null, harm=True),
            null=null,
            within_tolerance=within,
            fixed_score=harm_score(ratio),
            summary=summary,
            unit="correct-call rate delta",
        )


Grade = tuple[dict[str, Any] | None, str | None, bool]  # call, schema problem, allowed name


def _grade(spec: ToolUseSpec, case: ToolCase, text: str) -> Grade:
    call = parse_call(text)
    problem = schema_problem(call, case.tools)
    allowed = spec.allowed_tools if spec.allowed_tools is not None else (case.gold,)
    return call, problem, call is not None and call["name"] in allowed


def _rates(grades: Sequence[Grade]) -> tuple[np.ndarray, np.ndarray, float]:
    valid = np.asarray([problem is None for _, problem, _ in grades])
    correct = np.asarray([problem is None and ok for _, problem, ok in grades])
    halluc = [not ok for _, problem, ok in grades if problem is None]
    return valid, correct, float(np.mean(halluc)) if halluc else 0.0


def _measurement(
    cases: Sequence[ToolCase], base: Sequence[Grade], treated: Sequence[Grade], texts: Sequence[str]
) -> Measurement:
    valid_b, correct_b, halluc_b = _rates(base)
    valid, correct, halluc = _rates(treated)
    both = [
        disagreement(b[0]["arguments"], t[0]["arguments"])
        for b, t in zip(base, treated, strict=True)
        if b[1] is None and t[1] is None and b[0] is not None and t[0] is not None
    ]
    rows = tuple(
        {
            "prompt": case.prompt,
            "gold_tool": case.gold,
            "output": text,
            "call": t[0],
            "valid": t[1] is None,
            "problem": t[1],
            "correct": bool(c),
            "correct_base": bool(cb),
        }
        for case, text, t, c, cb in zip(cases, texts, treated, correct, correct_b, strict=True)
    )
    delta = correct.astype(float) - correct_b.astype(float)
    return Measurement(
        raw=float(delta.mean()),
        values=tuple(float(d) for d in delta),
        items=rows,
        evidence={
            "cases": len(cases),
            "correct_rate": float(correct.mean()),
            "correct_rate_base": float(correct_b.mean()),
            "valid_rate": float(valid.mean()),
            "valid_rate_base": float(valid_b.mean()),
            "hallucination": halluc,
            "hallucination_base": halluc_b,
            "arg_disagreement": float(np.mean(both)) if both else None,
        },
    )
