"""Adapters: the only code that knows where things live inside a model family.

Each family is one declarative :class:`FamilySpec`: module paths, capabilities, and the config
attributes it handles. :class:`Adapter` binds a spec to a loaded HF model and answers every
family question the rest of actpatch asks: hook points (the one site -> ``(module, "input" |
"output")`` table), accessor methods (attention module, heads' writes, running a block,
unembedding) and :class:`Capabilities`. Nothing outside ``models/`` reads a module path.

Config attributes are checked against an allow-list (Penzai-style): an attribute the family's
adapter does not know of is refused by name, because it may change the computation in a way
actpatch's own code paths (the attention function, the batched engine, the unembedding) would
not reproduce; attributes it knows with values it has not verified are refused too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError, UnsupportedSiteError
from ..sites import FEATURE_KINDS, Site, SiteKind
from .attention import recompute_pattern

__all__ = ["FamilySpec", "Capabilities", "Adapter", "FAMILIES", "adapter_for", "supported_families"]

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
    mlp_down: str | None
    """The MLP's output projection; its input are the neurons (mlp_post). None for a mixture of
    experts, whose neurons are per expert (``mlp_post`` is then refused)."""
    mlp_in_norm: str | None
    """Norm whose input is resid_mid; None when attention and MLP run in parallel."""
    rotary: str | None = None
    """Rotary position embedding module (model-level path); None when positions are added to
    the embeddings (GPT-2)."""
    parallel: bool | str = False
    """Attention and MLP run in parallel on the block input: always (True: GPT-J, Phi, Cohere),
    or when the named config attribute is true (GPT-NeoX, StableLM)."""
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    context_attr: str = "max_position_embeddings"
    """Config attribute holding the longest input the model reads."""
    post_norms: bool = False
    """Norms after the attention and MLP outputs (Gemma 2): heads' writes do not add up."""
    fused_qkv: bool = False
    """q, k and v come from one projection (GPT-2's c_attn, GPT-NeoX's query_key_value)."""
    bias_attr: str | bool = "attention_bias"
    """Whether the attention projections have biases: a constant, or the config attribute that
    says so."""
    rotary_by_layer_type: bool = False
    """Each ``config.layer_types`` entry has its own rotary tables (Gemma 3: local and global
    layers with different bases); the rotary module takes the layer type."""
    residual_multiplier: str | None = None
    """Config attribute scaling what attention and the MLP add to the residual stream (Granite);
    the attn_out / mlp_out sites are before the scaling."""
    logit_scale: Callable[[Any], float] | None = None
    """The factor the model applies to its logits, from its config (Cohere, Granite)."""
    moe: bool = False
    """The MLP is a mixture of experts."""
    gated_mlp: bool = False
    """The MLP multiplies an activated gate with an up projection (Llama's SwiGLU, Gemma's
    GeGLU): its neurons are a product, which RelP's half rule splits between the two factors."""
    handled: frozenset[str] = frozenset()
    """Config attributes this adapter knows of (beyond every config's generic ones)."""
    refuse: dict[str, Callable[[Any], bool]] = field(default_factory=dict)
    """Known config attributes with values the adapter has not verified: a predicate that is
    true for a refused value."""


def _truthy(v: Any) -> bool:
    return bool(v)


def _rope_unverified(v: Any) -> bool:
    """Rotary scalings that depend only on the position are computed by the model's own rotary
    module, which the batched engine calls; others are refused until verified."""
    params = v.values() if isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()) else [v]
    return any(isinstance(p, dict) and p.get("rope_type", "default") not in ("default", "linear", "llama3") for p in params)


_GENERIC = frozenset({
    "_name_or_path", "_model_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype",
    "id2label", "label2id", "is_encoder_decoder", "model_type", "output_attentions", "output_hidden_states",
    "problem_type", "return_dict", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
    "unk_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range", "use_cache",
    "tie_word_embeddings", "vocab_size", "is_decoder", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "tf_legacy_loss", "use_bfloat16", "pruned_heads", "torchscript", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "_attn_implementation_autoset",
})
"""Attributes every HF config may carry that do not change a decoder's forward pass."""

_DECODER = frozenset({
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
    "attention_dropout", "attention_bias", "rms_norm_eps",
})
"""Attributes of Llama-style decoders that the HF modules actpatch runs apply themselves."""

