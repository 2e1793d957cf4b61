"""The :class:`Model` handle: an HF causal LM, its tokenizer and its adapter, in one object."""

from __future__ import annotations

import hashlib
import itertools
from contextlib import AbstractContextManager, contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..errors import PromptError
from .adapters import Adapter, adapter_for, live_param
from .attention import AttentionState, continuation_tail
from .recipe import Recipe

if TYPE_CHECKING:  # pragma: no cover
    from ..prompts.continuation import Continuation

__all__ = ["Model"]


def _dictionary_error(message: str) -> Exception:
    from ..errors import DictionaryError

    return DictionaryError(message)


class Model:
    """A loaded model ready for patching.

    Attributes:
        hf: the Hugging Face ``*ForCausalLM`` module (eval mode).
        tokenizer: its tokenizer (``None`` for tiny test models built from ids).
        adapter: the family adapter, the only object that knows module paths.
        name: a human-readable id (hub id, path or bundled name).

    Example:
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("gpt2")
        >>> (m.n_layers, m.n_heads, m.d_head)
        (2, 4, 16)
    """

    def __init__(self, hf: nn.Module, tokenizer: Any = None, name: str | None = None) -> None:
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.adapter: Adapter = adapter_for(hf)
        self.name = name or getattr(hf.config, "_name_or_path", "") or type(hf).__name__
        self.recipe: Recipe | None = None
        """How to rebuild this model elsewhere (set by the loaders; None for a model built in memory)."""
        # Hook bookkeeping of this model only (see actpatch.hooks): one torch hook per module
        # side, and the attention function's hooks and key / value prefixes.
        self.hook_points: dict[tuple[int, str], Any] = {}
        self._hook_seq = itertools.count()
        self.attention_state = AttentionState(self.hf)
        self.dictionaries: dict[Any, Any] = {}
        """Attached feature dictionaries by the (full) site they replace: see :meth:`attach`."""

    # -- feature dictionaries ----------------------------------------------------------------
    def attach(self, *dictionaries: Any) -> None:
        """Attach feature dictionaries (SAEs, transcoders): their feature and error sites become
        patchable; the model's outputs do not change (see :mod:`actpatch.features`). Widths are
        checked against the model first; :meth:`detach` removes them, ``ap.features.attach`` is
        the context-manager form."""
        from ..features.attach import check_fits

        for d in dictionaries:
            check_fits(self, d)
        taken = [d for d in dictionaries if self.dictionaries.get(d.site, d) is not d]
        if taken:
            raise _dictionary_error(f"{taken[0].site} already has a dictionary attached "
                                    f"({self.dictionaries[taken[0].site].label}); detach it first.")
        for d in dictionaries:
            self.dictionaries[d.site] = d

    def detach(self, *dictionaries: Any) -> None:
        """Remove attached dictionaries (all of them when none are named)."""
        for d in dictionaries or list(self.dictionaries.values()):
            if self.dictionaries.get(d.site) is d:
                del self.dictionaries[d.site]

    def attached(self, site: Any) -> Any:
        """The dictionary attached where a feature site ``site`` points (``site.on`` at
        ``site.layer``); a clear error when there is none."""
        from ..sites import Site

        key = Site(site.on, site.layer)
        d = self.dictionaries.get(key)
        if d is None:
            have = ", ".join(str(k) for k in self.dictionaries) or "none"
            raise _dictionary_error(f"{site}: no dictionary is attached at {key} (attached: {have}); attach one "
                                    f"first: model.attach(dictionary) or `with ap.features.attach(model, d):`.")
        return d

    def next_hook_seq(self) -> int:
        """Order of attachment, so entries of equal priority run in the order they were added."""
        return next(self._hook_seq)

    def attention_fn(self) -> AbstractContextManager[None]:
        """While open, the model runs actpatch's hookable eager attention (then the user's
        implementation is restored exactly); nestable."""
        return self.attention_state.enabled()

    @property
    def context_length(self) -> int | None:
        """The longest input the model reads (its position limit), when the config states one."""
        return self.adapter.context_length

    # -- shapes ----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def n_heads(self) -> int:
        return self.adapter.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.adapter.n_kv_heads

    @property
    def d_model(self) -> int:
        return self.adapter.d_model

    @property
    def d_head(self) -> int:
        return self.adapter.d_head

    @property
    def d_mlp(self) -> int:
        return self.adapter.d_mlp

    @property
    def vocab_size(self) -> int:
        """How many logits the model outputs (the unembedding's rows, which may exceed the
        tokenizer's vocabulary when padded); every valid token id is below it."""
        out = self.hf.get_output_embeddings()
        return int(out.weight.shape[0]) if out is not None else int(self.hf.config.vocab_size)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def device(self) -> torch.device:
        """Where inputs go: the parameters' device, or for a model accelerate dispatched
        (``device_map=``, CPU / disk offload) the execution device of its first hooked module
        (its weights may sit on ``meta`` between calls). Accelerate always hooks the top module,
        so an unplaced model costs one attribute lookup (this is read on every forward pass)."""
        if not self.is_dispatched:
            return next(self.hf.parameters()).device
        for module in self.hf.modules():
            dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if dev is not None:
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        return next(self.hf.parameters()).device

    @property
    def is_dispatched(self) -> bool:
        """Whether accelerate placed the model (a device map or offloading): its blocks may live
        on several devices, each receiving its inputs through accelerate's hooks (which always
        include one on the top module)."""
        return getattr(self.hf, "_hf_hook", None) is not None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @cached_property
    def weight_hash(self) -> str:
        """SHA-256 (first 16 hex digits) over parameter names, shapes and bytes: provenance
        (computed once; :meth:`current_weight_hash` recomputes)."""
        return self.current_weight_hash()

    def current_weight_hash(self) -> str:
        """:attr:`weight_hash` of the weights as they are now (after any in-place edit)."""
        h = hashlib.sha256()
        for name, p in sorted(self.hf.state_dict().items()):
            if p.device.type == "meta":  # offloaded by accelerate: the weights live in its hook's map
                module_name, _, leaf = name.rpartition(".")
                p = live_param(self.hf.get_submodule(module_name), leaf)
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    # -- running ---------------------------------------------------------------------------
    def logits(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits for token ids ``(batch, pos)``: ``(batch, pos, vocab)``, or ``(batch, vocab)``
        for the last position when ``last_only``. No gradients, no cache."""
        with torch.inference_mode():
            kwargs: dict[str, Any] = {"use_cache": False}
            if last_only:
                kwargs["logits_to_keep"] = 1
            out = self.hf(input_ids=ids.to(self.device), **kwargs).logits
        return out[:, -1] if last_only else out

    def readout(self, ids: torch.Tensor, continuation: "Continuation | None" = None, *, grad: bool = False) -> torch.Tensor:
        """The logits the metrics read, ``(batch, readouts, vocab)``: the prompt's last position
        and, teacher-forced, each continuation token's (the layout of
        :mod:`actpatch.prompts.continuation`). Without a continuation (or single-token answers)
        one readout: the last position. ``grad``: with autograd on (gradient-based techniques).
        The continuation is invisible to site hooks: patches and captures see the prompt."""
        if continuation is None or continuation.is_single:
            logits = self.last_logits_with_grad(ids) if grad else self.logits(ids, last_only=True)
            return logits[:, None]
        B, T = ids.shape
        cont = continuation.to(ids.device)
        if cont.rows != B:
            raise PromptError(f"A continuation of {cont.rows} rows for a batch of {B} (internal mismatch).")
        full = torch.cat([ids, cont.tokens], 1).to(self.device)
        positions, branches = continuation.tree(T)
        C = continuation.n_tokens
        with torch.set_grad_enabled(grad), torch.inference_mode(not grad), self.teacher_forced(positions, branches, C):
            out = self.hf(input_ids=full, position_ids=positions[None].to(self.device), use_cache=False,
                          logits_to_keep=C + 1).logits
        return out[:, -(C + 1):]

    @contextmanager
    def teacher_forced(self, positions: torch.Tensor, branches: torch.Tensor, n_tokens: int) -> Iterator[None]:
        """While open, forward passes follow the continuation tree (``positions`` and
        ``branches`` (S,) of prompt then continuation, :mod:`actpatch.prompts.continuation`)
        and site hooks see the prompt: the last ``n_tokens`` positions are hidden from them."""
        with self.attention_state.branched(positions, branches), continuation_tail(n_tokens):
            yield

    def last_logits_with_grad(self, ids: torch.Tensor) -> torch.Tensor:
        """Last-position logits ``(batch, vocab)`` with autograd on (gradient-based techniques)."""
        with torch.enable_grad():
            return self.hf(input_ids=ids.to(self.device), use_cache=False, logits_to_keep=1).logits[:, -1]

    # -- tokens ----------------------------------------------------------------------------
    def to_tokens(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if self.tokenizer is None:
            raise PromptError("This model has no tokenizer; pass token ids instead of text (PromptSet.from_ids).")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_str(self, token_id: int) -> str:
        """Readable text of one token (``"#17"`` when there is no tokenizer)."""
        if self.tokenizer is None:
            return f"#{int(token_id)}"
        return self.tokenizer.decode([int(token_id)])

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, family={self.family}, n_layers={self.n_layers}, n_heads={self.n_heads}, "
            f"n_kv_heads={self.n_kv_heads}, d_model={self.d_model}, d_head={self.d_head})"
        )
