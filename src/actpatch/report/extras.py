"""Report sections for a run's Patchscopes (a layer x source-position table of decoded text),
interchanges (each patch's mean effect and its standard error, in raw metric units) and
patched generations (next to the unpatched continuation)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..app.extras import Extras
    from ..techniques.patchscope import PatchscopeResult

__all__ = ["extras_sections"]

MAX_SOURCES = 4
"""Source prompts shown per Patchscope (the JSON keeps every one)."""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _scope(name: str, scope: "PatchscopeResult") -> str:
    what = ("the logit lens (final norm and unembedding)" if scope.target_prompt is None
            else f"the target prompt <code>{_esc(scope.target_prompt)}</code>")
    share = scope.share_by_layer()
    decoded = [layer for layer, s in zip(scope.layers, share.tolist()) if s >= 0.5]
    out = [f"<h3>{_esc(name)}</h3><p>{_esc(scope.kind.value)} of each source position, decoded through {what}; "
           f"the source token comes back in at least half the cells at {len(decoded)} of {len(scope.layers)} layers "
           f"({_esc(', '.join(map(str, decoded[:30])))}). Bold: the continuation starts with the source token.</p>"]
    hits = scope.decodes_source
    for s, src in enumerate(scope.sources[:MAX_SOURCES]):
        head = "".join(f"<th>{_esc(scope.token_text[s][p])} ({int(scope.positions[s, p])})</th>"
                       for p in range(scope.positions.shape[1]))
        rows = []
        for li, layer in enumerate(scope.layers):
            cells = "".join((f"<td><b>{_esc(t)}</b></td>" if hits[li, s, p] else f"<td>{_esc(t)}</td>")
                            for p, t in enumerate(scope.table(s)[li]))
            rows.append(f"<tr><th>L{layer}</th>{cells}</tr>")
        out.append(f"<p>source: <code>{_esc(src)}</code></p><table><tr><th>layer</th>{head}</tr>{''.join(rows)}</table>")
    return "".join(out)


def _interchange(name: str, data: dict[str, Any]) -> str:
    metric = next(iter(data["values"]))
    values, base = data["values"][metric], data["base"][metric]
    rows = []
    for label, patched in zip(data["labels"], values):
        eff = [v - b for v, b in zip(patched, base)]
        n = len(eff)
        mean = sum(eff) / n
        sem = (sum((e - mean) ** 2 for e in eff) / (n - 1)) ** 0.5 / n**0.5 if n > 1 else float("nan")
        rows.append(f"<tr><td>{_esc(label)}</td><td>{mean:+.3f}</td><td>{sem:.3f}</td></tr>")
    findings = "".join(f"<div class='finding {_esc(f['level'])}'>{_esc(f['message'])} "
                       f"<span class='advice'>{_esc(f.get('advice', ''))}</span></div>" for f in data["findings"])
    return (f"<h3>{_esc(name)}</h3><p>{len(base)} base prompts, sources: {_esc(data['reduce'])}; effect = patched - "
            f"unpatched {_esc(metric)} (0 = no effect), mean over prompts and its standard error.</p>"
            f"<table><tr><th>patch</th><th>effect</th><th>s.e.</th></tr>{''.join(rows)}</table>{findings}")


def _generation(name: str, data: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_esc(p)}</td><td><b>{_esc(t)}</b></td><td>{_esc(b)}</td></tr>"
                   for p, t, b in zip(data["prompt_text"], data["text"], data["baseline_text"] or [""] * len(data["text"])))
    return (f"<h3>{_esc(name)}</h3><table><tr><th>prompt</th><th>patched</th><th>unpatched</th></tr>{rows}</table>")


def extras_sections(extras: "Extras | None") -> list[str]:
    """The report's sections for the saved jobs (none when there are none)."""
    if not extras:
        return []
    parts = []
    if extras.get("patchscope"):
        parts.append("<h2>Patchscopes</h2>" + "".join(_scope(n, s) for n, s in extras["patchscope"].items()))
    if extras.get("interchange"):
        parts.append("<h2>Interchanges</h2>" + "".join(_interchange(n, d) for n, d in extras["interchange"].items()))
    if extras.get("generation"):
        parts.append("<h2>Patched generation</h2>" + "".join(_generation(n, d) for n, d in extras["generation"].items()))
    return parts
