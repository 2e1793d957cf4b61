"""Exact patching on tiny models: invariants with known answers and a hand-computed oracle."""

from __future__ import annotations

import math

import pytest
import torch

import actpatch as ap
from actpatch import Site
from actpatch.testing import tiny_model


def _pairs(n=4, T=6, seed=0, diff_positions=(2,), vocab=(2, 60)):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(*vocab, (n, T), generator=g)
    corrupted = clean.clone()
    for p in diff_positions:
        corrupted[:, p] = (clean[:, p] + 1 + torch.randint(0, 20, (n,), generator=g)) % vocab[1]
        corrupted[:, p] = corrupted[:, p].clamp(min=vocab[0])
    answers = torch.randint(*vocab, (n,), generator=g)
    alts = (answers + 7) % vocab[1]
    return ap.PromptSet.from_ids(clean, corrupted, answers, alts.clamp(min=vocab[0]))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama_gqa", n_layers=3)


def test_denoise_all_positions_of_first_residual_restores_clean(tiny):
    ps = _pairs(diff_positions=(1, 4))
    for direction, expected in (("denoise", 1.0), ("noise", 0.0)):
        res = ap.sweep(tiny, ps, "resid_pre", direction=direction, per_position=False, layers=[0],
                       metric=["logit_diff", "logprob", "kl"], progress=False)
        for m in res.metrics:  # in raw units: the normalised error is this over a gap that can be tiny
            target = res.clean[m] if direction == "denoise" else res.corrupted[m]
            torch.testing.assert_close(res.raw[m][:, 0], target, atol=1e-5, rtol=0, msg=f"{direction} {m}")


def test_clean_into_clean_changes_nothing(llama):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(2, 60, (3, 5), generator=g)
    ps = ap.PromptSet.from_ids(clean, clean, [5, 6, 7], [8, 9, 10])
    for target in ("resid_post", "z", "pattern"):
        res = ap.sweep(llama, ps, target, direction="noise", progress=False)
        base = res.clean["logit_diff"].reshape(-1, *([1] * len(res.dims)))
        assert (res.raw["logit_diff"] - base).abs().max().item() < 1e-5
        assert torch.isnan(res.values).all()  # normalisation undefined, never a huge number
        assert res.findings[0].code == "normalisation_undefined" and res.findings[0].level == ap.Level.ERROR


def test_all_heads_z_equals_attn_out(tiny):
    ps = _pairs(diff_positions=(0, 3), seed=1)
    for direction in ("denoise", "noise"):
        for layer in range(tiny.n_layers):
            via_z = ap.patch(tiny, ps, [Site("z", layer)], direction=direction)
            via_heads = ap.patch(tiny, ps, [Site("z", layer, head=h) for h in range(tiny.n_heads)], direction=direction)
            via_out = ap.patch(tiny, ps, [Site("attn_out", layer)], direction=direction)
            torch.testing.assert_close(via_z.raw["logit_diff"], via_out.raw["logit_diff"], atol=1e-5, rtol=0)
            torch.testing.assert_close(via_heads.raw["logit_diff"], via_out.raw["logit_diff"], atol=1e-5, rtol=0)


def test_per_position_patch_equals_hand_computed_forward(llama):
    ps = _pairs(n=3, T=6, diff_positions=(2,), seed=2)
    res = ap.sweep(llama, ps, "attn_out", direction="denoise", metric="logit_diff", progress=False)
    clean = torch.stack(ps.clean)
    corrupted = torch.stack(ps.corrupted)
    with ap.capture(llama, [Site("attn_out", 1)]) as acts:
        llama.logits(clean)
    src = acts[Site("attn_out", 1)]
    with torch.no_grad():  # hand-written replacement with a raw torch hook
        block = llama.adapter.block_module(1, "self_attn")
        h = block.register_forward_hook(lambda m, a, out: (torch.cat([out[0][:, :4], src[:, 4:5], out[0][:, 5:]], 1), *out[1:]))
        try:
            logits = llama.hf(input_ids=corrupted).logits[:, -1]
        finally:
            h.remove()
    idx = torch.arange(3)
    expected = logits[idx, ps.answers] - logits[idx, ps.alternatives]
    torch.testing.assert_close(res.raw["logit_diff"][:, 1, 4], expected, atol=1e-5, rtol=0)
    # positions before the first difference cannot matter for denoising at layer 0
    assert res.raw["logit_diff"][:, 0, :2].sub(res.corrupted["logit_diff"][:, None]).abs().max() < 1e-5


