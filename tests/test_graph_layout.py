"""The two graph layouts: MIB's edge counts (published in its evaluation code) reproduced from
the models' shapes, the layouts' relation (equal without grouped-query attention), and edge
scores and circuit runs in MIB's layout against an independent reference: the grouped-query
model's ungrouped copy (one KV head per query head, :func:`actpatch.testing.ungrouped_copy`),
whose KV layout *is* MIB's layout of the original, computed by another model."""

from __future__ import annotations


import functools

import pytest
import torch

import actpatch as ap
from actpatch.techniques.circuit import _Circuits
from actpatch.techniques.graph import Graph, GraphLayout, Port, PortKind
from actpatch.testing import tiny_model, ungrouped_copy

# (layers, heads, KV heads) -> MIB's edge count for gpt2, Qwen2.5-0.5B, Gemma-2-2B, Llama-3.1-8B
MIB_COUNTS = {(12, 12, 12): 32_491, (24, 14, 2): 179_749, (26, 8, 4): 74_218, (32, 32, 8): 1_592_881}


@pytest.mark.parametrize("shape, count", MIB_COUNTS.items())
def test_mib_layout_reproduces_mibs_edge_counts(shape, count):
    g = Graph.shaped(*shape, layout="mib")
    assert g.n_edges == count
    L, H, _ = shape
    assert sum(p.kind is PortKind.K for p in g.ports) == L * H  # a key input per query head


def test_layouts_differ_only_under_grouped_query_attention():
    assert Graph.shaped(12, 12, 12).n_edges == Graph.shaped(12, 12, 12, layout="mib").n_edges == 32_491
    kv, mib = Graph.shaped(30, 9, 3), Graph.shaped(30, 9, 3, layout=GraphLayout.MIB)  # SmolLM2-135M's shape
    assert (kv.n_edges, mib.n_edges) == (70_651, 123_211)
    assert [str(p) for p in kv.ports[9:11]] == ["L0.KV0.k", "L0.KV1.k"]
    assert [str(p) for p in mib.ports[9:11]] == ["L0.H0.k", "L0.H1.k"]


@pytest.mark.parametrize("family", ["llama_gqa", "gpt_neox"])  # grouped-query; parallel attention and MLP
def test_reachability_at_once_equals_each_pair(family):
    model = tiny_model(family)
    for layout in GraphLayout:
        g = Graph.of(model, layout=layout)
        want = [[g.reaches(n, p) for p in g.ports] for n in g.nodes]
        assert g.reachable.tolist() == want
        assert g.n_edges == Graph.shaped(model.n_layers, model.n_heads, model.n_kv_heads, parallel=g.parallel,
                                         layout=layout).n_edges
    assert Graph.of(model).parallel is (family == "gpt_neox")
    # edge attribution defaults to MIB's layout (Graph.of to the KV layout)
    assert [str(p) for p in Graph.of(model, "mib").ports] == ap.edge_attribution(model, ap.testing.random_pairs()).downstream


def test_unknown_layout_is_refused_with_the_choices():
    with pytest.raises(ap.errors.MethodError, match="layout='mlp'.*'kv'.*'mib'"):
        Graph.shaped(2, 4, 2, layout="mlp")


@functools.lru_cache(maxsize=None)
def _gqa(family: str):
    model = tiny_model(family, n_layers=2, seed=3)
    return model, ungrouped_copy(model)


PAIRS = [("When Mary and John went to the store", "When Alice and John went to the store", " Mary", " John"),
         ("When Tom and Anna went to the park", "When Tom and Bob went to the park", " Anna", " Tom")]
MULTI = [("When Mary and John went to the store", "When Alice and John went to the store", " Mary gave", " John"),
         ("When Tom and Anna went to the park", "When Tom and Bob went to the park", " Anna", " Tom had fun")]
TOL = 1e-5  # raw units: logit difference, and edge scores (logit difference per edge)


