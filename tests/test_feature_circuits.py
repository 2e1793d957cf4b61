"""Techniques on features: AtP over features and error terms against a hand-written linear
estimate and against exact feature patching, sparse feature circuits against plain-hooks
oracles (faithfulness, completeness, edges), the TopK trainer on planted features, and the
bundled dictionaries' cache."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.errors import DictionaryError, MethodError, PromptError, ResultError
from actpatch.features import Dictionary, attach, train_topk
from actpatch.features.builtin import Recipe, bundled
from actpatch.features.circuit import feature_circuit
from actpatch.testing import tiny_model

from test_features import _first, _hand_decode, _hand_encode


def _prompts():
    return ap.PromptSet.from_ids([[2, 3, 4, 5, 6, 7], [3, 4, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9]],
                                 [[2, 9, 4, 5, 6, 7], [3, 8, 5, 6, 7, 8], [4, 10, 6, 7, 8, 9]], [7, 8, 9], [8, 9, 10])


@pytest.fixture(scope="module")
def two():
    """A tiny llama with ReLU dictionaries at resid_post of layers 0 and 1."""
    m = tiny_model("llama", n_layers=3)
    d0 = Dictionary.random(ap.Site("resid_post", 0), d_in=m.d_model, n_features=24, seed=1)
    d1 = Dictionary.random(ap.Site("resid_post", 1), d_in=m.d_model, n_features=24, seed=2)
    return m, d0, d1


def _blocks(m):
    return m.hf.model.layers


def _hand_run(m, ids, dicts, edit=None, taps=None):
    """Plain hooks: at each dictionary's block output, y -> decode(f') + err' with f = encode(y),
    err = y - decode(f), (f', err') = edit(layer, f, err) (identity by default); ``taps[layer]``
    (zeros requiring grad) are added to (f, err). Returns the last-position logits and what
    each layer saw: {layer: (f, err, f + tap)}."""
    seen, handles = {}, []
    for d in dicts:
        layer = d.site.layer

        def hook(mod, args, out, d=d, layer=layer):
            y = _first(out)
            f = _hand_encode(d, y)
            err = y - _hand_decode(d, f)
            if taps is not None:
                f, err = f + taps[layer][0], err + taps[layer][1]
            seen[layer] = (f.detach(), err.detach(), f)
            if edit is not None:
                f, err = edit(layer, f, err)
            new = _hand_decode(d, f) + err
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handles.append(_blocks(m)[layer].register_forward_hook(hook))
    try:
        logits = m.hf(input_ids=ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def _ld(logits, ps):
    rows = torch.arange(len(ps))
    return logits[rows, ps.answers] - logits[rows, ps.alternatives]


def test_atp_over_features_equals_the_linear_estimate_by_hand(two):
    m, d0, _ = two
    ps = _prompts()
    clean, corrupted = torch.stack(ps.clean), torch.stack(ps.corrupted)
    with torch.no_grad():
        _, src = _hand_run(m, corrupted, [d0])
    f_corr, e_corr, _ = src[0]
    zf = torch.zeros(3, 6, 24, requires_grad=True)
    ze = torch.zeros(3, 6, m.d_model, requires_grad=True)
    logits, base = _hand_run(m, clean, [d0], taps={0: (zf, ze)})
    gf, ge = torch.autograd.grad(_ld(logits, ps).sum(), [zf, ze])
    f_clean, e_clean, _ = base[0]
    want_f = ((f_corr - f_clean) * gf).mean(0).T  # (F, T)
    want_e = ((e_corr - e_clean) * ge).sum(-1).mean(0)  # (T,)
    with attach(m, d0):
        est = ap.attribute(m, ps, d0, direction="noise")
    assert est.dims == ("feature", "pos") and est.coords["feature"][-1] == "error"
    got = (est.raw["logit_diff"] - est.clean["logit_diff"][:, None, None]).mean(0)
    assert (got[:-1] - want_f).abs().max() < 1e-5
    assert (got[-1] - want_e).abs().max() < 1e-5
    assert got.abs().max() > 1e-3  # the estimates are not all zero


def test_feature_atp_validation_patches_features_exactly(two):
    m, d0, _ = two
    ps = _prompts()
    with attach(m, d0):
        est = ap.attribute(m, ps, d0, direction="noise", features=[0, 3, 5, "error"])
        exact = ap.sweep(m, ps, d0, direction="noise", features=[0, 3, 5, "error"], progress=False)
        v = ap.validate_attribution(m, ps, est, exhaustive=True)
    assert est.info.technique.dictionary["label"] == d0.label
    want = (exact.values.flatten() - exact.info.direction.no_effect)
    got = v.exact[torch.argsort(torch.tensor([est.shape[1] * c[0] + c[1] for c in v.cells]))]
    assert (got.double() - want.double()).abs().max() < 1e-5
    with pytest.raises(ResultError, match="attach it again"):
        ap.validate_attribution(m, ps, est, exhaustive=True)  # the dictionary is detached now
    with attach(m, d0), pytest.raises(MethodError, match="grad_drop"):
        ap.attribute(m, ps, d0, grad_drop=True)


def _oracle_metric(m, ps, dicts, keep):
    """Mean clean logit difference with every (layer, pos, feature | 'error') not in ``keep``
    set to its corrupted value, by plain hooks (features and errors recomputed downstream)."""
    clean, corrupted = torch.stack(ps.clean), torch.stack(ps.corrupted)
    with torch.no_grad():
        _, src = _hand_run(m, corrupted, dicts)

        def edit(layer, f, err):
            kf = torch.zeros(f.shape[1:], dtype=torch.bool)
            ke = torch.zeros(err.shape[1], dtype=torch.bool)
            for (l, p, feat) in keep:
                if l == layer:
                    if feat == "error":
                        ke[p] = True
                    else:
                        kf[p, feat] = True
            return torch.where(kf, f, src[layer][0]), torch.where(ke[:, None], err, src[layer][1])

        logits, _ = _hand_run(m, clean, dicts, edit=edit)
    return float(_ld(logits, ps).mean())


def test_feature_circuit_faithfulness_and_completeness_equal_the_oracle(two):
    m, d0, d1 = two
    ps = _prompts()
    with attach(m, d0, d1):
        fc = feature_circuit(m, ps, sizes=[1, 3, 10, 40], max_edge_nodes=5)
    every = {(l, p, f) for l in (0, 1) for p in range(6) for f in [*range(24), "error"]}
    assert abs(fc.clean - _oracle_metric(m, ps, [d0, d1], every)) < 1e-5
    assert abs(fc.corrupted - _oracle_metric(m, ps, [d0, d1], set())) < 1e-5
    for n, raw, comp in zip(fc.sizes, fc.faithfulness_raw, fc.completeness_raw):
        circuit = {(int(x.site.split(".L")[1]), x.pos, x.feature) for x in fc.nodes[:n]}
        assert abs(raw - _oracle_metric(m, ps, [d0, d1], circuit)) < 1e-5, n
        assert abs(comp - _oracle_metric(m, ps, [d0, d1], every - circuit)) < 1e-5, n
    assert [abs(x.score) for x in fc.nodes] == sorted((abs(x.score) for x in fc.nodes), reverse=True)
    assert fc.n_candidates == 2 * 25 * 6 and fc.circuit_size <= 5
    assert fc.faithfulness_raw[-1] != fc.faithfulness_raw[0]  # the curve moves


def test_feature_circuit_edges_sum_to_the_first_order_change_of_each_node(two):
    """Summed over every upstream node, the edges into a downstream feature d equal the
    directional derivative of dm/dd * d along (upstream corrupted - clean), by hand."""
    m, d0, d1 = two
    ps = _prompts()
    with attach(m, d0, d1):
        fc = feature_circuit(m, ps, sizes=[1000], edges_at=1000, max_edge_nodes=1000)
    downstream = [i for i, x in enumerate(fc.nodes) if x.site.endswith("L1") and x.feature != "error"][:3]
    assert downstream
    clean, corrupted = torch.stack(ps.clean), torch.stack(ps.corrupted)
    with torch.no_grad():
        _, src = _hand_run(m, corrupted, [d0])
    for j in downstream:
        node = fc.nodes[j]
        eps = torch.zeros((), requires_grad=True)
        z1 = (torch.zeros(3, 6, 24, requires_grad=True), torch.zeros(3, 6, m.d_model))
        with torch.no_grad():
            _, base = _hand_run(m, clean, [d0])
        delta = _hand_decode(d0, src[0][0]) + src[0][1] - (_hand_decode(d0, base[0][0]) + base[0][1])

        def edit(layer, f, err):
            return (f, err + eps * delta) if layer == 0 else (f, err)

        logits, seen = _hand_run(m, clean, [d0, d1], edit=edit, taps={0: (torch.zeros(3, 6, 24), torch.zeros(3, 6, m.d_model)), 1: z1})
        g = torch.autograd.grad(_ld(logits, ps).sum(), z1[0], retain_graph=True)[0]
        value = (g[:, node.pos, node.feature].detach() * seen[1][2][:, node.pos, node.feature]).sum()
        want = float(torch.autograd.grad(value, eps)[0]) / len(ps)
        got = sum(e.score for e in fc.edges if e.down == j)
        assert abs(got - want) < 1e-5, (node.label, got, want)
    last = [e for e in fc.edges if e.down == -1]
    assert last and all(abs(e.score - fc.nodes[e.up].score) < 1e-12 for e in last)


def test_feature_circuits_report_large_error_nodes_and_a_reconstruction_that_moves_the_metric(two):
    m, d0, d1 = two
    ps = _prompts()
    with attach(m, d0, d1):  # random dictionaries explain little: both findings
        fc = feature_circuit(m, ps, sizes=[5, 20])
    codes = {f.code for f in fc.findings}
    assert codes == {"feature_error_large", "feature_reconstruction_changes_metric"}
    # a dictionary that reconstructs exactly (relu(x) - relu(-x) = x) leaves the metric alone
    d = m.d_model
    eye = torch.eye(d)
    exact = Dictionary(torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye], 0), torch.zeros(d),
                       ap.Site("resid_post", 0), activation="relu")
    with attach(m, exact):
        fc2 = feature_circuit(m, ps, sizes=[5])
    assert abs(fc2.reconstruction - fc2.clean) < 1e-4
    assert "feature_reconstruction_changes_metric" not in {f.code for f in fc2.findings}


def test_feature_circuits_refuse_bad_input(two):
    m, d0, d1 = two
    ps = _prompts()
    with pytest.raises(MethodError, match="attached dictionaries"):
        feature_circuit(m, ps)
    with pytest.raises(MethodError, match="not attached"):
        feature_circuit(m, ps, [d0])
    unequal = ap.PromptSet.from_ids([[2, 3, 4, 5], [2, 3, 4, 5, 6]], [[2, 9, 4, 5], [2, 9, 4, 5, 6]], [7, 7], [8, 8])
    with attach(m, d0):
        with pytest.raises(PromptError, match="one length|one token length"):
            feature_circuit(m, unequal)
        with pytest.raises(MethodError, match="node counts"):
            feature_circuit(m, ps, sizes=[0])
        with pytest.raises(ap.errors.SiteError, match="features="):
            ap.attribute(m, ps, "z", features=[1])


def test_the_trainer_recovers_planted_features_deterministically():
    g = torch.Generator().manual_seed(0)
    d, F, k, n = 16, 24, 3, 6000
    true = torch.randn(F, d, generator=g)
    true /= true.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(n)])
    coef = torch.rand(n, k, generator=g) * 2 + 0.5
    x = torch.einsum("nk,nkd->nd", coef, true[idx]) + 0.3
    site = ap.Site("resid_post", 0)
    sae = train_topk(x, site, n_features=48, k=k, steps=800, batch=256, lr=3e-3, seed=0)
    again = train_topk(x, site, n_features=48, k=k, steps=800, batch=256, lr=3e-3, seed=0)
    assert torch.equal(sae.W_enc, again.W_enc) and torch.equal(sae.W_dec, again.W_dec)
    q = ap.features.dictionary_quality(sae, x[:1000])
    assert q["fvu"] < 0.1 and q["l0"] <= k  # planted data: nearly all variance explained (FVU of a random SAE ~1)
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (true @ rows.T).max(1).values  # each planted direction's closest decoder row
    assert float((best > 0.9).float().mean()) >= 0.8, best
    with pytest.raises(DictionaryError, match="n >= batch"):
        train_topk(x[:10], site, n_features=8, k=2, batch=64)


def test_bundled_dictionaries_train_once_then_load_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTPATCH_CACHE", str(tmp_path))
    m = tiny_model("gpt2", n_layers=4)
    r = Recipe(n_features=64, k=4, steps=40, batch=64, text_windows=20, prompts_per_builder=4, quality_prompts=4)
    first = bundled(m, recipe=r, progress=False)
    assert [str(d.site) for d in first] == ["resid_post.L1", "resid_post.L2"]
    q = first[0].meta["quality"]
    assert set(q) >= {"fvu", "l0", "dead", "tokens"} and 0 < q["fvu"] < 1.5 and q["l0"] == 4
    assert "quality: fvu" in first[0].summary()

    def no_training(*a, **kw):
        raise AssertionError("trained again")

    monkeypatch.setattr("actpatch.features.train.train_topk", no_training)
    again = bundled(m, recipe=r, progress=False)
    assert all(torch.equal(a.W_enc, b.W_enc) and a.meta["quality"] == b.meta["quality"] for a, b in zip(first, again))
    monkeypatch.setattr("actpatch.features.builtin.DEFAULT_RECIPE", r)
    one = ap.load_dictionary("bundled:resid_post.L2", model=m)
    assert torch.equal(one.W_dec, first[1].W_dec)
    with pytest.raises(DictionaryError, match="residual stream"):
        bundled(m, ["mlp_out.L1"], recipe=r)
    with pytest.raises(DictionaryError, match="pass model="):
        ap.load_dictionary("bundled:resid_post.L2")