def test_gaussian_noise_sigma_zero_is_no_corruption_and_seeds_reproduce(llama):
    ps = _pairs(diff_positions=(1,))
    zero = ap.sweep(llama, ps, "resid_pre", corruption=ap.corruption.GaussianNoise(scale=0.0, n_draws=3), progress=False)
    torch.testing.assert_close(zero.corrupted["logit_diff"], zero.clean["logit_diff"], atol=1e-6, rtol=0)
    kw = dict(direction="denoise", progress=False)
    a = ap.sweep(llama, ps, "resid_pre", corruption=ap.corruption.GaussianNoise(n_draws=4), seed=5, **kw)
    b = ap.sweep(llama, ps, "resid_pre", corruption=ap.corruption.GaussianNoise(n_draws=4), seed=5, **kw)
    c = ap.sweep(llama, ps, "resid_pre", corruption=ap.corruption.GaussianNoise(n_draws=4), seed=6, **kw)
    assert torch.equal(a.raw["logit_diff"], b.raw["logit_diff"])
    assert not torch.equal(a.raw["logit_diff"], c.raw["logit_diff"])
    assert a.info.corruption.sigma > 0
    # denoising the noised (diff) position at layer 0 restores clean exactly
    torch.testing.assert_close(a.raw["logit_diff"][:, 0, 1], a.clean["logit_diff"], atol=1e-5, rtol=0)


def test_resample_mean_zero(llama):
    ps = _pairs(n=4, diff_positions=(2,))
    r = ap.sweep(llama, ps, "resid_pre", corruption="resample", direction="denoise", per_position=False, layers=[0],
                 progress=False)
    torch.testing.assert_close(r.raw["logit_diff"][:, 0], r.clean["logit_diff"], atol=1e-5, rtol=0)
    clean = torch.stack([torch.as_tensor(c) for c in ps.clean])
    rows = torch.arange(len(clean))
    with ap.capture(llama, [Site("mlp_out", 1)]) as acts:
        llama.logits(clean)
    for name in ("mean", "zero"):
        res = ap.sweep(llama, ps, "mlp_out", corruption=name, direction="noise", progress=False)
        assert torch.isfinite(res.values).all()
        # the oracle, by hand: mlp_out of layer 1 at position 3 replaced by 0 or by its mean over the prompts
        value = 0.0 if name == "zero" else acts[Site("mlp_out", 1)][:, 3].mean(0)
        with ap.intervene(llama, {Site("mlp_out", 1, pos=3): value}):
            logits = llama.logits(clean, last_only=True)
        want = logits[rows, ps.answers] - logits[rows, ps.alternatives]
        torch.testing.assert_close(res.raw["logit_diff"][:, 1, 3], want, atol=1e-5, rtol=0)
    with pytest.raises(ap.errors.CorruptionError, match="no corrupted run to denoise"):
        ap.sweep(llama, ps, "resid_pre", corruption="mean", direction="denoise", progress=False)
    with pytest.raises(ap.errors.CorruptionError, match="at least two prompts"):
        ap.sweep(llama, ps.subset([0]), "resid_pre", corruption="resample", progress=False)


def test_mean_ablation_source_is_the_mean(llama):
    ps = _pairs(n=3, diff_positions=(2,))
    res = ap.patch(llama, ps, [Site("resid_pre", 1)], direction="noise", corruption="mean")
    clean = torch.stack(ps.clean)
    with ap.capture(llama, [Site("resid_pre", 1)]) as a:
        llama.logits(clean)
    mean = a[Site("resid_pre", 1)].mean(0, keepdim=True)
    with ap.intervene(llama, {Site("resid_pre", 1): mean}):
        logits = llama.logits(clean, last_only=True)
    idx = torch.arange(3)
    torch.testing.assert_close(res.raw["logit_diff"], logits[idx, ps.answers] - logits[idx, ps.alternatives], atol=1e-5, rtol=0)


