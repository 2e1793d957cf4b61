"""Circuit evaluation comparable with the Mechanistic Interpretability Benchmark (MIB, 2025),
circuit-localisation track.

Faithfulness of a circuit C is ``f(C) = (m(C) - m(empty)) / (m(full) - m(empty))``: the clean run
with every edge outside C taken from the corrupted run (counterfactual patching, MIB's default
ablation), normalised so that the full graph gives 1 and the empty one 0. It is measured at
circuits holding a fraction of all edges, by default MIB's ``{0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50,
100} %`` (``int(fraction * n_edges)`` edges each), and summarised by trapezoid areas over the
fraction axis (linear, as MIB reports by default; ``log_scale=True`` integrates over log
fractions):

* **CPR** (circuit performance ratio): the area under f, circuits chosen by *signed* score
  (the edges that carry the clean behaviour first: the most negative noising scores, the most
  positive denoising scores; MIB's scores have the opposite sign convention for noising);
  higher is better;
* **CMD** (circuit-model difference): the area under |1 - f|, circuits chosen by *absolute*
  score; 0 is best.

The definitions follow the benchmark's public description and evaluation code; actpatch's own
circuit runs (:mod:`actpatch.techniques.circuit`) compute m(C). Edge scores from any source can
be scored: EAP, EAP-IG, a random baseline (:func:`random_edges`), or scores imported from the
EAP-IG / MIB JSON format (:mod:`actpatch.techniques.circuit_io`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..corruption import Corruption
from .._io import read_named, write_named
from ..errors import MethodError
from ..metrics import normalise, MetricSpec
from ..prompts.promptset import PromptSet
from ..types import Direction
from .circuit import _Circuits, greedy_edges, top_edges
from .eap import EdgeMethod, EdgeScores, edge_attribution
from .graph import GraphLayout

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from ..models.handle import Model

__all__ = ["MIB_FRACTIONS", "area_under", "CircuitScores", "circuit_scores", "random_edges", "oracle_edges",
           "compare_methods",
           "save_mib", "load_mib"]

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Edge fractions at which MIB measures faithfulness."""


def area_under(fractions: Sequence[float], values: Sequence[float], *, from_one: bool = False,
               log_scale: bool = False) -> float:
    """Trapezoid area under ``values`` (or under ``|1 - values|`` with ``from_one``) over
    ``fractions`` (increasing; their logs with ``log_scale``).

    Example:
        >>> area_under([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])  # 0.25 + 0.5
        0.75
        >>> area_under([0.0, 0.5, 1.0], [0.0, 1.0, 1.0], from_one=True)
        0.25
    """
    xs = [math.log(x) for x in fractions] if log_scale else [float(x) for x in fractions]
    ys = [abs(1.0 - float(v)) if from_one else float(v) for v in values]
    if len(xs) != len(ys) or len(xs) < 2:
        raise MethodError(f"An area needs as many values as fractions, at least 2 (got {len(xs)} and {len(ys)}).")
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise MethodError(f"Fractions must increase: {list(fractions)}.")
    return sum((x2 - x1) * (y1 + y2) / 2 for x1, x2, y1, y2 in zip(xs, xs[1:], ys, ys[1:]))


@dataclass(frozen=True)
class CircuitScores:
    """One method's MIB-style evaluation: faithfulness at each edge fraction for signed
    selection (``signed``, giving CPR) and absolute selection (``absolute``, giving CMD)."""

    method: str
    fractions: tuple[float, ...]
    sizes: tuple[int, ...]
    n_edges: int
    signed: torch.Tensor
    absolute: torch.Tensor
    cpr: float
    cmd: float
    seconds: float
    log_scale: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "fractions": list(self.fractions), "sizes": list(self.sizes),
                "n_edges": self.n_edges, "signed": self.signed.tolist(), "absolute": self.absolute.tolist(),
                "cpr": self.cpr, "cmd": self.cmd, "seconds": self.seconds, "log_scale": self.log_scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CircuitScores":
        return cls(method=d["method"], fractions=tuple(d["fractions"]), sizes=tuple(d["sizes"]), n_edges=d["n_edges"],
                   signed=torch.tensor(d["signed"]), absolute=torch.tensor(d["absolute"]), cpr=d["cpr"], cmd=d["cmd"],
                   seconds=d["seconds"], log_scale=d.get("log_scale", False))

    def plot(self, title: str | None = None) -> "go.Figure":
        """Faithfulness against edge fraction, both selections (plotly)."""
        from ..report.figures import mib_figure

        return mib_figure({self.method: self}, title or f"{self.method}: CPR {self.cpr:.3f}, CMD {self.cmd:.3f}")


