"""One self-contained HTML report (plotly.js inlined from the installed package: works offline),
plus a static SVG of every figure under ``figures/``.

Every piece of user text (prompts, tokens, findings, provenance) is escaped; figure data is
embedded as JSON with ``<``, ``>`` and ``&`` written as unicode escapes, so no prompt can close
a script tag.
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..agreement import compare_estimate, estimate_mismatch
from ..compare import Comparison, comparable, compare
from ..findings import LEVEL_COLOURS, Level
from ..types import Direction, Method
from .extras import extras_sections
from .figures import agreement_figure, comparison_figure, faithfulness_figure, mib_figure, result_figure
from .svg import agreement_svg, heatmap_svg, scatter_svg

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from ..app.extras import Extras
    from ..techniques.das import DASRecord
    from ..techniques.circuit import Faithfulness
    from ..techniques.mib import CircuitScores
    from ..techniques.self_repair import DirectTotal
    from ..results import PatchResult

__all__ = ["write_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1500px;color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;font-size:.9em}
th{background:#f5f5f5}.pair{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:12px}.pair>div{min-width:0}
.finding{padding:6px 10px;margin:6px 0;border-left:4px solid #999;background:#fafafa}
.advice{color:#555}code,pre{background:#f5f5f5;font-size:.85em}pre{padding:8px;overflow:auto}
""" + "".join(f".{level.value}{{border-color:{colour}}}" for level, colour in LEVEL_COLOURS.items()) + "\n"


def _figure_html(fig: "go.Figure", div_id: str) -> str:
    import plotly.io as pio

    fig.update_layout(modebar={"orientation": "v"})  # the toolbar down the right edge, off the title
    payload = pio.to_json(fig, validate=False)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (f'<div id="{div_id}" class="plot"></div>\n<script>(function(){{var f={payload};'
            f'Plotly.newPlot("{div_id}",f.data,f.layout,{{responsive:true,displaylogo:false}});}})();</script>')


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pairs(results: dict[str, "PatchResult"]) -> list[tuple[str, "PatchResult | None", "PatchResult | None"]]:
    """(name, denoising result, noising result) per target: each result goes where its own
    direction says; a name ending in that direction (``z_noise``) pairs with its other half."""
    names: dict[str, dict[Direction, PatchResult]] = {}
    for name, res in results.items():
        d = res.info.direction
        suffix = f"_{d.value}"
        base = name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else name
        if d in names.get(base, {}):  # two results of one direction under one name: keep both
            base = name
        names.setdefault(base, {})[d] = res
    return [(k, v.get(Direction.DENOISE), v.get(Direction.NOISE)) for k, v in names.items()]


