"""The HTML report: one self-contained page (inline CSS, plots as base64 PNG, no script and no
external resource) that leads with the gate's verdict, then a card per probe and the null
calibration behind the verdicts. Every text from a suite or a model (names, prompts, messages)
is escaped: prompts are user data."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from sway_engine.report import format as fmt
from sway_engine.report.plots import ablation_plot, layer_plot, null_plot
from sway_engine.result import ProbeResult, SuiteResult, Verdict, json_safe
from sway_engine.score import blocker, claim_of

MAX_ROWS = 20  # per-prompt rows shown per probe; the JSON result has them all
MAX_CELL = 400  # characters shown of one cell (a long prompt or completion)


@dataclass(frozen=True)
class Gate:
    """The gate decision the page leads with, and why."""

    passed: bool
    reason: str


def recorded_gate(result: SuiteResult, passed: bool | None) -> Gate:
    """The gate of a stored evaluation: its recorded decision, with the reason rebuilt from the
    verdicts (the store keeps the decision, not the suite's threshold or its wording)."""
    blocked: dict[str, list[str]] = {}
    for r in result.probes:
        if (why := blocker(r)) is not None:
            blocked.setdefault(why, []).append(r.name)
    overall = fmt.num(result.score.overall, 2)
    if passed is None:
        passed = not blocked
    if passed:
        return Gate(True, f"overall {overall}, no FAIL or ERROR")
    if not blocked:
        return Gate(False, f"overall {overall} below the suite's threshold")
    order = ("errored", "failed", "uncalibrated")
    return Gate(False, "; ".join(f"{w}: {', '.join(blocked[w])}" for w in order if w in blocked))


def page_path(folder: Path, adapter_id: str, run_id: str) -> Path:
    """Where an evaluation's page lives in a reports folder: `<adapter>/<run>.html`, one file
    per run, so a later run never overwrites an earlier run's page."""
    return folder / _file_name(adapter_id) / f"{_file_name(run_id)}.html"


def write_page(folder: Path, adapter_id: str, run_id: str, result: SuiteResult, gate: Gate) -> Path:
    """Write the evaluation's page to its `page_path`; the path."""
    path = page_path(folder, adapter_id, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_html(result, gate), encoding="utf-8")
    return path


def to_html(result: SuiteResult, gate: Gate) -> str:
    """The whole page."""
    s = result.score
    counts = {v: sum(p.verdict == v for p in result.probes) for v in Verdict}
    tally = ", ".join(f"{n} {v.value}" for v, n in counts.items() if n)
    verdict = "Gate passed" if gate.passed else "Gate FAILED"
    banner = (
        f'<section class="banner {"pass" if gate.passed else "fail"}" id="verdict">'
        f'<div><div class="verdict">{verdict}</div><div class="reason">{_e(gate.reason)}</div>'
        f'<div class="tally">{_e(tally)}</div></div>'
        f'<div class="overall">{fmt.num(s.overall, 2)}<small>overall &middot; '
        f"{_e(s.band)}</small></div></section>"
    )
    cards = "".join(_card(i, p) for i, p in enumerate(result.probes, 1))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sway report: {_e(result.adapter or result.base_model)}</title>
<style>{CSS}</style></head>
<body><main>
<header><h1>sway report</h1><p class="sub">{_e(result.adapter or "(base only)")}</p></header>
{banner}
{_meta(result)}
<h2>Probes</h2>
<section class="panel">{_summary(result.probes)}</section>
<div class="columns">
<section class="panel"><h2>Components</h2>{_components(result)}</section>
<section class="panel"><h2>Findings</h2>{_findings(s.findings)}</section>
</div>
<h2>Calibration</h2>
<section class="panel" id="calibration">{_calibration(result.probes)}</section>
{cards}
<footer>sway {_e(result.sway_version)} &middot; {_e(result.backend_kind)} backend &middot;
{_e(_work(result))} &middot; one self-contained file: no script, nothing fetched</footer>
</main></body></html>
"""


def _meta(result: SuiteResult) -> str:
    fields = [
        ("base model", result.base_model),
        ("adapter", result.adapter),
        ("suite", result.spec_path),
        ("spec hash", result.spec_hash),
        ("started", result.started_at),
        ("finished", result.finished_at),
        ("wall", fmt.seconds(result.wall_s)),
    ]
    rows = "".join(
        f"<div><dt>{name}</dt><dd><code>{_e(value)}</code></dd></div>"
        for name, value in fields
        if value
    )
    return f'<dl class="meta panel">{rows}</dl>'


def _summary(probes: Sequence[ProbeResult]) -> str:
    head = "".join(
        f'<th class="{"num" if c not in ("probe", "kind", "verdict") else ""}">{c}</th>'
        for c in ("probe", "kind", "verdict", "score", "raw", "z", "p", "q")
    )
    rows = "".join(
        f'<tr><td><a href="#probe-{i}">{_e(p.name)}</a></td><td>{_e(p.kind)}</td>'
        f"<td>{_pill(p.verdict)}</td><td class=num>{fmt.num(p.score, 2)}</td>"
        f"<td class=num>{fmt.num(p.raw, 4)}</td><td class=num>{fmt.zfmt(p.z)}</td>"
        f"<td class=num>{fmt.pval(p.p)}</td><td class=num>{fmt.pval(_q(p))}</td></tr>"
        for i, p in enumerate(probes, 1)
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def _components(result: SuiteResult) -> str:
    s = result.score
    rows = []
    for category, value in s.components.items():
        width = max(0.0, min(1.0, value)) * 100 if math.isfinite(value) else 0.0
        weight = s.weights.get(category)
        note = " (informational)" if weight == 0 else ""
        rows.append(
            f"<tr><td>{_e(category)}{note}</td><td class=num>{fmt.num(value, 2)}</td>"
            f'<td><span class="bar"><span style="width:{width:.0f}%"></span></span></td>'
            f"<td class=num>{fmt.num(weight, 2)}</td></tr>"
        )
    head = '<tr><th>category</th><th class="num">score</th><th></th><th class="num">weight</th>'
    return f"<table>{head}</tr>{''.join(rows)}</table>"


def _findings(findings: Sequence[str]) -> str:
    if not findings:
        return '<p class="note">none</p>'
    return "<ol>" + "".join(f"<li>{_e(f)}</li>" for f in findings) + "</ol>"


def _calibration(probes: Sequence[ProbeResult]) -> str:
    """Null mode and count, which probes the nulls calibrated (and why not the others), and
    the multiplicity correction the effect claims went through."""
    null = next((p for p in probes if p.kind == "null_adapter" and p.evidence), None)
    parts = []
    if null is None:
        parts.append(
            "<p>This evaluation has no null calibration (no <code>null_adapter</code> entry, or "
            "its backend lacks null views): no probe was judged against random adapters.</p>"
        )
    else:
        ev = null.evidence
        seeds, ranks = list(ev.get("seeds", [])), list(ev.get("rank_multipliers", [1.0]))
        per_rank = f" &times; {len(ranks)} rank multipliers ({_e(ranks)})" if len(ranks) > 1 else ""
        parts.append(
            f"<p>Null mode <b>{_e(ev.get('mode', '?'))}</b>: "
            f"<b>{len(seeds) * len(ranks)}</b> random adapters ({len(seeds)} seeds{per_rank}), "
            "each measured on the probes' own inputs, paired with the adapter.</p>"
        )
        for name, reason in ev.get("skipped", []):
            parts.append(f'<p class="warn">{_e(name)}: null calibration skipped: {_e(reason)}</p>')
    groups: dict[str, list[str]] = {}
    for p in probes:
        if p.kind == "null_adapter":
            continue
        if p.evidence.get("uncalibrated"):
            groups.setdefault("uncalibrated", []).append(
                f"{_e(p.name)} <span class=note>({_e(p.evidence['uncalibrated'])})</span>"
            )
        elif claim_of(p.kind) == "none":
            groups.setdefault("not calibrated by design", []).append(_e(p.name))
        elif p.verdict in (Verdict.SKIP, Verdict.ERROR):
            groups.setdefault("not run", []).append(f"{_e(p.name)} ({p.verdict.value})")
        elif p.null is not None:
            groups.setdefault("calibrated", []).append(f"{_e(p.name)} ({p.null.n} nulls)")
        else:
            groups.setdefault("uncalibrated", []).append(_e(p.name))
    rows = "".join(
        f"<tr><th>{label}</th><td class=num>{len(groups.get(label, []))}</td>"
        f"<td>{', '.join(groups.get(label, [])) or '&mdash;'}</td></tr>"
        for label in ("calibrated", "uncalibrated", "not calibrated by design", "not run")
    )
    parts.append(f'<table class="groups">{rows}</table>')
    family = max((int(p.evidence.get("family", 0)) for p in probes), default=0)
    alphas = sorted({float(a) for p in probes if (a := _alpha(p)) is not None})
    if family:
        levels = ", ".join(f"{a:g}" for a in alphas) or "the suite's"
        parts.append(
            f"<p>Benjamini&ndash;Hochberg over the suite's <b>{family}</b> calibrated effect "
            f"claim(s): a PASS needs its adjusted p (<i>q</i>) within alpha ({levels}), and "
            "one that is not becomes FAIL. Guard rails keep their own alpha (a false harm alarm "
            "errs on the user's side). The gate is an AND of verdicts and needs no further "
            "correction.</p>"
        )
    else:
        parts.append("<p>No calibrated effect claim: no multiplicity correction applied.</p>")
    return "".join(parts)


def _card(i: int, p: ProbeResult) -> str:
    stats = [
        ("raw", fmt.num(p.raw, 4)),
        ("z", fmt.zfmt(p.z)),
        ("p", fmt.pval(p.p)),
        ("q (BH)", fmt.pval(_q(p))),
        ("score", fmt.num(p.score, 2)),
        ("95% CI", fmt.ci(p.ci_95)),
    ]
    if p.null is not None:
        spread = f"{fmt.num(p.null.mean, 4)} ± {fmt.num(p.null.std, 4)}"
        stats.append((f"null ({p.null.n})", spread))
    if (alpha := _alpha(p)) is not None:
        scale = p.evidence.get("significance", {}).get("scale", "")
        stats.append(("alpha", f"{alpha:g}" + (f", {scale} scale" if scale else "")))
    cells = "".join(
        f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in stats if v != fmt.DASH
    )
    warn = ""
    if p.evidence.get("uncalibrated"):
        warn = f'<p class="warn">uncalibrated: {_e(p.evidence["uncalibrated"])}</p>'
    return (
        f'<section class="card" id="probe-{i}"><header><h3>{_e(p.name)}</h3>'
        f'<span class="kind">{_e(p.kind)} &middot; {_e(p.category)}</span>{_pill(p.verdict)}'
        f"</header><p class=message>{_e(p.message)}</p>{warn}"
        f'<dl class="stats">{cells}</dl>{_figures(p)}{_items(p.items, p.kind != "null_adapter")}'
        f"{_evidence(p)}</section>"
    )


def _figures(p: ProbeResult) -> str:
    n = p.null.n if p.null is not None else 0
    scale = p.evidence.get("significance", {}).get("scale", "linear")
    figures = []
    curve = ablation_plot(p)
    if curve is not None:
        if n:
            log = " (a log y axis, so D(0) = 0 is not drawn)" if scale == "log" else ""
            caption = (
                "The adapter's mean divergence D(&lambda;) as its update is scaled by &lambda;. "
                "The nulls' whole curves are not kept, only their D(1): the grey dots at "
                f"&lambda; = 1 are the {n} nulls' D(1), the grey bar their mean &plusmn; 2 std "
                f"on the {_e(scale)} scale the probe is calibrated on{log}."
            )
        else:
            caption = "The adapter's mean divergence D(&lambda;); no null calibration to show."
        figures.append(_figure(curve, f"{p.name} ablation curve", caption))
    layers = layer_plot(p)
    if layers is not None:
        caption = (
            f"{_e(p.evidence.get('per_layer_label', 'per layer'))}, layer by layer (red); the "
            "grey band is the nulls' mean &plusmn; 2 std of the probe's raw over all layers."
        )
        figures.append(_figure(layers, f"{p.name} per layer", caption))
    histogram = null_plot(p)
    if histogram is not None:
        caption = (
            f"The null distribution: the raw of each of the {n} null adapters on the same "
            f"inputs (grey) and the adapter's raw, {fmt.num(p.raw, 4)} (red line)."
        )
        figures.append(_figure(histogram, f"{p.name} null distribution", caption))
    if not figures and n and p.null is not None and p.null.samples:
        return '<p class="note">Plots need matplotlib (<code>pip install matplotlib</code>).</p>'
    return f'<div class="figures">{"".join(figures)}</div>' if figures else ""


def _figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _items(items: Sequence[dict[str, Any]], unfolded: bool) -> str:
    """The per-prompt rows, the first MAX_ROWS of them (folded away unless `unfolded`)."""
    if not items:
        return ""
    shown = items[:MAX_ROWS]
    columns = list(dict.fromkeys(k for row in shown for k in row))
    numeric = {c for c in columns if all(_is_number(row.get(c)) for row in shown)}
    head = "".join(f'<th class="{"num" if c in numeric else ""}">{_e(c)}</th>' for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in shown)
    more = ""
    if len(items) > MAX_ROWS:
        more = (
            f'<p class="more">{len(items) - MAX_ROWS} more rows not shown (of {len(items)}); '
            "the JSON result (<code>--json</code>) has them all.</p>"
        )
    return (
        f'<details class="items"{" open" if unfolded else ""}>'
        f"<summary>rows ({len(items)})</summary>"
        f"<table><tr>{head}</tr>{body}</table>{more}</details>"
    )


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _cell(value: Any) -> str:
    if value is None:
        return f"<td class=num>{fmt.DASH}</td>"
    if isinstance(value, bool):
        return f"<td>{value}</td>"
    if isinstance(value, int):
        return f"<td class=num>{value}</td>"
    if isinstance(value, float):
        return f"<td class=num>{f'{value:.4g}' if math.isfinite(value) else fmt.DASH}</td>"
    text = value if isinstance(value, str) else json.dumps(json_safe(value), default=str)
    if len(text) > MAX_CELL:
        text = text[:MAX_CELL] + f"… ({len(text) - MAX_CELL} more characters)"
    return f'<td class="text">{_e(text)}</td>'


def _evidence(p: ProbeResult) -> str:
    if not p.evidence:
        return ""
    text = json.dumps(json_safe(p.evidence), indent=1, sort_keys=True, default=str)
    return f"<details><summary>evidence</summary><pre>{_e(text)}</pre></details>"


def _pill(verdict: Verdict) -> str:
    return f'<span class="pill {verdict.value}">{verdict.value.upper()}</span>'


def _q(p: ProbeResult) -> float | None:
    q = p.evidence.get("q")
    return float(q) if isinstance(q, int | float) else None


def _alpha(p: ProbeResult) -> float | None:
    alpha = p.evidence.get("significance", {}).get("alpha")
    return float(alpha) if isinstance(alpha, int | float) else None


def _work(result: SuiteResult) -> str:
    st = result.backend_stats
    passes = int(st.get("forward_passes", 0))
    return f"{passes:,} forward passes, wall {fmt.seconds(result.wall_s)}"


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _file_name(name: str) -> str:
    """`name` as one path component; a name that had to change gets a short hash of the
    original, so two names never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
    if safe == name:
        return safe
    return f"{safe[:120]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


CSS = """
:root{--pass:#1a7f37;--fail:#cf222e;--warn:#9a6700;--error:#8250df;--skip:#6e7781;
--line:#d0d7de;--muted:#57606a;--soft:#f6f8fa}
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:#1f2328;background:var(--soft);margin:0}
main{max-width:76rem;margin:0 auto;padding:1.5rem 1.5rem 0}
h1{font-size:1.5rem;margin:0}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
.panel h2,.panel>p:first-child{margin-top:0}
.sub{margin:.1rem 0 1rem;color:var(--muted);word-break:break-all}
.banner{border-radius:10px;padding:1rem 1.4rem;color:#fff;display:flex;gap:1.5rem;
align-items:center;flex-wrap:wrap}
.banner.pass{background:var(--pass)}.banner.fail{background:var(--fail)}
.banner .verdict{font-size:1.7rem;font-weight:700;letter-spacing:.01em}
.banner .reason{font-size:1rem;word-break:break-word}.banner .tally{opacity:.85;font-size:.85rem}
.banner .overall{font-size:2rem;font-weight:700;margin-left:auto;text-align:right;
line-height:1.1}
.banner .overall small{display:block;font-size:.8rem;font-weight:400;opacity:.9}
.panel,.card{background:#fff;border:1px solid var(--line);border-radius:10px;
padding:1rem 1.25rem;margin:1rem 0}
.columns{display:grid;grid-template-columns:repeat(auto-fit,minmax(22rem,1fr));gap:0 1rem}
.meta{display:grid;grid-template-columns:repeat(auto-fill,minmax(16rem,1fr));gap:.4rem 1rem}
dt{font-size:.7rem;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
dd{margin:0;word-break:break-all}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid var(--line);padding:.3rem .5rem;text-align:left;
vertical-align:top}
th{font-weight:600;color:var(--muted);font-size:.75rem;text-transform:uppercase;
letter-spacing:.03em}
.num{font-variant-numeric:tabular-nums;text-align:right;white-space:nowrap}
.groups th{width:14rem;text-transform:none;font-size:.85rem;color:#1f2328}
a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
.pill{display:inline-block;border-radius:999px;padding:.05rem .65rem;font-size:.72rem;
font-weight:700;color:#fff;letter-spacing:.04em}
.pill.pass{background:var(--pass)}.pill.fail{background:var(--fail)}
.pill.warn{background:var(--warn)}.pill.error{background:var(--error)}
.pill.skip{background:var(--skip)}
.card header{display:flex;gap:.75rem;align-items:center;flex-wrap:wrap}
.card h3{margin:0;font-size:1.1rem}.kind{color:var(--muted);font-size:.85rem}
.card header .pill{margin-left:auto}.message{margin:.5rem 0}
.warn{color:var(--warn);font-weight:600}.note{color:var(--muted)}
.stats{display:grid;grid-template-columns:repeat(auto-fill,minmax(8.5rem,1fr));gap:.5rem;
margin:.75rem 0}
.stats div{background:var(--soft);border-radius:6px;padding:.3rem .6rem}
.stats dd{font-weight:600;font-variant-numeric:tabular-nums;word-break:normal}
.figures{display:flex;flex-wrap:wrap;gap:1rem;margin:.5rem 0}
figure{margin:0;max-width:30rem}figure img{max-width:100%;height:auto;display:block;
border:1px solid var(--line);border-radius:6px;background:#fff}
figcaption{font-size:.8rem;color:var(--muted);margin-top:.3rem}
details{margin:.6rem 0}summary{cursor:pointer;color:var(--muted);font-weight:600}
.items td{font-size:.85rem}.items td.text{white-space:pre-wrap;word-break:break-word}
.more{color:var(--muted);font-size:.85rem;margin:.4rem 0}
details pre{white-space:pre-wrap;word-break:break-word;font-size:.75rem;
background:var(--soft);padding:.6rem;border-radius:6px;max-height:22rem;overflow:auto}
.bar{background:#eaeef2;border-radius:4px;height:.55rem;width:9rem;display:inline-block;
vertical-align:middle}.bar span{display:block;height:100%;border-radius:4px;
background:#0969da}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85em}
footer{color:var(--muted);font-size:.8rem;margin:2rem 0;padding-bottom:1.5rem}
"""
