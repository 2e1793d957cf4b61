"""Edge attribution (EAP, EAP-IG): edges into a node add up to that node's attribution."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.testing import assert_effect_close, random_pairs, tiny_model, without_final_norm


def _pairs(n=3, T=6, diff=(1, 4), seed=0):
    return random_pairs(n=n, T=T, diff=diff, seed=seed)


def _no_input_norms(family):
    """Attention inputs become linear in the residual stream (norms before attention removed,
    and Qwen3's per-head q / k norms), so the edges into a head's q / k / v add up to that
    head's exact AtP score."""
    m = tiny_model(family, n_layers=3, seed=1)
    name = {"gpt2": "ln_1", "gpt_neox": "input_layernorm"}.get(family, "input_layernorm")
    for block in m.hf.get_submodule("transformer.h" if family == "gpt2" else
                                    "gpt_neox.layers" if family.startswith("gpt_neox") else "model.layers"):
        setattr(block, name, torch.nn.Identity())
        if family == "qwen3":
            block.self_attn.q_norm, block.self_attn.k_norm = torch.nn.Identity(), torch.nn.Identity()
        if family == "stablelm_serial":
            block.self_attn.q_layernorm, block.self_attn.k_layernorm = torch.nn.Identity(), torch.nn.Identity()
    return m


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "mistral", "gpt_neox", "gpt_neox_serial", "qwen2", "qwen3",
                                    "gemma", "phi3", "starcoder2", "granite", "smollm3", "mixtral", "stablelm_serial"])
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_edges_into_a_node_add_up_to_its_attribution(family, direction):
    m = _no_input_norms(family)
    ps = _pairs()
    base = "clean" if direction == "noise" else "corrupted"
    # logits: the edges into the output add up to AtP of the final residual stream
    atp = ap.attribute(m, ps, "resid_final", direction=direction, per_position=False)
    expected = atp.raw["logit_diff"] - getattr(atp, base)["logit_diff"]
    # heads' query / key / value inputs: per KV head (the KV layout) or per query head (MIB's:
    # the key / value each query head reads, k_ungrouped / v_ungrouped)
    layouts = {"kv": (("q", m.n_heads, "H{}.q"), ("k", m.n_kv_heads, "KV{}.k"), ("v", m.n_kv_heads, "KV{}.v")),
               "mib": (("q", m.n_heads, "H{}.q"), ("k_ungrouped", m.n_heads, "H{}.k"),
                       ("v_ungrouped", m.n_heads, "H{}.v"))}
    if m.n_kv_heads == m.n_heads:  # without grouped-query attention the two are one graph (test_graph_layout)
        del layouts["mib"]
    for layout, inputs in layouts.items():
        edges = ap.edge_attribution(m, ps, direction=direction, layout=layout)
        got = edges.per_prompt[:, :, edges.downstream.index("logits")].nansum(1)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, check_dtype=False)  # estimates are float64
        for kind, n, label in inputs:
            atp = ap.attribute(m, ps, kind, direction=direction)
            for l in range(m.n_layers):
                for h in range(n):
                    node = f"L{l}." + label.format(h)
                    got = edges.per_prompt[:, :, edges.downstream.index(node)].nansum(1)
                    want = atp.raw["logit_diff"][:, l, h] - getattr(atp, base)["logit_diff"]
                    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=node, check_dtype=False)


