import pytest
import torch

import actpatch as ap
from actpatch.models.adapters import supported_families
from actpatch.testing import TINY_FAMILIES, tiny_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dimensions_are_the_configs_and_the_activations(family):
    """What a Model reports is what its config says and what its activations have (not a
    table restated here)."""
    m = tiny_model(family, n_layers=3)
    cfg = m.hf.config
    assert (m.n_layers, m.n_heads, m.d_model) == (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size)
    assert m.n_kv_heads == (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    moe = m.adapter.capabilities.mixture_of_experts  # no neuron sites: its experts' neurons are their own
    sites = [ap.Site(k, 1) for k in ("resid_pre", "z", "k", "attn_out", "mlp_out") + ((), ("mlp_post",))[not moe]]
    with ap.capture(m, sites) as acts:
        m.logits(ids)
    resid, z, k, attn, mlp, *post = (acts[s] for s in sites)
    assert resid.shape == attn.shape == mlp.shape == (1, 5, m.d_model)
    assert z.shape == (1, 5, m.n_heads, m.d_head) and k.shape == (1, 5, m.n_kv_heads, m.d_head)
    assert [p.shape[-1] for p in post] == [m.d_mlp] * (not moe)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_parallel_residual_flag_is_how_the_block_computes(family):
    """``parallel_residual`` is true exactly when the MLP does not see the same layer's
    attention output: zeroing attn_out changes mlp_out in serial blocks only."""
    m = tiny_model(family, n_layers=2)
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    site = ap.Site("mlp_out", 0)
    with ap.capture(m, [site]) as acts:
        m.logits(ids)
    plain = acts[site].clone()
    with ap.capture(m, [site]) as acts, ap.intervene(m, {ap.Site("attn_out", 0): 0.0}):
        m.logits(ids)
    unchanged = torch.allclose(acts[site], plain, atol=1e-6)
    assert m.adapter.capabilities.parallel_residual == unchanged


def test_unknown_architecture_lists_families():
    from transformers import AutoModelForCausalLM, OPTConfig

    hf = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32))
    with pytest.raises(ap.errors.UnsupportedArchitectureError, match="model_type='opt'") as e:
        ap.Model(hf)
    for fam in ("gpt2", "llama", "gpt_neox", "gemma2"):
        assert fam in str(e.value)


def test_unhandled_config_attribute_is_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    hf = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2,
                                                     reorder_and_upcast_attn=True, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ap.errors.UnsupportedArchitectureError, match="reorder_and_upcast_attn=True"):
        ap.Model(hf)


def test_unknown_model_name():
    with pytest.raises(ap.errors.ModelNotFoundError, match="No model directory at './no/such/model'"):
        ap.load_model("./no/such/model")


def test_a_dtype_torch_does_not_know_is_refused_before_loading():
    from actpatch.models.loading import parse_dtype

    for bad in ("float8_banana", torch.int8, 3, None):
        with pytest.raises(ap.errors.DeviceError, match=r"not a dtype a model can be loaded in; use one of .*bf16"):
            ap.load_model("./no/such/model", dtype=bad)  # refused before the path is even looked at
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32


