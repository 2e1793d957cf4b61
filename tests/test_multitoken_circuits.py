"""Circuits, their MIB scores and DAS with answers of several tokens (teacher-forced).

A circuit's edges live at prompt positions; the continuation tokens after the prompt are
computed by the whole model from the circuit's prompt-position keys and values (as every
technique computes them after its patches). The oracle composes two things tested elsewhere:
the single-token circuit run (its prompt positions do not depend on the answer), recorded at
every layer's keys and values and at the final residual, and plain teacher-forced forward
passes over ``prompt + answer[:-1]`` (one per branch) with those recorded values written at
the prompt positions, log-probabilities summed by hand.
"""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.techniques.circuit import _Circuits
from actpatch.testing import branch_logprob, tiny_model

PAIRS = [
    ("When Mary and John went to the store", "When Alice and John went to the store", " Mary gave", " John"),
    ("When Paul and Sara went to the school", "When Paul and Lucy went to the school", " Sara is", " Rome city of"),
    ("When Tom and Anna went to the park", "When Tom and Bob went to the park", " Anna", " Tom had fun"),
]
TOL = 1e-5  # raw logit-difference units (float32 tiny models)


def _single(ps: ap.PromptSet) -> ap.PromptSet:
    """The same prompts with the first answer / alternative tokens only."""
    return ap.PromptSet.from_ids(ps.clean, ps.corrupted, ps.answers.tolist(), ps.alternatives.tolist())


