"""Circuits and edge scores others can read: the JSON graph format of the EAP-IG / MIB code, and
safetensors + JSON.

**EAP-IG / MIB JSON.** ``{"cfg": {...}, "nodes": {name: {"in_graph": bool}}, "edges": {name:
{"score": float, "in_graph": bool}}}`` with node names ``input``, ``a{L}.h{H}``, ``m{L}``,
``logits`` and edge names ``parent->child``, where an edge into a head names the input it
enters, ``parent->a{L}.h{H}<q|k|v>``. actpatch's nodes map one to one: ``embed`` is ``input``,
``L{l}.H{h}`` is ``a{l}.h{h}``, ``L{l}.MLP`` is ``m{l}``. In MIB's graph layout (the default of
:func:`~actpatch.edge_attribution`) every query head has its own k / v inputs, as in MIB's files.
Edges scored in the KV layout (one key and value input per *KV head*, ``L{l}.KV{j}.k``) are
written as ``a{l}.h{j}<k>`` with ``cfg["n_key_value_heads"]`` recording that the k / v indices
count KV heads; reading a file picks the layout from that count.

Scores keep actpatch's sign: the estimated change of the metric when the edge is patched in the
recorded ``cfg["actpatch"]["direction"]`` (for noising, negative when the edge matters; MIB's
attribution code stores the opposite sign for the same quantity).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import read_json
from ..corruption import CorruptionSpec
from ..errors import ResultError
from ..types import Direction
from .eap import EdgeScores
from .graph import Graph, GraphLayout, Node, NodeKind, Port, PortKind

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["node_name", "port_name", "to_mib_json", "from_mib_json", "save_edge_scores", "load_edge_scores",
           "to_mib_submission", "from_mib_submission", "SUBMISSION_PERCENTS"]

SUBMISSION_PERCENTS: tuple[float, ...] = (0, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)
"""The edge percentages of MIB's multiple-circuit submissions: one circuit with at most each."""


def node_name(node: Node) -> str:
    """The EAP-IG / MIB name of an upstream node."""
    if node.kind is NodeKind.EMBED:
        return "input"
    return f"a{node.layer}.h{node.head}" if node.kind is NodeKind.HEAD else f"m{node.layer}"


def port_name(port: Port) -> tuple[str, str | None]:
    """The EAP-IG / MIB name of a downstream node, and the input (q / k / v) for heads."""
    if port.kind is PortKind.LOGITS:
        return "logits", None
    if port.kind is PortKind.MLP:
        return f"m{port.layer}", None
    return f"a{port.layer}.h{port.head}", port.kind.value


def _edge_name(node: Node, port: Port) -> str:
    child, qkv = port_name(port)
    return f"{node_name(node)}->{child}" + (f"<{qkv}>" if qkv else "")


def to_mib_json(edges: EdgeScores, path: str | Path, *, keep: torch.Tensor | None = None, mib_sign: bool = False,
                meta: dict[str, Any] | None = None) -> Path:
    """Write the edges (and the circuit ``keep``, a (U, V) mask; default: every edge) in the
    EAP-IG / MIB JSON format. ``mib_sign``: scores in MIB's sign convention (larger = carries
    more of the clean behaviour: noising scores negated), as MIB's evaluation ranks them;
    recorded in ``cfg["actpatch"]["sign"]`` so that :func:`from_mib_json` reads them back.
    ``meta``: more entries for ``cfg["actpatch"]`` (e.g. the model and task)."""
    g = edges.graph
    keep = torch.ones_like(edges.scores, dtype=torch.bool) if keep is None else keep
    if tuple(keep.shape) != tuple(edges.scores.shape):
        raise ResultError(f"keep has shape {tuple(keep.shape)}; the edges are {tuple(edges.scores.shape)}.")
    real = g.reachable
    kept = keep & real
    n_heads = max((n.head for n in g.nodes if n.kind is NodeKind.HEAD), default=-1) + 1
    n_kv = sum(p.kind is PortKind.K and p.layer == 0 for p in g.ports)
    n_layers = max((n.layer for n in g.nodes if n.layer is not None), default=-1) + 1
    cfg = {"n_layers": n_layers, "n_heads": n_heads, "n_key_value_heads": n_kv, "parallel_attn_mlp": g.parallel,
           "actpatch": {"method": edges.method, "direction": edges.direction.value, "metric": edges.metric,
                        "corruption": edges.corruption.to_json(), "seed": edges.seed, "ig_steps": edges.ig_steps,
                        "layout": g.layout.value, "sign": "mib" if mib_sign else "actpatch", **(meta or {})}}
    nodes: dict[str, dict[str, Any]] = {node_name(n): {"in_graph": bool(kept[i].any())} for i, n in enumerate(g.nodes)}
    for j, p in enumerate(g.ports):
        name, _ = port_name(p)
        entry = nodes.setdefault(name, {"in_graph": False})
        entry["in_graph"] = entry["in_graph"] or bool(kept[:, j].any()) or name == "logits"
    flip = -1.0 if mib_sign and edges.direction is Direction.NOISE else 1.0
    out = {}
    for i, n in enumerate(g.nodes):
        for j, p in enumerate(g.ports):
            if real[i, j]:
                out[_edge_name(n, p)] = {"score": flip * float(edges.scores[i, j]), "in_graph": bool(kept[i, j])}
    path = Path(path)
    path.write_text(json.dumps({"cfg": cfg, "nodes": nodes, "edges": out}))
    return path


