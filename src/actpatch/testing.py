"""Tiny randomly initialised models built from configs (no download), for tests and examples.

Example:
    >>> from actpatch.testing import tiny_model
    >>> tiny_model("llama_gqa").n_kv_heads
    2
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .errors import ConfigError, UnsupportedArchitectureError
from .models.handle import Model
from .models.recipe import Recipe

__all__ = ["tiny_model", "TINY_FAMILIES", "tiny_tokenizer", "WORDS", "assert_effect_close", "ungrouped_copy", "UNGROUPABLE"]

# A word-level vocabulary so that tiny models can run PromptSet builders end to end.
WORDS = (
    "<unk> <pad> When Then While After and went to the store park school office gave a an drink book "
    "ball pen key Mary John Alice Bob Tom Anna Paul Sara Mark Lucy had fun , . The war lasted from "
    "year 17 01 32 45 68 99 is in city Paris Rome Berlin Madrid Tower Colosseum Eiffel Louvre capital "
    "of France Italy Spain it"
).split()
VOCAB = 72

TINY_FAMILIES = ("gpt2", "llama", "llama_gqa", "mistral", "qwen2", "qwen3", "gemma", "phi3", "starcoder2", "gpt_neox",
                 "gpt_neox_serial", "gemma2", "gemma3_text", "olmo2", "olmo", "granite", "cohere", "stablelm",
                 "stablelm_serial", "phi", "gptj", "smollm3", "mixtral")


def assert_effect_close(normalised: "torch.Tensor | float", expected: "torch.Tensor | float", clean: float,
                        corrupted: float, atol: float) -> None:
    """Assert normalised effects equal ``expected`` to within ``atol`` in the metric's *raw*
    units: ``|normalised - expected| * |clean - corrupted| <= atol``.

    A tolerance on normalised values is one on raw values divided by the gap, so it blows up
    when a tiny random model happens to have a tiny gap; stated in raw units it is what the
    engines' rounding can actually reach.

    Example:
        >>> assert_effect_close(1.00002, 1.0, clean=0.3, corrupted=0.2, atol=1e-5)  # 2e-6 in raw units
    """
    got = torch.as_tensor(normalised, dtype=torch.float64)
    want = torch.as_tensor(expected, dtype=torch.float64)
    err = float(((got - want).abs() * abs(clean - corrupted)).max())
    if not err <= atol:
        raise AssertionError(f"effects differ by {err:.3g} in raw metric units (> {atol}); normalised {got.tolist()} "
                             f"vs {want.tolist()}, clean {clean:.6g}, corrupted {corrupted:.6g}")


def _config(family: str, n_layers: int):  # noqa: ANN202 - returns a transformers config
    import transformers as tf

    from transformers import (GemmaConfig, Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              Phi3Config, Qwen2Config, Qwen3Config, Starcoder2Config)

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=n_layers, n_head=4, n_positions=128,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return LlamaConfig(**common, num_key_value_heads=4, intermediate_size=128, max_position_embeddings=128)
    if family == "llama_gqa":
        return LlamaConfig(**common, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    if family == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    if family == "mistral":  # sliding-window attention over 4 tokens
        return MistralConfig(**common, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                             sliding_window=4)
    if family == "gemma":  # scaled embeddings, (1 + w) RMSNorm, GeLU
        return GemmaConfig(**common, num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128)
    if family == "phi3":  # fused qkv and gate_up projections
        return Phi3Config(**common, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                          resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if family == "starcoder2":  # biases, layer norm, sliding window
        return Starcoder2Config(**common, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                sliding_window=4, residual_dropout=0.0, embedding_dropout=0.0, bos_token_id=0,
                                eos_token_id=0)
    if family == "qwen3":  # q / k norms per head, GQA, head_dim set apart from hidden / heads
        return Qwen3Config(**common, num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128)
    if family in ("gpt_neox", "gpt_neox_serial"):
        return GPTNeoXConfig(**common, intermediate_size=128, max_position_embeddings=128,
                             use_parallel_residual=family == "gpt_neox", hidden_dropout=0.0, attention_dropout=0.0)
    if family == "gemma2":
        return Gemma2Config(**common, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                            max_position_embeddings=128, sliding_window=4, query_pre_attn_scalar=16,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    gqa = dict(**common, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128, **ids)
    if family == "gemma3_text":  # layers 0, 1 slide over 4 tokens with base 10k rotary, layer 2 global with 1M
        return tf.Gemma3TextConfig(**gqa, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"][:n_layers]
                                   + ["full_attention"] * max(0, n_layers - 3))
    if family == "olmo2":  # norms after attention and MLP only, q / k norms
        return tf.Olmo2Config(**gqa)
    if family == "olmo":  # layer norms without parameters, q / k / v clipped
        return tf.OlmoConfig(**gqa, clip_qkv=3.0)
    if family == "granite":  # every multiplier away from 1
        return tf.GraniteConfig(**gqa, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                logits_scaling=4.0)
    if family == "cohere":  # parallel block, logit scale, q / k norms
        return tf.CohereConfig(**gqa, logit_scale=0.5, use_qk_norm=True)
    if family in ("stablelm", "stablelm_serial"):  # partial rotary (a quarter of each head), q / k layer norms
        return tf.StableLmConfig(**gqa, partial_rotary_factor=0.25, qk_layernorm=True, use_qkv_bias=True,
                                 use_parallel_residual=family == "stablelm", hidden_dropout=0.0)
    if family == "phi":  # parallel block, partial rotary, biases everywhere
        return tf.PhiConfig(**common, intermediate_size=128, max_position_embeddings=128, partial_rotary_factor=0.5,
                            resid_pdrop=0.0, embd_pdrop=0.0, **ids)
    if family == "gptj":  # parallel block, rotary on 8 of 16 dimensions per head
        return tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=n_layers, n_head=4, n_inner=128, rotary_dim=8,
                             n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "smollm3":  # layer 1 has no rotary embedding
        return tf.SmolLM3Config(**gqa, no_rope_layers=[1 if l != 1 else 0 for l in range(n_layers)],
                                use_sliding_window=False)
    if family == "mixtral":  # 4 experts, 2 per token
        return tf.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2)
    raise UnsupportedArchitectureError(f"Unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}.")


def tiny_tokenizer():  # noqa: ANN201 - returns a transformers tokenizer
    """A whitespace word-level tokenizer over :data:`WORDS` (``" Mary"`` -> ``["Mary"]``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def tiny_model(family: str = "llama", *, n_layers: int = 2, seed: int = 0, attn_implementation: str = "sdpa") -> Model:
    """A random-init model of ``family`` (one of :data:`TINY_FAMILIES`), float32, with a tiny
    word-level tokenizer."""
    from transformers import AutoModelForCausalLM

    cfg = _config(family, n_layers)
    # Gemma 2 only has an eager path in transformers.
    cfg._attn_implementation = "eager" if family == "gemma2" else attn_implementation
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init uses small std; scale weights up a little so that attention is not uniform
    # and patches have visible effects.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model = Model(hf, tiny_tokenizer(), name=f"tiny-{family}")
    model.recipe = Recipe("actpatch.testing:tiny_model", (family,),
                          {"n_layers": n_layers, "seed": seed, "attn_implementation": attn_implementation})
    return model


UNGROUPABLE = ("llama_gqa", "mistral", "qwen2")
"""Tiny grouped-query families :func:`ungrouped_copy` can expand (separate k / v projections)."""


def ungrouped_copy(model: Model) -> Model:
    """The same function as the grouped-query ``model`` computed without grouped-query attention:
    a copy with one KV head per query head, whose key / value projections repeat each KV head's
    rows for every query head of its group. Its ``k`` / ``v`` sites are ``model``'s
    ``k_ungrouped`` / ``v_ungrouped``: an independent reference for them (and for MIB's graph,
    which gives every query head its own key and value inputs).

    Example:
        >>> m = tiny_model("llama_gqa")
        >>> wide = ungrouped_copy(m)
        >>> wide.n_kv_heads, bool((wide.logits(torch.tensor([[2, 3, 4]])) - m.logits(torch.tensor([[2, 3, 4]]))).abs().max() < 1e-5)
        (4, True)
    """
    from transformers import AutoModelForCausalLM

    hf = model.hf
    H, KV, D = model.n_heads, model.n_kv_heads, model.d_head
    if not any(n.endswith(".k_proj.weight") for n, _ in hf.named_parameters()):
        raise UnsupportedArchitectureError(f"ungrouped_copy() needs separate k_proj / v_proj projections; "
                                           f"{model.adapter.family} fuses them. Use one of {', '.join(UNGROUPABLE)}.")
    cfg = copy.deepcopy(hf.config)
    cfg.num_key_value_heads = H
    wide = AutoModelForCausalLM.from_config(cfg, dtype=next(hf.parameters()).dtype)
    state = {}
    for name, p in hf.state_dict().items():
        if ".k_proj." in name or ".v_proj." in name:  # (KV * D, ...) -> (H * D, ...), head j repeated H // KV times
            p = p.reshape(KV, D, *p.shape[1:]).repeat_interleave(H // KV, 0).reshape(H * D, *p.shape[1:])
        state[name] = p
    wide.load_state_dict(state)
    wide.eval()
    return Model(wide, model.tokenizer, name=f"{model.name}-ungrouped")


def without_final_norm(model: Model) -> Model:
    """``model`` with its final norm replaced by the identity (in place): the logits, and so the
    logit difference, become linear in the final residual stream and in everything written to it
    last. Exactness tests of linear estimates use it."""
    model.adapter.replace_final_norm(torch.nn.Identity())
    return model


def micro_model(gate: str = "and"):  # noqa: ANN201 - returns (Model, PromptSet)
    """A 2-layer GPT-2 with hand-set weights computing ``C = A AND B`` (or ``A OR B``), and its
    prompt pair. Every number it produces can be derived on paper.

    Tokens 0-3 encode two input bits (a, b) = (id >> 1, id & 1); the clean prompt is token 3
    (a = b = 1), the corrupted one token 0 (a = b = 0); answer token 4, alternative 5.

    Residual stream (12 dims) holds one-hot pairs (x, 1 - x) for a, b, A, B, C (dims 0-9) and
    two zeros, so its mean (5/12) and standard deviation (sigma = sqrt(35)/12) are the same in
    every run and each LayerNorm is an exact affine map. Attention is zeroed.

    * layer 0 MLP (ReLU): neuron 0 computes A = a, neuron 1 B = b, neuron 2 is a constant 1 that
      writes nothing (a component involved in neither direction); A and B are written into
      their pairs.
    * layer 1 MLP: AND: C = relu(A + B - 1); OR: C = relu(A + B) - relu(A + B - 1) = min(A + B, 1);
      C is written into its pair.
    * the unembedding reads the C pair so that logit(4) - logit(5) = 2C - 1: +1 clean, -1 corrupted.

    Sites: A = ``Site("mlp_post", 0, index=0)``, B = ``index=1``, the dummy ``index=2``,
    C = ``Site("mlp_out", 1)``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from .prompts.promptset import PromptSet

    if gate not in ("and", "or"):
        raise ConfigError(f"gate={gate!r}: use 'and' or 'or'.")
    cfg = GPT2Config(vocab_size=6, n_embd=12, n_layer=2, n_head=1, n_inner=4, n_positions=4,
                     activation_function="relu", layer_norm_epsilon=1e-12, tie_word_embeddings=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg)
    sigma = 35**0.5 / 12
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for ln in [hf.transformer.ln_f] + [m for b in hf.transformer.h for m in (b.ln_1, b.ln_2)]:
            ln.weight.fill_(1.0)
        for t in range(4):
            a, b = t >> 1, t & 1
            hf.transformer.wte.weight[t] = torch.tensor([a, 1 - a, b, 1 - b, 0, 1, 0, 1, 0, 1, 0, 0], dtype=torch.float)
        m0, m1 = hf.transformer.h[0].mlp, hf.transformer.h[1].mlp  # Conv1D weights are (in, out)
        read = lambda w, on, off, neuron: (w.__setitem__((on, neuron), sigma / 2), w.__setitem__((off, neuron), -sigma / 2))  # noqa: E731
        read(m0.c_fc.weight, 0, 1, 0)
        read(m0.c_fc.weight, 2, 3, 1)
        m0.c_fc.bias[:3] = torch.tensor([0.5, 0.5, 1.0])
        m0.c_fc.bias[3] = -1.0
        m0.c_proj.weight[0, 4], m0.c_proj.weight[0, 5] = 1.0, -1.0
        m0.c_proj.weight[1, 6], m0.c_proj.weight[1, 7] = 1.0, -1.0
        for neuron in (0, 1):
            read(m1.c_fc.weight, 4, 5, neuron)
            read(m1.c_fc.weight, 6, 7, neuron)
        if gate == "and":  # C = relu(A + B - 1)
            m1.c_fc.bias[0] = 0.0
            m1.c_fc.bias[1:] = -1.0
            m1.c_proj.weight[0, 8], m1.c_proj.weight[0, 9] = 1.0, -1.0
        else:  # C = relu(A + B) - relu(A + B - 1)
            m1.c_fc.bias[0], m1.c_fc.bias[1] = 1.0, 0.0
            m1.c_fc.bias[2:] = -1.0
            m1.c_proj.weight[0, 8], m1.c_proj.weight[0, 9] = 1.0, -1.0
            m1.c_proj.weight[1, 8], m1.c_proj.weight[1, 9] = -1.0, 1.0
        hf.lm_head.weight[4, 8] = sigma
        hf.lm_head.weight[5, 9] = sigma
    model = Model(hf, None, name=f"micro-{gate}")
    prompts = PromptSet.from_ids([[3]], [[0]], [4], [5], name=f"micro-{gate}")
    return model, prompts


def _centring_gpt2(vocab: int, d: int, n_layers: int, d_mlp: int):  # noqa: ANN202 - returns GPT2LMHeadModel
    """A GPT-2 with every weight zero but its LayerNorms, which are centring maps: epsilon 1e8 and
    weight 1e4 make ``LN(x) = x - mean(x)`` to within 1e-8 for activations of order 1, so a
    hand-set model stays linear but for its ReLUs when every read vector sums to zero."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=n_layers, n_head=1, n_inner=d_mlp, n_positions=4,
                     activation_function="relu", layer_norm_epsilon=1e8, tie_word_embeddings=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for ln in [hf.transformer.ln_f] + [m for b in hf.transformer.h for m in (b.ln_1, b.ln_2)]:
            ln.weight.fill_(1e4)
    return hf


def _cancelling_pair(hf: Any) -> None:
    """Neuron 0 of each MLP of a 2-layer centring GPT-2 set to :func:`cancel_model`'s A and N,
    with the readout logit(2) - logit(3) = 2 x_2."""
    with torch.no_grad():
        hf.transformer.wte.weight[1, 0] = 1.0  # token 1: a = 1
        m0, m1 = hf.transformer.h[0].mlp, hf.transformer.h[1].mlp  # Conv1D weights are (in, out)
        m0.c_fc.weight[0, 0], m0.c_fc.weight[3, 0] = 1.0, -1.0  # A = relu(a)
        m0.c_proj.weight[0, 1], m0.c_proj.weight[0, 2] = 1.0, 2.0
        m1.c_fc.weight[1, 0], m1.c_fc.weight[3, 0] = 2.0, -2.0  # N = relu(2 A - 1)
        m1.c_fc.bias[0] = -1.0
        m1.c_proj.weight[0, 2] = -1.0
        hf.lm_head.weight[2, 2], hf.lm_head.weight[2, 3] = 1.0, -1.0
        hf.lm_head.weight[3, 2], hf.lm_head.weight[3, 3] = -1.0, 1.0


def cancel_model():  # noqa: ANN201 - returns (Model, PromptSet)
    """A 2-layer GPT-2 with hand-set weights in which a neuron's direct and indirect effects cancel
    to first order (Kramár et al. 2024's cancellation failure of AtP), and its prompt pair.

    The LayerNorms have a huge epsilon (1e8) and weight 1e4, so each is ``x - mean(x)`` to
    within 1e-8, and every read vector sums to zero: the model is linear but for its ReLUs.
    Residual dims: 0 the input bit a, 1 a copy of A, 2 the output, 3 always zero. The clean
    prompt is token 1 (a = 1), the corrupted one token 0 (a = 0); answer token 2, alternative 3,
    and logit(2) - logit(3) = 2 * x_2.

    * layer 0 neuron A = relu(a) writes 1 to dim 1 and c = 2 to dim 2 (direct effect);
    * layer 1 neuron N = relu(2 A - 1) writes -1 to dim 2 (indirect effect of A, through N).

    Clean: A = N = 1, LD = 2 (2 - 1 in dim 2); corrupted: LD = 0. At the clean run dLD/dA =
    2 (c - 2) = 0, so AtP scores A as irrelevant, but patching A to 0 turns N off too: LD = 0.
    Sites: A = ``Site("mlp_post", 0, index=0)``, N = ``Site("mlp_post", 1, index=0)``.
    """
    from .prompts.promptset import PromptSet

    hf = _centring_gpt2(vocab=4, d=4, n_layers=2, d_mlp=2)
    _cancelling_pair(hf)
    model = Model(hf, None, name="micro-cancel")
    prompts = PromptSet.from_ids([[1]], [[0]], [2], [3], name="micro-cancel")
    return model, prompts


def false_negative_model(n_small: int = 20):  # noqa: ANN201 - returns (Model, PromptSet)
    """:func:`cancel_model` among ``n_small`` decoys per layer: a model where AtP provably
    ranks the most important neuron last, for testing that a validation finds it.

    Centring LayerNorms; residual dims as in :func:`cancel_model` (0 the input bit a, 1 a copy
    of A, 2 the output, 3 zero), logit(2) - logit(3) = 2 x_2; clean token 1, corrupted token 0.

    * layer 0 neuron 0, A = relu(a), writes 1 to dim 1 and 2 to dim 2; layer 1 neuron 0,
      N = relu(2 A - 1), writes -1 to dim 2 (A's direct and indirect effects cancel to first order);
    * neurons 1..n_small of both layers are decoys: relu(a) writing ``0.01 j`` to dim 2, a
      linear path AtP gets exactly.

    Clean LD = 2 (1 + S), S = the sum of both layers' decoys; corrupted 0. Noising (mlp_post, raw LD change):
    A -2 exactly but 0 by AtP (dLD/dA = 2 (2 - 2) = 0 at the clean run); N +2 (both); decoy j
    -0.02 j (both). So exact patching ranks A and N first, AtP ranks A last.
    """
    from .prompts.promptset import PromptSet

    hf = _centring_gpt2(vocab=4, d=4, n_layers=2, d_mlp=n_small + 1)
    _cancelling_pair(hf)
    with torch.no_grad():
        m0, m1 = hf.transformer.h[0].mlp, hf.transformer.h[1].mlp  # Conv1D weights are (in, out)
        for mlp in (m0, m1):
            for j in range(1, n_small + 1):  # decoys: relu(a) -> 0.01 j to the output
                mlp.c_fc.weight[0, j], mlp.c_fc.weight[3, j] = 1.0, -1.0
                mlp.c_proj.weight[j, 2] = 0.01 * j
    model = Model(hf, None, name="micro-false-negative")
    return model, PromptSet.from_ids([[1]], [[0]], [2], [3], name="micro-false-negative")


def backup_model():  # noqa: ANN201 - returns (Model, PromptSet)
    """A 2-layer GPT-2 with hand-set weights in which a later MLP neuron repairs the loss of an
    earlier one (self-repair), and its prompt pair.

    Centring LayerNorms (:func:`_centring_gpt2`); residual dims: 0 the input bit a, 1 a copy of
    A, 2 the output; logit(2) - logit(3) = 2 x_2. Clean prompt token 1 (a = 1), corrupted token 0.

    * layer 0 neuron A = relu(a) writes 1 to dims 1 and 2;
    * layer 1 neuron B = relu(a - A), the backup, writes 1 to dim 2: it fires only when the input
      is there but A is not.

    Clean: A = 1, B = 0, LD = 2; corrupted: LD = 0. Noising layer 0's MLP turns B on: LD stays 2,
    total effect 0. Its direct effect (only its write to the logits swapped) is -1 (LD 0): the
    backup hides it. Layer 1's MLP: 0 either way.
    """
    from .prompts.promptset import PromptSet

    hf = _centring_gpt2(vocab=4, d=4, n_layers=2, d_mlp=1)
    with torch.no_grad():
        hf.transformer.wte.weight[1, 0] = 1.0
        m0, m1 = hf.transformer.h[0].mlp, hf.transformer.h[1].mlp  # Conv1D weights are (in, out)
        m0.c_fc.weight[0, 0], m0.c_fc.weight[3, 0] = 1.0, -1.0  # A = relu(a)
        m0.c_proj.weight[0, 1], m0.c_proj.weight[0, 2] = 1.0, 1.0
        m1.c_fc.weight[0, 0], m1.c_fc.weight[1, 0] = 1.0, -1.0  # B = relu(a - A)
        m1.c_proj.weight[0, 2] = 1.0
        hf.lm_head.weight[2, 2], hf.lm_head.weight[2, 3] = 1.0, -1.0
        hf.lm_head.weight[3, 2], hf.lm_head.weight[3, 3] = -1.0, 1.0
    model = Model(hf, None, name="micro-backup")
    return model, PromptSet.from_ids([[1]], [[0]], [2], [3], name="micro-backup")


def backup_head_model():  # noqa: ANN201 - returns (Model, PromptSet)
    """A 2-layer attention-only GPT-2 with hand-set weights in which a later head takes over when
    an earlier one is knocked out (a backup head), and its prompt pair.

    Centring LayerNorms (:func:`_centring_gpt2`), one head per layer. Prompts are two tokens: an
    input token (0: a = 0, 1: a = 1) and a query token 2; the answer is read at the query. Residual
    dims: 0 a, 1 marks the input position, 2 marks the query position, 3 a copy of head A's
    output, 4 the output, 5 always 0 (read vectors sum to zero); logit(3) - logit(4) = 2 x_4.
    Scores are scaled by 1e4, so every softmax is one-hot.

    * layer 0, head A: the query attends to the input position and copies a into dims 3 and 4;
    * layer 1, head B (the backup): its query scores the input position 1e4 (1 - A) and its own
      position 1e4 A, so it copies a into dim 4 only when A wrote nothing.

    Clean (token 1): A = 1, B = 0, LD = 2; corrupted (token 0): LD = 0. Noising A (its z from the
    corrupted run) turns B on: LD stays 2, total effect 0; A's direct effect (only its write to
    the logits swapped) is -1. Sites: A = ``Site("z", 0, head=0)``, B = ``Site("z", 1, head=0)``.
    """
    from .prompts.promptset import PromptSet

    hf = _centring_gpt2(vocab=5, d=6, n_layers=2, d_mlp=1)
    big = 1e4
    with torch.no_grad():
        wte = hf.transformer.wte.weight
        wte[0, 1] = 1.0  # input position, a = 0
        wte[1, 0], wte[1, 1] = 1.0, 1.0  # input position, a = 1
        wte[2, 2] = 1.0  # query position
        a, b = hf.transformer.h[0].attn, hf.transformer.h[1].attn  # c_attn (in, q | k | v), c_proj (in, out)
        a.c_attn.weight[2, 0], a.c_attn.weight[5, 0] = big, -big  # q: "I am the query"
        a.c_attn.weight[1, 6], a.c_attn.weight[5, 6] = 1.0, -1.0  # k: "I am the input"
        a.c_attn.weight[0, 12], a.c_attn.weight[5, 12] = 1.0, -1.0  # v: a
        a.c_proj.weight[0, 3], a.c_proj.weight[0, 4] = 1.0, 1.0
        b.c_attn.weight[2, 0], b.c_attn.weight[3, 0] = big, -big  # q0: query and A silent
        b.c_attn.weight[3, 1], b.c_attn.weight[5, 1] = big, -big  # q1: A spoke
        b.c_attn.weight[1, 6], b.c_attn.weight[5, 6] = 1.0, -1.0  # k0: the input position
        b.c_attn.weight[2, 7], b.c_attn.weight[5, 7] = 1.0, -1.0  # k1: the query position
        b.c_attn.weight[0, 12], b.c_attn.weight[5, 12] = 1.0, -1.0  # v: a
        b.c_proj.weight[0, 4] = 1.0
        hf.lm_head.weight[3, 4], hf.lm_head.weight[3, 5] = 1.0, -1.0
        hf.lm_head.weight[4, 4], hf.lm_head.weight[4, 5] = -1.0, 1.0
    model = Model(hf, None, name="micro-backup-head")
    return model, PromptSet.from_ids([[1, 2]], [[0, 2]], [3], [4], name="micro-backup-head")


def illusion_model(control: bool = False):  # noqa: ANN201 - returns (Model, PromptSet, Site, Tensor)
    """A 1-layer GPT-2 with hand-set weights where patching an MLP subspace shows an effect the
    model does not compute (Makelov, Lange & Nanda 2023's interpretability illusion), and a
    control where the same kind of patch is genuine. Returns ``(model, prompts, site, U)``.

    LayerNorms are centring maps (:func:`_centring_gpt2`) and every read vector sums to zero. Residual dims: 0 the input bit a, 1 the output; logit(2) -
    logit(3) = 2 (x_1 - x_2). Clean prompt token 1 (a = 1), corrupted token 0; answer 2,
    alternative 3. The site is ``Site("mlp_post", 0, pos=0)`` (two ReLU neurons).

    * **illusion**: the embedding writes a to dim 1 too (another path solves the task). Neuron 0
      computes a but its output weights are zero (it varies, and nothing reads it: the null
      space of the MLP's output projection); neuron 1 is always 0 but writes +1 to dim 1 (read,
      dormant). Clean LD = 2, corrupted 0. ``U = (1, 1) / sqrt(2)``. Denoising the whole MLP
      changes nothing (0: neuron 0 is unread, neuron 1 equal); patching along U sets the
      neurons to (0.5, 0.5), so neuron 1 adds 0.5 * 2 = 1 to LD: normalised 0.5. Along the read
      part (neuron 1) alone: 0, since it never varies. Flagged.
    * **control**: no direct path; neuron 0 computes a and writes +1 to dim 1. ``U = (1, 0)``.
      Patching along U and the whole MLP both give 1; U lies in the row space. Not flagged.
    """
    from .prompts.promptset import PromptSet
    from .sites import Site

    hf = _centring_gpt2(vocab=4, d=4, n_layers=1, d_mlp=2)
    block = hf.transformer.h[0]
    with torch.no_grad():
        hf.transformer.wte.weight[1, 0] = 1.0  # token 1: a = 1
        mlp = block.mlp  # Conv1D weights are (in, out)
        mlp.c_fc.weight[0, 0], mlp.c_fc.weight[3, 0] = 1.0, -1.0  # neuron 0 = relu(a)
        if control:
            mlp.c_proj.weight[0, 1] = 1.0  # neuron 0 writes the output
        else:
            hf.transformer.wte.weight[1, 1] = 1.0  # the task is solved by the direct path
            mlp.c_proj.weight[1, 1] = 1.0  # neuron 1 (always 0) would write the output
        hf.lm_head.weight[2, 1], hf.lm_head.weight[2, 2] = 1.0, -1.0
        hf.lm_head.weight[3, 1], hf.lm_head.weight[3, 2] = -1.0, 1.0
    name = "micro-illusion-control" if control else "micro-illusion"
    model = Model(hf, None, name=name)
    prompts = PromptSet.from_ids([[1]], [[0]], [2], [3], name=name)
    U = torch.tensor([[1.0, 0.0]]) if control else torch.tensor([[1.0, 1.0]]) / 2**0.5
    return model, prompts, Site("mlp_post", 0, pos=0), U


def planted_direction_model(scale: float = 4.0):  # noqa: ANN201 - returns (Model, PromptSet, Site, Tensor)
    """A 1-layer GPT-2 (blocks zeroed) whose answer is read along one planted direction of the
    residual stream, next to a distractor feature that varies as much but is never read; for
    testing that DAS finds the planted direction. Returns ``(model, prompts, site, planted)``.

    Tokens 0-3 encode bits (a, b) = (id >> 1, id & 1) as ``(2a - 1) u + (2b - 1) v`` with
    orthonormal, zero-sum u (planted) and v (distractor) in 6 dims; the centring final norm keeps
    them, and the unembedding reads ``logit(4) - logit(5) = 2 scale <x, u>``: answer 4 when a = 1,
    5 when a = 0. Pairs: every clean / corrupted token pair with different a (8), so b changes in
    half of them. Patching along u moves the answer fully; along ``(u + v) / sqrt(2)`` only when b
    changes the same way. The site is ``Site("resid_pre", 0, pos=0)``.
    """
    from .prompts.promptset import PromptSet
    from .sites import Site

    hf = _centring_gpt2(vocab=6, d=6, n_layers=1, d_mlp=4)
    u = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.0]) / 2
    v = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 0.0]) / 2
    with torch.no_grad():
        for t in range(4):
            a, b = t >> 1, t & 1
            hf.transformer.wte.weight[t] = (2 * a - 1) * u + (2 * b - 1) * v
        hf.lm_head.weight[4] = scale * u
        hf.lm_head.weight[5] = -scale * u
    pairs = [(c, k) for c in range(4) for k in range(4) if (c >> 1) != (k >> 1)]
    answer = lambda t: 4 if t >> 1 else 5  # noqa: E731
    prompts = PromptSet.from_ids([[c] for c, _ in pairs], [[k] for _, k in pairs], [answer(c) for c, _ in pairs],
                                 [answer(k) for _, k in pairs], name="micro-planted")
    return Model(hf, None, name="micro-planted"), prompts, Site("resid_pre", 0, pos=0), u


