"""Patchscopes (Ghandeharioun et al. 2024): decode a hidden state by writing it into another
prompt and letting the model speak.

The activation at ``site`` (layer ``l``, a source position) of each source prompt is written
into the *target prompt* at ``target_position`` and layer ``target_layer`` (default: ``l``),
and the model generates from there (:func:`actpatch.generate`, greedy). The default target is
the paper's identity prompt, few-shot examples of repeating a token, ending where the model
should repeat the patched one; a sweep over source layers gives the table "what does layer
``l`` say about this token". With ``target_prompt=None`` it is the logit lens: the source
activation read through the final norm and the unembedding (one token per cell).

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> scope = ap.patchscope(model, [[5, 6, 7]], "resid_post", target_prompt=[1, 2, 1, 2, 9], max_new_tokens=2)
    >>> tuple(scope.tokens.shape)  # (layer, source, position, new token)
    (2, 1, 1, 2)
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PromptError, SiteError
from ..hooks import capture
from ..sites import Site, SiteKind
from .generation import decode, prompt_ids

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["patchscope", "PatchscopeResult", "IDENTITY_PROMPT"]

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
"""The identity target prompt of the Patchscopes paper: the model repeats the token at ``?``."""

_KINDS = (SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST, SiteKind.ATTN_OUT, SiteKind.MLP_OUT)
ROWS = 64
"""Target-prompt rows generated at once (layers x sources x positions run in chunks of this many)."""


@dataclasses.dataclass(frozen=True)
class PatchscopeResult:
    """What each layer's activation at each source position decodes to.

    Attributes:
        kind: the site kind read and written.
        layers: the source layers (axis 0); ``target_layers`` where each was written.
        sources: the source prompts' text (axis 1; ``#id`` lists without a tokenizer).
        positions: ``(S, P)`` token index of each source position (axis 2).
        source_tokens: ``(S, P)`` the token at each source position.
        tokens: ``(L, S, P, N)`` generated ids (N = 1 for the logit lens).
        text: ``text[l][s][p]``, the decoded continuation.
        target_prompt: the target's text (None for the logit lens).
    """

    kind: SiteKind
    layers: tuple[int, ...]
    target_layers: tuple[int, ...]
    sources: tuple[str, ...]
    positions: torch.Tensor
    source_tokens: torch.Tensor
    tokens: torch.Tensor
    text: tuple[tuple[tuple[str, ...], ...], ...]
    target_prompt: str | None
    token_text: tuple[tuple[str, ...], ...] = ()

    @property
    def decodes_source(self) -> torch.Tensor:
        """``(L, S, P)`` bool: the continuation's first word is the source token (ignoring case and
        surrounding spaces, after the identity prompt's ``->`` when the model writes it)."""
        out = torch.zeros(self.tokens.shape[:3], dtype=torch.bool)
        for li in range(len(self.layers)):
            for s in range(len(self.sources)):
                for p in range(self.positions.shape[1]):
                    word = _first_word(self.text[li][s][p])
                    out[li, s, p] = bool(word) and word == _norm(self.token_text[s][p])
        return out

    def share_by_layer(self) -> torch.Tensor:
        """``(L,)``: the share of (source, position) cells whose activation decodes to the source token."""
        return self.decodes_source.float().flatten(1).mean(1)

    def table(self, source: int = 0) -> list[list[str]]:
        """Rows per layer, one decoded text per source position, for source prompt ``source``."""
        return [[self.text[li][source][p] for p in range(self.positions.shape[1])] for li in range(len(self.layers))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (:meth:`from_dict` reads it back)."""
        return {"kind": self.kind.value, "layers": list(self.layers), "target_layers": list(self.target_layers),
                "sources": list(self.sources), "positions": self.positions.tolist(),
                "source_tokens": self.source_tokens.tolist(), "tokens": self.tokens.tolist(),
                "text": [[list(row) for row in layer] for layer in self.text], "target_prompt": self.target_prompt,
                "token_text": [list(row) for row in self.token_text]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PatchscopeResult":
        return cls(kind=SiteKind(d["kind"]), layers=tuple(d["layers"]), target_layers=tuple(d["target_layers"]),
                   sources=tuple(d["sources"]), positions=torch.tensor(d["positions"]),
                   source_tokens=torch.tensor(d["source_tokens"]), tokens=torch.tensor(d["tokens"]),
                   text=tuple(tuple(tuple(row) for row in layer) for layer in d["text"]),
                   target_prompt=d["target_prompt"], token_text=tuple(tuple(row) for row in d["token_text"]))

    def __repr__(self) -> str:
        what = "logit lens" if self.target_prompt is None else f"target {self.target_prompt!r}"
        lines = [f"PatchscopeResult({self.kind.value}, {len(self.layers)} layers x {len(self.sources)} sources, {what})"]
        for s, src in enumerate(self.sources[:4]):
            lines.append(f"  source {src!r} at {[self.token_text[s][p] for p in range(self.positions.shape[1])]}")
            for li, layer in enumerate(self.layers):
                lines.append(f"    L{layer:>3}: " + " | ".join(repr(t) for t in self.table(s)[li]))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        parts = []
        for s, src in enumerate(self.sources):
            head = "".join(f"<th>{html.escape(self.token_text[s][p])} ({int(self.positions[s, p])})</th>"
                           for p in range(self.positions.shape[1]))
            body = "".join(f"<tr><th>L{layer}</th>" + "".join(f"<td>{html.escape(t)}</td>" for t in row) + "</tr>"
                           for layer, row in zip(self.layers, self.table(s)))
            parts.append(f"<p>{html.escape(src)}</p><table><thead><tr><th>layer</th>{head}</tr></thead>"
                         f"<tbody>{body}</tbody></table>")
        return "".join(parts)


def _norm(text: str) -> str:
    return text.strip().lower()


def _first_word(text: str) -> str:
    """The first word of a continuation, after a leading ``->`` (the identity prompt's arrow)."""
    text = text.strip()
    if text.startswith("->"):
        text = text[2:]
    words = text.split()
    return _norm(words[0]) if words else ""


def patchscope(
    model: "Model",
    source_prompts: Any,
    site: str | SiteKind | Site = "resid_post",
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    target_prompt: Any = IDENTITY_PROMPT,
    target_position: int = -1,
    target_layer: int | None = None,
    max_new_tokens: int = 4,
) -> PatchscopeResult:
    """Decode the activation at ``site`` of each source prompt through a target prompt.

    Args:
        source_prompts: a text, a list of texts (any lengths) or of id lists, or a PromptSet
            (its clean prompts).
        site: a kind (``resid_post`` default; ``resid_pre`` / ``resid_mid`` / ``attn_out`` /
            ``mlp_out``), or a Site whose layer / position pick one layer / position.
        layers: source layers (default: the site's layer, else every layer).
        positions: source token indices, negative from each prompt's end (default: the site's
            position, else the last token).
        target_prompt: text or ids; :data:`IDENTITY_PROMPT` by default; None: the logit lens.
        target_position: where in the target the activation is written (default: its last token).
        target_layer: the layer written (default: the source layer, cell by cell).
        max_new_tokens: tokens generated from the patched target.
    """
    kind, layers_, positions_ = _parse_site(model, site, layers, positions)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise PromptError(f"max_new_tokens={max_new_tokens!r}: generate at least one token (max_new_tokens >= 1).")
    if target_layer is not None and not 0 <= target_layer < model.n_layers:
        raise SiteError(f"target_layer={target_layer} is out of range: the model has layers 0..{model.n_layers - 1}.")
    sources = _source_ids(model, source_prompts)
    target = None if target_prompt is None else prompt_ids(model, target_prompt)
    tpos = None
    if target is not None:
        Tt = target.shape[1]
        if target.shape[0] != 1:
            raise PromptError("target_prompt is one prompt; give one text or one list of ids.")
        tpos = Tt + target_position if target_position < 0 else target_position
        if not 0 <= tpos < Tt:
            raise SiteError(f"target_position={target_position} is outside the target prompt ({Tt} tokens: "
                            f"0..{Tt - 1}, or -1..-{Tt} from its end).")
    pos = torch.empty(len(sources), len(positions_), dtype=torch.long)
    for s, ids in enumerate(sources):
        T = len(ids)
        for j, p in enumerate(positions_):
            q = T + p if p < 0 else p
            if not 0 <= q < T:
                raise SiteError(f"Source position {p} is outside source prompt {s} ({T} tokens: 0..{T - 1}).")
            pos[s, j] = q
    acts = _source_acts(model, sources, kind, layers_, pos)  # (L, S, P, d)
    if target is None:
        tokens = _logit_lens(model, acts)
    else:
        tokens = _scope(model, acts, kind, layers_, target, tpos, target_layer, max_new_tokens)  # type: ignore[arg-type]
    src_tok = torch.tensor([[ids[int(q)] for q in pos[s]] for s, ids in enumerate(sources)])
    decode_text = _decoder(model)
    text = tuple(tuple(tuple(decode_text(tokens[li, s, p].tolist()) for p in range(pos.shape[1]))
                       for s in range(len(sources))) for li in range(len(layers_)))
    return PatchscopeResult(
        kind=kind, layers=tuple(layers_),
        target_layers=tuple(layers_ if target_layer is None else [target_layer] * len(layers_)),
        sources=tuple(decode_text(ids) for ids in sources), positions=pos, source_tokens=src_tok, tokens=tokens,
        text=text, target_prompt=None if target is None else decode_text(target[0].tolist()),
        token_text=tuple(tuple(decode_text([int(t)]) for t in row) for row in src_tok),
    )


def _parse_site(model: "Model", site: Any, layers: Sequence[int] | None,
                positions: Sequence[int] | None) -> tuple[SiteKind, list[int], list[int]]:
    if isinstance(site, Site):
        kind, layer, pos = site.kind, site.layer, site.pos
        if site.head is not None or site.index is not None:
            raise SiteError(f"{site}: a Patchscope reads a whole {kind.value} vector; drop head / index.")
    else:
        try:
            kind, layer, pos = SiteKind(site), None, None
        except ValueError:
            raise SiteError(f"site={site!r}: give a kind ({', '.join(k.value for k in _KINDS)}) or a Site.") from None
    if kind not in _KINDS:
        raise SiteError(f"A Patchscope reads residual-width activations; {kind.value!r} is not one "
                        f"(use {', '.join(k.value for k in _KINDS)}).")
    if isinstance(pos, str):
        raise SiteError(f"{site}: give a token index (negative from the end), not a name.")
    layers_ = list(layers) if layers is not None else ([layer] if layer is not None else list(range(model.n_layers)))
    bad = [l for l in layers_ if not isinstance(l, int) or not 0 <= l < model.n_layers]
    if bad or not layers_:
        raise SiteError(f"layers={layers_}: give layers in 0..{model.n_layers - 1}.")
    positions_ = list(positions) if positions is not None else ([pos] if pos is not None else [-1])
    if not positions_ or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions_):
        raise SiteError(f"positions={positions_!r}: give token indices (negative from each prompt's end).")
    return kind, layers_, positions_


def _source_ids(model: "Model", prompts: Any) -> list[list[int]]:
    from ..prompts.promptset import PromptSet

    if isinstance(prompts, PromptSet):
        return [row.tolist() for row in prompts.clean]
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, int) for p in prompts):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise PromptError(f"source_prompts={prompts!r:.60}: give a text, a list of texts or id lists, or a PromptSet.")
    return [prompt_ids(model, p)[0].tolist() for p in prompts]


