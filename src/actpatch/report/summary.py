"""Compact summaries of results: the top cells with labels and intervals, as data, as HTML (the
notebook's ``_repr_html_``) and as rich renderables that fit a terminal of any width (the CLI).
One source for all three, so a notebook, a terminal and a report say the same thing."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

from ..stats import Cell, top_cells


if TYPE_CHECKING:  # pragma: no cover
    from rich.console import RenderableType

    from ..compare import Comparison
    from ..findings import Finding
    from ..results import PatchResult

__all__ = ["Cell", "top_cells", "result_html", "comparison_html", "findings_html", "result_renderables",
           "block_heatmap"]


def _fmt(x: float | None) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:+.3f}"


def findings_html(findings: list["Finding"]) -> str:
    """A list of findings, each in its one HTML form (:meth:`Finding.to_html`)."""
    return "".join(f.to_html() for f in findings) if findings else "<p>No findings.</p>"


def result_html(res: "PatchResult", k: int = 8) -> str:
    """A compact HTML summary: what was run, baselines, the top cells with 95% CIs, findings."""
    info = res.info
    dims = " x ".join(f"{d} {len(res.coords[d])}" for d in res.dims) or "one patch"
    head = (f"<b>PatchResult</b>: {html.escape(info.target)}, {info.direction.value}, {html.escape(info.label)}; "
            f"{dims}; {res.n_prompts} prompts; model {html.escape(info.provenance.model)}")
    base = "".join(f"<tr><td>{html.escape(m)}</td><td>{b['clean']:+.3f}</td><td>{b['corrupted']:+.3f}</td></tr>"
                   for m, b in res.baselines.items())
    cells = "".join(f"<tr><td>{html.escape(c.label)}</td><td>{_fmt(c.value)}</td><td>"
                    + (f"[{_fmt(c.low)}, {_fmt(c.high)}]" if c.low is not None else "") + "</td></tr>"
                    for c in top_cells(res, k))
    style = "border-collapse:collapse;margin:4px 0"
    return (f"<div class='actpatch-result'><p>{head}</p>"
            f"<table style='{style}'><tr><th>metric</th><th>clean</th><th>corrupted</th></tr>{base}</table>"
            f"<p>Top cells ({res.metric}, normalised: 1 = clean, 0 = corrupted):</p>"
            f"<table style='{style}'><tr><th>cell</th><th>value</th><th>95% CI</th></tr>{cells}</table>"
            f"{findings_html(res.findings)}</div>")


def comparison_html(cmp: "Comparison", k: int = 8) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(' '.join(f'{d}={r[d]}' for d in cmp.dims))}</td><td>{r.sufficiency:+.3f}</td>"
        f"<td>{r.necessity:+.3f}</td><td>{html.escape(r.role)}</td></tr>"
        for _, r in cmp.strongest(k).iterrows())
    counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in cmp.counts().items())
    return (f"<div class='actpatch-comparison'><p><b>Comparison</b> ({html.escape(cmp.metric)}): {counts}</p>"
            f"<p><small>{html.escape(cmp.thresholds)}</small></p>"
            f"<table><tr><th>component</th><th>sufficiency</th><th>necessity</th><th>role</th></tr>{rows}</table></div>")


# -- terminal ----------------------------------------------------------------------------------

_SIGNS = ((0.15, "·", "·"), (0.5, "+", "-"), (1.01, "▲", "▼"))
"""Characters for |position| below each bound: (bound, above no effect, below no effect)."""


def _sign_char(p: float) -> str:
    if math.isnan(p):
        return " "
    for bound, up, down in _SIGNS:
        if abs(p) < bound:
            return up if p >= 0 else down
    return "▲" if p >= 0 else "▼"


def block_heatmap(res: "PatchResult", width: int, metric: str | None = None,
                  colour: str | None = "truecolor") -> "RenderableType | None":
    """A heatmap, one character per cell (rows: first dim, columns: second), when it fits
    ``width``; None otherwise. Its scale is centred on the result's no-effect value
    (:class:`~actpatch.report.scale.Scale`). ``colour`` is the terminal's colour system (rich's
    ``Console.color_system``): with 256 colours or truecolor each cell is a block shaded along
    the scale; with only the standard 8/16 colours, shades would mislead, so each cell is a
    signed character (▲ + · - ▼) whose legend gives the values it stands for."""
    from rich.text import Text

    from .figures import grid
    from .scale import Scale

    values, rows, cols, rdim, cdim = grid(res, metric)
    label_w = max((len(html.unescape(str(r))) for r in rows), default=1)
    if values.shape[1] + label_w + 2 > width or values.shape[0] > 64:
        return None
    scale = Scale.of(values, res.info.direction.no_effect)
    shaded = colour in ("256", "truecolor")
    text = Text()
    text.append(f"{rdim or ''} \\ {cdim or ''}  (one {'block' if shaded else 'character'} per cell)\n", style="dim")
    for i, r in enumerate(rows):
        text.append(f"{html.unescape(str(r)):>{label_w}} ")
        for j in range(values.shape[1]):
            v = float(values[i, j])
            if shaded:
                rgb = scale.rgb(v)
                text.append("█" if rgb else "?", style="rgb({},{},{})".format(*rgb) if rgb else "dim")
            else:
                p = scale.position(v)
                text.append(_sign_char(p), style="" if math.isnan(p) or abs(p) < 0.15 else
                            ("blue" if p > 0 else "red"))
        text.append("\n")
    ticks = [" "] * values.shape[1]
    for j in range(0, values.shape[1], 5):  # a column index every 5 cells, where it fits
        label = str(j)
        if all(c == " " for c in ticks[max(0, j - 1):j + len(label)]) and j + len(label) <= len(ticks):
            ticks[j:j + len(label)] = list(label)
    text.append(" " * (label_w + 1) + "".join(ticks).rstrip() + f"  ({cdim or 'column'} index)\n", style="dim")
    if shaded:
        text.append(scale.describe() + "; ? = missing\n", style="dim")
    else:
        c, s_ = scale.centre, scale.span
        text.append(f"▲ above {c + 0.5 * s_:+.2f}, + above {c + 0.15 * s_:+.2f}, · within "
                    f"{0.15 * s_:.2f} of {c:g} (no effect), - below {c - 0.15 * s_:+.2f}, "
                    f"▼ below {c - 0.5 * s_:+.2f}; blank = missing\n", style="dim")
    return text


def result_renderables(res: "PatchResult", width: int, k: int = 10, title: str | None = None,
                       colour: str | None = "truecolor") -> list["RenderableType"]:
    """What the CLI prints for a result: a heatmap when the terminal has colour (``colour``: rich's
    ``Console.color_system``, None for none) and it fits, then the top cells with labels and 95%
    CIs in a table that wraps instead of cutting."""
    from rich.table import Table

    from rich.text import Text

    out: list[RenderableType] = []
    heading = title or f"{res.info.target} {res.info.direction.value}: top {k} cells ({res.metric})"
    heat = block_heatmap(res, width, colour=colour) if colour else None
    if heat is not None:  # the title first, then its heatmap and table
        out.append(Text(heading, style="bold"))
        out.append(heat)
    table = Table(title=None if heat is not None else heading, title_justify="left", expand=False)
    table.add_column("cell", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("95% CI", justify="right", no_wrap=True)
    for c in top_cells(res, k):
        ci = f"[{_fmt(c.low)}, {_fmt(c.high)}]" if c.low is not None else ""
        table.add_row(c.label, _fmt(c.value), ci)
    out.append(table)
    return out