def write_report(
    results: dict[str, "PatchResult"], out: str | Path, *, title: str = "actpatch report",
    curves: "dict[str, Faithfulness] | None" = None,
    das: "dict[str, DASRecord] | None" = None,
    mib: "dict[str, CircuitScores] | None" = None,
    direct_total: "DirectTotal | None" = None,
    extras: "Extras | None" = None,
) -> Path:
    """Write ``out/report.html`` and ``out/figures/*.svg`` for named results (``<target>_<direction>``),
    plus circuit faithfulness ``curves`` (by method name), DAS records (by job name) and a run's
    Patchscopes, interchanges and generations (``extras``, :func:`actpatch.app.extras.load_extras`) when given."""
    import plotly.offline

    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()), None)
    fig = itertools.count(1)  # figure ids, in page order
    parts: list[str] = [f"<h1>{html.escape(title)}</h1>", *(_baselines(results) if results else [])]
    pairs, comparisons = _heatmaps(results, figdir, fig)
    parts += pairs + _comparisons(comparisons, figdir, fig) + _estimates(results, figdir, fig)
    parts += _circuits(curves, mib, fig)
    parts += _subspace_sections(results, das or {})
    if direct_total is not None:
        parts += _direct_total(direct_total, fig)
    parts += extras_sections(extras)
    parts += (_findings(results) + _provenance(first)) if first is not None else []
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><script>{plotly.offline.get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _baselines(results: dict[str, "PatchResult"]) -> list[str]:
    first = next(iter(results.values()))
    rows: dict[tuple, list] = {}
    for name, res in results.items():  # results of one run share baselines: show each once
        for m, b in res.baselines.items():
            key = (m, round(b["clean"], 6), round(b["corrupted"], 6))
            rows.setdefault(key, [m, f"{b['clean']:+.4f}", f"{b['corrupted']:+.4f}", f"{b['clean'] - b['corrupted']:+.4f}", []])[4].append(name)
    table = [[*r[:4], ", ".join(r[4])] for r in rows.values()]
    return [f"<p>{first.n_prompts} prompts; model {html.escape(first.info.provenance.model)}; "
            f"corruption {html.escape(first.info.corruption.name.value)}.</p>",
            "<h2>Baselines</h2>" + _table(["metric", "clean", "corrupted", "gap", "results"], table)]


def _heatmaps(results: dict[str, "PatchResult"], figdir: Path, fig: Iterator[int]) -> tuple[list[str], list[tuple]]:
    """A heatmap per result and metric, the two directions of a target side by side; and the
    pairs that can be compared."""
    parts, comparisons = [], []
    for base, den, noi in _pairs(results):
        parts.append(f"<h2>{html.escape(base)}</h2><div class='pair'>")
        for label, res in (("denoising: sufficiency (1 = restores clean)", den), ("noising: 1 = no damage, 0 = broken", noi)):
            if res is None:
                continue
            if res.info.method is Method.ATP:
                label += f", {res.info.label} estimate"
            for metric in res.metrics:
                t = f"{base} {label} [{metric}]"
                parts.append("<div>" + _figure_html(result_figure(res, t, metric), f"fig{next(fig)}") + "</div>")
                (figdir / f"{base}_{res.info.direction.value}_{metric}.svg").write_text(heatmap_svg(res, t, metric))
        parts.append("</div>")
        for res in (den, noi):
            check = None if res is None else res.info.subspace_check
            if check is not None:
                parts.append(f"<p class='advice'>Subspace check ({html.escape(res.info.direction.value)}): "
                             f"{html.escape(check.summary())}.</p>")
        if den is not None and noi is not None and comparable(den, noi):
            comparisons.append((base, compare(den, noi), den, noi))
    return parts, comparisons


def _comparisons(comparisons: list[tuple], figdir: Path, fig: Iterator[int]) -> list[str]:
    if not comparisons:
        return []
    parts = ["<h2>Both directions compared</h2><p>Sufficiency = denoising effect; necessity = 1 - noised "
             "value (Heimersheim &amp; Nanda 2024). Dotted lines: the thresholds.</p><div class='pair'>"]
    for base, cmp, den, noi in comparisons:
        title = f"{base}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in cmp.counts().items())
        parts.append("<div>" + _figure_html(comparison_figure(cmp, title), f"fig{next(fig)}") + "</div>")
        (figdir / f"{base}_compare.svg").write_text(scatter_svg(cmp, f"{base}: sufficiency vs necessity"))
    parts.append("</div>")
    for base, cmp, den, noi in comparisons:
        parts.append(f"<h3>{html.escape(base)}: top components with 95% bootstrap CIs</h3>" + _top_table(cmp))
    return parts


def _estimates(results: dict[str, "PatchResult"], figdir: Path, fig: Iterator[int]) -> list[str]:
    """Every attribution estimate beside the exact sweep of the same target, direction and grid
    (:func:`~actpatch.agreement.compare_estimate`): scatter, rank agreement, misranked components."""
    pairs = [(en, est, xn, exact) for en, est in results.items() for xn, exact in results.items()
             if estimate_mismatch(est, exact) is None]
    if not pairs:
        return []
    parts = ["<h2>Estimates beside exact patching</h2><p>Each attribution estimate against the exact sweep of the "
             "same target and direction, every cell, in raw metric units (0 = no effect). Red: components the "
             "estimate misranks (in exact's top k but beyond the estimate's top 2k, or the reverse).</p>"
             "<div class='pair'>"]
    readings = []
    for en, est, xn, exact in pairs:
        a = compare_estimate(est, exact)
        parts.append("<div>" + _figure_html(agreement_figure(a, f"{en} vs {xn}"), f"fig{next(fig)}") + "</div>")
        (figdir / f"{en}_vs_exact.svg").write_text(agreement_svg(a, f"{en} vs {xn}"))
        readings.append((en, xn, a))
    parts.append("</div>")
    rows = [[en, xn, a.n_cells, f"{a.rank_correlation:.3f}", f"{a.top_k_recall:.0%} (k = {a.k})",
             f"{float(a.errors_raw.max()):.3g}" if len(a.labels) else "-", f"{a.largest_effect_raw:.3g}",
             "; ".join(str(m) for m in a.misranked[:6]) + (" …" if len(a.misranked) > 6 else "") or "none"]
            for en, xn, a in readings]
    parts.append(_table(["estimate", "exact", "cells", "Spearman", "exact top-k in estimate's top 2k",
                         "largest error (raw)", "largest effect (raw)", "misranked"], rows))
    return parts + [f.to_html(en) for en, _, a in readings for f in a.findings if f.level is not Level.INFO]


def _circuits(curves: "dict[str, Faithfulness] | None", mib: "dict[str, CircuitScores] | None",
              fig: Iterator[int]) -> list[str]:
    parts = []
    if curves:
        parts.append("<h2>Circuits</h2><p>Clean run with every edge outside the top-n circuit taken from the "
                     "corrupted run (1 = clean, 0 = corrupted).</p>"
                     + _figure_html(faithfulness_figure(curves), f"fig{next(fig)}"))
        rows = [[name, *(f"{v:+.3f}" for v in c.values.tolist())] for name, c in curves.items()]
        sizes = next(iter(curves.values())).sizes
        parts.append(_table(["method", *(f"{s} edges" for s in sizes)], rows))
    if mib:
        parts.append("<h2>Circuits, MIB evaluation</h2><p>Faithfulness at MIB's edge fractions (1 = full model, 0 = "
                     "every edge from the corrupted run). CPR: area under the curve of circuits chosen by signed score "
                     "(higher is better); CMD: area under |1 - f| of circuits chosen by |score| (0 is best).</p>"
                     + _figure_html(mib_figure(mib), f"fig{next(fig)}"))
        parts.append(_table(["method", "CPR", "CMD", "edges", "seconds"],
                            [[k, f"{v.cpr:.3f}", f"{v.cmd:.3f}", v.n_edges, f"{v.seconds:.1f}"] for k, v in mib.items()]))
    return parts


def _direct_total(direct_total: "DirectTotal", fig: Iterator[int]) -> list[str]:
    parts = ["<h2>Direct vs total effects</h2><p>Noising each head and MLP: its effect through the direct path "
             "to the logits only (every other component frozen) against its total effect (everything "
             "downstream recomputed). Points far above the diagonal: later components compensate "
             "(self-repair).</p>" + _figure_html(direct_total.plot(), f"fig{next(fig)}"),
             _table(["component", "direct", "total"],
                    [[name, f"{d:+.3f}", f"{t:+.3f}"] for name, d, t in direct_total.disagreements(10)])]
    return parts + [f.to_html() for f in direct_total.findings]


def _findings(results: dict[str, "PatchResult"]) -> list[str]:
    parts = ["<h2>Findings</h2>"]
    seen = set()
    for name, res in results.items():
        for f in res.findings:
            if (f.code, f.message) not in seen:
                seen.add((f.code, f.message))
                parts.append(f.to_html(name))
    return parts if seen else parts + ["<p>No findings.</p>"]


def _provenance(first: "PatchResult") -> list[str]:
    parts = []
    texts = [list(t) for t in first.info.prompt_texts]
    if texts:
        parts.append("<h2>Prompts</h2>" + _table(["clean", "corrupted", "answer", "alternative"], texts[:50]))
    info = first.info.to_dict()
    prov = {k: v for k, v in info.items() if k not in ("prompt_attributes", "diagnostics", "prompt_texts")}
    return parts + ["<h2>Provenance</h2><pre>" + html.escape(json.dumps(prov, indent=2, default=str)) + "</pre>"]


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:+.3f}" if isinstance(v, float) else html.escape(str(v))


