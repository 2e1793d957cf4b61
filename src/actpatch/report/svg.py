"""Static SVG renderings of the report's figures, written without a browser or network."""

from __future__ import annotations

from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

if TYPE_CHECKING:  # pragma: no cover
    from ..agreement import Agreement
    from ..compare import Comparison
    from ..results import PatchResult

from .figures import BLUE_HEX, RED_HEX, ROLE_COLOURS, grid
from .scale import Scale

__all__ = ["heatmap_svg", "scatter_svg", "agreement_svg"]


def heatmap_svg(res: "PatchResult", title: str, metric: str | None = None) -> str:
    """An SVG heatmap of normalised effects with row and column labels, on the scale centred on
    the result's no-effect value (:class:`~actpatch.report.scale.Scale`), its legend underneath."""
    import html as _html

    values, rows, cols, rdim, cdim = grid(res, metric)
    scale = Scale.of(values, res.info.direction.no_effect)
    rows = [_html.unescape(r) for r in rows]
    cols = [_html.unescape(c) for c in cols]
    cell, left, top = 22, 110, 40
    legend = scale.describe()
    width = max(left + cell * len(cols) + 20, left + 8 * len(title), 16 + 6 * len(legend))  # room for title, legend
    height = top + cell * len(rows) + 130
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="10">',
           f'<text x="{left}" y="20" font-size="13">{escape(title)}</text>']
    for i, r in enumerate(rows):
        y = top + i * cell
        out.append(f'<text x="{left - 4}" y="{y + 15}" text-anchor="end">{escape(r)}</text>')
        for j in range(len(cols)):
            v = float(values[i, j])
            out.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" fill="{scale.hex(v)}">'
                       f'<title>{escape(r)} / {escape(cols[j])}: {v:+.3f}</title></rect>')
    yb = top + len(rows) * cell + 6
    for j, c in enumerate(cols):
        x = left + j * cell + 15
        out.append(f'<text x="{x}" y="{yb}" transform="rotate(60 {x} {yb})">{escape(c)}</text>')
    out.append(f'<text x="8" y="{top - 6}">{escape(rdim)}</text>')
    out.append(f'<text x="8" y="{height - 8}">{escape(legend)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def scatter_svg(cmp: "Comparison", title: str) -> str:
    """An SVG scatter of sufficiency against necessity, coloured by role."""
    data = cmp.scatter_data()
    size, pad = 360, 50
    xs, ys = data["x"], data["y"]
    lo = min([0.0, *xs, *ys]) - 0.05
    hi = max([1.0, *xs, *ys]) + 0.05
    sx = lambda v: pad + (v - lo) / (hi - lo) * size  # noqa: E731
    sy = lambda v: pad + size - (v - lo) / (hi - lo) * size  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 2 * pad}" height="{size + 2 * pad}" font-family="sans-serif" font-size="11">',
           f'<text x="{pad}" y="20" font-size="13">{escape(title)}</text>',
           f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="none" stroke="#999"/>',
           f'<line x1="{sx(cmp.sufficient_threshold)}" y1="{pad}" x2="{sx(cmp.sufficient_threshold)}" y2="{pad + size}" stroke="#bbb" stroke-dasharray="3"/>',
           f'<line x1="{pad}" y1="{sy(cmp.necessary_threshold)}" x2="{pad + size}" y2="{sy(cmp.necessary_threshold)}" stroke="#bbb" stroke-dasharray="3"/>',
           f'<text x="{pad + size / 2}" y="{pad + size + 30}" text-anchor="middle">sufficiency (denoising)</text>',
           f'<text x="15" y="{pad + size / 2}" transform="rotate(-90 15 {pad + size / 2})" text-anchor="middle">necessity (noising damage)</text>']
    for x, y, label, role in zip(xs, ys, data["label"], data["role"]):
        if x == x and y == y:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{ROLE_COLOURS[role]}"><title>{escape(label)}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)


def agreement_svg(a: "Agreement", title: str) -> str:
    """An SVG scatter of an estimate against exact patching (raw units), misranked points in red."""
    e, x = (a.estimate * a.scale).tolist(), (a.exact * a.scale).tolist()
    size, pad = 360, 50
    lim = max([abs(v) for v in e + x] + [1e-9]) * 1.05
    sx = lambda v: pad + (v + lim) / (2 * lim) * size  # noqa: E731
    sy = lambda v: pad + size - (v + lim) / (2 * lim) * size  # noqa: E731
    missed = {m.label for m in a.misranked}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 2 * pad}" height="{size + 2 * pad}" font-family="sans-serif" font-size="11">',
           f'<text x="{pad}" y="20" font-size="13">{escape(title)}</text>',
           f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="none" stroke="#999"/>',
           f'<line x1="{sx(-lim)}" y1="{sy(-lim)}" x2="{sx(lim)}" y2="{sy(lim)}" stroke="#bbb" stroke-dasharray="3"/>',
           f'<text x="{pad + size / 2}" y="{pad + size + 30}" text-anchor="middle">exact effect (raw units)</text>',
           f'<text x="15" y="{pad + size / 2}" transform="rotate(-90 15 {pad + size / 2})" text-anchor="middle">estimate (raw units)</text>']
    for xv, ev, label in zip(x, e, a.labels):
        if xv == xv and ev == ev:
            colour = RED_HEX if label in missed else BLUE_HEX
            out.append(f'<circle cx="{sx(xv):.1f}" cy="{sy(ev):.1f}" r="3.5" fill="{colour}"><title>{escape(label)}: '
                       f'exact {xv:+.3f}, estimate {ev:+.3f}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)
