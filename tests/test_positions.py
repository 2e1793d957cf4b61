"""Named positions: sweeps aligned by role over prompts of different lengths and layouts."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.experiment.checkpoint import UnitStore
from actpatch.techniques.positions import named_positions
from actpatch.testing import random_pairs, tiny_model


def _mixed():
    """Five pairs in three layouts: lengths 6 and 8, differing at different positions, and a
    custom role ``X`` set through the attributes."""
    parts = [random_pairs(n=2, T=6, diff=(2, 4), seed=1), random_pairs(n=2, T=8, diff=(1, 5), seed=2),
             random_pairs(n=1, T=8, diff=(3,), seed=3)]
    clean = [c for p in parts for c in p.clean]
    corr = [c for p in parts for c in p.corrupted]
    ans = torch.cat([p.answers for p in parts])
    alt = torch.cat([p.alternatives for p in parts])
    x = [1, 1, 0, 0, 2]
    return ap.PromptSet.from_ids(clean, corr, ans, alt, attributes=[{"positions": {"X": v}} for v in x])


ROLES = ["first_diff", "X", "last_diff", "end"]


def _reference_rows(model, prompts, fn, roles, **kw):
    """Each prompt alone, with its roles turned into integer positions."""
    rows = []
    for i in range(len(prompts)):
        pos = [named_positions(prompts, i)[r] for r in roles]
        uniq = sorted(set(pos))
        res = fn(model, prompts.subset([i]), positions=uniq, per_position=True, **kw)
        axis = 1 + res.dims.index("pos")
        rows.append(res.raw["logit_diff"].index_select(axis, torch.tensor([uniq.index(p) for p in pos])))
    return torch.cat(rows)


@pytest.mark.parametrize("target, kw", [("resid_pre", {}), ("z", {"layers": [1]})])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_role_sweep_equals_each_prompt_at_its_own_positions(target, kw, direction):
    m = tiny_model("llama", n_layers=2)
    ps = _mixed()
    res = ap.sweep(m, ps, target, positions=ROLES, direction=direction, progress=False, **kw)
    assert res.coords["pos"] == ROLES and res.info.role_groups == 3
    ref = _reference_rows(m, ps, lambda *a, **k: ap.sweep(*a, target=target, progress=False, **k), ROLES,
                          direction=direction, **kw)
    torch.testing.assert_close(res.raw["logit_diff"], ref, atol=1e-5, rtol=1e-5)
    clean = torch.cat([ap.sweep(m, ps.subset([i]), "embed", progress=False).clean["logit_diff"] for i in range(len(ps))])
    torch.testing.assert_close(res.clean["logit_diff"], clean, atol=1e-5, rtol=1e-5)
    if target == "resid_pre":  # prompt 4 differs at one token: patching it at layer 0 is the whole change
        goal = (res.clean if direction == "denoise" else res.corrupted)["logit_diff"][4]
        assert abs(float(res.raw["logit_diff"][4, 0, ROLES.index("first_diff")] - goal)) < 1e-4
    assert "single_direction" in {f.code for f in res.findings}


def test_role_attribution_equals_each_prompt_alone():
    m = tiny_model("gpt2", n_layers=2)
    ps = _mixed()
    res = ap.attribute(m, ps, "mlp_out", positions=["first_diff", "end"])
    ref = _reference_rows(m, ps, lambda *a, **k: ap.attribute(*a, target="mlp_out", **k), ["first_diff", "end"])
    torch.testing.assert_close(res.raw["logit_diff"], ref, atol=1e-5, rtol=1e-5)
    codes = [f.code for f in res.findings]
    assert codes.count("attribution_estimate") == 1
    # validation patches the chosen cells exactly, group by group: the role sweep's values
    check = ap.validate_attribution(m, ps, res, k=2, n_random=2)
    exact = ap.sweep(m, ps, "mlp_out", positions=["first_diff", "end"], direction="noise", progress=False)
    assert len(check.cells) == 4
    torch.testing.assert_close(check.exact, torch.stack([exact.values[c] for c in check.cells]) - 1.0, atol=1e-5,
                               rtol=1e-5, check_dtype=False)  # effects: 0 = no effect (noising's 1)


def test_role_sweep_resumes_from_its_groups_units(tmp_path):
    m = tiny_model("llama", n_layers=2)
    ps = _mixed()
    store = UnitStore(tmp_path / "units")
    first = ap.sweep(m, ps, "resid_pre", positions=ROLES, progress=False, store=store, unit_size=2)
    saved = sorted(p.relative_to(tmp_path).parts[1] for p in (tmp_path / "units").rglob("*.safetensors"))
    assert set(saved) == {"group0", "group1", "group2"}
    again = ap.sweep(m, ps, "resid_pre", positions=ROLES, progress=False, store=store, unit_size=2)
    assert torch.equal(first.raw["logit_diff"], again.raw["logit_diff"])
    # the second run really reads the store: a unit edited on disk comes back as edited
    unit = UnitStore(tmp_path / "units" / "group0")
    marked = {k: torch.full_like(v, 123.0) for k, v in unit.get("g0_u0").items()}
    unit.put("g0_u0", marked)
    resumed = ap.sweep(m, ps, "resid_pre", positions=ROLES, progress=False, store=store, unit_size=2)
    changed = resumed.raw["logit_diff"] != first.raw["logit_diff"]
    assert changed.any() and torch.all(resumed.raw["logit_diff"][changed] == 123.0)


def test_role_errors():
    m = tiny_model("llama", n_layers=2)
    ps = _mixed()
    with pytest.raises(ap.errors.PromptError, match="Prompt 0 has no position named 'S2'.*end, first_diff, last_diff"):
        ap.sweep(m, ps, "resid_pre", positions=["S2"], progress=False)
    with pytest.raises(ap.errors.SiteError, match="either indices or role names"):
        ap.sweep(m, ps, "resid_pre", positions=[1, "end"], progress=False)
    with pytest.raises(ap.errors.SiteError, match="give a list"):
        ap.sweep(m, ps, "resid_pre", positions="end", progress=False)
    with pytest.raises(ap.errors.SiteError, match="names a position twice"):
        ap.sweep(m, ps, "resid_pre", positions=["end", "end"], progress=False)
    with pytest.raises(ap.errors.SiteError, match="drop per_position=False"):
        ap.sweep(m, ps, "z", positions=["end"], per_position=False, progress=False)


@pytest.mark.slow
def test_bundled_ioi_roles_across_all_templates(bundled):
    """Every template, both orders: the names sit where the roles say, and the residual stream
    at S2 carries the behaviour early, at the end late (IOI's known picture)."""
    ps = ap.prompts.ioi(bundled, n=24, seed=1)
    assert len(set(ps.lengths.tolist())) > 1
    for a, ids, ans in zip(ps.attributes, ps.clean, ps.answers):
        pos = a["positions"]
        assert ids[pos["S1"]] == ids[pos["S2"]] and ids[pos["IO"]] == ans and pos["S1+1"] == pos["S1"] + 1
    res = ap.sweep(bundled, ps, "resid_pre", positions=["IO", "S1", "S2", "end"], layers=[0, 29], direction="denoise",
                   progress=False)
    v = res.values
    print(f"\nIOI, all templates, resid_pre denoising: S2 at layer 0 {v[0, 2]:.3f}, end at layer 29 {v[1, 3]:.3f}")
    assert v[0, 2] > 0.9 and v[1, 3] > 0.8 and abs(v[1, 2]) < 0.1


@pytest.mark.slow
def test_bundled_factual_subject_roles(bundled):
    ps = ap.prompts.factual(bundled, n=12, same_length=False)
    for a, ids in zip(ps.attributes, ps.clean):
        p = a["positions"]
        assert bundled.tokenizer.decode(ids[p["subject_first"]: p["subject_last"] + 1]).strip() == a["subject"]
    res = ap.sweep(bundled, ps, "resid_pre", positions=["subject_last", "end"], layers=[0], progress=False)
    assert res.coords["pos"] == ["subject_last", "end"] and res.values.shape == (1, 2)


def test_role_corruptions_do_not_depend_on_the_grouping():
    """Gaussian noise keeps the whole set's sigma; resample and mean (which draw on the other
    prompts) are refused; per-prompt diagnostics come back in prompt order."""
    m = tiny_model("llama", n_layers=2)
    ps = _mixed()
    user = ap.corruption.GaussianNoise(n_draws=2)
    noise = user.prepared(m, ps)
    assert user.sigma is None and noise is not user  # corruptions are values: the caller's is never changed
    res = ap.sweep(m, ps, "resid_pre", positions=["first_diff", "end"], corruption=ap.corruption.GaussianNoise(n_draws=2),
                   direction="noise", progress=False)
    assert res.info.corruption.sigma == pytest.approx(noise.sigma)
    for name in ("resample", "mean"):
        with pytest.raises(ap.errors.CorruptionError, match=f"corruption '{name}' draws on the other prompts"):
            ap.sweep(m, ps, "resid_pre", positions=["end"], corruption=name, direction="noise", progress=False)
    plain = ap.sweep(m, ps, "z", progress=False)  # no position axis: every prompt in one call
    by_role = ap.sweep(m, ps, "resid_pre", positions=["end"], progress=False)
    assert by_role.info.diagnostics.clean_correct == plain.info.diagnostics.clean_correct
    assert by_role.info.diagnostics.null_patch_max_abs <= 1e-4


def test_a_site_may_name_its_position_and_patch_resolves_it_per_prompt():
    """Site(pos="end" / -1 / a builder's name) on prompts of different lengths equals patching
    each prompt alone at its own index; entry points that need an index say so."""
    m = tiny_model("llama", n_layers=2)
    ps = ap.PromptSet.from_ids([[2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [4, 5, 6, 7]], [[2, 9, 4, 5], [3, 4, 9, 6, 7, 8],
                               [4, 9, 6, 7]], [7, 7, 7], [8, 8, 8],
                               attributes=[{"positions": {"X": 1}}, {"positions": {"X": 4}}, {"positions": {"X": 2}}])
    for direction in ("denoise", "noise"):
        for pos, index in (("end", lambda i: ps.clean[i].numel() - 1), (-1, lambda i: ps.clean[i].numel() - 1),
                           (-2, lambda i: ps.clean[i].numel() - 2), ("X", lambda i: ps.attributes[i]["positions"]["X"]),
                           ("first_diff", lambda i: int(ps.first_diff[i]))):
            got = ap.patch(m, ps, ap.Site("resid_pre", 1, pos=pos), direction=direction)
            for i in range(len(ps)):
                alone = ap.patch(m, ps.subset([i]), ap.Site("resid_pre", 1, pos=index(i)), direction=direction)
                assert got.raw["logit_diff"][i] == pytest.approx(float(alone.raw["logit_diff"][0]), abs=1e-6), (pos, i)
            assert got.n_prompts == 3 and got.info.provenance.prompts["n_prompts"] == 3
    assert ap.Site.parse("z.L1.H0.posS2") == ap.Site("z", 1, head=0, pos="S2")
    assert ap.Site.parse(str(ap.Site("resid_pre", 1, pos=-1))).pos == -1
    with pytest.raises(ap.errors.PromptError, match="prompt 0 has no position named 'S9'"):
        ap.patch(m, ps, ap.Site("resid_pre", 1, pos="S9"))
    with pytest.raises(ap.errors.SiteError, match="before the start of prompt 0"):
        ap.patch(m, ps, ap.Site("resid_pre", 1, pos=-9))
    with pytest.raises(ap.errors.SiteError, match="relative to each prompt; ap.patch resolves it"):
        with ap.capture(m, [ap.Site("resid_pre", 1, pos="end")]):
            m.logits(ps.clean[0][None])
    with pytest.raises(ap.errors.SiteError, match="not a position name"):
        ap.Site("resid_pre", 1, pos="a.b")
