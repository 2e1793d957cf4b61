"""MIB-style circuit evaluation: areas by hand, curves consistent with the circuit runs,
signed vs absolute selection, baselines, and the EAP-IG / MIB JSON round trip."""

from __future__ import annotations

import math

import pytest
import torch

import actpatch as ap
from actpatch.techniques.circuit import top_edges
from actpatch.techniques.mib import MIB_FRACTIONS, area_under, circuit_scores, compare_methods, random_edges
from actpatch.testing import random_pairs, tiny_model


def test_area_under_hand_computed_curves():
    fr = [0.001, 0.01, 0.1, 1.0]
    f = [0.0, 0.5, 0.9, 1.0]
    # trapezoids: 0.009 * 0.25 + 0.09 * 0.7 + 0.9 * 0.95
    assert area_under(fr, f) == pytest.approx(0.009 * 0.25 + 0.09 * 0.7 + 0.9 * 0.95, abs=1e-12)
    # |1 - f|: 1, 0.5, 0.1, 0 -> 0.009 * 0.75 + 0.09 * 0.3 + 0.9 * 0.05
    assert area_under(fr, f, from_one=True) == pytest.approx(0.009 * 0.75 + 0.09 * 0.3 + 0.9 * 0.05, abs=1e-12)
    # log scale: each step is log(10) wide
    assert area_under(fr, f, log_scale=True) == pytest.approx(math.log(10) * (0.25 + 0.7 + 0.95), abs=1e-12)
    # a perfect circuit everywhere: CPR is the span of the fractions, CMD 0; overshoot counts in CMD
    assert area_under(MIB_FRACTIONS, [1.0] * 10) == pytest.approx(0.999, abs=1e-12)
    assert area_under(MIB_FRACTIONS, [1.0] * 10, from_one=True) == 0.0
    assert area_under([0.5, 1.0], [1.5, 1.0], from_one=True) == pytest.approx(0.125)
    with pytest.raises(ap.errors.MethodError, match="Fractions must increase"):
        area_under([0.5, 0.1], [0, 1])
    with pytest.raises(ap.errors.MethodError, match="as many values as fractions"):
        area_under([0.1, 0.5], [0.0])


def test_signed_and_absolute_selection():
    m = tiny_model("llama", n_layers=2)
    edges = ap.edge_attribution(m, random_pairs(n=2, T=5, diff=(1, 3)))
    s = edges.scores
    ok = ~torch.isnan(s)
    by_abs = top_edges(edges, 5)
    by_sign = top_edges(edges, 5, absolute=False)
    assert int(by_abs.sum()) == int(by_sign.sum()) == 5 and not (by_abs & ~ok).any()
    assert s[by_abs].abs().min() >= s[ok & ~by_abs].abs().max()
    assert s[by_sign].min() >= s[ok & ~by_sign].max()


def test_circuit_scores_are_the_circuit_runs_at_mib_fractions():
    m = tiny_model("llama", n_layers=2, seed=2)
    ps = random_pairs(n=3, T=6, diff=(1, 4))
    edges = ap.edge_attribution(m, ps)
    fr = (0.01, 0.1, 0.5, 1.0)
    res = circuit_scores(m, ps, edges, fractions=fr)
    n = int((~torch.isnan(edges.scores)).sum())
    assert res.n_edges == n and res.sizes == tuple(int(f * n) for f in fr)
    # |score| selection is faithfulness()'s top-n circuits
    curve = ap.circuits.faithfulness(m, ps, edges, sizes=list(res.sizes))
    torch.testing.assert_close(res.absolute, curve.values, atol=1e-5, rtol=0)
    # signed selection (noising scores): the most negative scores first, i.e. top |score| of -scores
    import dataclasses

    flipped = dataclasses.replace(edges, scores=-edges.scores)
    signed = [float(ap.circuits.run_circuit(m, ps, top_edges(flipped, k, absolute=False)).mean()) for k in res.sizes]
    from actpatch.metrics import normalise

    torch.testing.assert_close(res.signed, normalise(torch.tensor(signed), curve.clean, curve.corrupted), atol=1e-5, rtol=0)
    assert float(res.signed[-1]) == pytest.approx(1.0, abs=1e-5) == float(res.absolute[-1])
    assert res.cpr == pytest.approx(area_under(fr, res.signed.tolist()))
    assert res.cmd == pytest.approx(area_under(fr, res.absolute.tolist(), from_one=True))
    with pytest.raises(ap.errors.MethodError, match=r"fractions must increase within \(0, 1\]"):
        circuit_scores(m, ps, edges, fractions=(0.5, 0.1))