@pytest.mark.parametrize("target, dims, shape", [
    ("resid_mid", ("layer", "pos"), (3, 6)),
    ("z", ("layer", "head"), (3, 4)),
    ("k", ("layer", "kv_head"), (3, 2)),
    ("pattern", ("layer", "head"), (3, 4)),
    ("mlp_post", ("layer", "neuron"), (1, 5)),
    ("embed", ("pos",), (6,)),
])
def test_targets_dims(llama, target, dims, shape):
    ps = _pairs(diff_positions=(2,))
    kw = {"layers": [2], "neurons": range(5)} if target == "mlp_post" else {}
    res = ap.sweep(llama, ps, target, progress=False, **kw)
    assert res.dims == dims and tuple(res.values.shape) == shape
    assert res.per_prompt_normalised.shape == (4, *shape)
    # each prompt's row is that prompt run alone, normalised with the whole set's mean baselines
    gap = res.clean["logit_diff"].mean() - res.corrupted["logit_diff"].mean()
    for i in (0, 3):
        alone = ap.sweep(llama, ps.subset([i]), target, progress=False, **kw)
        torch.testing.assert_close(res.raw["logit_diff"][i], alone.raw["logit_diff"][0], atol=1e-5, rtol=0)
        by_hand = (alone.raw["logit_diff"][0] - res.corrupted["logit_diff"].mean()) / gap
        torch.testing.assert_close(res.per_prompt_normalised[i] * gap, by_hand * gap, atol=1e-5, rtol=0)  # raw units
    assert torch.equal(res.per_prompt_raw, res.raw["logit_diff"])  # the names say which
    torch.testing.assert_close(res.per_prompt_normalised.mean(0), res.values, atol=1e-6, rtol=0)
    with pytest.warns(DeprecationWarning, match="per_prompt_normalised"):
        assert torch.equal(res.per_prompt, res.per_prompt_normalised)


def test_head_per_position_sums_like_all_positions_for_z_at_last_layer(llama):
    """At the last layer, z patches at different positions only meet at the final norm, so
    patching head h at every position at once equals the per-position patch at the last token
    (earlier positions cannot affect the last-position logits there)."""
    ps = _pairs(diff_positions=(1, 3))
    per_pos = ap.sweep(llama, ps, "z", per_position=True, layers=[2], progress=False)
    all_pos = ap.sweep(llama, ps, "z", layers=[2], progress=False)
    torch.testing.assert_close(per_pos.raw["logit_diff"][..., -1], all_pos.raw["logit_diff"], atol=1e-5, rtol=0)


def test_windows_patch_consecutive_layers(llama):
    ps = _pairs(diff_positions=(2,))
    win = ap.sweep(llama, ps, "mlp_out", window=2, progress=False)
    joint = ap.patch(llama, ps, [Site("mlp_out", 0, pos=3), Site("mlp_out", 1, pos=3)])
    torch.testing.assert_close(win.raw["logit_diff"][:, 0, 3], joint.raw["logit_diff"], atol=1e-6, rtol=0)
    last = ap.patch(llama, ps, [Site("mlp_out", 2, pos=3)])  # window clipped at the last layer
    torch.testing.assert_close(win.raw["logit_diff"][:, 2, 3], last.raw["logit_diff"], atol=1e-6, rtol=0)


def test_mixed_lengths_group_for_all_position_targets(llama):
    a, b = _pairs(n=2, T=5, seed=1), _pairs(n=3, T=7, seed=2)
    ps = ap.PromptSet.from_ids(list(a.clean) + list(b.clean), list(a.corrupted) + list(b.corrupted),
                               torch.cat([a.answers, b.answers]), torch.cat([a.alternatives, b.alternatives]))
    res = ap.sweep(llama, ps, "z", progress=False)
    ra = ap.sweep(llama, a, "z", progress=False)
    torch.testing.assert_close(res.raw["logit_diff"][:2], ra.raw["logit_diff"], atol=1e-6, rtol=0)
    with pytest.raises(ap.errors.PromptError, match="different token lengths"):
        ap.sweep(llama, ps, "resid_pre", progress=False)


