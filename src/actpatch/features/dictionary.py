"""A feature dictionary: a sparse autoencoder (SAE) or a transcoder, as a value.

A dictionary reads one site's activation ``x`` (its ``reads`` site), encodes it into
``n_features`` sparse feature activations ``f = encode(x)`` and decodes them into a
reconstruction of the activation at its ``site`` (the same site for an SAE; for a transcoder
the site it writes, e.g. an MLP's output from the MLP's input)::

    pre  = (normalise(x) - b_dec [SAE, when apply_b_dec_to_input]) @ W_enc + b_enc
    f    = relu(pre)                              architecture "relu" (SAELens' "standard")
         = relu(pre) * (pre > threshold)          "jumprelu" (and BatchTopK at inference)
         = topk(pre, k), then relu                "topk"
    x^   = denormalise(f @ W_dec + b_dec) [+ x @ W_skip.T for a skip transcoder]

Attached to a model (:func:`actpatch.features.attach`), the activation at ``site`` becomes
``x^ + error`` with ``error = y - x^`` (``y`` the model's own activation there), which is the
identity until a feature or the error term is patched.

Example:
    >>> import torch
    >>> from actpatch import Site
    >>> from actpatch.features import Dictionary
    >>> d = Dictionary.random(Site("resid_post", 0), d_in=8, n_features=16, seed=0)
    >>> x = torch.randn(2, 3, 8)
    >>> tuple(d.encode(x).shape), d.n_features
    ((2, 3, 16), 16)
    >>> bool(torch.allclose(d.decode(d.encode(x), x) + d.error(x), x, atol=1e-6))
    True
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import DictionaryError
from ..sites import DICTIONARY_SITES, Site, SiteKind

__all__ = ["Dictionary", "Activation", "Normalization"]


class Activation(str, enum.Enum):
    """How pre-activations become features."""

    RELU = "relu"
    """``relu(pre)`` (SAELens' ``standard`` architecture)."""
    JUMPRELU = "jumprelu"
    """``relu(pre) * (pre > threshold)``; also BatchTopK at inference (one global threshold)."""
    TOPK = "topk"
    """The ``k`` largest pre-activations of each token, then relu; the others zero."""


class Normalization(str, enum.Enum):
    """How the input is normalised before encoding (and the reconstruction un-normalised)."""

    NONE = "none"
    SCALE = "scale"
    """A constant factor: encode ``x * scale``, decode divides by it (SAELens'
    ``expected_average_only_in`` with its ``norm_scaling_factor``)."""
    CONSTANT_NORM = "constant_norm_rescale"
    """Each token rescaled to norm ``sqrt(d_in)``; the reconstruction scaled back."""
    LAYER_NORM = "layer_norm"
    """Each token standardised (mean 0, std 1); the reconstruction un-standardised."""


@dataclass(eq=False)
class Dictionary:
    """An SAE or a transcoder: weights, architecture, and the sites it reads and writes.

    ``W_enc`` (d_in, n_features), ``b_enc`` (n_features), ``W_dec`` (n_features, d_out),
    ``b_dec`` (d_out); ``threshold`` (n_features or one value) for ``jumprelu``; ``k`` for
    ``topk``; ``W_skip`` (d_out, d_in) for a skip transcoder. ``site`` is where the
    reconstruction replaces the model's activation, ``reads`` where the input is read (None:
    the same site, an SAE). Build one with :func:`actpatch.load_dictionary`, :meth:`random`, or
    :func:`actpatch.features.train_dictionary`.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    site: Site
    reads: Site | None = None
    activation: Activation = Activation.RELU
    k: int | None = None
    threshold: torch.Tensor | None = None
    apply_b_dec_to_input: bool = True
    normalization: Normalization = Normalization.NONE
    scale: float | None = None
    W_skip: torch.Tensor | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    """What the file said about its origin (model name, hook name, training data) and, for
    dictionaries actpatch trained, their quality figures (``meta["quality"]``)."""

    def __post_init__(self) -> None:
        self.activation = _enum(Activation, self.activation, "activation")
        self.normalization = _enum(Normalization, self.normalization, "normalization")
        self.site = _dictionary_site(self.site, "site")
        if self.reads is not None:
            self.reads = _dictionary_site(self.reads, "reads")
            if self.reads == self.site:
                self.reads = None
        self._check_shapes()
        if self.activation is Activation.TOPK and (self.k is None or not 0 < int(self.k) <= self.n_features):
            raise DictionaryError(f"A topk dictionary needs k in 1..{self.n_features} (its feature count), got "
                                  f"k={self.k!r}.")
        if self.activation is Activation.JUMPRELU and self.threshold is None:
            raise DictionaryError("A jumprelu dictionary needs its threshold (one per feature, or one value).")
        if self.normalization is Normalization.SCALE and not (self.scale and self.scale > 0):
            raise DictionaryError(f"Normalization 'scale' needs a positive scale factor, got {self.scale!r}.")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise DictionaryError(f"Dictionary {self.label}: {name} has {bad} NaN / inf value(s); the weights "
                                      f"are damaged (re-export them).")

    def _check_shapes(self) -> None:
        d_in, F = self.W_enc.shape if self.W_enc.dim() == 2 else (None, None)
        want = {"W_enc": (d_in, F), "b_enc": (F,), "W_dec": (F, self.W_dec.shape[-1]),
                "b_dec": (self.W_dec.shape[-1],)}
        for name, shape in want.items():
            t = getattr(self, name)
            if d_in is None or tuple(t.shape) != shape:
                raise DictionaryError(f"Dictionary weights do not fit together: {name} has shape {tuple(t.shape)}, "
                                      f"expected {shape} (W_enc is (d_in, n_features), W_dec (n_features, d_out)).")
        if self.threshold is not None and self.threshold.numel() not in (1, F):
            raise DictionaryError(f"threshold has {self.threshold.numel()} values; give one per feature ({F}) or one.")
        if self.W_skip is not None and tuple(self.W_skip.shape) != (self.d_out, d_in):
            raise DictionaryError(f"W_skip has shape {tuple(self.W_skip.shape)}, expected (d_out, d_in) = "
                                  f"{(self.d_out, d_in)}.")
        if not self.is_transcoder and d_in != self.d_out:
            raise DictionaryError(f"An SAE reads and writes one site, but W_enc reads {d_in} and W_dec writes "
                                  f"{self.d_out} dimensions; a transcoder names the site it reads (reads=...).")

    # -- shapes and names ---------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def is_transcoder(self) -> bool:
        """Whether it reads one site and writes another."""
        return self.reads is not None

    @property
    def input_site(self) -> Site:
        """The site whose activation is encoded (``reads``, or ``site`` for an SAE)."""
        return self.reads if self.reads is not None else self.site

    @property
    def label(self) -> str:
        return self.name or f"{'transcoder' if self.is_transcoder else 'sae'}@{self.site}"

    def feature(self, index: int, pos: int | str | None = None) -> Site:
        """The site of one feature (at one position, or all when ``pos`` is None).

        Example: ``d.feature(17, pos="end")``."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n_features:
            raise DictionaryError(f"Feature {index!r} is out of range for {self.label}: it has features "
                                  f"0..{self.n_features - 1}.")
        return Site(SiteKind.FEATURE, self.site.layer, pos=pos, index=index, on=self.site.kind)

    def features(self, indices: Sequence[int], pos: int | str | None = None) -> list[Site]:
        """The sites of several features: patched together, a set of features."""
        return [self.feature(int(i), pos) for i in indices]

    def error_site(self, pos: int | str | None = None) -> Site:
        """The site of the error term (the part of the activation the dictionary misses)."""
        return Site(SiteKind.FEATURE_ERROR, self.site.layer, pos=pos, on=self.site.kind)

    @property
    def feature_site(self) -> Site:
        """All features at all positions (the full feature site)."""
        return Site(SiteKind.FEATURE, self.site.layer, on=self.site.kind)

    # -- computing ----------------------------------------------------------------------------
    def _normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        n = self.normalization
        if n is Normalization.SCALE:
            return x * self.scale, self.scale
        if n is Normalization.CONSTANT_NORM:
            coeff = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * coeff, coeff
        if n is Normalization.LAYER_NORM:
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            return (x - mu) / (std + 1e-5), (mu, std)
        return x, None

    def _denormalise(self, y: torch.Tensor, ctx: Any) -> torch.Tensor:
        if ctx is None or self.is_transcoder:  # a transcoder's output lives in another space
            return y
        if self.normalization is Normalization.LAYER_NORM:
            mu, std = ctx
            return y * std + mu
        return y / ctx

    def encode_with_context(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(features, context)``: the context (per-token normalisation) that :meth:`decode`
        needs to undo the input normalisation."""
        x = x.to(self.W_enc.dtype)
        xn, ctx = self._normalise(x)
        if self.apply_b_dec_to_input and not self.is_transcoder:
            xn = xn - self.b_dec
        pre = xn @ self.W_enc + self.b_enc
        if self.activation is Activation.TOPK:
            top = pre.topk(int(self.k), dim=-1)  # type: ignore[arg-type]
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        elif self.activation is Activation.JUMPRELU:
            f = pre.relu() * (pre > self.threshold).to(pre.dtype)  # type: ignore[operator]
        else:
            f = pre.relu()
        return f, ctx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(..., n_features)`` of inputs ``(..., d_in)``."""
        return self.encode_with_context(x)[0]

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None, ctx: Any = None) -> torch.Tensor:
        """The reconstruction ``(..., d_out)`` from features; ``x`` (the input) is needed for a
        skip transcoder and for per-token normalisation (or pass its ``ctx``)."""
        if ctx is None and x is not None and self.normalization is not Normalization.NONE:
            ctx = self._normalise(x.to(self.W_enc.dtype))[1]
        if ctx is None and self.normalization is Normalization.SCALE:
            ctx = self.scale
        if ctx is None and self.normalization in (Normalization.CONSTANT_NORM, Normalization.LAYER_NORM) \
                and not self.is_transcoder:
            raise DictionaryError(f"{self.label} normalises each token: decode(f, x) needs the input x.")
        y = self._denormalise(f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec, ctx)
        if self.W_skip is not None:
            if x is None:
                raise DictionaryError(f"{self.label} has a skip connection: decode(f, x) needs the input x.")
            y = y + x.to(self.W_skip.dtype) @ self.W_skip.T
        return y

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` (for a transcoder: its estimate of the written site)."""
        f, ctx = self.encode_with_context(x)
        return self.decode(f, x, ctx)

    def error(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The error term ``y - reconstruct(x)`` (``y = x`` for an SAE)."""
        target = x if y is None else y
        return target.to(self.W_dec.dtype) - self.reconstruct(x)

    # -- building -----------------------------------------------------------------------------
    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Dictionary":
        """A copy with weights in ``dtype`` / on ``device``."""
        moved = {n: (None if getattr(self, n) is None else getattr(self, n).to(device=device, dtype=dtype))
                 for n in _TENSORS}
        return Dictionary(**{**self._fields(), **moved})  # type: ignore[arg-type]

    def _fields(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.__dataclass_fields__}

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @classmethod
    def random(cls, site: Site, d_in: int, n_features: int, *, seed: int = 0, activation: str = "relu",
               k: int | None = None, reads: Site | None = None, d_out: int | None = None,
               dtype: torch.dtype = torch.float32) -> "Dictionary":
        """A dictionary with random weights (tests, examples): decoder rows of norm 1, encoder
        their transpose, small biases."""
        g = torch.Generator().manual_seed(seed)
        d_out = d_in if d_out is None else d_out
        W_dec = torch.randn(n_features, d_out, generator=g, dtype=torch.float64)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.T.clone() if d_out == d_in else torch.randn(d_in, n_features, generator=g, dtype=torch.float64) / d_in ** 0.5
        b_enc = 0.1 * torch.randn(n_features, generator=g, dtype=torch.float64)
        b_dec = 0.1 * torch.randn(d_out, generator=g, dtype=torch.float64)
        threshold = torch.full((n_features,), 0.05, dtype=torch.float64) if activation == "jumprelu" else None
        return cls(W_enc.to(dtype), b_enc.to(dtype), W_dec.to(dtype), b_dec.to(dtype), site, reads=reads,
                   activation=activation, k=k, threshold=None if threshold is None else threshold.to(dtype))  # type: ignore[arg-type]

    def summary(self) -> str:
        """One paragraph: what it is, where it sits, and its quality figures when known."""
        kind = "transcoder" if self.is_transcoder else "SAE"
        where = f"reads {self.input_site}, writes {self.site}" if self.is_transcoder else f"at {self.site}"
        act = self.activation.value + (f" (k={self.k})" if self.k else "")
        lines = [f"{kind} {self.name or ''} {where}: {self.n_features} features over {self.d_in} dimensions, "
                 f"{act}".replace("  ", " ")]
        q = self.meta.get("quality")
        if q:
            lines.append("quality: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in q.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Dictionary({self.label!r}, n_features={self.n_features}, activation={self.activation.value!r})"


_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")


def _enum(cls: type[enum.Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise DictionaryError(f"Unknown dictionary {what} {value!r}; use one of: "
                              f"{', '.join(m.value for m in cls)}.") from None  # type: ignore[attr-defined]


def _dictionary_site(site: Any, what: str) -> Site:
    if not isinstance(site, Site):
        raise DictionaryError(f"A dictionary's {what} must be a Site, e.g. Site('resid_post', 3), got {site!r}.")
    allowed = ", ".join(sorted(k.value for k in DICTIONARY_SITES))
    if site.kind not in DICTIONARY_SITES or not site.is_full:
        raise DictionaryError(f"A dictionary attaches to a whole site of one of: {allowed} (a layer, no position "
                              f"or head), not {site}.")
    return site