def test_compare_methods_and_the_random_baseline():
    m = tiny_model("gpt2", n_layers=2)
    ps = random_pairs(n=2, T=5, diff=(2,))
    res = compare_methods(m, ps, ig_steps=2, fractions=(0.1, 0.5, 1.0))
    assert list(res) == ["eap", "eap-ig", "random"]
    for r in res.values():
        assert r.seconds > 0 and float(r.absolute[-1]) == pytest.approx(1.0, abs=1e-5)
    edges = ap.edge_attribution(m, ps)
    rnd = random_edges(edges, seed=3)
    assert torch.equal(torch.isnan(rnd.scores), torch.isnan(edges.scores)) and rnd.method == "random"
    assert torch.equal(rnd.scores.nan_to_num(), random_edges(edges, seed=3).scores.nan_to_num())
    with pytest.raises(ap.errors.MethodError, match="Unknown circuit method"):
        compare_methods(m, ps, methods=["acdc"])


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_mib_json_round_trip(tmp_path, family):
    import json

    from actpatch.techniques.circuit_io import from_mib_json, load_edge_scores, save_edge_scores, to_mib_json

    m = tiny_model(family, n_layers=2)
    edges = ap.edge_attribution(m, random_pairs(n=2, T=5, diff=(1, 3)))
    keep = top_edges(edges, 12)
    path = to_mib_json(edges, tmp_path / "circuit.json", keep=keep)
    d = json.loads(path.read_text())
    assert set(d) == {"cfg", "nodes", "edges"} and d["cfg"]["n_heads"] == m.n_heads
    assert len(d["edges"]) == int((~torch.isnan(edges.scores)).sum())
    assert "input->a0.h0<q>" in d["edges"] and "m1->logits" in d["edges"] and "a1.h0->m1" in d["edges"]
    assert sum(e["in_graph"] for e in d["edges"].values()) == 12 and d["nodes"]["logits"]["in_graph"]
    back, kept = from_mib_json(path, m)
    assert torch.equal(kept, keep)
    assert torch.equal(torch.isnan(back.scores), torch.isnan(edges.scores))
    torch.testing.assert_close(back.scores.nan_to_num(), edges.scores.nan_to_num(), atol=0, rtol=0)
    assert back.method == edges.method and back.direction is edges.direction
    # the re-imported circuit runs to the same numbers
    torch.testing.assert_close(ap.circuits.run_circuit(m, random_pairs(n=2, T=5, diff=(1, 3)), kept),
                               ap.circuits.run_circuit(m, random_pairs(n=2, T=5, diff=(1, 3)), keep))
    st, meta = save_edge_scores(edges, tmp_path / "scores")
    again = load_edge_scores(tmp_path / "scores", m)
    assert torch.equal(again.scores.nan_to_num(), edges.scores.nan_to_num()) and st.is_file() and meta.is_file()


def test_mib_json_refuses_other_graphs(tmp_path):
    import json

    from actpatch.techniques.circuit_io import from_mib_json, to_mib_json

    m = tiny_model("llama", n_layers=2)
    path = to_mib_json(ap.edge_attribution(m, random_pairs(n=2, T=5, diff=(1,))), tmp_path / "c.json")
    with pytest.raises(ap.errors.ResultError, match="the graph is for"):
        from_mib_json(path, tiny_model("llama", n_layers=3))
    d = json.loads(path.read_text())
    d["edges"]["m1->a0.h0<q>"] = {"score": 1.0, "in_graph": True}
    path.write_text(json.dumps(d))
    with pytest.raises(ap.errors.ResultError, match="goes backwards"):
        from_mib_json(path, m)
    path.write_text('{"nodes": {}}')
    with pytest.raises(ap.errors.ResultError, match="expected keys cfg, nodes and edges"):
        from_mib_json(path, m)