def circuit_scores(
    model: "Model",
    prompts: PromptSet,
    edges: EdgeScores,
    *,
    fractions: Sequence[float] = MIB_FRACTIONS,
    corruption: str | Corruption | None = None,
    metric: str | None = None,
    seed: int | None = None,
    log_scale: bool = False,
    selection: str = "topn",
    rows: int | None = None,
    memory_budget: "int | str | None" = None,
) -> CircuitScores:
    """CPR and CMD of ``edges`` on ``prompts`` (see the module docstring): one exact circuit run
    per fraction and selection, plus the empty and full graphs for the normalisation. The
    corruption, metric and seed default to those the scores were computed with.
    ``selection``: ``topn`` (the best-scoring edges anywhere, MIB's default) or ``greedy``
    (grown from the logits, so every edge is connected: :func:`~actpatch.techniques.circuit.greedy_edges`).
    ``rows``: circuit x prompt rows per forward pass (the circuits of the evaluation run in
    batches of that many; default one circuit per pass on a CPU,
    :data:`~actpatch.techniques.circuit.CIRCUIT_ROWS` on an accelerator). ``memory_budget``: as
    in :func:`~actpatch.circuits.faithfulness` (the scores do not change)."""
    if selection not in ("topn", "greedy"):
        raise MethodError(f"selection={selection!r}: use 'topn' or 'greedy'.")
    pick = top_edges if selection == "topn" else greedy_edges
    t0 = time.perf_counter()
    fr = tuple(float(f) for f in fractions)
    if not fr or any(not 0 < f <= 1 for f in fr) or list(fr) != sorted(set(fr)):
        raise MethodError(f"fractions must increase within (0, 1], got {list(fractions)}.")
    from ..corruption import from_description

    corr = corruption if corruption is not None else from_description(edges.corruption)
    runner = _Circuits(model, prompts, corr, metric or edges.metric, edges.seed if seed is None else seed, rows,
                       layout=edges.graph.layout, memory_budget=memory_budget)
    n_edges = int((~torch.isnan(edges.scores)).sum())
    sizes = tuple(int(f * n_edges) for f in fr)
    none, every = torch.zeros_like(edges.scores, dtype=torch.bool), torch.ones_like(edges.scores, dtype=torch.bool)

    # signed selection keeps the edges that carry the clean behaviour first: a noising score is the
    # estimated change when the edge is corrupted (negative when it matters), a denoising score
    # the change when it is restored (positive when it matters)
    helpful = edges if edges.direction is Direction.DENOISE else dataclasses.replace(edges, scores=-edges.scores)

    circuits = [pick(helpful, n, absolute=False) for n in sizes] + [pick(edges, n, absolute=True) for n in sizes]
    *raw, empty, full = runner.run_many(circuits + [none, every]).mean(1).tolist()  # one batch for every circuit
    signed, absolute = (normalise(torch.tensor(raw[i:i + len(sizes)]), full, empty) for i in (0, len(sizes)))
    return CircuitScores(method=edges.method + ("+greedy" if selection == "greedy" else ""), fractions=fr, sizes=sizes, n_edges=n_edges, signed=signed,
                         absolute=absolute, cpr=area_under(fr, signed.tolist(), log_scale=log_scale),
                         cmd=area_under(fr, absolute.tolist(), from_one=True, log_scale=log_scale),
                         seconds=time.perf_counter() - t0, log_scale=log_scale)