def _custom_code_folder(tmp_path):
    """A tiny llama saved with an auto_map pointing at a module that, if ever imported, leaves a mark."""
    import json

    m = tiny_model("llama", n_layers=1)
    m.hf.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    mark = tmp_path / "the_code_ran"
    (tmp_path / "custom.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return mark


def test_a_folder_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path):
    import subprocess
    import sys

    mark = _custom_code_folder(tmp_path)
    with pytest.raises(ap.errors.ModelNotFoundError, match=r"auto_map: AutoConfig, AutoModelForCausalLM.*"
                                                        r"load_model\(\.\.\., trust_remote_code=True\)"):
        ap.load_model(str(tmp_path))
    assert not mark.exists()
    # the same without a terminal and with stdin closed: a clear error, never a question on stdin
    run = subprocess.run([sys.executable, "-c", f"import actpatch as ap; ap.load_model({str(tmp_path)!r})"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "trust_remote_code=True" in run.stderr and "[y/N]" not in run.stdout + run.stderr
    assert not mark.exists()


def test_supported_families_text():
    text = supported_families()
    assert "SmolLM2" in text and "Pythia" in text and "Gemma 2" in text


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logits_last_only_matches_full(family):
    m = tiny_model(family)
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    torch.testing.assert_close(m.logits(ids, last_only=True), m.logits(ids)[:, -1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family, flags", [
    ("gpt2", dict(parallel_residual=False, post_norms=False, heads_write_additively=True, rotary=False, fused_qkv=True)),
    ("llama_gqa", dict(parallel_residual=False, post_norms=False, heads_write_additively=True, rotary=True, fused_qkv=False)),
    ("gpt_neox", dict(parallel_residual=True, post_norms=False, heads_write_additively=True, rotary=True, fused_qkv=True)),
    ("gpt_neox_serial", dict(parallel_residual=False, heads_write_additively=True)),
    ("gemma2", dict(post_norms=True, heads_write_additively=False, attn_softcap=50.0, final_softcap=30.0)),
    ("phi3", dict(fused_qkv=True, attention_bias=False, heads_write_additively=True)),
    ("starcoder2", dict(fused_qkv=False, attention_bias=True, rotary=True)),
    ("gemma3_text", dict(post_norms=True, heads_write_additively=False, attn_softcap=None, final_softcap=None)),
    ("olmo2", dict(post_norms=True, parallel_residual=False)),
    ("granite", dict(residual_scale=0.5, logit_scale=0.25)),
    ("cohere", dict(parallel_residual=True, logit_scale=0.5)),
    ("stablelm", dict(parallel_residual=True, attention_bias=True)),
    ("stablelm_serial", dict(parallel_residual=False)),
    ("phi", dict(parallel_residual=True, attention_bias=True)),
    ("gptj", dict(parallel_residual=True, attention_bias=False, rotary=True)),
    ("mixtral", dict(mixture_of_experts=True)),
])
def test_capabilities_per_family(family, flags):
    caps = tiny_model(family).adapter.capabilities
    assert {k: getattr(caps, k) for k in flags} == flags


def test_positions_beyond_the_input_are_site_errors(ids):
    m = tiny_model("llama")
    for ctx in (ap.capture(m, [ap.Site("resid_pre", 0, pos=9)]), ap.intervene(m, {ap.Site("z", 1, pos=7): 0.0})):
        with pytest.raises(ap.errors.SiteError, match=r"pos \d is out of range for this input \(pos has 7: 0..6\)"):
            with ctx:
                m.logits(ids)
    with pytest.raises(ap.errors.SiteError, match="cannot write a value of shape"):
        with ap.intervene(m, {ap.Site("resid_pre", 0, pos=1): torch.ones(5)}):
            m.logits(ids)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_actpatch_attention_reproduces_the_models_own_forward(family):
    """Every site inside attention is read through actpatch's attention function: with it
    switched on, the logits equal the model's own implementation's (sdpa or eager)."""
    m = tiny_model(family, n_layers=3)
    ids = torch.tensor([[2, 5, 9, 11, 3, 7, 20, 4], [6, 1, 8, 30, 2, 9, 9, 5]])
    own = m.logits(ids)
    with m.attention_fn():
        ours = m.logits(ids)
    torch.testing.assert_close(ours, own, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family, kind, fragment", [
    ("mixtral", "mlp_post", "mixture of experts whose neurons belong to each expert"),
    ("gptj", "mlp_in", "one shared norm"), ("cohere", "resid_mid", "parallel attention and MLP"),
    ("stablelm", "mlp_in", "one shared norm"),
])
def test_sites_a_family_lacks_are_refused_with_the_reason(family, kind, fragment):
    m = tiny_model(family)
    assert kind not in m.adapter.site_kinds
    with pytest.raises(ap.errors.UnsupportedSiteError, match=fragment):
        ap.sweep(m, ap.testing.random_pairs(n=2, T=5, diff=(1, 2)), kind, progress=False)


def test_layer_types_get_their_own_rotary_tables():
    """Gemma 3: local layers rotate with base 10k, global ones with 1M; each block gets its own."""
    m = tiny_model("gemma3_text", n_layers=3)
    x = torch.zeros(1, 5, m.d_model)
    pe = m.adapter.position_embeddings(x, torch.arange(5)[None])
    assert set(pe) == {"sliding_attention", "full_attention"}
    assert not torch.allclose(pe["sliding_attention"][0], pe["full_attention"][0])
    assert m.adapter.layer_types == ("sliding_attention", "sliding_attention", "full_attention")


def test_every_model_type_has_a_tiny_model_and_a_readme_row():
    """The family table is the whole list: each model_type an adapter accepts is built as a tiny
    model (so the invariant table runs on it) and documented in the README."""
    from pathlib import Path

    from actpatch.models.adapters import FAMILIES
    from actpatch.testing import _config

    tiny_types = {_config(f, 2).model_type for f in TINY_FAMILIES}
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for spec in FAMILIES:
        for mt in spec.model_types:
            assert mt in tiny_types, f"model_type {mt!r} ({spec.name}) has no tiny model in TINY_FAMILIES"
        assert f"| `{spec.name}`" in readme, f"README's family table lacks {spec.name}"
    assert sum(len(s.model_types) for s in FAMILIES) == 20