def test_reachability_and_naming():
    m = tiny_model("llama", n_layers=2)
    e = ap.edge_attribution(m, _pairs())
    assert e.upstream[:3] == ["embed", "L0.H0", "L0.H1"] and "L1.MLP" in e.upstream
    assert torch.isnan(e.into("L0.H0.q")[1:]).all() and not torch.isnan(e.into("L0.H0.q")[0])  # only embed reaches L0
    assert not torch.isnan(e.into("L0.MLP")[1:5]).any() and torch.isnan(e.into("L0.MLP")[5])  # L0 heads feed L0 MLP (serial)
    assert not torch.isnan(e.into("logits")).any()
    top = e.top(5)
    assert len(top) == 5 and abs(top[0][2]) >= abs(top[-1][2])
    # the list and the mask name the same edges; asking for more lists only the reachable ones
    mask = ap.circuits.top_edges(e, 5)
    assert {(str(x.upstream), str(x.downstream)) for x, _ in e.strongest(5)} == {
        (e.upstream[u], e.downstream[v]) for u, v in mask.nonzero().tolist()}
    reachable = int((~torch.isnan(e.scores)).sum())
    assert len(e.strongest(10 ** 6)) == reachable and not any(s != s for _, s in e.strongest(10 ** 6))
    assert len(e.to_pandas()) == int((~torch.isnan(e.scores)).sum())
    par = ap.edge_attribution(tiny_model("gpt_neox", n_layers=2), _pairs())
    assert torch.isnan(par.into("L0.MLP")[1:]).all()  # parallel: heads of a layer do not feed its MLP


def test_eap_ig():
    m = tiny_model("gpt2", n_layers=2)
    ps = _pairs()
    eap = ap.edge_attribution(m, ps)
    one = ap.edge_attribution(m, ps, ig_steps=1)  # the single point is the base run itself
    torch.testing.assert_close(one.per_prompt, eap.per_prompt, equal_nan=True)
    ig = ap.edge_attribution(m, ps, ig_steps=5)
    assert ig.method == "eap-ig"


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_eap_ig_is_complete_on_the_embeddings(direction):
    """Integrated gradients' completeness: every port reads the embeddings additively, so the
    edges out of ``embed`` add up to the path integral along the interpolated inputs, i.e. the
    whole effect m(other run) - m(base run), as the steps grow (error ~ 1/steps). EAP (one
    point) misses it by a lot on this model."""
    m = tiny_model("llama", n_layers=2)
    ps = _pairs()
    atp = ap.attribute(m, ps, "resid_final", direction=direction, per_position=False)
    base, other = ("clean", "corrupted") if direction == "noise" else ("corrupted", "clean")
    total = (getattr(atp, other)["logit_diff"] - getattr(atp, base)["logit_diff"]).double()

    def miss(steps):
        e = ap.edge_attribution(m, ps, direction=direction, ig_steps=steps)
        return float((e.per_prompt[:, e.upstream.index("embed"), :].nansum(-1) - total).abs().max())

    assert float(total.abs().max()) > 1.0  # an effect worth integrating
    eap, coarse, fine = miss(0), miss(8), miss(32)
    assert eap > 0.3 and fine < 0.02  # raw logit-diff units
    assert fine < coarse / 3  # converges as a Riemann sum should


def test_eap_refusals():
    with pytest.raises(ap.ActpatchError, match="normalises the attention output"):
        ap.edge_attribution(tiny_model("gemma2"), _pairs())
    with pytest.raises(ap.errors.MetricError, match="differentiable"):
        ap.edge_attribution(tiny_model("gpt2"), _pairs(), metric="rank")


# -- circuits ---------------------------------------------------------------------------------------