def random_edges(edges: EdgeScores, seed: int = 0) -> EdgeScores:
    """The random baseline: the same graph with scores drawn uniformly at random (seeded),
    NaN where no edge exists."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(edges.scores.shape, generator=g)
    noise[torch.isnan(edges.scores)] = float("nan")
    return dataclasses.replace(edges, scores=noise, per_prompt=noise[None].expand(edges.per_prompt.shape[0], -1, -1),
                               method="random", extra={**edges.extra, "random_seed": seed})


def oracle_edges(model: "Model", prompts: PromptSet, edges: EdgeScores, k: int = 50) -> EdgeScores:
    """Exact edge patching on a subset, the oracle: the ``k`` edges ``edges`` ranks highest by
    |score| get their exact effect (the clean run with that one edge cut, minus the clean run;
    one circuit run each), every other reachable edge scores 0 (ranked after them). Needs
    noising scores, whose sign the exact effects share."""
    if edges.direction is not Direction.NOISE:
        raise MethodError("oracle_edges() cuts edges from the clean run: give noising scores (direction='noise').")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MethodError(f"k={k!r}: exact-score at least one edge.")
    from ..corruption import from_description

    runner = _Circuits(model, prompts, from_description(edges.corruption), edges.metric, edges.seed,
                       layout=edges.graph.layout)
    ok = (~torch.isnan(edges.scores)).flatten().nonzero().flatten()
    chosen = ok[edges.scores.flatten()[ok].abs().argsort(descending=True)][:k].tolist()
    exact = torch.where(torch.isnan(edges.scores), edges.scores, torch.zeros_like(edges.scores))
    exact.view(-1)[chosen] = runner.cut_each(chosen)
    return dataclasses.replace(edges, scores=exact, per_prompt=exact[None], method=f"exact@{len(chosen)}",
                               extra={**edges.extra, "oracle_of": edges.method, "oracle_k": len(chosen)})


def compare_methods(
    model: "Model",
    prompts: PromptSet,
    methods: Sequence[str] = ("eap", "eap-ig", "random"),
    *,
    ig_steps: int = 5,
    oracle_k: int = 50,
    fractions: Sequence[float] = MIB_FRACTIONS,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    seed: int = 0,
    layout: str | GraphLayout = GraphLayout.MIB,
    mask_density: float = 0.05,
    mask_steps: int = 200,
) -> dict[str, CircuitScores]:
    """CPR and CMD of several edge-scoring methods side by side on the same circuit runs'
    definitions: ``eap``, ``eap-ig`` (``ig_steps`` interpolation steps on the inputs),
    ``eap-ig-act`` (the same on every node's output), ``relp`` (LRP coefficients, EAP's cost),
    ``random`` (uniform scores over EAP's graph) and ``exact`` (the oracle: EAP's top
    ``oracle_k`` edges scored by cutting each exactly, :func:`oracle_edges`) and ``mask`` (a
    learned edge mask, ``mask_steps`` steps towards ``mask_density`` of the edges,
    :func:`~actpatch.techniques.masks.learn_edge_mask`; its fractions rank the edges by keep
    probability). Each entry's
    ``seconds`` includes scoring. ``layout``: the graph, MIB's (the default: MIB's fractions of
    MIB's edges) or the KV-head one (:class:`~actpatch.techniques.graph.GraphLayout`)."""
    known = (*(m.value for m in EdgeMethod), "random", "exact", "mask")
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise MethodError(f"Unknown circuit method(s) {unknown or list(methods)}; choose from {', '.join(known)}.")
    out: dict[str, CircuitScores] = {}
    base: EdgeScores | None = None
    for name in methods:
        t0 = time.perf_counter()
        if name in ("random", "exact"):
            base = base or edge_attribution(model, prompts, direction=Direction.NOISE, corruption=corruption,
                                            metric=metric, seed=seed, layout=layout)
            scored = random_edges(base, seed) if name == "random" else oracle_edges(model, prompts, base, oracle_k)
        elif name == "mask":
            from .masks import learn_edge_mask

            scored = learn_edge_mask(model, prompts, density=mask_density, steps=mask_steps, corruption=corruption,
                                     metric=metric, seed=seed, layout=layout)
        else:
            how = EdgeMethod(name)
            scored = edge_attribution(model, prompts, direction=Direction.NOISE, corruption=corruption, metric=metric,
                                      ig_steps=how.steps(ig_steps), seed=seed, ig_target=how.ig_target, layout=layout,
                                      method=how)
            base = base or scored
        res = circuit_scores(model, prompts, scored, fractions=fractions, corruption=corruption, metric=metric, seed=seed)
        out[name] = dataclasses.replace(res, seconds=time.perf_counter() - t0)
    return out


def save_mib(scores: dict[str, CircuitScores], path: str | Path) -> None:
    """Write MIB evaluations (by method) as JSON."""
    write_named(scores, path)


def load_mib(path: str | Path) -> dict[str, CircuitScores]:
    """Read what :func:`save_mib` wrote ({} when the file does not exist)."""
    return read_named(path, CircuitScores.from_dict, "an MIB evaluation file (save_mib)")
