"""Memory budgets: gradient techniques run in chunks of prompts, or with every block recomputed,
and give what the unbudgeted run gives; budgets too small for one prompt are refused first."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import actpatch as ap
from actpatch.errors import MemoryBudgetError
from actpatch.experiment.core import Experiment
from actpatch.hooks import gradient_taps, intervene, recompute_blocks
from actpatch.memory import backward_bytes, parse_budget, plan
from actpatch.sites import Site
from actpatch.techniques.attribution import attribution_memory_plan
from actpatch.techniques.eap import edge_memory_plan
from actpatch.techniques.graph import Graph
from actpatch.testing import random_pairs, tiny_model

RTOL = 1e-9  # of the largest |value|, in float64: chunks compute the same numbers (in float32 they
# differ by ~1e-6 of the largest value, from the batch sizes BLAS sees)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b| (NaNs, e.g. unreachable edges, where both have them)."""
    assert bool((a.isnan() == b.isnan()).all())
    return float((a - b).nan_to_num().abs().max() / b.nan_to_num().abs().max())


@pytest.fixture(scope="module")
def models():
    out = {}
    for f in ("llama_gqa", "gpt2"):
        m = tiny_model(f, n_layers=3)
        m.hf.double()
        out[f] = m
    return out


def _multi_token(model):
    ids = [[2, 3, 4, 5, 6, 7], [2, 8, 4, 9, 6, 7], [2, 3, 10, 5, 11, 7]]
    corr = [[2, 12, 4, 5, 6, 7], [2, 8, 13, 9, 6, 7], [2, 3, 10, 14, 11, 7]]
    return ap.PromptSet.from_ids(ids, corr, [[20, 21], [22], [23, 24, 25]], [[26], [27, 28], [29]])


def test_budgets_parse_and_bad_ones_are_refused_by_name():
    assert parse_budget("4GiB") == 4 * 2**30 and parse_budget("1.5 GB") == 1_500_000_000
    assert parse_budget("512MiB") == 512 * 2**20 and parse_budget("2g") == 2 * 2**30 and parse_budget(1000) == 1000
    assert parse_budget(None) > 0
    for bad in ("lots", "4 GiBs", "-1GiB", 0, -5, True, 2.5):
        with pytest.raises(MemoryBudgetError, match="memory_budget"):
            parse_budget(bad)  # type: ignore[arg-type]


def test_chunks_hold_whole_prompts_and_their_draws(models):
    m = models["llama_gqa"]
    ps = random_pairs(n=5)
    exp = Experiment.setup(m, ps, direction="noise", corruption=ap.corruption.GaussianNoise(n_draws=3),
                                         metric="logit_diff", seed=0, technique="test")
    (whole,) = list(exp.groups())
    chunks = list(exp.groups(max_rows=7))  # 2 prompts (6 rows) a chunk
    assert [len(c.group.indices) for c in chunks] == [2, 2, 1] and [c.rows for c in chunks] == [6, 6, 3]
    assert torch.equal(torch.cat([c.group.indices for c in chunks]), whole.group.indices)
    for name in ("ids", "embed_noise"):  # the noise drawn for the whole group, not again per chunk
        got = torch.cat([getattr(c.corrupted, name) for c in chunks])
        assert torch.equal(got, getattr(whole.corrupted, name))
    assert torch.equal(torch.cat([c.answers for c in chunks]), whole.answers)


def test_the_plan_chunks_then_recomputes_then_refuses(models):
    m = models["gpt2"]
    p = plan("X", m, 10_000, total_rows=8, per_row=3_000, per_row_recomputed=1_000, passes=4)
    assert (p.rows, p.chunks, p.recompute) == (3, 3, False)
    p = plan("X", m, 2_000, total_rows=8, per_row=3_000, per_row_recomputed=1_000, passes=4)
    assert (p.rows, p.chunks, p.recompute, p.forward_equivalents) == (2, 4, True, pytest.approx(16 / 3))
    p = plan("X", m, 6_000, total_rows=8, per_row=1_000, per_row_recomputed=500, passes=4, draws=4)
    assert p.rows == 4  # whole prompts: 4 draws each
    with pytest.raises(MemoryBudgetError, match=r"memory_budget='1MiB' or more"):
        plan("X", m, 999, total_rows=8, per_row=3_000, per_row_recomputed=1_000, passes=4)