_LLAMA_REFUSE = {
    "pretraining_tp": lambda v: v not in (None, 1),
    "mlp_bias": _truthy,
    "rope_parameters": _rope_unverified,
    "rope_scaling": _rope_unverified,
}

def _llama_like(name: str, model_types: tuple[str, ...], examples: str, *, handled: set[str],
                refuse: dict[str, Callable[[Any], bool]] | None = None, **paths: Any) -> FamilySpec:
    """A family laid out like Llama (pre-norm blocks under ``model.layers``, ``self_attn`` with
    ``o_proj``, an MLP read through ``post_attention_layernorm``, one rotary module)."""
    layout: dict[str, Any] = dict(
        blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm", attn="self_attn",
        attn_out="self_attn", o_proj="self_attn.o_proj", mlp_out="mlp", mlp_down="mlp.down_proj",
        mlp_in_norm="post_attention_layernorm", rotary="model.rotary_emb", gated_mlp=True,
    )
    layout.update(paths)
    return FamilySpec(name=name, model_types=model_types, examples=examples, handled=_DECODER | handled,
                      refuse={**_LLAMA_REFUSE, **(refuse or {})}, **layout)


_GEMMA2 = FamilySpec(
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
    post_norms=True,
    gated_mlp=True,
    handled=_DECODER | {"hidden_activation", "attn_logit_softcapping", "final_logit_softcapping",
                        "query_pre_attn_scalar", "sliding_window", "layer_types", "use_bidirectional_attention",
                        "cache_implementation"},
    refuse={"use_bidirectional_attention": _truthy, "rope_parameters": _rope_unverified},
)
"""Gemma 2: norms after attention and the MLP, soft-capping; Gemma 3 differs only in its rotary tables."""


_GPT2 = FamilySpec(
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
    context_attr="n_positions",
    fused_qkv=True,
    bias_attr=True,
    handled=frozenset({"activation_function", "attn_pdrop", "embd_pdrop", "resid_pdrop", "layer_norm_epsilon",
                       "n_embd", "n_head", "n_inner", "n_layer", "n_positions", "n_ctx", "reorder_and_upcast_attn",
                       "scale_attn_by_inverse_layer_idx", "scale_attn_weights", "summary_activation",
                       "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj"}),
    refuse={"add_cross_attention": _truthy, "reorder_and_upcast_attn": _truthy},
)
"""GPT-2: learned positions, fused qkv (Conv1D); GPT-J keeps its layout."""