_EDGE = re.compile(r"^(input|a\d+\.h\d+|m\d+)->(logits|m\d+|a\d+\.h\d+)(?:<([qkv])>)?$")


def from_mib_json(path: str | Path, model: "Model") -> tuple[EdgeScores, torch.Tensor]:
    """Read an EAP-IG / MIB JSON graph for ``model``: its edge scores (NaN where the file has no
    score) and its circuit (the edges marked ``in_graph``). Refuses files of another shape."""
    d = read_json(Path(path), "an EAP-IG / MIB circuit JSON")
    if not isinstance(d, dict) or not {"cfg", "nodes", "edges"} <= set(d):
        raise ResultError(f"{path}: expected keys cfg, nodes and edges (the EAP-IG / MIB graph format).")
    cfg = d["cfg"]
    want = {"n_layers": model.n_layers, "n_heads": model.n_heads}
    bad = {k: cfg.get(k) for k, v in want.items() if cfg.get(k) != v}
    if bad:
        raise ResultError(f"{path}: the graph is for {bad}, but this model has {want}.")
    kv = int(cfg.get("n_key_value_heads", cfg["n_heads"]))
    if kv not in (model.n_heads, model.n_kv_heads):
        raise ResultError(f"{path}: k / v inputs are indexed over {kv} heads; this model has {model.n_heads} query "
                          f"heads (MIB's layout) and {model.n_kv_heads} KV heads (the KV layout).")
    g = Graph.of(model, GraphLayout.MIB if kv == model.n_heads else GraphLayout.KV)
    nodes = {node_name(n): i for i, n in enumerate(g.nodes)}
    ports = {port_name(p): j for j, p in enumerate(g.ports)}
    scores = torch.full((len(g.nodes), len(g.ports)), float("nan"))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for name, info in d["edges"].items():
        m = _EDGE.match(name)
        if m is None:
            raise ResultError(f"{path}: cannot read edge {name!r} (expected parent->child or parent->a<L>.h<H><q|k|v>).")
        parent, child, qkv = m.groups()
        if parent not in nodes or (child, qkv) not in ports:
            raise ResultError(f"{path}: edge {name!r} names a node this model does not have.")
        i, j = nodes[parent], ports[(child, qkv)]
        if not g.reachable[i, j]:
            raise ResultError(f"{path}: edge {name!r} goes backwards (its parent does not write before the child reads).")
        scores[i, j] = float(info.get("score", float("nan")))
        keep[i, j] = bool(info.get("in_graph", False))
    meta = cfg.get("actpatch", {})
    if meta.get("sign") == "mib" and meta.get("direction", Direction.NOISE.value) == Direction.NOISE.value:
        scores = -scores  # back to actpatch's sign (MIB's convention negates noising scores)
    edges = EdgeScores(graph=g, scores=scores, per_prompt=scores[None], method=str(meta.get("method", "imported")),
                       direction=Direction(meta.get("direction", Direction.NOISE.value)),
                       metric=str(meta.get("metric", "logit_diff")), corruption=CorruptionSpec.from_json(meta.get("corruption")),
                       seed=int(meta.get("seed", 0)), ig_steps=int(meta.get("ig_steps", 0)), extra={"source": str(path)})
    return edges, keep