def random_pairs(n: int = 3, T: int = 6, diff: tuple[int, ...] = (2, 4), seed: int = 0, vocab: int = 60):  # noqa: ANN201
    """A PromptSet of ``n`` random token sequences whose corrupted copies differ at positions
    ``diff``; random answers, alternative token 61 (for the tiny models' 72-token vocabulary)."""
    from .prompts.promptset import PromptSet

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, vocab, (n, T), generator=g)
    corr = clean.clone()
    for p in diff:
        corr[:, p] = 2 + (clean[:, p] - 2 + 1 + torch.randint(0, 30, (n,), generator=g)) % (vocab - 2)
    return PromptSet.from_ids(clean, corr, torch.randint(2, vocab, (n,), generator=g), torch.full((n,), vocab + 1))


def branch_logprob(model: Model, ids: torch.Tensor, answer: torch.Tensor, writes_at_prompt: dict) -> float:
    """A teacher-forced oracle by hand: log P(answer | ids) summed over one plain sequence
    ``ids + answer[:-1]`` (no continuation tree), float64, with ``writes_at_prompt`` ({full site:
    value over the prompt's positions}) written at the prompt's positions only."""
    from .hooks import intervene

    T = ids.numel()
    seq = torch.cat([ids, answer[:-1]])[None]

    def at_prompt(value: torch.Tensor):  # noqa: ANN202 - a hook function
        def fn(x: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            out[:, :T] = value
            return out
        return fn

    with model.attention_fn(), intervene(model, {s: at_prompt(v) for s, v in writes_at_prompt.items()}):
        lp = torch.log_softmax(model.logits(seq)[0, T - 1:].double(), -1)
    return float(lp[torch.arange(answer.numel()), answer].sum())