def test_recomputed_blocks_give_the_same_gradients_and_run_twice(models):
    m = models["llama_gqa"]
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    calls = []
    handle = m.adapter.blocks[1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        grads = []
        for recompute in (False, True):
            calls.clear()
            taps, zeros = gradient_taps([Site("z", 0), Site("mlp_out", 1)])
            with torch.enable_grad(), intervene(m, taps), recompute_blocks(m) if recompute else nullcontext():
                out = m.readout(ids, None, grad=True).sum()
                grads.append(torch.autograd.grad(out, [zeros[s][0] for s in zeros]))
            assert len(calls) == (2 if recompute else 1)
    finally:
        handle.remove()
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert not any("forward" in vars(b) for b in m.adapter.blocks)  # the blocks' own forward is back


CASES = [
    ("llama_gqa", "z", {}),
    ("gpt2", "mlp_out", {"method": "relp"}),
    ("llama_gqa", "z", {"grad_drop": True}),
    ("llama_gqa", "k", {"qk_fix": True}),
    ("gpt2", "z", {"corruption": ap.corruption.GaussianNoise(n_draws=2)}),
    ("llama_gqa", "z", {"corruption": "mean"}),  # the mean over the whole group in every chunk
]


@pytest.mark.parametrize("family,target,kw", CASES, ids=[f"{f}-{t}-{'-'.join(k) or 'atp'}" for f, t, k in CASES])
def test_attribution_under_a_budget_equals_the_unbudgeted_run(models, family, target, kw):
    m = models[family]
    ps = random_pairs(n=3)
    full = ap.attribute(m, ps, target, direction="noise", **kw)
    sites = [Site(target, l) for l in range(m.n_layers)]
    if kw.get("qk_fix"):
        sites += [Site(k, l) for l in range(m.n_layers) for k in ("q", "pattern")]
    draws = getattr(kw.get("corruption"), "draws", 1)
    need = attribution_memory_plan(m, ps, sites, None, grad_drop=kw.get("grad_drop", False), draws=draws,
                                   pattern=bool(kw.get("qk_fix")))
    for budget, chunks, recompute in ((2 * need.per_row * draws, 2, False), (need.recomputed_per_row * draws, 3, True)):
        p = attribution_memory_plan(m, ps, sites, budget, grad_drop=kw.get("grad_drop", False), draws=draws,
                                    pattern=bool(kw.get("qk_fix")))
        assert (p.chunks, p.recompute) == (chunks, recompute)
        got = ap.attribute(m, ps, target, direction="noise", memory_budget=budget, **kw)
        for metric in full.raw:
            assert _close(got.raw[metric], full.raw[metric]) < RTOL
            assert torch.equal(got.clean[metric], full.clean[metric]) or _close(got.clean[metric], full.clean[metric]) < RTOL


def test_multi_token_attribution_under_a_budget(models):
    m = models["llama_gqa"]
    ps = _multi_token(m)
    full = ap.attribute(m, ps, "z", metric=["logit_diff", "logprob"])
    sites = [Site("z", l) for l in range(3)]
    need = attribution_memory_plan(m, ps, sites, None, pattern=False)
    budget = need.per_row - 1  # blocks recomputed
    assert attribution_memory_plan(m, ps, sites, budget, pattern=False).recompute
    got = ap.attribute(m, ps, "z", metric=["logit_diff", "logprob"], memory_budget=budget)
    for metric in full.raw:
        assert _close(got.raw[metric], full.raw[metric]) < RTOL


EDGE_CASES = [("llama_gqa", {}), ("llama_gqa", {"ig_steps": 3}), ("gpt2", {"method": "relp"}),
              ("gpt2", {"ig_steps": 2, "ig_target": "activations"})]


@pytest.mark.parametrize("family,kw", EDGE_CASES, ids=[f"{f}-{'-'.join(map(str, k.values())) or 'eap'}" for f, k in EDGE_CASES])
def test_edge_attribution_under_a_budget_equals_the_unbudgeted_run(models, family, kw):
    m = models[family]
    ps = random_pairs(n=3)
    full = ap.edge_attribution(m, ps, **kw)
    graph = Graph.of(m, "mib")
    steps = kw.get("ig_steps", 0) or 1
    need = edge_memory_plan(m, ps, graph, None, n_steps=steps, ig_target=kw.get("ig_target", "inputs"))
    spanned = _spanned_budget(lambda b: edge_memory_plan(m, ps, graph, b, n_steps=steps,
                                                         ig_target=kw.get("ig_target", "inputs")), need, T=6)
    for budget, chunks, recompute in ((2 * need.per_row, 2, False), (need.recomputed_per_row, 3, True), (spanned, 3, True)):
        p = edge_memory_plan(m, ps, graph, budget, n_steps=steps, ig_target=kw.get("ig_target", "inputs"))
        assert (p.chunks, p.recompute, 0 < p.positions < 6) == (chunks, recompute, budget == spanned)
        got = ap.edge_attribution(m, ps, memory_budget=budget, **kw)
        assert _close(got.per_prompt, full.per_prompt) < RTOL


def _spanned_budget(plan_at, need, T: int) -> int:
    """A budget whose plan holds part of the ``T`` positions at a time (buffers built and
    contracted in spans): the largest with at most a third of them, found by bisection (smaller
    budgets take shorter spans, then none fit), or, where the gradient pass outweighs the spans,
    the smallest that fits."""
    def short(budget: int) -> bool:
        try:
            return 0 < plan_at(budget).positions <= T // 3
        except MemoryBudgetError:
            return True

    lo, hi = 1, need.recomputed_per_row  # short(lo), not short(hi): it takes every position at once
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if short(mid) else (lo, mid)
    try:
        plan_at(lo)
        return lo
    except MemoryBudgetError:
        return hi


def test_multi_token_edge_attribution_under_a_budget(models):
    m = models["gpt2"]
    ps = _multi_token(m)
    full = ap.edge_attribution(m, ps)
    budget = edge_memory_plan(m, ps, Graph.of(m, "mib"), None).per_row - 1
    assert edge_memory_plan(m, ps, Graph.of(m, "mib"), budget).recompute
    assert _close(ap.edge_attribution(m, ps, memory_budget=budget).per_prompt, full.per_prompt) < RTOL


def test_a_budget_too_small_for_one_prompt_is_refused_before_any_work(models):
    m = models["llama_gqa"]
    ps = random_pairs(n=3)
    calls = []
    handle = m.adapter.embed_module().register_forward_hook(lambda *_: calls.append(1))
    try:
        for run in (lambda: ap.attribute(m, ps, "z", memory_budget="10KiB"),
                    lambda: ap.edge_attribution(m, ps, ig_steps=2, memory_budget=10_000)):
            with pytest.raises(MemoryBudgetError, match=r"one prompt needs about .* even with every block recomputed.*"
                                                        r"Give memory_budget='\d+MiB' or more"):
                run()
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_the_backward_estimate_covers_what_autograd_keeps(models, family):
    """backward_bytes is an upper bound of the activations autograd saves (weights excluded) and
    not a wild one: within 3x at 32 and 96 tokens, with actpatch's attention function (patterns
    kept) and with the model's own (sdpa)."""
    m = models[family]
    weights = {p.untyped_storage().data_ptr() for p in m.hf.parameters()}
    for pattern in (True, False):
        for T in (32, 96):
            seen: dict = {}

            def pack(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in weights:
                    seen[ptr] = t.untyped_storage().nbytes()
                return t

            taps, _ = gradient_taps([Site("z", l) for l in range(m.n_layers)])
            with m.attention_fn() if pattern else nullcontext(), torch.enable_grad(), intervene(m, taps), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                m.readout(torch.randint(2, 60, (1, T)), None, grad=True)
            saved, estimate = sum(seen.values()), backward_bytes(m, T, pattern=pattern)
            assert saved <= estimate <= 3 * saved, (pattern, T, saved, estimate)


def test_positional_edge_attribution_under_a_budget(models):
    """Named positions of prompts of two lengths, two prompts a chunk: the same per-position scores."""
    m = models["llama_gqa"]
    a, b = random_pairs(n=2, T=5, diff=(1,), seed=0), random_pairs(n=2, T=7, diff=(3,), seed=1)
    both = ap.PromptSet.from_ids(list(a.clean) + list(b.clean), list(a.corrupted) + list(b.corrupted),
                                 torch.cat([a.answers, b.answers]), torch.cat([a.alternatives, b.alternatives]))
    full = ap.circuits.positional_edge_attribution(m, both, positions=["first_diff", "end"])
    need = edge_memory_plan(m, both, Graph.of(m, "mib"), None, summed=False, per_position=2).per_row
    got = ap.circuits.positional_edge_attribution(m, both, positions=["first_diff", "end"], memory_budget=need)
    assert _close(got.per_prompt, full.per_prompt) < RTOL


def test_estimate_says_what_each_technique_will_do(models):
    m = models["llama_gqa"]
    ps = random_pairs(n=4)
    eap = ap.experiment.estimate(m, ps, "eap")
    ig = ap.experiment.estimate(m, ps, "eap-ig", ig_steps=5)
    assert (eap.forward_equivalents, ig.forward_equivalents) == (5, 17) and eap.per_row == ig.per_row
    per_position = ap.experiment.estimate(m, ps, "peap")
    assert per_position.per_row > eap.per_row  # a score per position
    atp = ap.experiment.estimate(m, ps, "atp", target="z")
    assert ap.experiment.estimate(m, ps, "atp", target="z", memory_budget=4 * atp.per_row).rows == 4
    assert ap.experiment.estimate(m, ps, "atp", target="z", memory_budget=4 * atp.per_row - 1).rows == 3
    qk = ap.experiment.estimate(m, ps, "atp", target="k", qk_fix=True)
    assert qk.per_row > ap.experiment.estimate(m, ps, "atp", target="k").per_row  # queries and patterns too
    tight = ap.experiment.estimate(m, ps, "eap", memory_budget=eap.per_row * 2)
    assert (tight.rows, tight.chunks) == (2, 2) and "2 of 4 prompt rows at a time (2 chunks)" in str(tight)
    with pytest.raises(MemoryBudgetError, match="technique='das'"):
        ap.experiment.estimate(m, ps, "das")


def test_long_prompts_keep_their_named_positions():
    m = tiny_model("llama")
    ps = random_pairs(n=2, T=6, diff=(2,)).with_positions("S2", [2, 2])
    long = ap.prompts.with_prefix(ps, [7, 8, 9, 10], after=1)
    assert torch.equal(long.clean[0], torch.cat([ps.clean[0][:1], torch.tensor([7, 8, 9, 10]), ps.clean[0][1:]]))
    assert long.attributes[0]["positions"]["S2"] == 6 and long.meta["prefix_tokens"] == 4
    from actpatch.techniques.positions import named_positions

    assert named_positions(long, 1)["first_diff"] == 6 and named_positions(long, 1)["end"] == 9
    padded = ap.prompts.long_context(m, ps, 40)
    assert padded.lengths.tolist() == [46, 46] and padded.attributes[1]["positions"]["S2"] == 42
    with pytest.raises(ap.errors.PromptError, match="n_tokens"):
        ap.prompts.long_context(m, ps, 0)
    with pytest.raises(ap.errors.PromptError, match="exceed"):
        ap.prompts.long_context(m, ps, 10**6)


@pytest.mark.slow
def test_bundled_long_ioi_and_needle(bundled):
    """IOI behind 242 tokens of filler: S2 at layer 0 still carries the whole behaviour and the
    end carries it before the last layer (a named-position sweep), and AtP under a budget that forces recomputation equals the
    unbudgeted run; the needle set is solved at 256 tokens."""
    ps = ap.prompts.long_context(bundled, ap.prompts.ioi(bundled, n=2, seed=0, templates=[0]), 242)
    assert ps.seq_len == 256
    res = ap.sweep(bundled, ps, "resid_pre", direction="denoise", layers=[0, 29], positions=["S2", "end"],
                   progress=False)
    assert float(res.values[0, 0]) == pytest.approx(1.0, abs=1e-3) and abs(float(res.values[0, 1])) < 1e-3
    # before the last layer the answer has moved to the end (0.935; 0.925 without the filler)
    assert float(res.values[1, 1]) > 0.85 and abs(float(res.values[1, 0])) < 0.01
    layers = [Site("z", l) for l in range(bundled.n_layers)]
    need = attribution_memory_plan(bundled, ps, layers, None).per_row
    full = ap.attribute(bundled, ps, "z", direction="noise", layers=[20, 21, 22, 23])
    got = ap.attribute(bundled, ps, "z", direction="noise", layers=[20, 21, 22, 23], memory_budget=need // 2)
    assert float((got.raw["logit_diff"] - full.raw["logit_diff"]).abs().max()) < 1e-4  # raw logits, float32
    needle = ap.prompts.needle(bundled, n=4, n_tokens=256)
    assert needle.seq_len == 256 and bool(ap.prompts.correct_mask(bundled, needle).all())


def test_circuit_runs_under_a_budget_equal_the_kept_ones(models):
    """Past the budget the corrupted and clean captures are computed again per chunk of prompts
    for every batch of circuits: the faithfulness curve and MIB's scores do not change."""
    from actpatch.techniques.circuit import circuit_memory_plan

    m = models["llama_gqa"]
    ps = random_pairs(n=5)
    edges = ap.edge_attribution(m, ps)
    graph = edges.graph
    kept = circuit_memory_plan(m, ps, graph, None)
    assert kept.kept and kept.rows == 5
    tight = circuit_memory_plan(m, ps, graph, 2 * kept.per_row)
    assert not tight.kept and tight.rows == 2 and "per chunk of 2 prompts" in str(tight)
    full = ap.circuits.faithfulness(m, ps, edges, sizes=[0, 10, 60, 10_000])
    got = ap.circuits.faithfulness(m, ps, edges, sizes=[0, 10, 60, 10_000], memory_budget=2 * kept.per_row)
    assert _close(got.values, full.values) < RTOL
    a = ap.circuits.circuit_scores(m, ps, edges, fractions=[0.1, 0.5, 1.0])
    b = ap.circuits.circuit_scores(m, ps, edges, fractions=[0.1, 0.5, 1.0], memory_budget=2 * kept.per_row)
    assert abs(a.cpr - b.cpr) < 1e-9 and abs(a.cmd - b.cmd) < 1e-9
    with pytest.raises(MemoryBudgetError, match="Circuit runs: one prompt needs about"):
        ap.circuits.faithfulness(m, ps, edges, sizes=[10], memory_budget=kept.per_row // 2)


def test_das_and_direction_finding_under_a_budget():
    """DAS sums each chunk's gradient (and recomputes blocks) to the same steps; the direction
    finders read the same vectors a few prompts at a time."""
    from actpatch.testing import planted_direction_model

    toy, prompts, site, _ = planted_direction_model()
    deep = tiny_model("llama_gqa", n_layers=3)
    for model, ps_, where in ((toy, prompts, site), (deep, random_pairs(n=6), Site("resid_pre", 1, pos=4))):
        model.hf.double()
        _das_under_budgets(model, ps_, where)
    m = tiny_model("llama_gqa", n_layers=2)
    ps = random_pairs(n=5)
    where = Site("resid_pre", 1, pos=4)
    whole = ap.subspaces.diff_of_means(m, ps, where)
    from actpatch.memory import inference_plan

    small = inference_plan("x", m, ps, [where.full()], None).per_row * 2
    assert inference_plan("x", m, ps, [where.full()], small).chunks == 3
    chunked = ap.subspaces.diff_of_means(m, ps, where, memory_budget=small).basis_for(1)
    assert float((chunked - whole.basis_for(1)).abs().max()) < 1e-6  # a unit vector: float32 rounding of batch sizes
    with pytest.raises(MemoryBudgetError, match=r"Finding a direction: one prompt needs about [\d.]+ KiB; memory_budget"):
        ap.subspaces.diff_of_means(m, ps, where, memory_budget=100)


def _das_under_budgets(toy, prompts, site):
    """DAS in chunks of two prompts and (where it saves memory: models of several layers) with
    every block recomputed takes the same steps as unbudgeted."""
    from actpatch.techniques.das import das_memory_plan

    need = das_memory_plan(toy, prompts, site, None)
    full = ap.subspaces.das(toy, prompts, site, k=1, steps=12, seed=0, progress=False)
    budgets = [2 * need.per_row] + ([need.recomputed_per_row] if need.recomputed_per_row < need.per_row else [])
    assert len(budgets) == 2 or toy.n_layers == 1
    for budget in budgets:
        plan_ = das_memory_plan(toy, prompts, site, budget)
        assert plan_.chunks > 1 and plan_.recompute == (budget == need.recomputed_per_row)
        got = ap.subspaces.das(toy, prompts, site, k=1, steps=12, seed=0, progress=False, memory_budget=budget)
        # (the basis is kept in float32: 1e-6 is its rounding, 1e-5 nats of loss its effect)
        assert float((got.subspace.basis_for(site.layer) - full.subspace.basis_for(site.layer)).abs().max()) < 1e-6
        assert max(abs(a - b) for x, y in zip(got.curve, full.curve) for a, b in zip(x, y)) < 1e-5


def _prepared_rows(monkeypatch):
    """The prompt rows of every chunk an exact sweep prepares, in order."""
    from actpatch.techniques.exact import SweepJob

    seen: list[int] = []
    prepare = SweepJob.prepare

    def spy(self, runs, outcome=None):
        seen.append(runs.rows)
        return prepare(self, runs, outcome)

    monkeypatch.setattr(SweepJob, "prepare", spy)
    return seen


@pytest.mark.parametrize("target, kw", [
    ("resid_pre", {"per_position": False}),
    ("z", {"direction": "denoise"}),
    ("attn_out", {"engine": "reference", "per_position": False}),
    ("resid_pre", {"corruption": ap.corruption.GaussianNoise(n_draws=2), "per_position": False}),
    ("mlp_out", {"corruption": "mean", "per_position": False}),
])
def test_sweeps_under_a_budget_run_chunks_of_prompts_with_the_same_values(models, monkeypatch, target, kw):
    m = models["llama_gqa"]
    ps = ap.PromptSet.from_ids([*random_pairs(n=3, T=6).clean, *random_pairs(n=2, T=7, seed=1).clean],
                               [*random_pairs(n=3, T=6).corrupted, *random_pairs(n=2, T=7, seed=1).corrupted],
                               [5, 6, 7, 8, 9], [61] * 5)  # two length groups: 3 and 2 prompts
    kw = {"direction": "noise", **kw}
    whole = ap.sweep(m, ps, target, progress=False, **kw)
    draws = kw["corruption"].draws if "corruption" in kw and not isinstance(kw["corruption"], str) else 1
    est = ap.experiment.estimate(m, ps, "sweep", target=target, corruption=kw.get("corruption", "str"))
    seen = _prepared_rows(monkeypatch)
    two = 2 * draws * est.per_row  # two prompts (all their draws) a chunk
    assert ap.experiment.estimate(m, ps, "sweep", target=target, memory_budget=two,
                                  corruption=kw.get("corruption", "str")).rows == 2 * draws
    chunked = ap.sweep(m, ps, target, progress=False, memory_budget=two, **kw)
    assert seen == [2 * draws, draws, 2 * draws]  # group of 3 in 2 + 1, group of 2 whole
    assert whole.raw["logit_diff"].std() > 0.01  # real, varied values
    assert _close(chunked.raw["logit_diff"], whole.raw["logit_diff"]) < RTOL
    for part in ("clean", "corrupted"):
        assert _close(getattr(chunked, part)["logit_diff"], getattr(whole, part)["logit_diff"]) < RTOL
    assert chunked.info.diagnostics.clean_correct == whole.info.diagnostics.clean_correct
    assert chunked.info.diagnostics.null_patch_max_abs < 1e-9


def test_a_chunked_sweep_resumes_from_units_named_by_their_prompts(models, monkeypatch, tmp_path):
    from actpatch.experiment.checkpoint import UnitStore
    from actpatch.techniques.exact import SweepJob

    m = models["gpt2"]
    ps = random_pairs(n=5, T=6)
    est = ap.experiment.estimate(m, ps, "sweep", target="resid_pre")
    budget = 2 * est.per_row
    first = ap.sweep(m, ps, "resid_pre", progress=False, memory_budget=budget, store=UnitStore(tmp_path), unit_size=5)
    names = sorted(p.stem for p in tmp_path.glob("*.safetensors"))
    assert names == [f"g0_p{a}-{b}_u{u}" for a, b in ((0, 2), (2, 4), (4, 5)) for u in range(4)]  # 18 cells in 4 units
    monkeypatch.setattr(SweepJob, "run_unit", lambda *a, **k: pytest.fail("a saved unit was computed again"))
    again = ap.sweep(m, ps, "resid_pre", progress=False, memory_budget=budget, store=UnitStore(tmp_path), unit_size=5)
    assert torch.equal(again.raw["logit_diff"], first.raw["logit_diff"])
    # a worker rebuilds a chunk from its unit's part: the same runs as the chunk
    exp = Experiment.setup(m, ps, direction="noise", corruption="resample", metric="logit_diff", seed=3,
                           technique="t")
    for runs in exp.groups(2):
        rebuilt = exp.group(runs.index, runs.part)
        assert torch.equal(rebuilt.base.ids, runs.base.ids) and torch.equal(rebuilt.source.ids, runs.source.ids)
        assert torch.equal(rebuilt.group.indices, runs.group.indices)


def test_a_sweep_budget_too_small_for_one_prompt_is_refused_but_the_default_runs(models, monkeypatch):
    m = models["llama_gqa"]
    ps = random_pairs(n=3)
    est = ap.experiment.estimate(m, ps, "sweep", target="z")
    calls = []
    handle = m.adapter.embed_module().register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(MemoryBudgetError, match=r"Exact patching: one prompt needs about .*Give memory_budget="):
            ap.sweep(m, ps, "z", progress=False, memory_budget=est.per_row - 1)
    finally:
        handle.remove()
    assert calls == []
    # a default budget (a share of free memory) too small for one prompt runs one at a time
    monkeypatch.setenv("ACTPATCH_MEMORY_BUDGET", "1000")
    seen = _prepared_rows(monkeypatch)
    small = ap.sweep(m, ps, "z", progress=False)
    monkeypatch.delenv("ACTPATCH_MEMORY_BUDGET")
    assert seen == [1, 1, 1]
    assert _close(small.raw["logit_diff"], ap.sweep(m, ps, "z", progress=False).raw["logit_diff"]) < RTOL


@pytest.mark.parametrize("engine, kw", [
    ("auto", {}),
    ("reference", {}),
    ("auto", {"receiver": "k"}),  # receivers swept, senders fixed
])
def test_path_sweeps_under_a_budget_run_chunks_of_prompts_with_the_same_values(models, monkeypatch, engine, kw):
    from actpatch.techniques.path import PathJob, path_memory_plan
    from actpatch.types import Engine

    m = models["llama_gqa"]
    ps = random_pairs(n=5, T=6)
    if kw:
        run = lambda **b: ap.path_sweep(m, ps, kw["receiver"], senders=[Site("z", 0, head=1)], progress=False,  # noqa: E731
                                        engine=engine, **b)
        cells = [((Site("z", 0, head=1),), (Site("k", l, head=h),)) for l in range(3) for h in range(2)]
    else:
        run = lambda **b: ap.path_sweep(m, ps, [Site("resid_final")], progress=False, engine=engine, **b)  # noqa: E731
        cells = [((Site("z", l, head=h),), (Site("resid_final"),)) for l in range(3) for h in range(4)]
    whole = run()
    per_row = path_memory_plan(m, ps, cells, Engine(engine), None).per_row
    seen: list[int] = []
    prepare = PathJob.prepare
    monkeypatch.setattr(PathJob, "prepare", lambda self, runs, outcome=None: (seen.append(runs.rows),
                                                                                prepare(self, runs, outcome))[1])
    chunked = run(memory_budget=2 * per_row)
    assert seen == [2, 2, 1]
    assert whole.raw["logit_diff"].std() > 0.01
    assert _close(chunked.raw["logit_diff"], whole.raw["logit_diff"]) < RTOL
    with pytest.raises(MemoryBudgetError, match=r"Path patching: one prompt needs about .*Give memory_budget="):
        run(memory_budget=per_row - 1)