def save_edge_scores(edges: EdgeScores, path: str | Path) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (scores (U, V), per-prompt scores) and ``<path>.json``
    (node and port names in order, method, direction, metric, corruption, seed)."""
    from safetensors.torch import save_file

    base = Path(path)
    tensors = base.with_suffix(".safetensors")
    meta = base.with_suffix(".json")
    save_file({"scores": edges.scores.contiguous(), "per_prompt": edges.per_prompt.contiguous()}, str(tensors))
    meta.write_text(json.dumps({"layout": edges.graph.layout.value, "upstream": edges.upstream,
                                "downstream": edges.downstream, "method": edges.method,
                                "direction": edges.direction.value, "metric": edges.metric,
                                "corruption": edges.corruption.to_json(), "seed": edges.seed, "ig_steps": edges.ig_steps},
                               indent=1))
    return tensors, meta


def load_edge_scores(path: str | Path, model: "Model") -> EdgeScores:
    """Read what :func:`save_edge_scores` wrote, for ``model`` (whose graph must match)."""
    from safetensors.torch import load_file

    base = Path(path)
    meta = read_json(base.with_suffix(".json"), "edge scores metadata (save_edge_scores)")
    g = Graph.of(model, meta.get("layout", GraphLayout.KV))  # (files without a layout predate MIB's)
    if meta.get("upstream") != [str(n) for n in g.nodes] or meta.get("downstream") != [str(p) for p in g.ports]:
        raise ResultError(f"{base}: these edge scores are for another graph than this model's.")
    t = load_file(str(base.with_suffix(".safetensors")))
    return EdgeScores(graph=g, scores=t["scores"], per_prompt=t["per_prompt"], method=meta["method"],
                      direction=Direction(meta["direction"]), metric=meta["metric"], corruption=CorruptionSpec.from_json(meta["corruption"]),
                      seed=int(meta["seed"]), ig_steps=int(meta.get("ig_steps", 0)))


def _submission_dir(folder: str | Path, model: str, task: str) -> Path:
    for what, name in (("model", model), ("task", task)):
        if not name or "_" in name or "/" in name:
            raise ResultError(f"{what}={name!r}: MIB names a submission's folder <task>_<model> (e.g. ioi_gpt2); give a "
                              f"{what} name without '_' or '/'.")
    return Path(folder) / f"{task}_{model}"


def to_mib_submission(edges: EdgeScores, folder: str | Path, *, model: str, task: str, circuits: bool = False,
                      absolute: bool = True, scores: Any = None) -> Path:
    """Write ``edges`` as one model / task of a submission to MIB's circuit track, in the folder
    ``<folder>/<task>_<model>`` that MIB expects: ``importances.json`` (every edge's score, in MIB's
    sign convention) or, with ``circuits=True``, one binary circuit per percentage of
    :data:`SUBMISSION_PERCENTS` (``circuit_<pct>.json``: the top edges by |score|, or by signed
    score with ``absolute=False``, at most that share of the edges). ``scores`` (a
    :class:`~actpatch.techniques.mib.CircuitScores`, e.g. from ``circuit_scores``) is stored beside
    them as ``actpatch_scores.json``. The edges must be in MIB's graph layout (the default of
    :func:`~actpatch.edge_attribution`). Returns the folder."""
    from .circuit import top_edges

    if edges.graph.layout is not GraphLayout.MIB:
        raise ResultError("MIB's submissions count a key and value input per query head: score the edges in MIB's "
                          "layout (edge_attribution(..., layout='mib'), the default).")
    out = _submission_dir(folder, model, task)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "task": task}
    if circuits:
        n_edges = edges.graph.n_edges
        for pct in SUBMISSION_PERCENTS:
            keep = top_edges(edges, int(pct / 100 * n_edges), absolute=absolute)
            to_mib_json(edges, out / f"circuit_{pct:g}.json", keep=keep, mib_sign=True, meta={**meta, "percent": pct})
    else:
        to_mib_json(edges, out / "importances.json", mib_sign=True, meta=meta)
    if scores is not None:
        (out / "actpatch_scores.json").write_text(json.dumps(scores.to_dict(), indent=1))
    return out


def from_mib_submission(folder: str | Path, model: "Model") -> tuple[EdgeScores, dict[float, torch.Tensor], Any]:
    """Read one ``<task>_<model>`` folder of an MIB submission for ``model``: the edge scores
    (from ``importances.json``, or from any circuit file when only circuits are given), the
    circuits by percentage ({} without circuit files) and the stored
    :class:`~actpatch.techniques.mib.CircuitScores` (None when absent)."""
    from .mib import CircuitScores

    folder = Path(folder)
    found = sorted(folder.glob("circuit_*.json"))
    first = folder / "importances.json" if (folder / "importances.json").is_file() else (found[0] if found else None)
    if first is None:
        raise ResultError(f"{folder}: no importances.json and no circuit_<pct>.json files (an MIB submission folder "
                          f"written by to_mib_submission).")
    edges, _ = from_mib_json(first, model)
    kept = {}
    for path in found:
        try:
            pct = float(path.stem.split("_", 1)[1])
        except ValueError:
            raise ResultError(f"{path}: expected circuit_<percent>.json, e.g. circuit_0.1.json.") from None
        kept[pct] = from_mib_json(path, model)[1]
    stored = folder / "actpatch_scores.json"
    scores = CircuitScores.from_dict(read_json(stored, "stored circuit scores")) if stored.is_file() else None
    return edges, dict(sorted(kept.items())), scores
