"""Adapters: the only code that knows where things live inside a model family.

Each family is one declarative :class:`FamilySpec` (module paths, which config attributes it
refuses). :class:`Adapter` turns a spec plus a loaded HF model into hook points:
``(module, "input" | "output")`` pairs that :mod:`actpatch.hooks` attaches to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError, UnsupportedSiteError
from ..sites import Site, SiteKind

__all__ = ["FamilySpec", "Adapter", "FAMILIES", "adapter_for", "supported_families"]

Where = Literal["input", "output"]


@dataclass(frozen=True)
class FamilySpec:
    """Where the parts of one architecture family live (dotted paths).

    Model-level paths start at the ``*ForCausalLM`` module; block-level paths start at one
    decoder block.
    """

    name: str
    model_types: tuple[str, ...]
    examples: str
    blocks: str
    embed: str
    final_norm: str
    attn: str
    """The attention module (its attention function sees q, k, v, pattern)."""
    attn_out: str
    """Module whose output the block adds to the residual stream after attention."""
    o_proj: str
    """Output projection of attention; its input is z."""
    mlp_out: str
    """Module whose output the block adds to the residual stream after the MLP."""
    mlp_down: str
    """The MLP's output projection; its input are the neurons (mlp_post)."""
    mlp_in_norm: str | None
    """Norm whose input is resid_mid; None when attention and MLP run in parallel."""
    rotary: str | None = None
    """Rotary position embedding module (model-level path); None when positions are added to
    the embeddings (GPT-2)."""
    parallel_flag: str | None = None
    """Config attribute that, when true, makes attention and MLP parallel (GPT-NeoX)."""
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    refuse: dict[str, Callable[[Any], bool]] = field(default_factory=dict)
    """Config attributes this adapter does not handle, with a predicate for refused values."""


def _truthy(v: Any) -> bool:
    return bool(v)


def _not_none(v: Any) -> bool:
    return v is not None


_LLAMA_REFUSE = {
    "pretraining_tp": lambda v: v not in (None, 1),
    "mlp_bias": _truthy,
}

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="gpt2",
        model_types=("gpt2",),
        examples="GPT-2, DistilGPT-2",
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        attn_out="attn",
        o_proj="attn.c_proj",
        mlp_out="mlp",
        mlp_down="mlp.c_proj",
        mlp_in_norm="ln_2",
        n_heads_attr="n_head",
        n_kv_heads_attr=None,
        refuse={"add_cross_attention": _truthy, "reorder_and_upcast_attn": _truthy},
    ),
    FamilySpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        examples="Llama, Mistral, Qwen2, SmolLM2 (grouped-query attention)",
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        attn="self_attn",
        attn_out="self_attn",
        o_proj="self_attn.o_proj",
        mlp_out="mlp",
        mlp_down="mlp.down_proj",
        mlp_in_norm="post_attention_layernorm",
        rotary="model.rotary_emb",
        refuse=_LLAMA_REFUSE,
    ),
    FamilySpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        examples="GPT-NeoX, Pythia (parallel attention and MLP)",
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        attn_out="attention",
        o_proj="attention.dense",
        mlp_out="mlp",
        mlp_down="mlp.dense_4h_to_h",
        mlp_in_norm="post_attention_layernorm",
        rotary="gpt_neox.rotary_emb",
        parallel_flag="use_parallel_residual",
        n_kv_heads_attr=None,
    ),
    FamilySpec(
        name="gemma2",
        model_types=("gemma2",),
        examples="Gemma 2 (extra norms, logit soft-capping)",
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        attn="self_attn",
        attn_out="post_attention_layernorm",
        o_proj="self_attn.o_proj",
        mlp_out="post_feedforward_layernorm",
        mlp_down="mlp.down_proj",
        mlp_in_norm="pre_feedforward_layernorm",
        rotary="model.rotary_emb",
    ),
)


def supported_families() -> str:
    """A one-line-per-family description of what actpatch supports."""
    return "\n".join(f"  {f.name}: {f.examples} (model_type {', '.join(f.model_types)})" for f in FAMILIES)


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