FAMILIES: tuple[FamilySpec, ...] = (
    _GPT2,
    _llama_like(
        "llama", ("llama", "mistral", "qwen2", "qwen3"),
        "Llama, Mistral, Qwen2, Qwen3 (q / k norms), SmolLM2 (grouped-query attention)",
        handled={"pretraining_tp", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers",
                 "layer_types", "use_qkv_bias"},
        refuse={"use_sliding_window": _truthy},
    ),
    _llama_like(
        "gemma", ("gemma",), "Gemma (embeddings scaled by sqrt(d_model) inside the model; the embed site is "
        "before the scaling)",
        handled={"hidden_activation", "use_bidirectional_attention"}, refuse={"use_bidirectional_attention": _truthy},
    ),
    _llama_like(
        "phi3", ("phi3",), "Phi-3 (fused q / k / v and gate / up projections)",
        handled={"resid_pdrop", "embd_pdrop", "original_max_position_embeddings", "sliding_window",
                 "partial_rotary_factor"},
        fused_qkv=True,
    ),
    _llama_like(
        "starcoder2", ("starcoder2",), "StarCoder2 (biases, sliding-window attention)",
        handled={"use_bias", "norm_epsilon", "embedding_dropout", "residual_dropout", "sliding_window"},
        mlp_down="mlp.c_proj", bias_attr="use_bias", gated_mlp=False,
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
        parallel="use_parallel_residual",
        n_kv_heads_attr=None,
        fused_qkv=True,
        handled=_DECODER | {"use_parallel_residual", "hidden_dropout", "classifier_dropout", "layer_norm_eps",
                            "rotary_pct", "rotary_emb_base", "partial_rotary_factor"},
        refuse={"rope_parameters": _rope_unverified, "rope_scaling": _rope_unverified},
    ),
    _GEMMA2,
    dataclasses.replace(
        _GEMMA2, name="gemma3_text", model_types=("gemma3_text",),
        examples="Gemma 3 text models, Gemma 3 270M (local and global layers with their own rotary bases, "
        "q / k norms, extra norms, scaled embeddings)",
        rotary_by_layer_type=True,
        handled=_GEMMA2.handled | {"_sliding_window_pattern"},
        refuse={**_GEMMA2.refuse, "rope_scaling": _rope_unverified},
    ),
    _llama_like(
        "olmo2", ("olmo2",), "OLMo 2 (norms after attention and MLP only, q / k norms)",
        handled=set(), attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm", mlp_in_norm="mlp",
        post_norms=True,
    ),
    _llama_like(
        "olmo", ("olmo",), "OLMo (layer norms without parameters, optional q / k / v clipping)",
        handled={"clip_qkv"},
    ),
    _llama_like(
        "granite", ("granite",), "Granite (embedding, residual, attention and logit multipliers)",
        handled={"embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling", "mlp_bias"},
        residual_multiplier="residual_multiplier", logit_scale=lambda cfg: 1.0 / float(cfg.logits_scaling),
    ),
    _llama_like(
        "cohere", ("cohere",), "Cohere Command-R (parallel attention and MLP, logit scale, optional q / k norms)",
        handled={"layer_norm_eps", "logit_scale", "use_qk_norm"}, parallel=True, mlp_in_norm=None,
        logit_scale=lambda cfg: float(cfg.logit_scale),
    ),
    _llama_like(
        "stablelm", ("stablelm",), "StableLM (partial rotary, parallel blocks when the config says so, "
        "optional per-head q / k layer norms)",
        handled={"layer_norm_eps", "hidden_dropout", "partial_rotary_factor", "qk_layernorm", "use_qkv_bias",
                 "use_parallel_residual"},
        parallel="use_parallel_residual", bias_attr="use_qkv_bias",
    ),
    _llama_like(
        "phi", ("phi",), "Phi-1, Phi-1.5, Phi-2 (parallel attention and MLP, partial rotary)",
        handled={"layer_norm_eps", "partial_rotary_factor", "qk_layernorm", "resid_pdrop", "embd_pdrop"},
        final_norm="model.final_layernorm", o_proj="self_attn.dense", mlp_down="mlp.fc2", mlp_in_norm=None,
        parallel=True, bias_attr=True, gated_mlp=False,
    ),
    _llama_like(
        "smollm3", ("smollm3",), "SmolLM3 (layers without rotary embeddings)",
        handled={"mlp_bias", "no_rope_layers", "no_rope_layer_interval", "sliding_window", "use_sliding_window",
                 "max_window_layers", "layer_types"},
        refuse={"use_sliding_window": _truthy},
    ),
    _llama_like(
        "mixtral", ("mixtral",), "Mixtral (mixture-of-experts MLP: residual, attention, heads and mlp_out sites)",
        handled={"num_local_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef",
                 "router_jitter_noise", "sliding_window"},
        mlp_down=None, moe=True,
    ),
    dataclasses.replace(
        _GPT2, name="gptj", model_types=("gptj",),
        examples="GPT-J (parallel attention and MLP, rotary on part of each head)",
        o_proj="attn.out_proj", mlp_down="mlp.fc_out", mlp_in_norm=None, rotary="transformer.rotary_emb",
        parallel=True, fused_qkv=False, bias_attr=False, refuse={},
        handled=frozenset({"activation_function", "attn_pdrop", "embd_pdrop", "resid_pdrop", "layer_norm_epsilon",
                           "n_embd", "n_head", "n_inner", "n_layer", "n_positions", "rotary_dim"}),
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


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model's blocks do, as flags techniques can branch on (never module paths)."""

    parallel_residual: bool
    """Attention and MLP both read the block input (GPT-NeoX with use_parallel_residual)."""
    post_norms: bool
    """Norms after the attention / MLP outputs (Gemma 2)."""
    heads_write_additively: bool
    """The attention output is the sum of each head's write through the output projection (no
    norm after it): per-head edges (EAP, circuits) are defined."""
    rotary: bool
    """Positions enter through rotary embeddings of q and k (False: added to the embeddings)."""
    fused_qkv: bool
    """q, k and v come from one projection: the q / k / v sites are read inside attention."""
    attention_bias: bool
    """The attention projections have biases."""
    attn_softcap: float | None
    final_softcap: float | None
    residual_scale: float = 1.0
    """What the block adds to the residual stream is ``residual_scale`` times the attn_out /
    mlp_out sites (Granite's residual multiplier)."""
    logit_scale: float = 1.0
    """The model multiplies its logits by this (Cohere's logit scale, 1 / Granite's logits scaling)."""
    mixture_of_experts: bool = False
    """The MLP is a mixture of experts: no ``mlp_post`` site."""


class Adapter:
    """Binds a :class:`FamilySpec` to one loaded HF causal LM."""

    def __init__(self, spec: FamilySpec, hf_model: nn.Module) -> None:
        self.spec = spec
        self.hf_model = hf_model
        cfg = hf_model.config
        self.parallel = spec.parallel if isinstance(spec.parallel, bool) else bool(getattr(cfg, spec.parallel, False))
        self.blocks: nn.ModuleList = _get(hf_model, spec.blocks)  # type: ignore[assignment]
        self.n_layers = len(self.blocks)
        self.n_heads = int(getattr(cfg, spec.n_heads_attr))
        kv = getattr(cfg, spec.n_kv_heads_attr, None) if spec.n_kv_heads_attr else None
        self.n_kv_heads = int(kv) if kv is not None else self.n_heads
        self.d_model = int(cfg.hidden_size)
        head_dim = getattr(cfg, "head_dim", None)
        self.d_head = int(head_dim) if head_dim else self.d_model // self.n_heads
        if spec.mlp_down is None:
            self.d_mlp = int(cfg.intermediate_size)
        else:
            down = self.block_module(0, spec.mlp_down)
            # nn.Linear reads in_features; GPT-2's Conv1D (weight (in, out)) reads nx
            self.d_mlp = int(getattr(down, "in_features", None) or getattr(down, "nx"))
        ctx = getattr(cfg, spec.context_attr, None)
        self.context_length: int | None = int(ctx) if ctx else None
        self.layer_types: tuple[str, ...] | None = (
            tuple(cfg.layer_types) if spec.rotary_by_layer_type else None)
        bias = spec.bias_attr if isinstance(spec.bias_attr, bool) else bool(getattr(cfg, spec.bias_attr, False))
        self.capabilities = Capabilities(
            parallel_residual=self.parallel, post_norms=spec.post_norms,
            heads_write_additively=spec.attn_out == spec.attn and not spec.post_norms,
            rotary=spec.rotary is not None,
            fused_qkv=spec.fused_qkv,
            attention_bias=bias,
            attn_softcap=getattr(cfg, "attn_logit_softcapping", None) or None,
            final_softcap=getattr(cfg, "final_logit_softcapping", None) or None,
            residual_scale=float(getattr(cfg, spec.residual_multiplier)) if spec.residual_multiplier else 1.0,
            logit_scale=spec.logit_scale(cfg) if spec.logit_scale else 1.0,
            mixture_of_experts=spec.moe,
        )
        # the model's own sites; feature / feature_error exist only where a dictionary is attached
        kinds = set(SiteKind) - FEATURE_KINDS
        # the MLP's own input module: absent when attention and MLP share one norm (GPT-J, Phi,
        # Cohere, parallel StableLM); in parallel blocks it reads resid_pre, so no resid_mid
        self._mlp_in = spec.mlp_in_norm is not None and getattr(self.blocks[0], spec.mlp_in_norm.split(".")[0], None) is not None
        if not self._mlp_in:
            kinds.discard(SiteKind.MLP_IN)
        if self.parallel or not self._mlp_in:
            kinds.discard(SiteKind.RESID_MID)
        if spec.mlp_down is None:
            kinds.discard(SiteKind.MLP_POST)
        self.site_kinds: frozenset[SiteKind] = frozenset(kinds)
        """The site kinds this model has."""

    @property
    def family(self) -> str:
        return self.spec.name

    # -- module lookup (models/ only) --------------------------------------------------------
    def block_module(self, layer: int, path: str) -> nn.Module:
        return _get(self.blocks[layer], path)

    def embed_module(self) -> nn.Module:
        """The token embedding (its output is the ``embed`` site)."""
        return _get(self.hf_model, self.spec.embed)

    def attention(self, layer: int) -> nn.Module:
        """Layer ``layer``'s attention module (its attention function sees q, k, v, pattern)."""
        return self.block_module(layer, self.spec.attn)

    def replace_final_norm(self, module: nn.Module) -> None:
        """Put ``module`` in place of the final norm (e.g. ``nn.Identity()`` for linear-logit tests)."""
        parent, name = self.spec.final_norm.rsplit(".", 1)
        setattr(self.hf_model.get_submodule(parent), name, module)

    # -- sites -----------------------------------------------------------------------------
    def check_site(self, site: Site) -> None:
        """Raise :class:`UnsupportedSiteError` when the family lacks this kind of site."""
        if site.kind in self.site_kinds:
            return
        if site.kind is SiteKind.RESID_MID:
            raise UnsupportedSiteError(
                f"{site}: resid_mid does not exist in {self.spec.name} with parallel attention and "
                f"MLP (both read resid_pre). Patch resid_pre, attn_out or mlp_out instead."
            )
        if site.kind is SiteKind.MLP_IN:
            raise UnsupportedSiteError(
                f"{site}: {self.spec.name}'s attention and MLP read one shared norm of resid_pre, so the "
                f"MLP has no input of its own to read or write. Patch resid_pre or mlp_out instead."
            )
        if site.kind is SiteKind.MLP_POST and self.capabilities.mixture_of_experts:
            raise UnsupportedSiteError(
                f"{site}: {self.spec.name}'s MLP is a mixture of experts whose neurons belong to each expert; "
                f"actpatch has no per-expert neuron sites. Patch mlp_out (the mixture's output) or mlp_in instead."
            )
        raise UnsupportedSiteError(f"{site}: no {site.kind.value!r} site in {self.spec.name}.")  # pragma: no cover

    def hook_point(self, site: Site) -> tuple[nn.Module, Where]:
        """The module and side whose tensor is this site's activation: the one site -> hook
        point table (not for attention-function kinds q / k / v / pattern, which
        :meth:`attention` serves; a resid_mid *write* also corrects the block output, see
        :mod:`actpatch.hooks`)."""
        self.check_site(site)
        s, k, l = self.spec, site.kind, site.layer
        if k == SiteKind.EMBED:
            return _get(self.hf_model, s.embed), "output"
        if k == SiteKind.RESID_FINAL:
            return _get(self.hf_model, s.final_norm), "input"
        if l is None:  # pragma: no cover - Site validation guarantees a layer for these kinds
            raise UnsupportedSiteError(f"{site}: needs a layer.")
        table: dict[SiteKind, tuple[str | None, Where]] = {
            SiteKind.RESID_PRE: (None, "input"),
            SiteKind.RESID_POST: (None, "output"),
            SiteKind.RESID_MID: (s.mlp_in_norm, "input"),
            SiteKind.MLP_IN: (s.mlp_in_norm, "input"),
            SiteKind.ATTN_OUT: (s.attn_out, "output"),
            SiteKind.MLP_OUT: (s.mlp_out, "output"),
            SiteKind.Z: (s.o_proj, "input"),
            SiteKind.MLP_POST: (s.mlp_down, "input"),
        }
        path, where = table[k]
        return (self.blocks[l] if path is None else self.block_module(l, path)), where

    # -- computing with parts of the model ----------------------------------------------------
    def head_writes(self, layer: int, dz: torch.Tensor) -> torch.Tensor:
        """(H, B, T, d_model): each head's write into the residual stream for z changes ``dz``
        (B, T, H, D), through the output projection without its bias."""
        o_proj = self.block_module(layer, self.spec.o_proj)
        B, T, H, D = dz.shape
        eye = torch.eye(H, dtype=dz.dtype, device=dz.device)[:, None, None, :, None]  # (H, 1, 1, H, 1)
        masked = (dz[None] * eye).reshape(H, B, T, H * D)
        # .forward, not __call__: no hooks, so this may run inside captures on the same module
        return self.residual_write(o_proj.forward(masked) - o_proj.forward(torch.zeros_like(masked[:1])))

    def reader_map(self, site: Site) -> torch.Tensor | None:
        """The matrix ``M`` (out, in) of the linear map that reads ``site``'s vectors, where one
        reader reads all of it: the MLP's output projection for ``mlp_post``, head ``h``'s slice
        of the attention output projection for ``z`` with a head. None elsewhere (residual
        streams are read by every later component; q / k / v through the softmax)."""
        if site.layer is None:
            return None
        if site.kind is SiteKind.MLP_POST and self.spec.mlp_down is not None:
            return _linear_matrix(self.block_module(site.layer, self.spec.mlp_down))
        if site.kind is SiteKind.Z and site.head is not None:
            M = _linear_matrix(self.block_module(site.layer, self.spec.o_proj))
            return M[:, site.head * self.d_head:(site.head + 1) * self.d_head]
        return None

    def residual_write(self, out: torch.Tensor) -> torch.Tensor:
        """What the block adds to the residual stream for an attn_out or mlp_out value ``out``."""
        scale = self.capabilities.residual_scale
        return out if scale == 1.0 else out * scale

    def recompute_pattern(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                          tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The attention pattern ``(B, H, Tq, Tk)`` layer ``layer`` computes from queries
        ``(B, Tq, H, D)`` and keys ``(B, Tk, KVH, D)`` (scaling, soft-capping, causal mask or the
        continuation ``tree``'s, sliding window as in the attention function)."""
        return recompute_pattern(self.attention(layer), q, k, tree)

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """What the blocks need for positions ``position_ids`` (1, T): rotary (cos, sin), one
        pair per layer type when layers differ (Gemma 3), or None; :meth:`run_block` picks."""
        if self.spec.rotary is None:
            return None
        rotary = _get(self.hf_model, self.spec.rotary)
        if self.layer_types is not None:
            return {t: rotary(hidden, position_ids, t) for t in set(self.layer_types)}
        return rotary(hidden, position_ids=position_ids)

    def run_block(self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """Block ``layer`` on ``hidden`` (B, T, d_model) with no mask (the actpatch attention
        function then applies a causal mask, offset by any key/value prefix)."""
        kwargs: dict[str, Any] = {"attention_mask": None}
        if self.spec.rotary is not None:
            if self.layer_types is not None:
                position_embeddings = position_embeddings[self.layer_types[layer]]
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
            w = live_param(head, "weight")
            b = live_param(head, "bias") if getattr(head, "bias", None) is not None else None
            logits = torch.nn.functional.linear(normed.to(w.device), w[tokens], None if b is None else b[tokens])
        if self.capabilities.logit_scale != 1.0:
            logits = logits * self.capabilities.logit_scale
        cap = self.capabilities.final_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def live_param(module: nn.Module, name: str) -> torch.Tensor:
    """A module's parameter as its forward pass sees it: the tensor itself, or for a module
    accelerate offloads (weights on ``meta`` between calls) the value its hook holds, moved to
    the hook's execution device."""
    p = getattr(module, name)
    if p.device.type != "meta":
        return p
    hook = getattr(module, "_hf_hook", None)
    if hook is None or getattr(hook, "weights_map", None) is None:
        raise UnsupportedArchitectureError(f"{type(module).__name__}.{name} is on the meta device with no accelerate "
                                           f"hook holding its value; load the model with its weights.")
    dev = hook.execution_device
    return hook.weights_map[name].to(f"cuda:{dev}" if isinstance(dev, int) else dev)


def _linear_matrix(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of a linear layer: nn.Linear's weight, or GPT-2's Conv1D's transposed."""
    w = live_param(module, "weight").detach()
    return w if isinstance(module, nn.Linear) else w.T


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
            present = cfg.to_dict()
            unknown = sorted(a for a in present if a not in _GENERIC and a not in spec.handled and a not in spec.refuse)
            bad = [f"{a}={present[a]!r}" for a in unknown]
            bad += [f"{a}={getattr(cfg, a)!r}" for a, pred in spec.refuse.items() if pred(getattr(cfg, a, None))]
            if bad:
                raise UnsupportedArchitectureError(
                    f"The {spec.name} adapter does not handle config {', '.join(bad)}; results could be "
                    f"silently wrong, so actpatch refuses. Supported families:\n{supported_families()}"
                )
            return Adapter(spec, hf_model)
    raise UnsupportedArchitectureError(
        f"Unknown architecture model_type={mt!r} ({type(hf_model).__name__}). "
        f"Supported families:\n{supported_families()}\n"
        f"Adding one is a FamilySpec in actpatch/models/adapters.py."
    )
