"""Findings carry their origin: a check's findings are recomputed when a result's prompts change,
a technique's findings (which no check can recompute) survive every change, each once."""

from __future__ import annotations

import json

import pytest

import actpatch as ap
from actpatch.findings import Origin
from actpatch.testing import illusion_model, random_pairs, tiny_model

ILLUSION = {"subspace_illusion", "subspace_exceeds_component"}


@pytest.fixture(scope="module")
def illusion():
    m, ps, site, U = illusion_model()
    return ap.patch(m, ps, [site], subspace=U, direction="denoise")


def _codes(res: ap.PatchResult) -> set[str]:
    return {f.code for f in res.findings}


def test_technique_findings_are_marked_as_such(illusion):
    by_code = {f.code: f.origin for f in illusion.findings}
    assert by_code["subspace_illusion"] is Origin.TECHNIQUE
    m, ps, _, _ = illusion_model()  # a check's finding (single_direction fires on sweeps, not single patches)
    swept = ap.sweep(m, ps, "mlp_post", direction="denoise", progress=False)
    assert {f.code: f.origin for f in swept.findings}["single_direction"] is Origin.CHECK


def test_illusion_finding_survives_concat_subset_and_split_by(illusion):
    both = ap.PatchResult.concat([illusion, illusion])
    assert both.n_prompts == 2 and ILLUSION <= _codes(both)
    assert [f.code for f in both.findings].count("subspace_illusion") == 1  # once, not once per part
    one = both.subset([1])
    assert ILLUSION <= _codes(one)
    tagged = both.replace(info=both.info.replace(prompt_attributes=({"k": "a"}, {"k": "b"})))
    for part in tagged.split_by("k").values():
        assert ILLUSION <= _codes(part)


def test_check_findings_are_recomputed_not_kept():
    m = tiny_model("llama", n_layers=2)
    ps = random_pairs(n=4, T=5, diff=(1,))
    res = ap.sweep(m, ps, "resid_pre", direction="denoise", progress=False)
    wrong = [i for i, ok in enumerate(res.info.diagnostics.clean_correct) if not ok]
    right = [i for i, ok in enumerate(res.info.diagnostics.clean_correct) if ok]
    assert wrong and right, "the fixture must hold prompts the random model gets right and wrong"
    assert "task_failure" in _codes(res)
    assert "task_failure" not in _codes(res.subset(right))  # a check finding that no longer applies goes


def test_named_position_sweeps_keep_the_subspace_findings():
    m = tiny_model("llama", n_layers=2)
    a, b = random_pairs(n=2, T=5, diff=(1,), seed=0), random_pairs(n=2, T=7, diff=(3,), seed=1)
    import torch

    ps = ap.PromptSet.from_ids(list(a.clean) + list(b.clean), list(a.corrupted) + list(b.corrupted),
                               torch.cat([a.answers, b.answers]), torch.cat([a.alternatives, b.alternatives]))
    skewed = torch.zeros(1, m.d_model)
    skewed[0, :2] = 1.0  # not unit length: orthonormalised, with a finding
    res = ap.sweep(m, ps, "resid_pre", positions=["first_diff", "end"], subspace=skewed, progress=False)
    assert res.info.role_groups == 2
    assert "subspace_orthonormalised" in _codes(res)
    assert [f.code for f in res.findings].count("subspace_orthonormalised") == 1


def test_origin_round_trips_and_old_results_infer_it(illusion, tmp_path):
    back = ap.PatchResult.load(illusion.save(tmp_path / "r"))
    assert [(f.code, f.origin) for f in back.findings] == [(f.code, f.origin) for f in illusion.findings]
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    for f in meta["findings"]:
        del f["origin"]  # as formats 1 and 2 saved them
    (tmp_path / "r" / "meta.json").write_text(json.dumps(meta))
    old = ap.PatchResult.load(tmp_path / "r")
    assert [(f.code, f.origin) for f in old.findings] == [(f.code, f.origin) for f in illusion.findings]
    assert ILLUSION <= _codes(old.subset([0]))