def test_save_load_roundtrip_and_pandas(llama, tmp_path):
    ps = _pairs(diff_positions=(2,))
    res = ap.sweep(llama, ps, "resid_pre", metric=["logit_diff", "prob", "rank"], progress=False)
    res.save(tmp_path / "r")
    back = ap.PatchResult.load(tmp_path / "r")
    for m in res.metrics:
        assert torch.equal(back.raw[m], res.raw[m])
        assert torch.equal(back.clean[m], res.clean[m]) and torch.equal(back.corrupted[m], res.corrupted[m])
    assert back.dims == res.dims and back.coords == res.coords and back.info == res.info
    df = res.to_pandas()
    assert len(df) == 3 * 6 * 3  # layers x positions x metrics
    assert set(df.columns) >= {"layer", "pos", "metric", "normalised", "raw", "clean", "corrupted"}
    row = df[(df.layer == 1) & (df.metric == "prob")].iloc[2]
    assert math.isclose(row.normalised, float(res.normalised("prob")[1, 2]), rel_tol=1e-6, abs_tol=1e-7)
    with pytest.raises(ap.errors.ResultError, match="not a saved PatchResult"):
        ap.PatchResult.load(tmp_path / "nothing")


def test_metrics_values_by_hand():
    from actpatch.metrics import Metric, compute_metrics, normalise

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0, -2.0]])
    a, b = torch.tensor([0]), torch.tensor([1])
    clean_lp = torch.log_softmax(torch.tensor([[0.0, 0, 0, 0, 0, 0]]), -1)
    out = compute_metrics(list(Metric), logits, a, b, clean_lp)
    lp = torch.log_softmax(logits, -1)
    assert out[Metric.LOGIT_DIFF].item() == 1.0
    assert math.isclose(out[Metric.LOGPROB].item(), lp[0, 0].item(), rel_tol=1e-6)
    assert math.isclose(out[Metric.PROB].item(), lp[0, 0].exp().item(), rel_tol=1e-6)
    assert out[Metric.RANK].item() == 1.0 and out[Metric.ACCURACY].item() == 0.0 and out[Metric.TOP5_ACCURACY].item() == 1.0
    kl = (clean_lp.exp() * (clean_lp - lp)).sum()
    assert math.isclose(out[Metric.KL].item(), -kl.item(), rel_tol=1e-6)
    assert normalise(torch.tensor(0.5), 1.0, 0.0).item() == 0.5
    assert math.isnan(normalise(torch.tensor(0.5), 1.0, 1.0).item())


@pytest.mark.parametrize("kwargs, err, fragment", [
    (dict(target="resid_prez"), ap.errors.SiteError, "Unknown target 'resid_prez'"),
    (dict(target="resid_pre", layers=[7]), ap.errors.SiteError, r"layers=\[7\]: valid values are 0..2"),
    (dict(target="resid_pre", direction="sideways"), ap.ActpatchError, "Unknown direction 'sideways'"),
    (dict(target="resid_pre", metric="f1"), ap.errors.MetricError, "Unknown metric 'f1'"),
    (dict(target="resid_pre", corruption="blur"), ap.errors.CorruptionError, "Unknown corruption 'blur'"),
    (dict(target="resid_pre", window=0), ap.errors.SiteError, "window=0"),
])
def test_bad_sweep_arguments(llama, kwargs, err, fragment):
    with pytest.raises(err, match=fragment):
        ap.sweep(llama, _pairs(), progress=False, **kwargs)


def test_resid_mid_sweep_refused_for_parallel_family():
    m = tiny_model("gpt_neox")
    with pytest.raises(ap.errors.UnsupportedSiteError, match="resid_mid does not exist"):
        ap.sweep(m, _pairs(), "resid_mid", progress=False)
