"""GradDrop (AtP*): against a slow reference, on a model built to cancel, and its edges."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import actpatch as ap
from actpatch.testing import cancel_model, random_pairs, tiny_model


@contextmanager
def _detach_layer(model, layer):
    """Reference mechanism, independent of actpatch's hooks: block ``layer``'s output becomes
    ``input + (output - input).detach()``, so no gradient passes through its contribution."""
    block = model.adapter.blocks[layer]
    inputs = []

    def pre(mod, args, kwargs):
        inputs[:] = [args[0] if args else kwargs["hidden_states"]]

    def post(mod, args, out):
        first = out[0] if isinstance(out, tuple) else out
        new = inputs[0] + (first - inputs[0]).detach()
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _effects(res):
    """Per-prompt estimated change of the metric, (n, *grid)."""
    base = (res.clean if res.info.direction is ap.Direction.NOISE else res.corrupted)["logit_diff"]
    return res.raw["logit_diff"] - base.view(-1, *[1] * len(res.dims))


def _reference(model, prompts, target, **kw):
    """sum over dropped layers of |plain AtP estimate| / (L - 1), one plain AtP per layer."""
    total = 0.0
    for layer in range(model.n_layers):
        with _detach_layer(model, layer):
            total = total + _effects(ap.attribute(model, prompts, target, **kw)).abs()
    return total / (model.n_layers - 1)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gpt_neox", "gemma2"])
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_graddrop_equals_the_per_layer_reference(family, direction):
    m = tiny_model(family, n_layers=3, seed=1)
    ps = random_pairs(n=3, T=6, diff=(2, 4), seed=1)
    for target, kw in (("z", {}), ("mlp_out", {"per_position": True}), ("mlp_post", {"neurons": range(0, 64, 7)}),
                       ("v", {"per_position": True, "layers": [0, 2]}), ("attn_out", {"layers": [1, 2]})):
        gd = ap.attribute(m, ps, target, direction=direction, grad_drop=True, **kw)
        ref = _reference(m, ps, target, direction=direction, **kw)
        mag = _effects(gd).abs()
        assert gd.info.label == "atp+graddrop" and gd.info.estimate is ap.types.Estimate.MAGNITUDE
        assert ref.abs().max() > 1e-3  # not trivial
        err = (mag - ref).abs().max().item()
        assert err < 1e-4 * (1 + ref.abs().max().item()), (target, err)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_graddrop_with_multi_token_answers_equals_the_per_layer_reference(family):
    """Teacher-forced answers: dropping a layer drops its contribution at the continuation's
    positions too, as the reference's detached block does at every position."""
    m = tiny_model(family, n_layers=3, seed=1)
    ps = ap.PromptSet.from_pairs(m, [
        ("When Mary and John went to the store", "When Alice and John went to the store", " Mary gave", " John"),
        ("When Paul and Sara went to the school", "When Paul and Lucy went to the school", " Sara is", " Rome city of"),
    ])
    assert ps.multi_token
    for target, kw in (("z", {}), ("mlp_out", {"per_position": True})):
        gd = ap.attribute(m, ps, target, direction="noise", grad_drop=True, **kw)
        ref = _reference(m, ps, target, direction="noise", **kw)
        assert ref.abs().max() > 1e-3
        err = (_effects(gd).abs() - ref).abs().max().item()
        assert err < 1e-4 * (1 + ref.abs().max().item()), (target, err)


def test_graddrop_of_the_last_layer_is_plain_atp_and_earlier_layers_differ():
    m = tiny_model("llama", n_layers=3, seed=2)
    ps = random_pairs(n=2, seed=2)
    plain = _effects(ap.attribute(m, ps, "z")).abs()
    gd = _effects(ap.attribute(m, ps, "z", grad_drop=True)).abs()
    torch.testing.assert_close(gd[:, -1], plain[:, -1], atol=1e-5, rtol=1e-5)
    assert (gd[:, 0] - plain[:, 0]).abs().max() > 1e-3


def test_graddrop_finds_the_cancelling_neuron_that_atp_misses():
    """Derivation in actpatch.testing.cancel_model: clean LD 2, corrupted 0. Noising A: exact
    LD 0 (value 0); AtP: gradient 0 (value 1); GradDrop: dropping layer 1 leaves the direct
    gradient 2c = 4, |4 * -1| / (L - 1) = 4, i.e. 2 in units of clean - corrupted (value -1).
    Noising N: exact and AtP LD 4 (value 2); GradDrop |2| (value 1 - 1 = 0, sign lost)."""
    m, ps = cancel_model()
    kw = dict(neurons=[0], direction="noise")
    exact = ap.sweep(m, ps, "mlp_post", progress=False, **kw)
    atp = ap.attribute(m, ps, "mlp_post", **kw)
    gd = ap.attribute(m, ps, "mlp_post", grad_drop=True, **kw)
    assert exact.baselines["logit_diff"] == {"clean": 2.0, "corrupted": 0.0}
    torch.testing.assert_close(exact.values.flatten(), torch.tensor([0.0, 2.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(atp.values.flatten(), torch.tensor([1.0, 2.0], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(gd.values.flatten(), torch.tensor([-1.0, 0.0], dtype=torch.float64), atol=1e-5, rtol=0)
    assert "attribution_magnitude" in {f.code for f in gd.findings}
    # validation ranks magnitudes: the cancelling neuron is the top cell, and agrees with exact
    check = ap.validate_attribution(m, ps, gd, k=2, n_random=0)
    assert check.cells[0] == (0, 0)


def test_atp_star_combines_qk_fix_and_graddrop():
    m = tiny_model("gpt2", n_layers=3, seed=4)
    ps = random_pairs(n=2, seed=4)
    kw = dict(layers=[0, 1], per_position=True, positions=[2, 4, 5])
    star = ap.attribute(m, ps, "k", qk_fix=True, grad_drop=True, **kw)
    assert star.info.label == "atp*"
    total = 0.0
    for layer in range(m.n_layers):
        with _detach_layer(m, layer):
            total = total + _effects(ap.attribute(m, ps, "k", qk_fix=True, **kw)).abs()
    torch.testing.assert_close(_effects(star).abs(), total / (m.n_layers - 1), atol=1e-5, rtol=1e-4)
    assert ap.attribute(m, ps, "k", qk_fix=True, **kw).info.label == "atp+qk_fix"


def test_graddrop_bad_input():
    m = tiny_model("gpt2", n_layers=2)
    ps = random_pairs(n=2)
    with pytest.raises(ap.ActpatchError, match="not 'resid_pre'.*residual stream"):
        ap.attribute(m, ps, "resid_pre", grad_drop=True)
    with pytest.raises(ap.ActpatchError, match="window=2 spans layers"):
        ap.attribute(m, ps, "mlp_out", window=2, grad_drop=True)
    one = tiny_model("gpt2", n_layers=1)
    with pytest.raises(ap.ActpatchError, match="at least two layers"):
        ap.attribute(one, ps, "z", grad_drop=True)


def test_compare_refuses_magnitudes():
    m, ps = cancel_model()
    kw = dict(neurons=[0], grad_drop=True)
    with pytest.raises(ap.errors.ResultError, match="GradDrop result .* holds magnitudes"):
        ap.compare(ap.attribute(m, ps, "mlp_post", direction="denoise", **kw), ap.attribute(m, ps, "mlp_post", **kw))
