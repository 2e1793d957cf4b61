"""Position-aware edge attribution and circuits: per-position scores add up to EAP's, named
positions line prompts of different layouts up, per-position circuits are exact."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.testing import assert_effect_close, random_pairs, tiny_model


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_scores_over_positions_add_up_to_eap(family):
    m = tiny_model(family, n_layers=2)
    ps = random_pairs(n=3, T=6, diff=(1, 4))
    pe = ap.circuits.positional_edge_attribution(m, ps)
    eap = ap.edge_attribution(m, ps)
    assert pe.positions == tuple(str(t) for t in range(6)) and pe.scores.shape[0] == 6
    torch.testing.assert_close(pe.summed().scores.nan_to_num(), eap.scores.nan_to_num(), atol=1e-5, rtol=1e-5)
    assert float(pe.scores[0].nan_to_num().abs().max()) == 0.0  # before the first difference: nothing
    assert pe.at(4).scores.shape == eap.scores.shape and pe.at("4").method == "peap@4"
    pos, up, down, score = pe.top(1)[0]
    assert abs(score) == pytest.approx(float(pe.scores.nan_to_num().abs().max()))


def test_named_positions_line_up_prompts_of_different_layouts():
    m = tiny_model("llama", n_layers=2)
    a = random_pairs(n=2, T=5, diff=(1,), seed=0)
    b = random_pairs(n=2, T=7, diff=(3,), seed=1)
    both = ap.PromptSet.from_ids(list(a.clean) + list(b.clean), list(a.corrupted) + list(b.corrupted),
                                 torch.cat([a.answers, b.answers]), torch.cat([a.alternatives, b.alternatives]))
    pe = ap.circuits.positional_edge_attribution(m, both, positions=["first_diff", "end"])
    assert pe.named and pe.positions == ("first_diff", "end")
    for part, diff, T in ((a, 1, 5), (b, 3, 7)):
        one = ap.circuits.positional_edge_attribution(m, part)
        rows = [0, 1] if part is a else [2, 3]
        torch.testing.assert_close(pe.per_prompt[rows, 0].nan_to_num(), one.per_prompt[:, diff].nan_to_num(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pe.per_prompt[rows, 1].nan_to_num(), one.per_prompt[:, T - 1].nan_to_num(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ap.errors.PromptError, match="give named positions"):
        ap.circuits.positional_edge_attribution(m, both)
    with pytest.raises(ap.errors.PromptError, match="no position named 'S9'"):
        ap.circuits.positional_edge_attribution(m, both, positions=["S9"])
    with pytest.raises(ap.errors.MethodError, match="named positions"):
        ap.circuits.top_positional_edges(pe, 3)


def test_position_aware_circuits_are_exact():
    m = tiny_model("llama_gqa", n_layers=2, seed=2)
    ps = random_pairs(n=3, T=6, diff=(2, 4))
    edges = ap.edge_attribution(m, ps)
    U, V = edges.scores.shape
    full = ap.circuits.run_circuit(m, ps, torch.ones(U, V, 6, dtype=torch.bool))
    empty = ap.circuits.run_circuit(m, ps, torch.zeros(U, V, 6, dtype=torch.bool))
    torch.testing.assert_close(full, ap.circuits.run_circuit(m, ps, torch.ones(U, V, dtype=torch.bool)), atol=1e-5, rtol=0)
    torch.testing.assert_close(empty, ap.circuits.run_circuit(m, ps, torch.zeros(U, V, dtype=torch.bool)), atol=1e-5, rtol=0)
    # a mask constant over positions is the ordinary circuit
    keep = ap.circuits.top_edges(edges, 15)
    torch.testing.assert_close(ap.circuits.run_circuit(m, ps, keep[:, :, None].expand(U, V, 6).contiguous()),
                               ap.circuits.run_circuit(m, ps, keep), atol=1e-5, rtol=0)
    # cutting every edge only where clean and corrupted agree (before the first difference) changes nothing
    before = torch.ones(U, V, 6, dtype=torch.bool)
    before[:, :, :2] = False
    torch.testing.assert_close(ap.circuits.run_circuit(m, ps, before), full, atol=1e-5, rtol=0)
    # and cutting them from the first difference on is the corrupted run
    after = torch.ones(U, V, 6, dtype=torch.bool)
    after[:, :, 2:] = False
    torch.testing.assert_close(ap.circuits.run_circuit(m, ps, after), empty, atol=1e-5, rtol=0)
    pe = ap.circuits.positional_edge_attribution(m, ps)
    curve = ap.circuits.positional_faithfulness(m, ps, pe, sizes=[0, 10, 10_000])
    assert_effect_close(curve.values[[0, -1]], [0.0, 1.0], curve.clean, curve.corrupted, atol=1e-5)
    with pytest.raises(ap.errors.MethodError, match="the prompts have 6 tokens"):
        ap.circuits.run_circuit(m, ps, torch.ones(U, V, 5, dtype=torch.bool))