def _decoder(model: "Model") -> Any:
    if model.tokenizer is None:
        return lambda ids: " ".join(f"#{int(t)}" for t in ids)
    return lambda ids: model.tokenizer.decode(list(ids))


def _source_acts(model: "Model", sources: list[list[int]], kind: SiteKind, layers: list[int],
                 pos: torch.Tensor) -> torch.Tensor:
    """``(L, S, P, d)``: the site's activation at each source position (one forward pass per prompt length)."""
    sites = [Site(kind, l) for l in layers]
    out = torch.empty(len(layers), len(sources), pos.shape[1], model.d_model, dtype=model.dtype)
    by_len: dict[int, list[int]] = {}
    for s, ids in enumerate(sources):
        by_len.setdefault(len(ids), []).append(s)
    with torch.inference_mode(), model.attention_fn():
        for idx in by_len.values():
            ids = torch.tensor([sources[s] for s in idx])
            with capture(model, sites) as acts:
                model.logits(ids, last_only=True)
            rows = torch.tensor(idx)
            for li, site in enumerate(sites):
                a = acts[site].cpu()
                out[li, rows] = a[torch.arange(len(idx))[:, None], pos[rows]]
    return out


def _logit_lens(model: "Model", acts: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits = model.adapter.unembed(acts.to(model.device))
    return logits.argmax(-1).cpu()[..., None]


def _scope(model: "Model", acts: torch.Tensor, kind: SiteKind, layers: list[int], target: torch.Tensor,
           tpos: int, target_layer: int | None, n: int) -> torch.Tensor:
    """Generate from the target prompt with each cell's activation written at ``tpos`` of its
    target layer: rows are (layer, source, position), :data:`ROWS` at a time."""
    L, S, P, d = acts.shape
    flat = acts.reshape(L * S * P, d)
    row_layer = torch.tensor([target_layer if target_layer is not None else l for l in layers]).repeat_interleave(S * P)
    tokens = torch.empty(L * S * P, n, dtype=torch.long)
    for r0 in range(0, flat.shape[0], ROWS):
        vals, lays = flat[r0 : r0 + ROWS], row_layer[r0 : r0 + ROWS]
        patches = {}
        for layer in sorted(set(lays.tolist())):
            mask = (lays == layer)[:, None]

            def write(x: torch.Tensor, mask: torch.Tensor = mask, vals: torch.Tensor = vals) -> torch.Tensor:
                return torch.where(mask.to(x.device), vals.to(x.device, x.dtype), x)

            patches[Site(kind, layer, pos=tpos)] = write
        ids = target.expand(len(vals), -1)
        toks, _ = decode(model, ids, patches, {}, n)
        tokens[r0 : r0 + ROWS] = toks
    return tokens.reshape(L, S, P, n)