@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "qwen2"])  # sliding window; q / k / v biases
@pytest.mark.parametrize("ig_steps", [0, 3])
def test_mib_layout_edge_scores_equal_the_ungrouped_models(family, ig_steps):
    model, wide = _gqa(family)
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    mib = ap.edge_attribution(model, ps, ig_steps=ig_steps)
    ref = ap.edge_attribution(wide, ps, ig_steps=ig_steps, layout="kv")
    assert mib.graph.layout is GraphLayout.MIB and mib.scores.shape == ref.scores.shape
    assert torch.equal(mib.scores.isnan(), ref.scores.isnan())
    assert float((mib.scores - ref.scores).nan_to_num(0).abs().max()) < TOL
    # summed over a KV group, the per-query-head key / value scores are the KV layout's
    kv = ap.edge_attribution(model, ps, ig_steps=ig_steps, layout="kv")
    group = model.n_heads // model.n_kv_heads
    for kind in (PortKind.K, PortKind.V):
        for j in range(model.n_kv_heads):
            ours = sum(mib.scores[:, mib.graph.port_index[Port(kind, 1, h, per_query_head=True)]]
                       for h in range(j * group, (j + 1) * group))
            theirs = kv.scores[:, kv.graph.port_index[Port(kind, 1, j)]]
            assert float((ours - theirs).nan_to_num(0).abs().max()) < TOL
    k_scores = mib.scores[:, [mib.graph.port_index[Port(PortKind.K, 1, h, per_query_head=True)] for h in range(group)]]
    assert float((k_scores[:, 0] - k_scores[:, 1]).nan_to_num(0).abs().max()) > 1e-4  # heads of a group differ


@pytest.mark.parametrize("family", ["llama_gqa", "mistral"])
@pytest.mark.parametrize("pairs", [PAIRS, MULTI], ids=["single", "multi"])
def test_mib_layout_circuits_equal_the_ungrouped_models(family, pairs):
    model, wide = _gqa(family)
    ps = ap.PromptSet.from_pairs(model, pairs)
    ours, ref = _Circuits(model, ps, "str", "logit_diff", 0), _Circuits(wide, ps, "str", "logit_diff", 0, layout="kv")
    g = torch.Generator().manual_seed(0)
    keeps = [torch.rand(len(ours.graph.nodes), len(ours.graph.ports), generator=g) < p for p in (0.2, 0.6)]
    got, want = ours.run_many(keeps), ref.run_many(keeps)
    assert float((got - want).abs().max()) < TOL
    assert float((got[0] - got[1]).abs().max()) > 1e-2  # the two circuits really differ


def test_cutting_every_edge_into_one_query_heads_key_is_noising_that_heads_ungrouped_key():
    model, _ = _gqa("llama_gqa")
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    runner = _Circuits(model, ps, "str", "logit_diff", 0)
    for kind in ("k", "v"):
        keep = torch.ones(len(runner.graph.nodes), len(runner.graph.ports), dtype=torch.bool)
        keep[:, runner.graph.port_index[Port(PortKind(kind), 1, 3, per_query_head=True)]] = False
        want = ap.patch(model, ps, [ap.Site(f"{kind}_ungrouped", 1, head=3)], direction="noise")
        assert float((runner.run(keep) - want.raw["logit_diff"]).abs().max()) < TOL


def test_without_grouped_query_attention_the_layouts_give_one_faithfulness_curve():
    model = tiny_model("llama", n_layers=2, seed=3)
    assert model.n_heads == model.n_kv_heads
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    mib, kv = ap.edge_attribution(model, ps), ap.edge_attribution(model, ps, layout="kv")
    assert torch.equal(mib.scores.nan_to_num(7.0), kv.scores.nan_to_num(7.0))
    sizes = [5, 40, 200]
    a = ap.circuits.faithfulness(model, ps, mib, sizes)
    b = ap.circuits.faithfulness(model, ps, kv, sizes)
    assert torch.equal(a.raw, b.raw) and (a.clean, a.corrupted) == (b.clean, b.corrupted)