def _keep_all_but(edges, node):
    keep = torch.ones_like(edges.scores, dtype=torch.bool)
    keep[:, edges.downstream.index(node)] = False
    return keep


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gpt_neox", "gpt_neox_serial", "granite", "mixtral"])
def test_circuit_runs_match_exact_patching(family):
    m = tiny_model(family, n_layers=3, seed=2)
    ps = _pairs()
    edges = ap.edge_attribution(m, ps)
    clean = ap.patch(m, ps, [ap.Site("resid_pre", 0)], direction="noise")  # for the baselines
    none = torch.zeros_like(edges.scores, dtype=torch.bool)
    full = torch.ones_like(none)
    torch.testing.assert_close(ap.circuits.run_circuit(m, ps, full), clean.clean["logit_diff"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ap.circuits.run_circuit(m, ps, none), clean.corrupted["logit_diff"], atol=1e-4, rtol=0)
    # cutting every edge into one head's query = noising that query exactly
    q = ap.patch(m, ps, [ap.Site("q", 1, head=2)], direction="noise")
    torch.testing.assert_close(ap.circuits.run_circuit(m, ps, _keep_all_but(edges, "L1.H2.q")), q.raw["logit_diff"], atol=1e-4, rtol=0)
    # a KV head's value input (KV layout) = noising v; one query head's (MIB's) = noising v_ungrouped
    kv = ap.patch(m, ps, [ap.Site("v", 2, head=1)], direction="noise")
    kv_edges = ap.edge_attribution(m, ps, layout="kv")
    torch.testing.assert_close(ap.circuits.run_circuit(m, ps, _keep_all_but(kv_edges, "L2.KV1.v"), layout="kv"),
                               kv.raw["logit_diff"], atol=1e-4, rtol=0)
    per_head = ap.patch(m, ps, [ap.Site("v_ungrouped", 2, head=3)], direction="noise")
    torch.testing.assert_close(ap.circuits.run_circuit(m, ps, _keep_all_but(edges, "L2.H3.v")),
                               per_head.raw["logit_diff"], atol=1e-4, rtol=0)
    # cutting every edge into an MLP = noising its output
    mlp = ap.patch(m, ps, [ap.Site("mlp_out", 1)], direction="noise")
    torch.testing.assert_close(ap.circuits.run_circuit(m, ps, _keep_all_but(edges, "L1.MLP")), mlp.raw["logit_diff"], atol=1e-4, rtol=0)


def test_faithfulness_curve():
    m = tiny_model("llama", n_layers=2)
    ps = _pairs()
    edges = ap.edge_attribution(m, ps)
    n_edges = int((~torch.isnan(edges.scores)).sum())
    curve = ap.circuits.faithfulness(m, ps, edges, sizes=[0, 5, 20, n_edges])
    assert_effect_close(curve.values[[0, -1]], [0.0, 1.0], curve.clean, curve.corrupted, atol=1e-5)
    assert curve.plot_data()["x"] == [0, 5, 20, n_edges]
    assert int(ap.circuits.top_edges(edges, 5).sum()) == 5


def _linear_head(family):
    """A tiny model whose logit difference is linear in the final residual stream, in the last
    layer's MLP output and neurons, and in every write into the logits."""
    return without_final_norm(tiny_model(family, n_layers=3, seed=3))


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gpt_neox", "granite"])
def test_validate_edges_is_exact_for_edges_into_linear_logits(family):
    """Cutting u -> logits changes the final residual by u's corrupted - clean write, to which
    the metric is linear here: EAP's score is the exact effect."""
    import dataclasses

    m = _linear_head(family)
    ps = _pairs()
    edges = ap.edge_attribution(m, ps)
    only_logits = edges.scores.clone()
    only_logits[:, :-1] = float("nan")
    assert edges.downstream[-1] == "logits"
    check = ap.circuits.validate_edges(m, ps, dataclasses.replace(edges, scores=only_logits), k=4, n_random=4)
    n_into_logits = int((~torch.isnan(only_logits)).sum())
    assert check.agreement.exhaustive and len(check.edges) == n_into_logits and all(v == "logits" for _, v in check.edges)
    assert check.exact.abs().max() > 1e-3
    torch.testing.assert_close(check.estimate, check.exact, atol=1e-4, rtol=1e-4)
    assert check.rank_correlation > 0.99 and check.findings[0].code == "edge_agreement"
    # edges into heads go through attention and norms: scores and exact effects differ, and are reported
    full = ap.circuits.validate_edges(m, ps, edges, k=5, n_random=5)
    assert (full.estimate - full.exact).abs().max() > 1e-4
    assert len(full.disagreements(3)) == 3
    # a sample (top 5, their grid neighbours, 5 stratified) agrees with the exhaustive check on its edges
    part = ap.circuits.validate_edges(m, ps, edges, k=5, n_random=5, exhaustive=False)
    assert not part.agreement.exhaustive and part.agreement.reasons.count("stratified") == 5
    where = {e: i for i, e in enumerate(full.edges)}
    torch.testing.assert_close(part.exact, full.exact[[where[e] for e in part.edges]], atol=1e-6, rtol=0)


def test_validate_edges_refuses_denoising_scores():
    m = tiny_model("llama", n_layers=2)
    ps = _pairs()
    with pytest.raises(ap.ActpatchError, match="checks noising scores"):
        ap.circuits.validate_edges(m, ps, ap.edge_attribution(m, ps, direction="denoise"))


@pytest.mark.slow
def test_bundled_ioi_edge_scores_against_cutting_edges(bundled):
    # EAP-IG in MIB's layout (123,211 edges); each exact cut is a circuit run, the cost of this test
    ps = ap.prompts.ioi(bundled, n=4, templates=[0, 2])
    edges = ap.edge_attribution(bundled, ps, ig_steps=5)
    check = ap.circuits.validate_edges(bundled, ps, edges, k=5, n_random=6, exhaustive=False)
    print(f"\nIOI edges, EAP-IG vs cutting each edge exactly ({len(check.edges)} edges: top 5, their neighbours, "
          f"6 random): Spearman {check.rank_correlation:.3f}; worst {check.disagreements(1)}")
    assert edges.graph.n_edges == 123_211 and len(check.edges) >= 20
    assert check.rank_correlation >= 0.5


@pytest.mark.parametrize("family, fragment", [
    ("gemma2", "heads' writes do not add up"), ("gemma3_text", "heads' writes do not add up"),
    ("olmo2", "heads' writes do not add up"), ("phi", "one shared norm"), ("gptj", "one shared norm"),
    ("cohere", "one shared norm"), ("stablelm", "one shared norm"),
])
def test_edge_graph_refused_where_edges_are_not_defined(family, fragment):
    with pytest.raises(ap.errors.MethodError, match=fragment):
        ap.edge_attribution(tiny_model(family), _pairs())


def test_eap_ig_on_activations():
    """ig_target='activations' moves every node's output along the line from source to base (the
    gradient still flows through the live graph): one step is EAP; edges into linear logits score
    the same either way; elsewhere the two paths differ."""
    m = _linear_head("llama_gqa")
    ps = _pairs()
    eap = ap.edge_attribution(m, ps)
    one = ap.edge_attribution(m, ps, ig_steps=1, ig_target="activations")
    torch.testing.assert_close(one.scores.nan_to_num(), eap.scores.nan_to_num(), atol=1e-6, rtol=0)
    inputs = ap.edge_attribution(m, ps, ig_steps=4)
    acts = ap.edge_attribution(m, ps, ig_steps=4, ig_target="activations")
    assert acts.method == "eap-ig-act" and inputs.method == "eap-ig"
    torch.testing.assert_close(acts.into("logits").nan_to_num(), eap.into("logits").nan_to_num(), atol=1e-5, rtol=1e-5)
    assert (acts.scores - inputs.scores).nan_to_num().abs().max() > 1e-4
    with pytest.raises(ap.errors.MethodError, match="ig_target='weights'"):
        ap.edge_attribution(m, ps, ig_steps=2, ig_target="weights")


@pytest.mark.parametrize("family", ["llama_gqa", "gpt_neox"])
def test_circuits_batched_together_equal_each_run_alone(family):
    """run_many packs several circuits (and, here, two length groups) into one forward pass per
    batch; each row must equal that circuit run on its own (1e-5: only the batch size differs)."""
    from actpatch.techniques.circuit import _Circuits, greedy_edges

    m = tiny_model(family, n_layers=3, seed=4)
    a, b = _pairs(n=3, T=6), _pairs(n=2, T=8, seed=1)
    ps = ap.PromptSet.from_ids([*a.clean, *b.clean], [*a.corrupted, *b.corrupted],
                               [*a.answers.tolist(), *b.answers.tolist()], [*a.alternatives.tolist(), *b.alternatives.tolist()])
    edges = ap.edge_attribution(m, ps)
    keeps = [ap.circuits.top_edges(edges, n) for n in (0, 3, 17, 60)] + [greedy_edges(edges, 9)]
    alone = _Circuits(m, ps, "str", "logit_diff", 0, rows=1)  # rows=1: one circuit per pass
    together = _Circuits(m, ps, "str", "logit_diff", 0, rows=4)  # two circuits of a 2- or 3-prompt group per pass
    singles = torch.stack([alone.run(k) for k in keeps])
    torch.testing.assert_close(together.run_many(keeps), singles, atol=1e-5, rtol=0)
    assert singles.std(0).max() > 1e-2  # the circuits really differ
    picked = edges.scores.flatten().nan_to_num(0).abs().argsort(descending=True)[:4].tolist()
    cuts = together.cut_each(picked)
    full = alone.run(torch.ones_like(keeps[0])).mean()
    for i, c in zip(picked, cuts):
        keep = torch.ones_like(keeps[0])
        keep.view(-1)[i] = False
        assert abs(float(alone.run(keep).mean() - full) - float(c)) < 1e-5


def test_positional_circuits_batched_together():
    from actpatch.techniques.circuit import _Circuits

    m = tiny_model("llama", n_layers=2, seed=5)
    ps = _pairs(n=3, T=6)
    U, V = ap.edge_attribution(m, ps).scores.shape
    g = torch.Generator().manual_seed(0)
    keeps = [torch.rand(U, V, 6, generator=g) < p for p in (0.2, 0.5, 0.9)]
    alone = _Circuits(m, ps, "str", "logit_diff", 0, rows=1)
    together = _Circuits(m, ps, "str", "logit_diff", 0, rows=64)  # all three circuits in one pass, not the CPU default
    torch.testing.assert_close(together.run_many(keeps), torch.stack([alone.run(k) for k in keeps]), atol=1e-5, rtol=0)
    with pytest.raises(ap.errors.MethodError, match="one kind"):
        together.run_many([keeps[0], keeps[0][..., 0]])
    with pytest.raises(ap.errors.MethodError, match="rows"):
        _Circuits(m, ps, "str", "logit_diff", 0, rows=0)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "granite", "gpt_neox"])
