"""Plotly figures of results and comparisons. All user text (tokens, prompts) is HTML-escaped
before it reaches plotly, which would otherwise interpret tags in labels."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Sequence

import plotly.graph_objects as go
import torch

from .scale import BLUE, RED, Scale

RED_HEX, BLUE_HEX = "#{:02x}{:02x}{:02x}".format(*RED), "#{:02x}{:02x}{:02x}".format(*BLUE)

if TYPE_CHECKING:  # pragma: no cover
    from ..agreement import Agreement
    from ..techniques.mib import CircuitScores
    from ..techniques.circuit import Faithfulness
    from ..compare import Comparison
    from ..models.handle import Model
    from ..results import PatchResult

__all__ = ["grid", "result_figure", "comparison_figure", "faithfulness_figure", "plot_attention", "ROLE_COLOURS",
           "colour_scale", "agreement_figure"]

ROLE_COLOURS = {
    "sufficient_and_necessary": "#1b7837",
    "sufficient_not_necessary": "#2166ac",
    "necessary_not_sufficient": "#b2182b",
    "negative": "#e08214",
    "neither": "#9e9e9e",
    "uncertain": "#c2a5cf",
}


def _labels(values: list) -> list[str]:
    return [html.escape(str(v)) for v in values]


def grid(res: "PatchResult", metric: str | None = None) -> tuple[torch.Tensor, list[str], list[str], str, str]:
    """A 2-D view of a result: (values, row labels, column labels, row dim, column dim).
    1-D results become one row; extra dims beyond two are averaged (named in the title)."""
    v = res.normalised(metric)
    dims = list(res.dims)
    if v.dim() == 0:
        return v.reshape(1, 1), ["all"], ["patch"], "", ""
    if v.dim() == 1:
        return v[None], [""], _labels(res.coords[dims[0]]), "", dims[0]
    while v.dim() > 2:
        v = v.nanmean(-1)
        dims = dims[:-1]
    return v, _labels(res.coords[dims[0]]), _labels(res.coords[dims[1]]), dims[0], dims[1]


def colour_scale() -> list[list]:
    """Plotly's form of :class:`~actpatch.report.scale.Scale`'s colours (red, white, blue)."""
    return [[0.0, "rgb({},{},{})".format(*RED)], [0.5, "rgb(255,255,255)"], [1.0, "rgb({},{},{})".format(*BLUE)]]


def result_figure(res: "PatchResult", title: str | None = None, metric: str | None = None) -> go.Figure:
    """Heatmap of normalised effects, labelled by tokens, on a diverging scale whose white is the
    result's no-effect value (0 denoising, 1 noising) and whose range comes from the data
    (:class:`~actpatch.report.scale.Scale`); hover shows each cell's coordinates, value and 95%
    bootstrap CI; missing cells are left blank. The report and ``res.plot()`` use it."""
    values, rows, cols, rdim, cdim = grid(res, metric)
    scale = Scale.of(values, res.info.direction.no_effect)
    if title is None:
        title = f"{res.info.target} {res.info.direction.value} ({res.info.label}) [{metric or res.metric}]"
    lo = hi = None
    if res.n_prompts > 1 and values.numel() == res.normalised(metric).numel():
        ci = res.ci(metric, n_boot=500)
        lo, hi = ci.low.reshape(values.shape), ci.high.reshape(values.shape)
    hover = [[(f"{rdim}={rows[i]}<br>" if rdim else "") + (f"{cdim}={cols[j]}<br>" if cdim else "")
              + f"value {float(values[i, j]):+.3f}"
              + (f"<br>95% CI [{float(lo[i, j]):+.2f}, {float(hi[i, j]):+.2f}]" if lo is not None else "")
              for j in range(values.shape[1])] for i in range(values.shape[0])]
    z = [[None if math.isnan(x) else x for x in row] for row in values.tolist()]
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"{j}|{c}" for j, c in enumerate(cols)], y=[f"{i}|{r}" for i, r in enumerate(rows)],
        colorscale=colour_scale(), zmid=scale.centre, zmin=scale.low, zmax=scale.high, text=hover,
        hovertemplate="%{text}<extra></extra>",
        colorbar={"title": f"normalised<br>(white = {scale.centre:g},<br>no effect)"},
    ))
    fig.update_layout(title=html.escape(title), xaxis_title=cdim, yaxis_title=rdim, height=max(320, 18 * len(rows) + 140),
                      margin={"l": 60, "r": 20, "t": 50, "b": 80})
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=[f"{i}|{r}" for i, r in enumerate(rows)], ticktext=rows)
    fig.update_xaxes(tickmode="array", tickvals=[f"{j}|{c}" for j, c in enumerate(cols)], ticktext=cols)
    return fig


def comparison_figure(cmp: "Comparison", title: str | None = None) -> go.Figure:
    """Sufficiency (denoising) against necessity (noising damage), coloured by role, with the
    bootstrap intervals the roles were decided on as error bars."""
    data = cmp.scatter_data()
    if title is None:
        title = f"sufficiency vs necessity ({cmp.metric}): " + ", ".join(
            f"{v} {k.replace('_', ' ')}" for k, v in cmp.counts().items())
    fig = go.Figure()
    for role, colour in ROLE_COLOURS.items():
        idx = [i for i, r in enumerate(data["role"]) if r == role]
        if not idx:
            continue
        bars = {}
        if cmp.intervals:
            ends = {k: cmp_flat.tolist() for k, cmp_flat in (
                (k, getattr(cmp, k).flatten()) for k in ("sufficiency_low", "sufficiency_high", "necessity_low",
                                                         "necessity_high"))}
            bars = dict(
                error_x={"type": "data", "symmetric": False, "thickness": 1, "width": 0,
                         "array": [ends["sufficiency_high"][i] - data["x"][i] for i in idx],
                         "arrayminus": [data["x"][i] - ends["sufficiency_low"][i] for i in idx]},
                error_y={"type": "data", "symmetric": False, "thickness": 1, "width": 0,
                         "array": [ends["necessity_high"][i] - data["y"][i] for i in idx],
                         "arrayminus": [data["y"][i] - ends["necessity_low"][i] for i in idx]})
        fig.add_trace(go.Scatter(
            **bars,
            x=[data["x"][i] for i in idx], y=[data["y"][i] for i in idx], mode="markers", name=role.replace("_", " "),
            text=[html.escape(data["label"][i]) for i in idx], marker={"color": colour, "size": 8},
            hovertemplate="%{text}<br>sufficiency %{x:+.3f}<br>necessity %{y:+.3f}<extra></extra>",
        ))
    fig.add_vline(x=cmp.sufficient_threshold, line_dash="dot", line_color="#888")
    fig.add_hline(y=cmp.necessary_threshold, line_dash="dot", line_color="#888")
    fig.update_layout(title=html.escape(title), xaxis_title="sufficiency (denoising effect)",
                      yaxis_title="necessity (noising damage)", height=440, margin={"l": 60, "r": 20, "t": 50, "b": 80})
    fig.add_annotation(text=html.escape(cmp.thresholds), xref="paper", yref="paper", x=0, y=-0.2, showarrow=False,
                       font={"size": 10}, xanchor="left")
    return fig


def agreement_figure(a: "Agreement", title: str | None = None) -> go.Figure:
    """An estimate against exact patching, both in raw metric units: one labelled point per
    checked cell, the diagonal where they agree, misranked components in red."""
    e, x = (a.estimate * a.scale).tolist(), (a.exact * a.scale).tolist()
    lim = max([abs(v) for v in e + x] + [1e-9]) * 1.05
    missed = {m.label for m in a.misranked}
    colours = [RED_HEX if lab in missed else BLUE_HEX for lab in a.labels]
    fig = go.Figure([
        go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", line={"color": "#999", "dash": "dot"},
                   name="estimate = exact", hoverinfo="skip"),
        go.Scatter(x=x, y=e, mode="markers", text=_labels(list(a.labels)), name="cells (red: misranked)",
                   marker={"color": colours, "size": 7},
                   hovertemplate="%{text}<br>exact %{x:.3f}<br>estimate %{y:.3f}<extra></extra>"),
    ])
    if title is None:
        title = f"{a.what} vs exact"
    title += f": Spearman {a.rank_correlation:.3f}, top-{a.k} recall {a.top_k_recall:.0%}, {len(missed)} misranked"
    fig.update_layout(title=html.escape(title), xaxis_title="exact effect (raw metric units, 0 = none)",
                      yaxis_title="estimated effect (raw metric units)", height=440,
                      margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return fig


def faithfulness_figure(curves: dict[str, "Faithfulness"], title: str = "Circuit faithfulness") -> go.Figure:
    """Normalised metric of the top-n-edge circuit against n (log axis), one line per method."""
    fig = go.Figure()
    for name, curve in curves.items():
        data = curve.plot_data()
        fig.add_trace(go.Scatter(x=[max(1, x) for x in data["x"]], y=data["y"], mode="lines+markers", name=html.escape(name),
                                 hovertemplate="%{x} edges: %{y:.3f}<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888")
    fig.add_hline(y=0.0, line_dash="dot", line_color="#888")
    fig.update_layout(title=html.escape(title), xaxis_title="edges in the circuit", yaxis_title="faithfulness (1 = clean)",
                      xaxis_type="log", height=380, margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return fig


def mib_figure(scores: dict[str, "CircuitScores"], title: str = "Circuit faithfulness (MIB)") -> go.Figure:
    """Faithfulness against the fraction of edges kept (log axis): solid lines select edges by
    signed score (CPR), dashed by |score| (CMD); one colour per method."""
    fig = go.Figure()
    palette = ["#2166ac", "#b2182b", "#4d9221", "#e08214", "#762a83"]
    for i, (name, s) in enumerate(scores.items()):
        colour = palette[i % len(palette)]
        x = [100 * f for f in s.fractions]
        fig.add_trace(go.Scatter(x=x, y=s.signed.tolist(), mode="lines+markers", line={"color": colour},
                                 name=html.escape(f"{name} signed (CPR {s.cpr:.3f})")))
        fig.add_trace(go.Scatter(x=x, y=s.absolute.tolist(), mode="lines+markers", line={"color": colour, "dash": "dash"},
                                 name=html.escape(f"{name} |score| (CMD {s.cmd:.3f})")))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888")
    fig.add_hline(y=0.0, line_dash="dot", line_color="#888")
    fig.update_layout(title=html.escape(title), xaxis_title="edges kept (%)", yaxis_title="faithfulness (1 = full model)",
                      xaxis_type="log", height=380, margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return fig


def plot_attention(model: "Model", tokens: Sequence[int] | torch.Tensor | str,
                   heads: Sequence[tuple[int, int]], title: str | None = None) -> go.Figure:
    """Attention patterns of chosen ``heads`` ((layer, head) pairs) on one prompt (text or token
    ids): query position x key position, tokens on both axes, one panel per head
    (``ap.plot_attention``; plotly is imported on first use).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> fig = ap.plot_attention(tiny_model("llama"), [2, 5, 9, 4], heads=[(0, 1), (1, 3)])
        >>> len(fig.data)
        2
    """
    from plotly.subplots import make_subplots

    from ..errors import SiteError
    from ..hooks import capture
    from ..sites import Site

    if isinstance(tokens, str):
        ids = torch.tensor([model.to_tokens(tokens)])
    else:
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise SiteError("plot_attention() needs at least one (layer, head), e.g. heads=[(9, 1)].")
    sites = {lh: Site("pattern", lh[0], head=lh[1]) for lh in heads}
    with capture(model, list(sites.values())) as acts:
        model.logits(ids, last_only=True)
    labels = [f"{i}|{html.escape(model.token_str(t))}" for i, t in enumerate(ids[0].tolist())]
    fig = make_subplots(rows=1, cols=len(heads), subplot_titles=[f"L{l}H{h}" for l, h in heads], shared_yaxes=True)
    for c, lh in enumerate(heads, start=1):
        a = acts[sites[lh]][0].float().cpu()  # (query, key)
        fig.add_trace(go.Heatmap(z=a.tolist(), x=labels, y=labels, colorscale="Blues", zmin=0.0, zmax=1.0,
                                 showscale=c == len(heads),
                                 hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"), row=1, col=c)
    fig.update_yaxes(autorange="reversed", title_text="query", col=1)
    fig.update_xaxes(title_text="key")
    fig.update_layout(title=html.escape(title or "attention patterns"), height=max(360, 22 * len(labels) + 160),
                      margin={"l": 80, "r": 20, "t": 70, "b": 80})
    return fig