@pytest.mark.parametrize("layout", ["mib", "kv"])
def test_greedy_selection_keeps_circuits_connected_to_the_logits(layout):
    from actpatch.techniques.circuit import greedy_edges

    m = tiny_model("llama_gqa", n_layers=3)
    edges = ap.edge_attribution(m, random_pairs(n=2, T=5, diff=(1, 3)), layout=layout)
    group = 1 if layout == "mib" else m.n_heads // m.n_kv_heads  # query heads per k / v input
    g = edges.graph
    for n in (1, 7, 40):
        mask = greedy_edges(edges, n)
        assert int(mask.sum()) == n and not (mask & torch.isnan(edges.scores)).any()
        # every kept edge's downstream port belongs to the logits or to a node that has a kept out-edge
        joined = {g.nodes[i] for i in mask.any(1).nonzero().flatten().tolist()}
        for j in mask.any(0).nonzero().flatten().tolist():
            port = g.ports[j]
            if port.kind is ap.circuits.PortKind.LOGITS:
                continue
            owners = [nd for nd in joined if nd.layer == port.layer and (
                (port.kind is ap.circuits.PortKind.MLP and nd.kind is ap.circuits.NodeKind.MLP)
                or (port.kind is ap.circuits.PortKind.Q and nd.kind is ap.circuits.NodeKind.HEAD and nd.head == port.head)
                or (port.kind in (ap.circuits.PortKind.K, ap.circuits.PortKind.V) and nd.kind is ap.circuits.NodeKind.HEAD
                    and nd.head // group == port.head))]
            assert owners, f"{port} is read by no node of the circuit"
    # the first pick is the best edge into the logits
    first = greedy_edges(edges, 1)
    into_logits = edges.scores[:, -1].abs().nan_to_num(-1.0)
    assert bool(first[int(into_logits.argmax()), -1])
    res = circuit_scores(m, random_pairs(n=2, T=5, diff=(1, 3)), edges, fractions=(0.1, 1.0), selection="greedy")
    assert res.method == "eap+greedy" and float(res.absolute[-1]) == pytest.approx(1.0, abs=1e-5)


def test_oracle_scores_are_exact_cuts():
    from actpatch.techniques.mib import oracle_edges

    m = tiny_model("llama", n_layers=2, seed=1)
    ps = random_pairs(n=2, T=5, diff=(1, 3))
    edges = ap.edge_attribution(m, ps)
    oracle = oracle_edges(m, ps, edges, k=4)
    assert oracle.method == "exact@4" and torch.equal(torch.isnan(oracle.scores), torch.isnan(edges.scores))
    nonzero = (oracle.scores.nan_to_num() != 0).nonzero().tolist()
    assert 1 <= len(nonzero) <= 4
    check = ap.circuits.validate_edges(m, ps, edges, k=4, n_random=0, exhaustive=False)  # the same exact cuts, computed independently
    mask = ap.circuits.top_edges(edges, 4)
    got = {(edges.upstream[i], edges.downstream[j]): float(oracle.scores[i, j]) for i, j in mask.nonzero().tolist()}
    top = [(name, exact) for name, exact, why in zip(check.edges, check.exact.tolist(), check.agreement.reasons)
           if why == "top"]
    assert len(top) == 4  # the neighbours it also cuts are not in the oracle's top 4
    for name, exact in top:
        assert got[name] == pytest.approx(exact, abs=1e-5)
    both = compare_methods(m, ps, methods=["exact", "eap-ig-act"], oracle_k=3, ig_steps=2, fractions=(0.5, 1.0))
    assert both["eap-ig-act"].method == "eap-ig-act" and both["exact"].method == "exact@3"
    with pytest.raises(ap.errors.MethodError, match="noising scores"):
        oracle_edges(m, ps, ap.edge_attribution(m, ps, direction="denoise"), k=2)


def test_saved_evaluations_round_trip_and_bad_files_are_one_error(tmp_path):
    from actpatch.techniques.circuit import load_curves
    from actpatch.techniques.mib import load_mib, save_mib

    m = tiny_model("llama", n_layers=2)
    ps = random_pairs(n=2, T=5, diff=(1, 3))
    res = circuit_scores(m, ps, ap.edge_attribution(m, ps), fractions=(0.5, 1.0))
    save_mib({"EAP": res}, tmp_path / "mib.json")
    back = load_mib(tmp_path / "mib.json")["EAP"]
    assert back.cpr == res.cpr and torch.equal(back.signed, res.signed) and back.sizes == res.sizes
    assert load_mib(tmp_path / "none.json") == {}
    (tmp_path / "mib.json").write_text('{"EAP": {"method": "eap"}}')
    with pytest.raises(ap.errors.ResultError, match="not an MIB evaluation file"):
        load_mib(tmp_path / "mib.json")
    (tmp_path / "circuits.json").write_text('{"EAP": [1, 2]}')
    with pytest.raises(ap.errors.ResultError, match="not faithfulness curves"):
        load_curves(tmp_path / "circuits.json")


def test_submission_files_read_back_and_score_as_stored(tmp_path):
    """A submission written by us and scored by our own code gives the numbers stored beside it."""
    import json

    from actpatch.techniques.circuit_io import SUBMISSION_PERCENTS, _edge_name, from_mib_submission, to_mib_submission

    m = tiny_model("llama_gqa", n_layers=2)
    ps = random_pairs(n=2, T=5, diff=(1, 3))
    edges = ap.edge_attribution(m, ps)
    stored = circuit_scores(m, ps, edges, fractions=(0.01, 0.1, 0.5, 1.0))
    folder = to_mib_submission(edges, tmp_path, model="tinyllama", task="ioi", scores=stored)
    assert folder == tmp_path / "ioi_tinyllama"
    raw = json.loads((folder / "importances.json").read_text())
    assert raw["cfg"]["n_key_value_heads"] == m.n_heads  # MIB's layout: k / v inputs per query head
    assert raw["cfg"]["actpatch"]["model"] == "tinyllama" and raw["cfg"]["actpatch"]["task"] == "ioi"
    (edge, score), = edges.strongest(1)
    assert raw["edges"][_edge_name(edge.upstream, edge.downstream)]["score"] == -score != 0  # MIB's sign
    back, circuits, again_stored = from_mib_submission(folder, m)
    assert circuits == {} and again_stored.cpr == stored.cpr and again_stored.cmd == stored.cmd
    assert torch.equal(back.scores.nan_to_num(9.0), edges.scores.nan_to_num(9.0))
    again = circuit_scores(m, ps, back, fractions=stored.fractions)
    assert (again.cpr, again.cmd) == (stored.cpr, stored.cmd) and torch.equal(again.signed, stored.signed)
    # MIB's other format: one binary circuit per percentage of the edges
    many = to_mib_submission(edges, tmp_path / "many", model="tinyllama", task="ioi", circuits=True)
    _, circuits, none = from_mib_submission(many, m)
    assert list(circuits) == [float(p) for p in SUBMISSION_PERCENTS] and none is None
    for pct, keep in circuits.items():
        n = int(pct / 100 * edges.graph.n_edges)
        assert torch.equal(keep, ap.circuits.top_edges(edges, n)), pct
    with pytest.raises(ap.errors.ResultError, match="layout"):
        to_mib_submission(ap.edge_attribution(m, ps, layout="kv"), tmp_path, model="tinyllama", task="ioi")
    with pytest.raises(ap.errors.ResultError, match="<task>_<model>"):
        to_mib_submission(edges, tmp_path, model="tiny_llama", task="ioi")