def test_circuit_runs_that_cut_only_late_edges_start_late_and_equal_the_full_run(family):
    """A circuit whose cut edges all enter layer l or later starts at l from the clean run; each
    equals the same circuit run from the embeddings (1e-5), down to cuts into the logits alone."""
    from actpatch.techniques.circuit import _Circuits

    m = tiny_model(family, n_layers=4, seed=3)
    ps = _pairs()
    late = _Circuits(m, ps, "str", "logit_diff", 0)
    whole = _Circuits(m, ps, "str", "logit_diff", 0)
    whole.kept = [(corr, measure, None) for corr, measure, _ in whole.kept]  # no clean-run shortcut
    ports = late.graph.ports
    g = torch.Generator().manual_seed(0)
    keeps = []
    for first in (1, 2, 3, 4):  # 4: only edges into the logits are cut
        keep = torch.rand(len(late.graph.nodes), len(ports), generator=g) > 0.5
        keep[:, [j for j, p in enumerate(ports) if p.layer is not None and p.layer < first]] = True
        keeps.append(keep)
        skip = late.kept[0][2]
        assert skip.start(late.graph, late._checked(keep)[None], m.n_layers) == first
    got, want = late.run_many(keeps), whole.run_many(keeps)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    full = whole.run(torch.ones_like(keeps[0]))
    assert (want - full).abs().max() > 1e-3  # the cuts change the metric