class Adapter:
    """Binds a :class:`FamilySpec` to one loaded HF causal LM."""

    def __init__(self, spec: FamilySpec, hf_model: nn.Module) -> None:
        self.spec = spec
        self.hf_model = hf_model
        cfg = hf_model.config
        self.parallel = bool(getattr(cfg, spec.parallel_flag, False)) if spec.parallel_flag else False
        self.blocks: nn.ModuleList = _get(hf_model, spec.blocks)  # type: ignore[assignment]
        self.n_layers = len(self.blocks)
        self.n_heads = int(getattr(cfg, spec.n_heads_attr))
        kv = getattr(cfg, spec.n_kv_heads_attr, None) if spec.n_kv_heads_attr else None
        self.n_kv_heads = int(kv) if kv is not None else self.n_heads
        self.d_model = int(cfg.hidden_size)
        head_dim = getattr(cfg, "head_dim", None)
        self.d_head = int(head_dim) if head_dim else self.d_model // self.n_heads
        self.d_mlp = int(self.block_module(0, spec.mlp_down).weight.shape[1 if spec.name != "gpt2" else 0])

    # -- module lookup ---------------------------------------------------------------------
    def block_module(self, layer: int, path: str) -> nn.Module:
        return _get(self.blocks[layer], path)

    def embed_module(self) -> nn.Module:
        return _get(self.hf_model, self.spec.embed)

    # -- sites -----------------------------------------------------------------------------
    def check_site(self, site: Site) -> None:
        """Raise :class:`UnsupportedSiteError` when the family lacks this kind of site."""
        if site.kind == SiteKind.RESID_MID and self.parallel:
            raise UnsupportedSiteError(
                f"{site}: resid_mid does not exist in {self.spec.name} with parallel attention and "
                f"MLP (both read resid_pre). Patch resid_pre, attn_out or mlp_out instead."
            )

    def hook_point(self, site: Site) -> tuple[nn.Module, Where]:
        """The module and side whose tensor is this site's activation (not for attention-function
        kinds q / k / v / pattern, nor for resid_mid, which :mod:`actpatch.hooks` builds from two
        points)."""
        self.check_site(site)
        s, k, l = self.spec, site.kind, site.layer
        if k == SiteKind.EMBED:
            return _get(self.hf_model, s.embed), "output"
        if k == SiteKind.RESID_FINAL:
            return _get(self.hf_model, s.final_norm), "input"
        if l is None:  # pragma: no cover - Site validation guarantees a layer for these kinds
            raise UnsupportedSiteError(f"{site}: needs a layer.")
        table: dict[SiteKind, tuple[nn.Module, Where]] = {
            SiteKind.RESID_PRE: (self.blocks[l], "input"),
            SiteKind.RESID_POST: (self.blocks[l], "output"),
            SiteKind.ATTN_OUT: (self.block_module(l, s.attn_out), "output"),
            SiteKind.MLP_OUT: (self.block_module(l, s.mlp_out), "output"),
            SiteKind.Z: (self.block_module(l, s.o_proj), "input"),
            SiteKind.MLP_POST: (self.block_module(l, s.mlp_down), "input"),
        }
        if k == SiteKind.RESID_MID and s.mlp_in_norm is not None:
            return self.block_module(l, s.mlp_in_norm), "input"
        if k not in table:
            raise UnsupportedSiteError(f"{site}: no module hook for kind {k.value!r} (internal routing error).")
        return table[k]

    # -- running parts of the model (the batched engine) ------------------------------------
    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """What the blocks need for positions ``position_ids`` (1, T): rotary (cos, sin), or None."""
        if self.spec.rotary is None:
            return None
        return _get(self.hf_model, self.spec.rotary)(hidden, position_ids=position_ids)

    def run_block(self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """Block ``layer`` on ``hidden`` (B, T, d_model) with no mask (the actpatch attention
        function then applies a causal mask, offset by any key/value prefix)."""
        kwargs: dict[str, Any] = {"attention_mask": None}
        if self.spec.rotary is not None:
            kwargs.update(position_ids=position_ids, position_embeddings=position_embeddings)
        out = self.blocks[layer](hidden, **kwargs)
        return _first_tensor(out)

    def unembed(self, hidden: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from final residual states (..., d_model): final norm, unembedding, soft-capping;
        only for the vocabulary ids ``tokens`` when given."""
        normed = _get(self.hf_model, self.spec.final_norm)(hidden)
        head = self.hf_model.get_output_embeddings()
        if tokens is None:
            logits = head(normed)
        else:
            bias = head.bias[tokens] if getattr(head, "bias", None) is not None else None
            logits = torch.nn.functional.linear(normed, head.weight[tokens], bias)
        cap = getattr(self.hf_model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def adapter_for(hf_model: nn.Module) -> Adapter:
    """Pick and validate the adapter for a loaded HF causal LM.

    Raises:
        UnsupportedArchitectureError: unknown ``model_type``, or a config attribute the adapter
            does not handle; the message lists the supported families.
    """
    cfg = hf_model.config
    mt = getattr(cfg, "model_type", None)
    for spec in FAMILIES:
        if mt in spec.model_types:
            bad = [f"{a}={getattr(cfg, a)!r}" for a, pred in spec.refuse.items() if pred(getattr(cfg, a, None))]
            if bad:
                raise UnsupportedArchitectureError(
                    f"The {spec.name} adapter does not handle config {', '.join(bad)}; results would be "
                    f"silently wrong, so actpatch refuses. Supported families:\n{supported_families()}"
                )
            return Adapter(spec, hf_model)
    raise UnsupportedArchitectureError(
        f"Unknown architecture model_type={mt!r} ({type(hf_model).__name__}). "
        f"Supported families:\n{supported_families()}\n"
        f"Adding one is a FamilySpec in actpatch/models/adapters.py."
    )
