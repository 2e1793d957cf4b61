"""RelP: LRP's rules change the backward pass only, conserve relevance, and make node and edge
attribution their RelP variants (edges into the output of a node add up to its node score)."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.hooks import capture, gradient_taps, intervene
from actpatch.models.relevance import DEFAULT_RULES, RULES, relevance_rules
from actpatch.sites import Site
from actpatch.testing import random_pairs, tiny_model

IDS = torch.tensor([[2, 3, 4, 5, 6, 7], [2, 9, 4, 8, 6, 5]])


def _metric_and_coefficients(m, rules):
    """The logit difference (answer 7 vs 8, summed over the batch), its value without rules, and
    the coefficients at the input embeddings under ``rules``."""
    with m.attention_fn():
        plain = m.last_logits_with_grad(IDS).detach()
        with relevance_rules(m, rules):
            taps, zeros = gradient_taps([Site("embed")])
            with torch.enable_grad(), intervene(m, taps):
                logits = m.last_logits_with_grad(IDS)
            value = (logits[:, 7] - logits[:, 8]).sum()
            (coef,) = torch.autograd.grad(value, zeros[Site("embed")][0])
    return logits.detach(), plain, float(value.detach()), float((coef * zeros[Site("embed")][1]).sum())


# Families without biases, learned positions or soft-capped logits: with every rule the model is
# locally linear in its input embeddings (GPT-2 adds learned positions, a second input; Gemma 2
# soft-caps its logits with a tanh; Mixtral's router is a product the rules do not split).
@pytest.mark.parametrize("family", ["llama", "llama_gqa", "mistral", "qwen3", "gemma", "gemma3_text", "phi3",
                                    "gpt_neox", "olmo", "olmo2", "cohere", "granite", "stablelm", "gptj", "smollm3"])
def test_with_every_rule_relevance_is_conserved_and_the_forward_pass_is_unchanged(family):
    m = tiny_model(family, n_layers=2)
    logits, plain, value, total = _metric_and_coefficients(m, RULES)
    assert torch.equal(logits, plain)  # bit for bit
    assert total == pytest.approx(value, abs=1e-4)  # raw logit-difference units


@pytest.mark.parametrize("dropped", RULES)
def test_each_rule_is_needed_for_conservation(dropped):
    m = tiny_model("llama", n_layers=2)
    _, _, value, total = _metric_and_coefficients(m, [r for r in RULES if r != dropped])
    assert abs(total - value) > 1e-3, dropped


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "mixtral"])
def test_the_default_rules_leave_every_forward_pass_unchanged(family):
    m = tiny_model(family, n_layers=2)
    rules = [r for r in DEFAULT_RULES if r != "half"] if family == "mixtral" else DEFAULT_RULES
    logits, plain, _, _ = _metric_and_coefficients(m, rules)
    assert torch.equal(logits, plain)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_relp_node_attribution_is_the_activation_change_times_the_coefficients(family):
    m = tiny_model(family, n_layers=3)
    ps = random_pairs(n=2, T=6, diff=(1, 4))
    est = ap.attribute(m, ps, "mlp_out", method="relp", direction="noise", per_position=True)
    assert est.info.label == "relp" and est.info.relp
    sites = [Site("mlp_out", l) for l in range(m.n_layers)]
    clean, corrupted = torch.stack(ps.clean), torch.stack(ps.corrupted)
    with m.attention_fn():
        with capture(m, sites) as corr:
            m.logits(corrupted)
        with relevance_rules(m), torch.enable_grad():
            taps, zeros = gradient_taps(sites)
            with intervene(m, taps):
                logits = m.last_logits_with_grad(clean)
            value = (logits.gather(1, ps.answers[:, None]) - logits.gather(1, ps.alternatives[:, None])).sum()
            grads = torch.autograd.grad(value, [zeros[s][0] for s in sites])
    by_hand = torch.stack([((corr[s] - zeros[s][1]) * g).sum(-1) for s, g in zip(sites, grads)], 1)  # (B, L, T)
    torch.testing.assert_close(est.raw["logit_diff"] - est.clean["logit_diff"][:, None, None], by_hand.double(),
                               atol=1e-5, rtol=1e-5)
    atp = ap.attribute(m, ps, "mlp_out", direction="noise", per_position=True)
    assert (atp.values - est.values).abs().max() > 1e-3  # the coefficients are not the gradient


@pytest.mark.parametrize("family,layout", [("llama_gqa", "mib"), ("llama_gqa", "kv"), ("gpt2", "mib")])
def test_relp_edges_out_of_a_node_add_up_to_its_relp_node_score(family, layout):
    m = tiny_model(family, n_layers=3)
    ps = random_pairs(n=3, T=6, diff=(1, 4))
    edges = ap.edge_attribution(m, ps, method="relp", layout=layout)
    assert edges.method == "relp"
    mlp = ap.attribute(m, ps, "mlp_out", method="relp", per_position=False)
    heads = ap.attribute(m, ps, "z", method="relp")
    for l in range(m.n_layers):
        got = edges.per_prompt[:, edges.upstream.index(f"L{l}.MLP")].nansum(-1)
        want = mlp.raw["logit_diff"][:, l] - mlp.clean["logit_diff"]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, check_dtype=False)
        for h in range(m.n_heads):
            got = edges.per_prompt[:, edges.upstream.index(f"L{l}.H{h}")].nansum(-1)
            want = heads.raw["logit_diff"][:, l, h] - heads.clean["logit_diff"]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, check_dtype=False)


def test_relp_results_validate_save_and_load(tmp_path):
    m = tiny_model("llama", n_layers=2)
    ps = random_pairs(n=2, T=6, diff=(1, 4))
    est = ap.attribute(m, ps, "z", method="relp")
    v = ap.validate_attribution(m, ps, est, k=3)
    assert v.agreement.exhaustive and len(v.cells) == est.values.numel()
    back = ap.PatchResult.load(est.save(tmp_path / "relp"))
    assert back.info.label == "relp" and torch.equal(back.values, est.values)
    assert any("RelP" in f.message for f in est.findings)


def test_relp_bad_input_is_refused_before_any_computation():
    m = tiny_model("llama", n_layers=2)
    ps = random_pairs(n=2, T=6, diff=(1, 4))
    with pytest.raises(ap.ActpatchError, match="use 'atp'"):
        ap.attribute(m, ps, "z", method="lrp")
    with pytest.raises(ap.ActpatchError, match="qk_fix and grad_drop"):
        ap.attribute(m, ps, "q", method="relp", qk_fix=True)
    with pytest.raises(ap.ActpatchError, match="takes no interpolation steps"):
        ap.edge_attribution(m, ps, method="relp", ig_steps=5)
    with pytest.raises(ap.ActpatchError, match="needs interpolation steps"):
        ap.edge_attribution(m, ps, method="eap-ig")
    with pytest.raises(ap.ActpatchError, match="choose from eap, eap-ig"):
        ap.edge_attribution(m, ps, method="lrp")
    with pytest.raises(ap.ActpatchError, match="Unknown relevance rule"):
        with relevance_rules(m, ["ln", "gamma"]):
            pass
    with pytest.raises(ap.ActpatchError, match="mixture of experts"):
        ap.attribute(tiny_model("mixtral", n_layers=2), ps, "z", method="relp")


def test_a_norm_the_ln_rule_does_not_know_is_refused():
    """A norm class of an unknown name would keep its plain gradient and break conservation
    silently: refused up front, naming the class."""
    m = tiny_model("llama", n_layers=2)
    norm = m.hf.model.norm
    norm.__class__ = type("ScaleNorm", (type(norm),), {})
    ps = random_pairs(n=2)
    with pytest.raises(ap.errors.UnsupportedArchitectureError, match="norm class.*ScaleNorm"):
        ap.attribute(m, ps, "z", method="relp")
    with pytest.raises(ap.errors.UnsupportedArchitectureError, match="ScaleNorm"):
        ap.edge_attribution(m, ps, method="relp")
    assert ap.attribute(m, ps, "z").values.shape[0] == 2  # plain AtP does not need the rule
