"""Subspace patching: the batched engine equals the reference on every vector kind; the math
by hand; bad bases refused with the reason."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.subspace import Subspace, SubspaceVerdict, width
from actpatch.testing import random_pairs, tiny_model

VECTOR_KINDS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_in", "z", "q", "k", "v",
                "mlp_post", "embed", "resid_final"]


def _basis(model, kind, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(width(model, ap.SiteKind(kind)), k, generator=g))[0].T


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_batched_equals_reference_on_every_vector_kind(family, direction):
    m = tiny_model(family, n_layers=3)
    ps = random_pairs(n=3, T=6, diff=(1, 4))
    for kind in VECTOR_KINDS:
        if kind not in m.adapter.site_kinds:
            continue
        U = _basis(m, kind)
        ref = ap.sweep(m, ps, kind, direction=direction, subspace=U, engine="reference", progress=False)
        if kind in ("embed", "resid_final"):  # the batched engine does not patch these: auto runs the reference
            assert ap.sweep(m, ps, kind, direction=direction, subspace=U, progress=False).info.engine is ap.Engine.REFERENCE
            continue
        fast = ap.sweep(m, ps, kind, direction=direction, subspace=U, engine="batched", progress=False)
        assert fast.dims == ref.dims and fast.coords == ref.coords, kind
        torch.testing.assert_close(fast.raw["logit_diff"], ref.raw["logit_diff"], atol=1e-5, rtol=1e-5, msg=kind)
        if kind != "mlp_post":  # a 3-dim subspace moves less than the whole vector
            full = ap.sweep(m, ps, kind, direction=direction, progress=False)
            assert (fast.raw["logit_diff"] - full.raw["logit_diff"]).abs().max() > 1e-4, kind


def test_per_layer_bases_and_windows():
    m = tiny_model("llama", n_layers=3)
    ps = random_pairs(n=2, T=5, diff=(2,))
    bases = {l: _basis(m, "resid_pre", k=2, seed=l) for l in range(3)}
    for kw in ({"window": 2}, {"per_position": False}):
        ref = ap.sweep(m, ps, "resid_pre", subspace=bases, engine="reference", progress=False, **kw)
        fast = ap.sweep(m, ps, "resid_pre", subspace=bases, engine="batched", progress=False, **kw)
        torch.testing.assert_close(fast.raw["logit_diff"], ref.raw["logit_diff"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ap.errors.SubspaceError, match=r"No basis for layer 2; this subspace has bases for layers \[0, 1\]"):
        ap.sweep(m, ps, "resid_pre", subspace={0: bases[0], 1: bases[1]}, progress=False)
    ap.sweep(m, ps, "resid_pre", subspace={0: bases[0], 1: bases[1]}, layers=[0, 1], progress=False)


def test_whole_space_equals_full_patching_and_the_math_by_hand():
    m = tiny_model("llama_gqa", n_layers=2)
    ps = random_pairs(n=2, T=5, diff=(1, 3))
    full = ap.sweep(m, ps, "z", direction="denoise", progress=False)
    whole = ap.sweep(m, ps, "z", direction="denoise", subspace=torch.eye(m.d_head), progress=False)
    torch.testing.assert_close(whole.raw["logit_diff"], full.raw["logit_diff"], atol=1e-5, rtol=0)
    # one site by hand: x_base + U^T U (x_src - x_base) written with intervene
    site = ap.Site("resid_pre", 1, pos=3)
    U = _basis(m, "resid_pre", k=2)
    got = ap.patch(m, ps, [site], direction="denoise", subspace=U)
    g = ps.groups()[0]
    with ap.capture(m, [site]) as clean:
        m.logits(g.clean)
    P = U.T @ U
    with ap.intervene(m, {site: lambda x: x + (clean[site] - x) @ P}):
        logits = m.logits(g.corrupted, last_only=True)
    rows = torch.arange(len(g.indices))
    want = logits[rows, g.answers] - logits[rows, g.alternatives]
    torch.testing.assert_close(got.raw["logit_diff"], want, atol=1e-5, rtol=0)
    assert got.info.subspace["k"] == 2 and got.info.subspace["d"] == m.d_model


def test_bad_bases_are_refused_or_fixed_with_a_finding():
    m = tiny_model("llama", n_layers=2)
    ps = random_pairs(n=2, T=5, diff=(1,))
    site = [ap.Site("resid_pre", 1)]
    res = ap.patch(m, ps, site, subspace=torch.tensor([[1.0, 1.0] + [0.0] * 62]))
    assert "subspace_orthonormalised" in [f.code for f in res.findings]
    same = ap.patch(m, ps, site, subspace=torch.tensor([[2 ** -0.5, 2 ** -0.5] + [0.0] * 62]))
    torch.testing.assert_close(res.raw["logit_diff"], same.raw["logit_diff"], atol=1e-6, rtol=0)
    dependent = torch.zeros(2, 64)
    dependent[0, 0] = dependent[1, 0] = 1.0
    with pytest.raises(ap.errors.SubspaceError, match="linearly dependent"):
        ap.patch(m, ps, site, subspace=dependent)
    with pytest.raises(ap.errors.SubspaceError, match="the basis has width 16 but resid_pre vectors have d_model = 64"):
        ap.patch(m, ps, site, subspace=torch.eye(16)[:2])
    with pytest.raises(ap.errors.SubspaceError, match="a pattern's last axis is key positions"):
        ap.patch(m, ps, [ap.Site("pattern", 0)], subspace=torch.eye(5)[:1])
    with pytest.raises(ap.errors.SubspaceError, match="single index has no subspace"):
        ap.patch(m, ps, [ap.Site("mlp_post", 0, index=3)], subspace=torch.eye(m.d_mlp)[:1])
    with pytest.raises(ap.errors.SubspaceError, match="NaN"):
        Subspace.of(torch.full((1, 64), float("nan")))
    with pytest.raises(ap.errors.SiteError, match="neurons=... applies to mlp_post without a subspace"):
        ap.sweep(m, ps, "mlp_post", neurons=[1], subspace=torch.eye(m.d_mlp)[:1], progress=False)


# -- the interpretability-illusion check ---------------------------------------------------


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_illusion_model_is_flagged_with_the_numbers_derived_by_hand(direction):
    from actpatch.subspaces import subspace_check
    from actpatch.testing import illusion_model

    m, ps, site, U = illusion_model()
    c = subspace_check(m, ps, site, U, direction=direction)
    sign = 1.0 if direction == "denoise" else -1.0
    assert c.effects["subspace"] == pytest.approx(0.5 * sign, abs=1e-5)  # neuron 1 moved by 0.5: LD 1 of 2
    assert c.effects["component"] == pytest.approx(0.0, abs=1e-6)  # neuron 0 unread, neuron 1 equal
    assert c.effects["row"] == pytest.approx(0.0, abs=1e-6) and c.effects["null"] == pytest.approx(0.0, abs=1e-6)
    assert c.row_share == pytest.approx(0.5, abs=1e-5)
    assert c.variation["null"] == pytest.approx(1.0, abs=1e-5) and c.variation["row"] == pytest.approx(0.0, abs=1e-6)
    assert c.variation["subspace"] == pytest.approx(2**-0.5, abs=1e-5)
    assert [f.code for f in c.findings] == ["subspace_illusion", "subspace_exceeds_component"] and c.flagged
    # the patch writes 0.707 u = (0.5, 0.5): half its squared norm on the unread neuron 0
    assert c.verdict is SubspaceVerdict.ILLUSION and c.null_share == pytest.approx(0.5, abs=1e-5)
    assert c.effect_share is None  # the whole MLP has no effect to share
    assert c.values["subspace"] == pytest.approx(0.5, abs=1e-5)  # on the result's scale, as res.values reads
    # subspace patching runs the check by default and reports it
    res = ap.patch(m, ps, [site], subspace=U, direction=direction)
    assert float(res.values) == pytest.approx(0.5, abs=1e-5)
    assert {"subspace_illusion", "subspace_exceeds_component"} <= {f.code for f in res.findings}
    assert res.info.subspace_check.effects["component"] == pytest.approx(0.0, abs=1e-6)
    # the patch's own value is reused as the check's subspace effect (change from the base run)
    assert res.info.subspace_check.effects["subspace"] == pytest.approx(0.5 * sign, abs=1e-5)
    quiet = ap.patch(m, ps, [site], subspace=U, direction=direction, check_subspace=False)
    assert not {f.code for f in quiet.findings} & {"subspace_illusion", "subspace_exceeds_component"}


def test_control_model_is_not_flagged():
    from actpatch.subspaces import subspace_check
    from actpatch.testing import illusion_model

    m, ps, site, U = illusion_model(control=True)
    c = subspace_check(m, ps, site, U, direction="denoise")  # the numbers below are derived for denoising
    assert c.effects["subspace"] == pytest.approx(1.0, abs=1e-5) and c.effects["component"] == pytest.approx(1.0, abs=1e-5)
    assert c.row_share == pytest.approx(1.0, abs=1e-5) and c.effects["null"] is None
    assert not c.flagged and [f.code for f in c.findings] == ["subspace_faithful"]
    assert c.verdict is SubspaceVerdict.FAITHFUL and c.effect_share == pytest.approx(1.0, abs=1e-5)
    assert c.null_share == pytest.approx(0.0, abs=1e-6) and c.values["subspace"] == pytest.approx(1.0, abs=1e-5)


def test_verdicts_name_what_the_check_measured(tmp_path):
    """Each named outcome on a hand-built MLP whose numbers follow from its weights (see
    ``illusion_model``): passing the illusion test alone is never reported as faithful."""
    from actpatch.subspaces import subspace_check
    from actpatch.testing import illusion_model

    # neuron 0 varies and nothing reads it: the subspace moves only the null space, effect 0
    m, ps, site, _ = illusion_model()
    c = subspace_check(m, ps, site, torch.tensor([[1.0, 0.0]]), direction="noise")
    assert c.verdict is SubspaceVerdict.DORMANT_PATHWAY_RISK and c.null_share == pytest.approx(1.0, abs=1e-6)
    warning = {f.code: f for f in c.findings}["subspace_dormant_risk"]
    assert warning.level is ap.Level.WARNING and "100% of what it moves lies in the null space" in warning.message
    assert c.values["subspace"] == pytest.approx(1.0, abs=1e-6)  # noising: 1 is no effect
    # neuron 1 never varies: nothing moves, nothing changes
    c = subspace_check(m, ps, site, torch.tensor([[0.0, 1.0]]), direction="denoise")
    assert c.verdict is SubspaceVerdict.NO_EFFECT and c.null_share is None and "subspace_no_effect" in {f.code for f in c.findings}
    # both neurons compute a and are read along different directions, neuron 1 three times as
    # strongly (it writes -3 to dim 2: LD += 6): neuron 0 (LD += 2) carries a quarter
    m, ps, site, U = illusion_model(control=True)
    mlp = m.hf.transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.weight[0, 1], mlp.c_fc.weight[3, 1] = 1.0, -1.0
        mlp.c_proj.weight[1, 2] = -3.0
    c = subspace_check(m, ps, site, U, direction="noise")
    assert c.verdict is SubspaceVerdict.PARTIAL and c.effect_share == pytest.approx(0.25, abs=1e-5)
    assert c.null_share == pytest.approx(0.0, abs=1e-6)
    assert c.values["subspace"] == pytest.approx(0.75, abs=1e-5) and c.values["component"] == pytest.approx(0.0, abs=1e-5)
    assert "carries 25% of the component's effect" in {f.code: f for f in c.findings}["subspace_partial"].message
    assert "partial" in c.summary() and "25%" in c.summary()
    # neuron 1 = relu(a) too, writing +0.5 to dim 2 (LD -1) against neuron 0's +1 to dim 1 (LD +2): the
    # MLP does half of what neuron 0 does, and the reader sees both (no null space)
    m2, ps2, site2, U2 = illusion_model(control=True)
    mlp2 = m2.hf.transformer.h[0].mlp
    with torch.no_grad():
        mlp2.c_fc.weight[0, 1], mlp2.c_fc.weight[3, 1] = 1.0, -1.0
        mlp2.c_proj.weight[1, 2] = 0.5
    c2 = subspace_check(m2, ps2, site2, U2, direction="denoise")
    assert c2.effect_share == pytest.approx(2.0, abs=1e-4) and c2.null_share == pytest.approx(0.0, abs=1e-6)
    assert c2.verdict is SubspaceVerdict.EXCEEDS_COMPONENT
    assert "subspace_larger_than_component" in {f.code for f in c2.findings}  # never called faithful
    # the verdict travels with the result, typed
    res = ap.patch(m, ps, [site], subspace=U, direction="noise")
    assert res.info.subspace_check.verdict is SubspaceVerdict.PARTIAL and float(res.values) == pytest.approx(0.75, abs=1e-5)
    res.save(tmp_path / "r")
    back = ap.PatchResult.load(tmp_path / "r").info.subspace_check
    assert back == res.info.subspace_check and back.verdict is SubspaceVerdict.PARTIAL


def test_check_on_a_residual_site_says_what_it_cannot_tell_and_sweeps_check_their_strongest_cell():
    m = tiny_model("llama", n_layers=2)
    ps = random_pairs(n=3, T=5, diff=(2,))
    U = _basis(m, "resid_pre", k=2)
    res = ap.sweep(m, ps, "resid_pre", direction="denoise", subspace=U, progress=False)
    codes = [f.code for f in res.findings]
    assert "subspace_check_limited" in codes
    assert res.info.subspace_check.verdict is SubspaceVerdict.UNSPLIT and res.info.subspace_check.null_share is None
    checked = str(res.info.subspace_check.site)
    strongest = res.values.abs().flatten().argmax()
    layer, pos = divmod(int(strongest), res.shape[1])
    assert checked == str(ap.Site("resid_pre", layer, pos=pos))
    # z of one head has a reader: its slice of the output projection
    z = ap.patch(m, ps, [ap.Site("z", 1, head=0)], subspace=_basis(m, "z", k=2), direction="denoise")
    assert z.info.subspace_check.reader == "head 0's output projection"


# -- directions from data -------------------------------------------------------------------


def test_directions_from_data_on_a_planted_feature():
    """Tokens 2..5 carry a bit along a planted embedding direction: clean prompts have it, corrupted
    ones not. Difference of means, the probe and PCA all find that direction at the embedding."""
    m = tiny_model("llama", n_layers=2)
    g = torch.Generator().manual_seed(0)
    planted = torch.randn(m.d_model, generator=g)
    planted /= planted.norm()
    emb = m.hf.get_input_embeddings().weight
    with torch.no_grad():
        base = emb[10:14].clone()
        emb[2:6] = base + 3.0 * planted  # tokens 2..5 = tokens 10..13 plus the feature
    clean = torch.tensor([[1, 2 + i % 4, 7] for i in range(8)])
    corrupted = clean.clone()
    corrupted[:, 1] += 8
    ps = ap.PromptSet.from_ids(clean, corrupted, torch.full((8,), 20), torch.full((8,), 21))
    site = ap.Site("embed", pos=1)
    from actpatch.subspaces import diff_of_means, pca_directions, probe_direction

    dm = diff_of_means(m, ps, site)
    assert float((dm.basis_for(None) @ planted).abs()) > 0.999 and dm.provenance["method"] == "diff_of_means"
    assert (dm.provenance["weight_hash"], dm.provenance["n_prompts"]) == (m.weight_hash, 8)
    pc = pca_directions(m, ps, site, k=1)
    assert float((pc.basis_for(None) @ planted).abs()) > 0.999 and pc.provenance["energy"] > 0.999
    pr = probe_direction(m, ps, ap.Site("embed"), position=1)
    assert pr.provenance["train_accuracy"] == 1.0
    assert float((pr.basis_for(None) @ planted).abs()) > 0.5  # separates the sets; regularised, not exact
    with pytest.raises(ap.errors.SubspaceError, match="not both or neither"):
        diff_of_means(m, ps, ap.Site("embed"))


# -- DAS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_das_recovers_the_planted_direction(seed):
    from actpatch.testing import planted_direction_model

    m, ps, site, planted = planted_direction_model()
    found = ap.subspaces.das(m, ps, site, k=1, steps=150, seed=seed, progress=False)
    U = found.subspace.basis_for(site.layer)
    assert float((U @ planted).abs()) > 0.95
    assert found.test_accuracy == 1.0 and found.test_effect > 0.9
    assert set(found.train).isdisjoint(found.test) and len(found.train) + len(found.test) == len(ps)
    losses = [c[1] for c in found.curve]
    assert losses[-1] < losses[0]
    assert found.subspace.provenance["method"] == "das"
    assert found.provenance.weight_hash == m.weight_hash and found.provenance.prompts["n_prompts"] == len(ps)
    assert ap.subspaces.DASRecord.from_dict(found.record().to_dict()) == found.record()  # provenance saved too
    # the diagonal direction that DAS must not settle on does worse on the same pairs
    diagonal = ap.patch(m, ps, [site], direction="denoise", subspace=(planted + torch.tensor(
        [1.0, 1.0, -1.0, -1.0, 0.0, 0.0]) / 2) / 2**0.5, check_subspace=False)
    exact = ap.patch(m, ps, [site], direction="denoise", subspace=U, check_subspace=False)
    assert float(exact.values) > float(diagonal.values) + 0.2


def test_das_bad_input():
    from actpatch.testing import planted_direction_model

    m, ps, site, _ = planted_direction_model()
    with pytest.raises(ap.errors.PromptError, match="at least 2 prompt pairs"):
        ap.subspaces.das(m, ps.subset([0]), site, progress=False)
    with pytest.raises(ap.errors.SubspaceError, match="k=7: ask for 1..6"):
        ap.subspaces.das(m, ps, site, k=7, progress=False)
    with pytest.raises(ap.errors.SubspaceError, match="test_fraction=1"):
        ap.subspaces.das(m, ps, site, test_fraction=1, progress=False)
