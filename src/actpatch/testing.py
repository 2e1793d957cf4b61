"""Tiny randomly initialised models built from configs (no download), for tests and examples.

Example:
    >>> from actpatch.testing import tiny_model
    >>> tiny_model("llama_gqa").n_kv_heads
    2
"""

from __future__ import annotations

import torch

from .models.handle import Model

__all__ = ["tiny_model", "TINY_FAMILIES", "tiny_tokenizer", "WORDS"]

# A word-level vocabulary so that tiny models can run PromptSet builders end to end.
WORDS = (
    "<unk> <pad> When Then While After and went to the store park school office gave a an drink book "
    "ball pen key Mary John Alice Bob Tom Anna Paul Sara Mark Lucy had fun , . The war lasted from "
    "year 17 01 32 45 68 99 is in city Paris Rome Berlin Madrid Tower Colosseum Eiffel Louvre capital "
    "of France Italy Spain it"
).split()
VOCAB = 72

TINY_FAMILIES = ("gpt2", "llama", "llama_gqa", "qwen2", "gpt_neox", "gpt_neox_serial", "gemma2")


def _config(family: str, n_layers: int):  # noqa: ANN202 - returns a transformers config
    from transformers import GPT2Config, Gemma2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

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
    if family in ("gpt_neox", "gpt_neox_serial"):
        return GPTNeoXConfig(**common, intermediate_size=128, max_position_embeddings=128,
                             use_parallel_residual=family == "gpt_neox", hidden_dropout=0.0, attention_dropout=0.0)
    if family == "gemma2":
        return Gemma2Config(**common, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                            max_position_embeddings=128, sliding_window=4, query_pre_attn_scalar=16,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")


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
    return Model(hf, tiny_tokenizer(), name=f"tiny-{family}")
