"""Typed sites: *where* in the model an activation lives.

A :class:`Site` names one activation tensor (``kind`` at ``layer``) and optionally a slice of
it (``head``, ``pos``, ``index``). Sites are frozen, hashable and validated on construction;
range checks against a particular model happen in :meth:`Site.check`.

Layouts of the full (unsliced) activation, batch first::

    embed, resid_pre, resid_mid, resid_post,
    attn_out, mlp_out, resid_final, mlp_in  (batch, pos, d_model)
    z, q                                    (batch, pos, n_heads, d_head)
    k, v                                    (batch, pos, n_kv_heads, d_head)
    k_ungrouped, v_ungrouped                (batch, pos, n_heads, d_head)
    pattern                                 (batch, n_heads, query_pos, key_pos)
    mlp_post                                (batch, pos, d_mlp)
    feature, feature_error                  (batch, pos, feature) / (batch, pos, d_site)

``feature`` and ``feature_error`` are the sites of a feature dictionary (an SAE or a transcoder,
:mod:`actpatch.features`) attached at the site ``on`` (its kind) of ``layer``: the dictionary's
feature activations, and the error term ``x - decode(encode(x))`` that makes attaching it the
identity.

``head`` selects a head (a KV head for k / v, a query head for k_ungrouped / v_ungrouped), ``pos`` a position (the query position for
``pattern``), ``index`` a neuron (``mlp_post``), a model dimension (residual kinds), a head
dimension (z / q / k / v) or a key position (``pattern``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import SiteError

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model

__all__ = ["SiteKind", "Site", "as_sites"]


class SiteKind(str, enum.Enum):
    """The kinds of activation a :class:`Site` can name."""

    EMBED = "embed"
    """Token embedding output (before any model-specific scaling or position embedding)."""
    RESID_PRE = "resid_pre"
    """Residual stream entering block ``layer``."""
    RESID_MID = "resid_mid"
    """Residual stream after attention, before the MLP (absent in parallel-residual models)."""
    RESID_POST = "resid_post"
    """Residual stream leaving block ``layer`` (equals ``resid_pre`` of ``layer + 1``)."""
    ATTN_OUT = "attn_out"
    """What the attention sub-layer adds to the residual stream."""
    MLP_OUT = "mlp_out"
    """What the MLP sub-layer adds to the residual stream."""
    Z = "z"
    """Per-head attention output, before the output projection."""
    Q = "q"
    """Per-head queries as attention sees them (after any rotary embedding)."""
    K = "k"
    """Per-KV-head keys as attention sees them (after any rotary embedding)."""
    V = "v"
    """Per-KV-head values."""
    K_UNGROUPED = "k_ungrouped"
    """The keys as each *query* head reads them: ``k`` with grouped-query attention's groups
    expanded to one copy per query head (TransformerLens's ``ungroup_grouped_query_attention``),
    so that writing head ``h`` changes the keys of query head ``h`` only, not of its whole group.
    The same tensor as ``k`` without grouped-query attention."""
    V_UNGROUPED = "v_ungrouped"
    """The values as each query head reads them (see ``k_ungrouped``)."""
    PATTERN = "pattern"
    """Attention probabilities, per head, query position x key position."""
    MLP_POST = "mlp_post"
    """MLP neurons: the input of the MLP's output projection."""
    RESID_FINAL = "resid_final"
    """Residual stream entering the final norm (the logits are the model's output)."""
    MLP_IN = "mlp_in"
    """What the MLP reads from the residual stream, before its norm: resid_mid in serial blocks,
    resid_pre in parallel ones. Writing it changes the MLP's input only (not the skip path);
    edge attribution and circuits use it."""
    FEATURE = "feature"
    """A feature dictionary's activations at the site it is attached to (``on``, ``layer``):
    ``index`` is the feature (see :mod:`actpatch.features`)."""
    FEATURE_ERROR = "feature_error"
    """A feature dictionary's error term ``x - decode(encode(x))`` at its site (``on``, ``layer``)."""

    @property
    def per_layer(self) -> bool:
        """Whether the kind needs a ``layer`` (all but embed and resid_final)."""
        return self not in (SiteKind.EMBED, SiteKind.RESID_FINAL)

    @property
    def has_heads(self) -> bool:
        """Whether ``head`` may be given."""
        return self in HEAD_KINDS

    @property
    def layout(self) -> tuple[str, ...]:
        """Axis names of the full activation tensor."""
        return _LAYOUTS[self]


FEATURE_KINDS = frozenset({SiteKind.FEATURE, SiteKind.FEATURE_ERROR})
DICTIONARY_SITES = frozenset({SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST, SiteKind.ATTN_OUT,
                              SiteKind.MLP_OUT, SiteKind.MLP_IN, SiteKind.MLP_POST, SiteKind.Z})
"""Where a feature dictionary may be attached (the site its reconstruction replaces)."""
HEAD_KINDS = frozenset({SiteKind.Z, SiteKind.Q, SiteKind.K, SiteKind.V, SiteKind.K_UNGROUPED, SiteKind.V_UNGROUPED,
                        SiteKind.PATTERN})
KV_KINDS = frozenset({SiteKind.K, SiteKind.V})
ATTENTION_FN_KINDS = frozenset({SiteKind.Q, SiteKind.K, SiteKind.V, SiteKind.K_UNGROUPED, SiteKind.V_UNGROUPED,
                                SiteKind.PATTERN})
UNGROUPED_KINDS = frozenset({SiteKind.K_UNGROUPED, SiteKind.V_UNGROUPED})

_RESID = ("batch", "pos", "d_model")
_LAYOUTS: dict[SiteKind, tuple[str, ...]] = {
    SiteKind.EMBED: _RESID,
    SiteKind.RESID_PRE: _RESID,
    SiteKind.RESID_MID: _RESID,
    SiteKind.RESID_POST: _RESID,
    SiteKind.ATTN_OUT: _RESID,
    SiteKind.MLP_OUT: _RESID,
    SiteKind.RESID_FINAL: _RESID,
    SiteKind.MLP_IN: _RESID,
    SiteKind.Z: ("batch", "pos", "head", "d_head"),
    SiteKind.Q: ("batch", "pos", "head", "d_head"),
    SiteKind.K: ("batch", "pos", "kv_head", "d_head"),
    SiteKind.V: ("batch", "pos", "kv_head", "d_head"),
    SiteKind.K_UNGROUPED: ("batch", "pos", "head", "d_head"),
    SiteKind.V_UNGROUPED: ("batch", "pos", "head", "d_head"),
    SiteKind.PATTERN: ("batch", "head", "query_pos", "key_pos"),
    SiteKind.MLP_POST: ("batch", "pos", "d_mlp"),
    SiteKind.FEATURE: ("batch", "pos", "feature"),
    SiteKind.FEATURE_ERROR: ("batch", "pos", "d_site"),
}

_KINDS_LIST = ", ".join(k.value for k in SiteKind)


def _check_pos(value: Any) -> None:
    """A position: an index, a negative index counted from each prompt's end (-1 = the last
    token), or a name (``"end"``, ``"first_diff"``, a builder's ``"S2"``)."""
    if isinstance(value, str):
        if not value or "." in value or value.isspace():
            raise SiteError(f"Site pos={value!r} is not a position name; use an index, -1 (the last token) or a "
                            f"name such as 'end', 'first_diff', 'S2'.")
        return
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise SiteError(f"Site pos={value!r} must be an int, a position name ('end', 'S2') or None.")


def _check_index(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise SiteError(f"Site {name}={value!r} must be an int or None.")
    if value < 0:
        raise SiteError(
            f"Site {name}={value} is negative; use a non-negative index "
            f"(positions count from the start of the prompt)."
        )


@dataclass(frozen=True, repr=False)
class Site:
    """One activation (or a slice of it) in a model.

    Example:
        >>> from actpatch import Site
        >>> Site("z", 3, head=2)
        Site(kind=<SiteKind.Z: 'z'>, layer=3, head=2, pos=None, index=None)
        >>> Site("resid_pre", 0, pos=4).full()
        Site(kind=<SiteKind.RESID_PRE: 'resid_pre'>, layer=0, head=None, pos=None, index=None)
    """

    kind: SiteKind
    layer: int | None = None
    head: int | None = None
    pos: int | str | None = None
    """A token index; or, resolved per prompt by :func:`actpatch.patch`, a negative index from
    the end (-1 = last) or a name (``"end"``, ``"first_diff"``, ``"last_diff"``, a builder's or a
    prompt file's names such as ``"S2"``)."""
    index: int | None = None
    on: SiteKind | None = None
    """For ``feature`` / ``feature_error`` sites only: the kind of site the dictionary is
    attached to (``"resid_post"``, ``"mlp_out"``, ...); None for every other kind."""

    def __post_init__(self) -> None:
        try:
            kind = SiteKind(self.kind)
        except ValueError:
            raise SiteError(
                f"Unknown site kind {self.kind!r}. Use one of: {_KINDS_LIST}."
            ) from None
        object.__setattr__(self, "kind", kind)
        if kind in FEATURE_KINDS:
            allowed = ", ".join(sorted(k.value for k in DICTIONARY_SITES))
            try:
                on = SiteKind(self.on) if self.on is not None else None
            except ValueError:
                on = None
            if on not in DICTIONARY_SITES:
                raise SiteError(f"Site kind {kind.value!r} needs on=<the site its dictionary is attached to> (one "
                                f"of {allowed}), got on={self.on!r}; e.g. dictionary.feature(3) builds it.")
            object.__setattr__(self, "on", on)
        elif self.on is not None:
            raise SiteError(f"on={self.on!r} applies to feature sites only ('feature', 'feature_error'), not "
                            f"{kind.value!r}.")
        if kind.per_layer and self.layer is None:
            raise SiteError(f"Site kind {kind.value!r} needs a layer, e.g. Site({kind.value!r}, 0).")
        if not kind.per_layer and self.layer is not None:
            raise SiteError(f"Site kind {kind.value!r} has no layer; drop layer={self.layer!r}.")
        if self.head is not None and not kind.has_heads:
            raise SiteError(
                f"Site kind {kind.value!r} has no heads; head={self.head!r} is only valid for "
                f"{', '.join(sorted(k.value for k in HEAD_KINDS))}."
            )
        for name in ("layer", "head", "index"):
            _check_index(name, getattr(self, name))
        _check_pos(self.pos)

    @property
    def relative(self) -> bool:
        """Whether the position depends on the prompt (a name or a negative index)."""
        return isinstance(self.pos, str) or (isinstance(self.pos, int) and self.pos < 0)

    def at(self, pos: int) -> "Site":
        """This site at token index ``pos`` (a relative site resolved for one prompt)."""
        return Site(self.kind, self.layer, head=self.head, pos=pos, index=self.index, on=self.on)

    def full(self) -> "Site":
        """The whole activation this site slices (same kind and layer, no head/pos/index)."""
        return Site(self.kind, self.layer, on=self.on)

    @property
    def is_full(self) -> bool:
        """True when the site names a whole activation tensor."""
        return self.head is None and self.pos is None and self.index is None

    def selector(self) -> tuple[Any, ...]:
        """Index tuple that picks this site's slice out of the full activation tensor."""
        if self.relative:
            raise SiteError(f"{self}: position {self.pos!r} is relative to each prompt; ap.patch resolves it per "
                            f"prompt, other entry points need a token index (pos=<int>).")
        sel: list[Any] = [slice(None)] * len(self.kind.layout)
        layout = self.kind.layout
        if self.head is not None:
            sel[layout.index("kv_head" if self.kind in KV_KINDS else "head")] = self.head
        if self.pos is not None:
            sel[layout.index("query_pos" if self.kind == SiteKind.PATTERN else "pos")] = self.pos
        if self.index is not None:
            sel[len(layout) - 1] = self.index
        return tuple(sel)

    def check(self, model: "Model", seq_len: int | None = None) -> None:
        """Raise :class:`SiteError` if the site is out of range for ``model`` (and ``seq_len``)."""
        if self.kind in FEATURE_KINDS:
            model.adapter.check_site(Site(self.on, self.layer))  # type: ignore[arg-type]
        else:
            model.adapter.check_site(self)
        if self.layer is not None and not 0 <= self.layer < model.n_layers:
            raise SiteError(
                f"{self}: layer {self.layer} is out of range; this model has layers "
                f"0..{model.n_layers - 1}."
            )
        if self.head is not None:
            n = model.n_kv_heads if self.kind in KV_KINDS else model.n_heads
            what = "KV heads" if self.kind in KV_KINDS else "heads"
            if self.head >= n:
                hint = ""
                if self.kind in KV_KINDS and self.head < model.n_heads:
                    hint = (f" Head {self.head} counts KV heads here; the {self.kind.value} that query head {self.head} "
                            f"reads (KV head {self.head // (model.n_heads // model.n_kv_heads)}'s) is "
                            f"Site('{self.kind.value}_ungrouped', {self.layer}, head={self.head}).")
                raise SiteError(f"{self}: head {self.head} is out of range; this model has {n} {what} "
                                f"(0..{n - 1}).{hint}")
        if self.pos is not None and not self.relative and seq_len is not None and self.pos >= seq_len:
            raise SiteError(
                f"{self}: position {self.pos} is out of range for prompts of {seq_len} tokens "
                f"(valid: 0..{seq_len - 1})."
            )
        if self.index is not None:
            last = self.kind.layout[-1]
            sizes = {"d_model": model.d_model, "d_head": model.d_head, "d_mlp": model.d_mlp, "key_pos": seq_len}
            if self.kind in FEATURE_KINDS:
                d = model.attached(self)
                sizes = {"feature": d.n_features, "d_site": d.d_out}
            size = sizes[last]
            if size is not None and self.index >= size:
                raise SiteError(f"{self}: index {self.index} is out of range for {last} of size {size}.")

    @classmethod
    def parse(cls, text: str) -> "Site":
        """The site :meth:`__str__` writes: ``"q.L23.H3"``, ``"resid_final"``, ``"z.L9.H1.pos4"``,
        ``"mlp_post.L3.[7]"``, ``"k.L23.KV1"`` (keys and values are numbered by KV head; ``H``
        is read there too).

        Example:
            >>> from actpatch import Site
            >>> Site.parse("q.L23.H3") == Site("q", 23, head=3)
            True
        """
        kind, *rest = str(text).strip().split(".")
        fields: dict[str, int | str] = {}
        if "@" in kind:  # feature@resid_post.L3.[17]
            kind, fields["on"] = kind.split("@", 1)
        names = {"L": "layer", "H": "head", "KV": "head", "pos": "pos"}
        for part in rest:
            key = next((k for k in ("pos", "L", "H", "KV") if part.startswith(k) and part[len(k):].isdigit()), None)
            if key is not None and names[key] not in fields:
                fields[names[key]] = int(part[len(key):])
            elif part.startswith("pos") and len(part) > 3 and "pos" not in fields:  # pos-1, posend, posS2
                tail = part[3:]
                fields["pos"] = int(tail) if tail.lstrip("-").isdigit() else tail
            elif part.startswith("[") and part.endswith("]") and part[1:-1].isdigit() and "index" not in fields:
                fields["index"] = int(part[1:-1])
            else:
                raise SiteError(f"Cannot read site {text!r}: {part!r} is not L<layer>, H<head> (KV<kv head>), pos<position> or "
                                f"[<index>]. Examples: 'resid_final', 'q.L23.H3', 'z.L9.H1.pos4'.")
        return cls(kind, **fields)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        on = "" if self.on is None else f", on={self.on!r}"
        return (f"Site(kind={self.kind!r}, layer={self.layer!r}, head={self.head!r}, pos={self.pos!r}, "
                f"index={self.index!r}{on})")

    def __str__(self) -> str:
        parts = [self.kind.value if self.on is None else f"{self.kind.value}@{self.on.value}"]
        if self.layer is not None:
            parts.append(f"L{self.layer}")
        if self.head is not None:
            parts.append(f"{'KV' if self.kind in KV_KINDS else 'H'}{self.head}")  # k / v: the KV head's number
        if self.pos is not None:
            parts.append(f"pos{self.pos}")
        if self.index is not None:
            parts.append(f"[{self.index}]")
        return ".".join(parts)


def as_sites(value: Any, what: str = "sites", *, allow_empty: bool = False) -> list[Site]:
    """A list of sites from one :class:`Site` or a sequence of them; anything else (text
    included: sites are typed, ``Site.parse`` reads their text) is refused, naming the parameter."""
    from .errors import SiteError

    if isinstance(value, str):
        raise SiteError(f"{what}= takes Site objects, got the text {value!r}; write ap.Site.parse({value!r}).")
    if isinstance(value, Site):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        raise SiteError(f"{what}= takes a Site or a list of Sites (e.g. [ap.Site('z', 0, head=1)]), "
                        f"not {type(value).__name__}.") from None
    bad = [item for item in items if not isinstance(item, Site)]
    if bad:
        raise SiteError(f"{what}= takes Site objects, got {bad[0]!r}; e.g. ap.Site('z', 3, head=1) or "
                        f"ap.Site.parse('z.L3.H1').")
    if not items and not allow_empty:
        raise SiteError(f"{what}= needs at least one Site, e.g. [ap.Site('resid_pre', 0)].")
    return items
