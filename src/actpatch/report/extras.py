"""Report sections for a run's Patchscopes (a layer x source-position table of decoded text),
interchanges (each patch's mean effect and its standard error, in raw metric units), patched
generations (next to the unpatched continuation) and the feature circuit (faithfulness and
completeness by node count, the top nodes and edges, where the top features are most active)."""

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


def _findings(items: list[dict[str, Any]]) -> str:
    return "".join(f"<div class='finding {_esc(f['level'])}'>{_esc(f['message'])} "
                   f"<span class='advice'>{_esc(f.get('advice', ''))}</span></div>" for f in items)


def _node_label(n: dict[str, Any]) -> str:
    what = "error" if n["feature"] == "error" else f"f{n['feature']}"
    return f"{n['site']} {what} @{n['pos']} {n.get('token', '')}"


def _features(data: dict[str, Any]) -> str:
    metric = data["metric"]
    curve = "".join(f"<tr><td>{n}</td><td>{f:.3f}</td><td>{fr:+.3f}</td><td>{c:.3f}</td></tr>"
                    for n, f, fr, c in zip(data["sizes"], data["faithfulness"], data["faithfulness_raw"],
                                           data["completeness"]))
    nodes = "".join(f"<tr><td>{i}</td><td>{_esc(_node_label(n))}</td><td>{n['score']:+.4f}</td></tr>"
                    for i, n in enumerate(data["nodes"][:15]))
    edges = "".join(f"<tr><td>{_esc(u)}</td><td>{_esc(v)}</td><td>{e:+.4f}</td></tr>" for u, v, e in data["top_edges"])
    checks = "; ".join(f"{_esc(k)}: rank correlation {v['rank_correlation']:.2f} over {v['cells']} cells"
                       for k, v in data.get("validation", {}).items())
    examples = "".join(
        f"<p><b>{_esc(key)}</b>: " + " | ".join(f"<code>{_esc(e['context'][-60:])}</code> ({e['activation']:.2f})"
                                                 for e in ex) + "</p>"
        for key, ex in data.get("examples", {}).items())
    dicts = "".join(f"<li><pre>{_esc(s)}</pre></li>" for s in data.get("dictionaries", []))
    return (f"<h2>Feature circuit</h2><ul>{dicts}</ul>"
            f"<p>{data['n_candidates']} nodes (features and error terms at every attached site and position) scored "
            f"by AtP, noising; {_esc(metric)} clean {data['clean']:+.3f}, every node corrupted {data['corrupted']:+.3f}, "
            f"reconstructions in place of the activations {data['reconstruction']:+.3f}. Faithfulness: the circuit "
            f"alone (others corrupted), 1 = clean, 0 = corrupted; completeness: the model without it (near 0 = "
            f"complete). Node scores against exact feature patching: {checks or 'not checked'}.</p>"
            f"<table><tr><th>nodes</th><th>faithfulness</th><th>raw {_esc(metric)}</th><th>completeness</th></tr>"
            f"{curve}</table><h3>Top nodes</h3><table><tr><th>#</th><th>node</th><th>AtP effect</th></tr>{nodes}"
            f"</table><h3>Top edges (circuit of {data['circuit_size']} nodes)</h3><table><tr><th>from</th><th>to</th>"
            f"<th>attribution</th></tr>{edges}</table><h3>Where the top features are most active</h3>{examples}"
            + _findings(data.get("findings", [])))


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
    if extras.get("features"):
        parts += [_features(d) for d in extras["features"].values()]
    return parts