def _oracle(model: ap.Model, ps: ap.PromptSet, keep: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logit difference per prompt of the circuit ``keep`` (every edge into the
    logits kept), composed as the module docstring says."""
    L = model.n_layers
    kv = [ap.Site(k, l) for l in range(L) for k in ("k", "v")]
    runner = _Circuits(model, _single(ps), "str", "logit_diff", 0, rows=1, layout="kv")  # (k / v per KV head)
    with ap.capture(model, kv + [ap.Site("resid_final")]) as got:  # the last forward of each wins
        runner.run(keep)
    out = []
    for i in range(len(ps)):
        T = ps.clean[i].numel()
        final = got[ap.Site("resid_final")][i]  # (d,) the circuit's final residual at T - 1
        writes = {s: got[s][i:i + 1] for s in kv}

        def last(x, final=final):
            x = x.clone()
            x[:, -1] = final
            return x

        with model.attention_fn(), ap.capture(model, [ap.Site("resid_final")]) as plain:
            model.logits(ps.clean[i][None])
        writes[ap.Site("resid_final")] = last(plain[ap.Site("resid_final")])
        out.append(branch_logprob(model, ps.clean[i], ps.answer_ids(i), writes)
                   - branch_logprob(model, ps.clean[i], ps.alternative_ids(i), writes))
    return torch.tensor(out)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "mistral", "gpt_neox"])
def test_multi_token_circuits_equal_the_composed_oracle(family):
    model = tiny_model(family, n_layers=2, seed=3)
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    assert ps.multi_token
    edges = ap.edge_attribution(model, ps, layout="kv")  # (MIB's layout: tests/test_graph_layout.py)
    logits = edges.downstream.index("logits")
    g = torch.Generator().manual_seed(0)
    runner = _Circuits(model, ps, "str", "logit_diff", 0, layout="kv")
    spread = []
    for p in (0.2, 0.6):
        keep = torch.rand(edges.scores.shape, generator=g) < p
        keep[:, logits] = True
        got, want = runner.run(keep), _oracle(model, ps, keep)
        assert float((got.double() - want).abs().max()) < TOL, (family, p)
        spread.append(got)
    assert float((spread[0] - spread[1]).abs().max()) > 1e-2  # the two circuits really differ


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_multi_token_circuits_match_exact_patching(family):
    """The empty circuit is the corrupted run and the full graph the clean run, teacher-forced;
    cutting every edge into a node is noising that node (ap.patch, itself tested against a
    teacher-forced oracle); several circuits in one pass equal each alone."""
    model = tiny_model(family, n_layers=3, seed=2)
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    edges = ap.edge_attribution(model, ps)
    base = ap.patch(model, ps, [ap.Site("resid_pre", 0)], direction="noise")
    full = torch.ones_like(edges.scores, dtype=torch.bool)

    def all_but(node: str) -> torch.Tensor:
        keep = full.clone()
        keep[:, edges.downstream.index(node)] = False
        return keep

    cases = [(full, base.clean["logit_diff"]), (~full, base.corrupted["logit_diff"])]
    for node, site in ((f"L1.H2.q", ap.Site("q", 1, head=2)), ("L2.H3.v", ap.Site("v_ungrouped", 2, head=3)),
                       ("L1.MLP", ap.Site("mlp_out", 1)), ("logits", ap.Site("resid_final"))):
        cases.append((all_but(node), ap.patch(model, ps, [site], direction="noise").raw["logit_diff"]))
    alone = _Circuits(model, ps, "str", "logit_diff", 0, rows=1)
    together = _Circuits(model, ps, "str", "logit_diff", 0, rows=64)
    many = together.run_many([k for k, _ in cases])
    for (keep, want), row in zip(cases, many):
        torch.testing.assert_close(alone.run(keep), want, atol=TOL, rtol=0)
        torch.testing.assert_close(row, want, atol=TOL, rtol=0)
    assert float((base.clean["logit_diff"] - base.corrupted["logit_diff"]).abs().max()) > 0.1


def test_mib_scores_and_faithfulness_take_multi_token_answers():
    model = tiny_model("llama_gqa", n_layers=2, seed=1)
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    edges = ap.edge_attribution(model, ps)
    curve = ap.circuits.faithfulness(model, ps, edges, sizes=[0, 10_000])
    base = ap.patch(model, ps, [ap.Site("resid_pre", 0)], direction="noise")
    clean, corrupted = base.clean["logit_diff"], base.corrupted["logit_diff"]
    assert float((clean - corrupted).abs().min()) > 0.1  # a real gap, in raw logit-difference units
    torch.testing.assert_close(curve.raw[0], corrupted, atol=TOL, rtol=0)  # no edges: the corrupted run
    torch.testing.assert_close(curve.raw[1], clean, atol=TOL, rtol=0)  # every edge: the clean run
    assert abs(curve.clean - float(clean.mean())) < TOL and abs(curve.corrupted - float(corrupted.mean())) < TOL
    scores = ap.circuits.circuit_scores(model, ps, edges, fractions=(0.1, 0.5, 1.0))
    # at 100 % of the edges both selections are the full graph, the same run as the normaliser's
    assert float(scores.absolute[-1]) == 1.0 and float(scores.signed[-1]) == 1.0
    assert 0 < scores.sizes[0] < scores.sizes[1] < scores.sizes[2] == scores.n_edges


def test_das_with_multi_token_answers_learns_through_the_continuation():
    """DAS's loss is the answer's teacher-forced negative log-probability: on single tokens the
    same as before, on several tokens the sum over the answer; a full-width subspace at every
    position of the first residual restores the clean run exactly (effect 1, the answer on top
    wherever the clean run puts it there)."""
    model = tiny_model("llama", n_layers=2, seed=0)
    ps = ap.PromptSet.from_pairs(model, PAIRS + [
        ("When Lucy and Mark went to the bank", "When Lucy and Paul went to the bank", " Mark went", " Lucy"),
    ])
    site = ap.Site("resid_pre", 0)
    d = model.d_model
    found = ap.subspaces.das(model, ps, site, k=d, steps=1, lr=0.0, init=ap.subspaces.Subspace.of(torch.eye(d)), progress=False)
    assert abs(found.test_effect - 1.0) < 1e-4
    test = ps.subset(list(found.test))
    clean_acc = ap.patch(model, test, [site], direction="denoise", metric="accuracy").clean["accuracy"]
    assert found.test_accuracy == pytest.approx(float(clean_acc.mean()))
    # the training loss is the teacher-forced cross-entropy of the whole answer
    train = ps.subset(list(found.train))
    lp = ap.patch(model, train, [site], direction="denoise", metric="logprob").clean["logprob"]
    assert found.curve[-1][1] == pytest.approx(float(-lp.mean()), abs=1e-4)
