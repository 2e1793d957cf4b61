"""``interchange``: take an activation from one prompt at one position and write it into another
prompt at another position (and layer), then score the base prompt's answer.

Each patch is one or more writes ``(source site, base site)`` (:class:`Interchange`): same kind
and width (a head's output into a head's output, a residual vector into a residual vector),
positions given as token indices (negative from each prompt's end) or names (``end``,
``first_diff``, ``last_diff``, a builder's ``S2`` / ``subject_last``, a prompt file's). The
source is

* a :class:`~actpatch.PromptSet` of the same size as the base (prompt ``i`` into prompt ``i``;
  its clean prompts) or of one prompt (into every base prompt);
* the mean over a prompt set (``reduce="mean"``: e.g. a function vector, Todd et al. 2024, the
  mean head output at the last token of in-context prompts, written into zero-shot prompts);
* a tensor (``(tensor, base_site)``): a fixed vector.

The base prompts (their clean prompts, their answers and alternatives, teacher-forced when
several tokens) are scored unpatched and under each patch; rows of (patch, prompt) share
forward passes, :data:`ROWS` at a time. The values and every label are in an
:class:`InterchangeResult`.

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> ps = ap.PromptSet.from_ids([[1, 2, 3, 4]], [[1, 5, 3, 4]], [6], [7])
    >>> res = ap.interchange(model, ps, ps, [(ap.Site("resid_pre", 1, pos=1), ap.Site("resid_pre", 1, pos=3))])
    >>> tuple(res.values[ap.Metric.LOGIT_DIFF].shape)  # (patch, prompt)
    (1, 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PromptError, SiteError
from ..findings import Finding, Level
from ..hooks import WRITE, _hooks, capture
from ..metrics import Metric, MetricLike, MetricSpec, compute_metrics, parse_metrics
from ..prompts.promptset import PromptSet
from ..sites import Site, SiteKind
from ..types import Provenance
from .positions import named_positions

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["interchange", "Interchange", "InterchangeResult", "ROWS"]

ROWS = 256
"""(patch, prompt) rows per forward pass."""


@dataclasses.dataclass(frozen=True)
class Interchange:
    """One write: the activation at ``source`` (of the source prompt) into ``base`` (of the base
    prompt); or, with :meth:`value`, a fixed tensor into ``base``."""

    source: Site | None
    base: Site
    tensor: torch.Tensor | None = None

    @classmethod
    def value(cls, tensor: torch.Tensor, base: Site) -> "Interchange":
        """Write ``tensor`` (the base slice's shape without batch and position) at ``base``."""
        return cls(None, base, torch.as_tensor(tensor))

    @property
    def label(self) -> str:
        src = "value" if self.source is None else str(self.source)
        return f"{src} -> {self.base}"


@dataclasses.dataclass
class InterchangeResult:
    """Metric values of the base prompts under each patch.

    Attributes:
        patches: the patches (tuples of writes), in order; ``labels`` their text.
        values: ``{metric: (n_patches, n_prompts)}`` under each patch.
        base: ``{metric: (n_prompts,)}`` unpatched.
        source: ``{metric: (n_prompts,)}`` the source prompts scored on the base's answers
            (pairwise sources only; None otherwise).
        reduce: ``"pair"``, ``"broadcast"``, ``"mean"`` or ``"value"``: how sources map to base prompts.
        findings: what to look at before reading the numbers.
        provenance / source_prompts: where the numbers come from.
    """

    patches: tuple[tuple[Interchange, ...], ...]
    values: dict[MetricLike, torch.Tensor]
    base: dict[MetricLike, torch.Tensor]
    source: dict[MetricLike, torch.Tensor] | None
    reduce: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    provenance: Provenance | None = None
    """Model, weights and the base prompts (``source_prompts``: the source set's description)."""
    source_prompts: dict[str, Any] | None = None

    @property
    def labels(self) -> list[str]:
        return [" + ".join(w.label for w in p) for p in self.patches]

    def effect(self, metric: MetricLike = Metric.LOGIT_DIFF) -> torch.Tensor:
        """``(n_patches, n_prompts)``: patched minus unpatched, in raw metric units (0 = no effect)."""
        return self.values[metric] - self.base[metric][None]

    def summary(self, metric: MetricLike = Metric.LOGIT_DIFF) -> list[tuple[str, float, float]]:
        """Per patch: (label, mean effect over prompts, its standard error), raw metric units."""
        eff = self.effect(metric)
        n = eff.shape[1]
        sem = eff.std(1) / n**0.5 if n > 1 else torch.full((eff.shape[0],), float("nan"))
        return [(label, float(e), float(s)) for label, e, s in zip(self.labels, eff.mean(1).tolist(), sem.tolist())]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: labels, values and findings (the patches' tensors are not kept)."""
        name = lambda m: getattr(m, "value", str(m))  # noqa: E731
        return {"labels": self.labels, "reduce": self.reduce,
                "values": {name(m): v.tolist() for m, v in self.values.items()},
                "base": {name(m): v.tolist() for m, v in self.base.items()},
                "source": None if self.source is None else {name(m): v.tolist() for m, v in self.source.items()},
                "findings": [f.to_dict() for f in self.findings],
                "provenance": None if self.provenance is None else dataclasses.asdict(self.provenance),
                "source_prompts": self.source_prompts}

    def __repr__(self) -> str:
        m = next(iter(self.values))
        name = getattr(m, "value", str(m))
        eff = self.effect(m).mean(1)
        lines = [f"InterchangeResult({len(self.patches)} patches x {self.values[m].shape[1]} prompts, {self.reduce}; "
                 f"mean {name} unpatched {float(self.base[m].mean()):.3f})"]
        for label, e in list(zip(self.labels, eff.tolist()))[:12]:
            lines.append(f"  {label}: effect {e:+.3f}")
        lines += [f"  [{f.level.value}] {f.message}" for f in self.findings]
        return "\n".join(lines)


def _write(w: Any) -> Interchange | None:
    """A write: an :class:`Interchange`, or a pair (source Site or a tensor, base Site)."""
    if isinstance(w, Interchange):
        return w
    if isinstance(w, tuple) and len(w) == 2 and isinstance(w[1], Site):
        if isinstance(w[0], Site):
            return Interchange(w[0], w[1])
        if isinstance(w[0], torch.Tensor):
            return Interchange.value(w[0], w[1])
    return None


def _as_patches(patches: Any) -> tuple[tuple[Interchange, ...], ...]:
    if _write(patches) is not None:
        patches = [patches]
    if not isinstance(patches, Sequence) or isinstance(patches, str) or not patches:
        raise SiteError("patches: give a list of (source_site, base_site) pairs (or lists of them, written "
                        "together), e.g. [(Site('resid_pre', 3, pos='end'), Site('resid_pre', 5, pos=-1))].")
    out = []
    for p in patches:
        one = _write(p)
        group = (one,) if one is not None else tuple(_write(w) for w in p) if isinstance(p, (tuple, list)) else ()
        if not group or not all(w is not None for w in group):
            raise SiteError(f"Each patch is a (source Site or tensor, base Site) pair, or a list of them written "
                            f"together; got {p!r:.80}.")
        out.append(group)  # type: ignore[arg-type]
    return tuple(out)


def _check_write(model: "Model", w: Interchange) -> None:
    """Same kind and width on both sides; a position axis at index 1; positions given."""
    base = w.base
    if base.kind == SiteKind.PATTERN or base.kind.layout[1] != "pos":
        raise SiteError(f"{base}: interchange writes activations with a position axis; {base.kind.value!r} has none.")
    if base.pos is None:
        raise SiteError(f"{base}: give the base position (pos=<int> or a name such as 'end').")
    base.at(0).check(model)
    if w.source is None:
        return
    src = w.source
    if src.kind != base.kind:
        raise SiteError(f"{w.label}: the source is {src.kind.value!r} and the base {base.kind.value!r}; an "
                        f"interchange writes an activation into one of the same kind.")
    if (src.head is None) != (base.head is None) or (src.index is None) != (base.index is None):
        raise SiteError(f"{w.label}: the two sides have different widths (a head or index on one side only); "
                        f"give both a head (or neither) and both an index (or neither).")
    if src.pos is None:
        raise SiteError(f"{src}: give the source position (pos=<int> or a name such as 'end').")
    src.at(0).check(model)


def _resolve(prompts: PromptSet, site: Site, i: int, what: str) -> int:
    T = prompts.clean[i].numel()
    pos = site.pos
    if isinstance(pos, str):
        have = named_positions(prompts, i)
        if pos not in have:
            raise PromptError(f"{site}: {what} prompt {i} has no position named {pos!r}; it has {sorted(have)}.")
        return have[pos]
    q = T + pos if pos < 0 else pos  # type: ignore[operator]
    if not 0 <= q < T:
        raise SiteError(f"{site}: position {pos} is beyond {what} prompt {i} ({T} tokens: 0..{T - 1}).")
    return q


def _rest(site: Site) -> tuple:
    """The index after the batch and position axes (head, index)."""
    return site.at(0).selector()[2:]


def interchange(
    model: "Model",
    base: PromptSet,
    source: PromptSet | None,
    patches: Any,
    *,
    metric: MetricSpec = "logit_diff",
    reduce: str = "pair",
) -> InterchangeResult:
    """Write source activations into the base prompts and score the base answers.

    Args:
        base: the prompts patched and scored (their clean prompts and answers).
        source: the prompts read (their clean prompts): as many as the base, or one; None when
            every write is a fixed tensor.
        patches: ``(source_site, base_site)`` pairs (``(tensor, base_site)`` for a fixed value), or
            lists of them written together.
        reduce: ``"pair"`` (prompt i into prompt i, or one source into all), or ``"mean"``
            (the mean over the source prompts, into every base prompt).

    Returns:
        an :class:`InterchangeResult`.
    """
    plist = _as_patches(patches)
    metrics = parse_metrics(metric)
    if reduce not in ("pair", "mean"):
        raise PromptError(f"reduce={reduce!r}: use 'pair' (prompt i into prompt i) or 'mean' (the source set's mean).")
    writes = [w for p in plist for w in p]
    for w in writes:
        _check_write(model, w)
    needs_source = any(w.source is not None for w in writes)
    if needs_source and source is None:
        raise PromptError("These patches read source sites; pass source=<PromptSet> (or write tensors: (tensor, base_site)).")
    n = len(base)
    mode = "value" if not needs_source else "mean" if reduce == "mean" else "pair" if len(source) == n else \
        "broadcast" if len(source) == 1 else None  # type: ignore[arg-type]
    if mode is None:
        raise PromptError(f"The source has {len(source)} prompts and the base {n}; give as many (prompt i into "  # type: ignore[arg-type]
                          f"prompt i), one, or reduce='mean'.")
    base_pos = {(k, j): [_resolve(base, w.base, i, "base") for i in range(n)]
                for k, p in enumerate(plist) for j, w in enumerate(p)}
    values = _source_values(model, source, plist, n, mode)  # (k, j) -> (n, *slice)
    out_base, out_vals = _score(model, base, plist, base_pos, values, metrics)
    src_scores = _score_sources(model, base, source, metrics) if mode == "pair" else None
    res = InterchangeResult(patches=plist, values=out_vals, base=out_base, source=src_scores, reduce=mode,
                            provenance=Provenance.of(model, base),
                            source_prompts=None if source is None else source.describe())
    res.findings = _findings(res, base)
    return res


def _source_values(model: "Model", source: PromptSet | None, plist: tuple[tuple[Interchange, ...], ...], n: int,
                   mode: str) -> dict[tuple[int, int], torch.Tensor]:
    """Per write, the value each base prompt receives, ``(n, *slice)``."""
    out: dict[tuple[int, int], torch.Tensor] = {}
    reads = [(k, j, w) for k, p in enumerate(plist) for j, w in enumerate(p) if w.source is not None]
    if reads:
        S = len(source)  # type: ignore[arg-type]
        fulls = sorted({w.source.full() for _, _, w in reads}, key=str)  # type: ignore[union-attr]
        got: dict[tuple[int, int], list[torch.Tensor | None]] = {(k, j): [None] * S for k, j, _ in reads}
        with torch.inference_mode(), model.attention_fn():
            for group in source.groups():  # type: ignore[union-attr]
                with capture(model, fulls) as acts:
                    model.logits(group.clean, last_only=True)
                for g, i in enumerate(group.indices.tolist()):
                    for k, j, w in reads:
                        p = _resolve(source, w.source, i, "source")  # type: ignore[arg-type]
                        got[(k, j)][i] = acts[w.source.full()][(g, p, *_rest(w.source))].cpu()  # type: ignore[union-attr]
        for key, vals in got.items():
            stacked = torch.stack(vals)  # type: ignore[arg-type]
            if mode == "mean":
                stacked = stacked.mean(0, keepdim=True)
            out[key] = stacked.expand(n, *stacked.shape[1:]) if stacked.shape[0] == 1 else stacked
    for k, p in enumerate(plist):
        for j, w in enumerate(p):
            if w.tensor is not None:
                out[(k, j)] = w.tensor.expand(n, *w.tensor.shape)
    return out


def _score(model: "Model", base: PromptSet, plist: tuple[tuple[Interchange, ...], ...],
           base_pos: dict[tuple[int, int], list[int]], values: dict[tuple[int, int], torch.Tensor],
           metrics: list[MetricLike]) -> tuple[dict[MetricLike, torch.Tensor], dict[MetricLike, torch.Tensor]]:
    """Unpatched and patched metric values: per length group, rows (prompt, patch) ``ROWS`` at a time."""
    n, K = len(base), len(plist)
    out_base = {m: torch.empty(n) for m in metrics}
    out_vals = {m: torch.empty(K, n) for m in metrics}
    with torch.inference_mode(), model.attention_fn():
        for group in base.groups():
            idx = group.indices
            G = len(idx)
            cont = group.continuation
            logits = model.readout(group.clean, cont)
            lp = torch.log_softmax(logits.float(), -1)
            for m, v in compute_metrics(metrics, logits, group.answers, group.alternatives, lp, cont).items():
                out_base[m][idx] = v.float().cpu()
            per = max(1, ROWS // G)
            for k0 in range(0, K, per):
                ks = list(range(k0, min(K, k0 + per)))
                rows = torch.arange(G).repeat(len(ks))  # row r*G + g: patch ks[r], prompt g
                entries = _writers(plist, ks, idx, G, base_pos, values)
                with _hooks(model, entries):
                    patched = model.readout(group.clean[rows], None if cont is None else cont.select(rows))
                got = compute_metrics(metrics, patched, group.answers[rows], group.alternatives[rows], lp[rows],
                                      None if cont is None else cont.select(rows))
                for m, v in got.items():
                    out_vals[m][torch.tensor(ks)[:, None], idx[None]] = v.float().cpu().view(len(ks), G)
    return out_base, out_vals


def _writers(plist: tuple[tuple[Interchange, ...], ...], ks: list[int], idx: torch.Tensor, G: int,
             base_pos: dict[tuple[int, int], list[int]], values: dict[tuple[int, int], torch.Tensor]) -> list:
    """Hook entries for the rows of patches ``ks`` over the group's prompts ``idx``."""
    by_full: dict[Site, list[tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor]]] = {}
    for r, k in enumerate(ks):
        rows = torch.arange(r * G, (r + 1) * G)
        for j, w in enumerate(plist[k]):
            pos = torch.tensor(base_pos[(k, j)])[idx]
            by_full.setdefault(w.base.full(), []).append((rows, pos, _rest(w.base), values[(k, j)][idx]))

    def writer(items: list) -> Any:
        def fn(x: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            for rows, pos, rest, val in items:
                out[(rows.to(x.device), pos.to(x.device), *rest)] = val.to(x.device, x.dtype)
            return out
        return fn

    return [(full, writer(items), WRITE) for full, items in by_full.items()]


def _score_sources(model: "Model", base: PromptSet, source: PromptSet, metrics: list[MetricLike]) -> dict[MetricLike, torch.Tensor]:
    """The source prompts scored on the base prompts' answers (the 'fully swapped' reference)."""
    swapped = dataclasses.replace(base, clean=source.clean, corrupted=source.clean, texts=())
    out = {m: torch.empty(len(base)) for m in metrics}
    with torch.inference_mode(), model.attention_fn():
        for group in swapped.groups():
            logits = model.readout(group.clean, group.continuation)
            lp = torch.log_softmax(logits.float(), -1)
            for m, v in compute_metrics(metrics, logits, group.answers, group.alternatives, lp, group.continuation).items():
                out[m][group.indices] = v.float().cpu()
    return out


def _findings(res: InterchangeResult, base: PromptSet) -> list[Finding]:
    out = []
    m = next(iter(res.values))
    null = [res.labels[k] for k in range(len(res.patches)) if float(res.effect(m)[k].abs().max()) <= 1e-6]
    if null:
        out.append(Finding(Level.INFO, "interchange_no_effect",
                           f"{len(null)} patch(es) change no base prompt's {getattr(m, 'value', m)} (e.g. {null[0]}).",
                           "The source writes what the base already has there, or nothing downstream reads that "
                           "site; check the positions and layers."))
    if Metric.LOGIT_DIFF in res.base:
        wrong = int((res.base[Metric.LOGIT_DIFF] <= 0).sum())
        if wrong:
            out.append(Finding(Level.WARNING, "base_not_solved",
                               f"{wrong} of {len(base)} base prompts prefer the alternative unpatched.",
                               "Effects there are not moves away from a solved task; drop those prompts or read "
                               "them apart."))
    return out
