"""Bootstrap confidence intervals and splits by prompt attribute."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap


def make(raw, clean, corrupted, attrs=None):
    raw = torch.tensor(raw, dtype=torch.float)
    info = ap.results.ResultInfo(target="z", direction=ap.Direction.DENOISE, metrics=("logit_diff",),
                         corruption=ap.corruption.CorruptionSpec(), seed=0,
                         provenance=ap.types.Provenance(model="hand-made", family="none", weight_hash="-"),
                         prompt_attributes=tuple(attrs or [{} for _ in clean]))
    return ap.PatchResult(dims=("head",), coords={"head": list(range(raw.shape[1]))},
                          raw={"logit_diff": raw}, clean={"logit_diff": torch.tensor(clean)},
                          corrupted={"logit_diff": torch.tensor(corrupted)}, info=info)


def test_ci_of_constant_effects_is_a_point_and_seeded():
    res = make([[0.5, 0.0]] * 6, [1.0] * 6, [0.0] * 6)
    ci = res.ci(n_boot=200)
    assert torch.allclose(ci.low, torch.tensor([0.5, 0.0])) and torch.allclose(ci.high, torch.tensor([0.5, 0.0]))
    assert ci.contains_zero.tolist() == [False, True]


def test_ci_matches_a_slow_loop_and_covers_the_mean():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(20, 3, generator=g) + torch.tensor([2.0, 0.0, -1.0])
    clean = torch.randn(20, generator=g) * 0.3 + 4.0
    corr = torch.randn(20, generator=g) * 0.3
    res = make(raw.tolist(), clean.tolist(), corr.tolist())
    ci = res.ci(n_boot=500, seed=3)
    # the same resampling written as a loop
    idx = torch.randint(0, 20, (500, 20), generator=torch.Generator().manual_seed(3))
    boots = torch.stack([(raw[i].mean(0) - corr[i].mean()) / (clean[i].mean() - corr[i].mean()) for i in idx])
    lo, hi = torch.quantile(boots.double(), torch.tensor([0.025, 0.975], dtype=torch.double), dim=0)
    torch.testing.assert_close(ci.low, lo.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ci.high, hi.float(), atol=1e-5, rtol=0)
    assert torch.all(ci.low <= ci.mean) and torch.all(ci.mean <= ci.high)
    assert ci.contains_zero.tolist() == [False, True, False]
    assert torch.equal(res.ci(n_boot=500, seed=3).low, ci.low)


def test_bad_ci_arguments():
    res = make([[0.5]], [1.0], [0.0])
    with pytest.raises(ap.errors.ResultError, match="level=1.5"):
        res.ci(level=1.5)
    with pytest.raises(ap.errors.ResultError, match="n_boot=2"):
        res.ci(n_boot=2)


def test_split_by_attribute():
    attrs = [{"template": 0}, {"template": 1}, {"template": 0}]
    res = make([[1.0], [0.0], [0.5]], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], attrs)
    parts = res.split_by("template")
    assert sorted(parts) == [0, 1]
    assert float(parts[0].values[0]) == pytest.approx(0.75) and float(parts[1].values[0]) == 0.0
    assert parts[0].info.split == {"template": 0} and parts[0].n_prompts == 2
    with pytest.raises(ap.errors.ResultError, match="No prompt attribute 'order'"):
        res.split_by("order")
