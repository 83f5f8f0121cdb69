"""Terminal (rich), Markdown, JSON and JUnit renderings of one suite result."""

from __future__ import annotations

import json
import sys
from typing import Any
from xml.etree import ElementTree as ET

from sway_engine.report import format as fmt
from sway_engine.result import SuiteResult, Verdict

VERDICT_STYLE = {
    Verdict.PASS: "green",
    Verdict.FAIL: "red",
    Verdict.WARN: "yellow",
    Verdict.SKIP: "dim",
    Verdict.ERROR: "magenta",
}


def to_json(result: SuiteResult) -> str:
    return json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str)


def print_terminal(result: SuiteResult, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    s = result.score
    console.rule(f"sway report — {result.base_model} vs {result.adapter or '(base only)'}")
    console.print(f"overall: [bold]{s.overall:.2f}[/bold] [{s.band}]")
    for cat, value in s.components.items():
        bar = "█" * round(10 * value) + "░" * (10 - round(10 * value))
        note = " (informational, weight=0)" if s.weights.get(cat, 0) == 0 else ""
        console.print(f"  {cat:<12} {value:.2f} {bar}{note}")
    table = Table(show_lines=False)
    for col in ("name", "kind", "verdict", "score", "raw", "ci95", "z", "p", "note"):
        table.add_column(col, overflow="fold")
    for p in result.probes:
        style = VERDICT_STYLE[p.verdict]
        table.add_row(
            p.name,
            p.kind,
            f"[{style}]{p.verdict.value}[/{style}]",
            fmt.num(p.score, 2),
            fmt.num(p.raw, 4),
            fmt.ci(p.ci_95),
            fmt.zfmt(p.z),
            fmt.pval(p.p),
            p.message,
        )
    console.print(table)
    for i, f in enumerate(s.findings, 1):
        console.print(f"  {i}. {f}")
    st = result.backend_stats
    console.print(
        f"[dim]wall {fmt.seconds(result.wall_s)} | sway {result.sway_version} | "
        f"forward passes {int(st.get('forward_passes', 0))} | tokens "
        f"{int(st.get('tokens_forwarded', 0))} | cache hits {int(st.get('cache_hits', 0))}"
        f"/{int(st.get('requests', 0))}[/dim]"
    )


def to_markdown(result: SuiteResult) -> str:
    s = result.score
    lines = [
        "# sway report",
        "",
        f"**Overall:** {s.overall:.2f} ({s.band})  ",
        f"**Base:** `{result.base_model}`  ",
        f"**Adapter:** `{result.adapter}`  ",
        f"**Wall:** {fmt.seconds(result.wall_s)}  ",
        f"**Spec hash:** `{result.spec_hash}`",
        "",
        "## Components",
        "",
        "| category | score | weight |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {v:.2f} | {s.weights.get(c, 0):.2f} |" for c, v in s.components.items()]
    lines += [
        "",
        "## Probes",
        "",
        "| name | kind | verdict | score | raw | ci95 | z | p | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result.probes:
        note = p.message.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {p.name} | {p.kind} | {p.verdict.value} | {fmt.num(p.score, 2)} | "
            f"{fmt.num(p.raw, 4)} | {fmt.ci(p.ci_95)} | {fmt.zfmt(p.z)} | "
            f"{fmt.pval(p.p)} | {note} |"
        )
    if s.findings:
        lines += ["", "## Top findings", ""] + [f"{i}. {f}" for i, f in enumerate(s.findings, 1)]
    return "\n".join(lines) + "\n"


def to_junit(result: SuiteResult) -> str:
    counts = {v: sum(p.verdict == v for p in result.probes) for v in Verdict}
    suite = ET.Element(
        "testsuite",
        name="sway",
        tests=str(len(result.probes)),
        failures=str(counts[Verdict.FAIL]),
        errors=str(counts[Verdict.ERROR]),
        skipped=str(counts[Verdict.SKIP]),
        time=f"{result.wall_s:.3f}",
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="overall", value=f"{result.score.overall:.4f}")
    ET.SubElement(props, "property", name="band", value=result.score.band)
    for p in result.probes:
        case = ET.SubElement(
            suite, "testcase", classname=p.kind, name=p.name, time=f"{p.duration_s:.3f}"
        )
        tag = {Verdict.FAIL: "failure", Verdict.ERROR: "error", Verdict.SKIP: "skipped"}.get(
            p.verdict
        )
        if tag:
            ET.SubElement(case, tag, message=p.message)
    return ET.tostring(suite, encoding="unicode")
