"""Attaching feature dictionaries to a model: width checks and the context-manager form.

While a dictionary is attached at its site, ``Site("feature", layer, on=kind, index=i)`` (build
it with ``dictionary.feature(i)``) and ``dictionary.error_site()`` are sites like any other:
:func:`~actpatch.capture`, :func:`~actpatch.intervene`, :func:`~actpatch.patch` and
:func:`~actpatch.sweep` read and write them (the mechanics live in :mod:`actpatch.hooks`).

Example:
    >>> import actpatch as ap, torch
    >>> from actpatch.testing import tiny_model
    >>> from actpatch.features import Dictionary, attach
    >>> m = tiny_model("llama")
    >>> d = Dictionary.random(ap.Site("resid_post", 0), d_in=m.d_model, n_features=32, seed=0)
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> with attach(m, d), ap.capture(m, [d.feature_site]) as acts:
    ...     _ = m.logits(ids)
    >>> tuple(acts[d.feature_site].shape)
    (1, 4, 32)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import DictionaryError
from ..sites import Site, SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model
    from .dictionary import Dictionary

__all__ = ["attach", "check_fits", "site_width"]

# Where in a block each site is computed: a transcoder must read before it writes.
_ORDER = {SiteKind.RESID_PRE: 0, SiteKind.Z: 1, SiteKind.ATTN_OUT: 2, SiteKind.RESID_MID: 3, SiteKind.MLP_IN: 3,
          SiteKind.MLP_POST: 4, SiteKind.MLP_OUT: 5, SiteKind.RESID_POST: 6}


def site_width(model: "Model", site: Site) -> int:
    """The width of the last axis of a dictionary site's activation (z: all heads flattened)."""
    if site.kind == SiteKind.Z:
        return model.n_heads * model.d_head
    if site.kind == SiteKind.MLP_POST:
        return model.d_mlp
    return model.d_model


def check_fits(model: "Model", d: Any) -> None:
    """Refuse (naming both numbers) a dictionary whose widths or sites do not fit ``model``."""
    from .dictionary import Dictionary

    if not isinstance(d, Dictionary):
        raise DictionaryError(f"attach() takes actpatch Dictionary objects (ap.load_dictionary(path) reads one, also "
                              f"from an SAELens SAE), got {type(d).__name__}.")
    for what, site in (("site", d.site), ("reads", d.reads)):
        if site is None:
            continue
        try:
            site.check(model)
        except Exception as e:
            raise DictionaryError(f"Dictionary {d.label}: its {what} {site} does not fit this model: {e}") from None
    if d.reads is not None:
        if d.reads.layer != d.site.layer or _ORDER[d.reads.kind] >= _ORDER[d.site.kind]:
            raise DictionaryError(f"Transcoder {d.label} reads {d.reads} and writes {d.site}: actpatch attaches "
                                  f"transcoders that read a site earlier in the same block than the one they write "
                                  f"(e.g. reads mlp_in.L3, writes mlp_out.L3).")
    want_in, want_out = site_width(model, d.input_site), site_width(model, d.site)
    if d.d_in != want_in:
        raise DictionaryError(f"Dictionary {d.label} reads {d.d_in} dimensions, but {d.input_site} of this model "
                              f"has {want_in}: it was trained for another model or site.")
    if d.d_out != want_out:
        raise DictionaryError(f"Dictionary {d.label} writes {d.d_out} dimensions, but {d.site} of this model has "
                              f"{want_out}: it was trained for another model or site.")


@contextmanager
def attach(model: "Model", *dictionaries: "Dictionary") -> Iterator[None]:
    """Attach dictionaries for the duration of the context (see :meth:`Model.attach`); they
    are detached afterwards, also on an error."""
    model.attach(*dictionaries)
    try:
        yield
    finally:
        model.detach(*dictionaries)