def _subspace_sections(results: dict[str, "PatchResult"], das: "dict[str, DASRecord]") -> list[str]:
    """Subspace results next to their whole components (the illusion check's numbers), and DAS runs."""
    parts: list[str] = []
    rows = []
    for name, res in results.items():
        c = res.info.subspace_check
        if res.info.subspace is None or c is None:
            continue
        e, v = c.values, c.variation
        pct = lambda f: "-" if f is None else f"{f:.0%}"  # noqa: E731
        codes = ", ".join(f.code for f in c.findings)
        rows.append([name, f"{res.info.subspace.get('method', '?')} (k = {res.info.subspace['k']})", str(c.site),
                     c.verdict.value if c.verdict else "(saved before verdicts)", pct(c.effect_share),
                     pct(c.null_share), c.reader or "none (see the finding)", _fmt(c.row_share),
                     _fmt(v.get("subspace")), _fmt(v.get("row")), _fmt(v.get("null")), _fmt(e.get("subspace")),
                     _fmt(e.get("row")), _fmt(e.get("null")), _fmt(e.get("component")), codes])
    if rows:
        parts.append("<h2>Subspaces</h2><p>Each subspace result's strongest cell checked for the interpretability "
                     "illusion (Makelov, Lange &amp; Nanda 2023). Verdict, worst first: <i>illusion</i> (the effect "
                     "comes from a direction the model does not vary), <i>unsplit</i> (no single reader: the illusion "
                     "cannot be ruled out), <i>dormant pathway risk</i> (half or more of what the patch moves is in "
                     "the reader's null space), <i>no effect</i>, <i>partial</i> (the subspace carries under half of "
                     "the component's effect), <i>exceeds component</i> (over 1.25x of it), <i>faithful</i>. Effect share: the subspace's effect over the whole "
                     "component's; null share: the part of what the patch moves that the reader ignores. Values on "
                     "the result's scale (1 = clean, 0 = corrupted).</p>" + _table(
                         ["result", "basis", "site checked", "verdict", "effect share", "null share", "reader",
                          "read share of basis", "variation", "read part", "unread part", "value: subspace",
                          "read part", "unread part", "whole component", "findings"], rows))
    if das:
        rows = [[name, str(r.site), r.k, f"{r.test_accuracy:.2f}", _fmt(r.test_effect), r.steps,
                 f"{r.seconds:.1f}", ", ".join(f.code for f in r.findings)] for name, r in das.items()]
        parts.append("<h2>DAS</h2><p>Subspaces learned by interchange-intervention training; accuracy and effect on "
                     "the held-out pairs (bases in <code>&lt;name&gt;.safetensors</code>).</p>" + _table(
                         ["job", "site", "k", "test accuracy", "test effect", "steps", "seconds", "findings"], rows))
    return parts


def _top_table(cmp: Comparison, k: int = 15) -> str:
    """The components with the largest readings, the intervals their roles were decided on and the rule."""
    if not cmp.intervals:
        return f"<p>(one prompt: no intervals; {html.escape(cmp.thresholds)})</p>"
    rows = []
    for _, r in cmp.strongest(k).iterrows():
        zero_d = r.sufficiency_low <= 0 <= r.sufficiency_high
        rows.append([*(r[d] for d in cmp.dims), f"{r.sufficiency:+.3f}",
                     f"[{r.sufficiency_low:+.2f}, {r.sufficiency_high:+.2f}]" + (" (contains 0)" if zero_d else ""),
                     f"{r.necessity:+.3f}", f"[{r.necessity_low:+.2f}, {r.necessity_high:+.2f}]", r.role])
    return (_table([*cmp.dims, "sufficiency", f"{cmp.level:.0%} CI", "necessity", f"{cmp.level:.0%} CI", "role"], rows)
            + f"<p class='advice'>{html.escape(cmp.thresholds)}</p>")
