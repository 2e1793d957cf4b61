"""Hooks on every family: identities that must hold to float precision, hand-computed attention."""

from __future__ import annotations

import math

import pytest
import torch

import actpatch as ap
from actpatch import Site
from actpatch.models import attention as attn_mod
from actpatch.testing import TINY_FAMILIES, tiny_model

ALL_KINDS = ["embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "k_ungrouped", "v_ungrouped",
             "pattern", "mlp_post", "resid_final"]


PARALLEL = ("gpt_neox", "stablelm", "phi", "gptj", "cohere")


def _sites(model, layer=1):
    out = []
    for k in ALL_KINDS:
        if k not in model.adapter.site_kinds:  # resid_mid of parallel blocks, mlp_post of experts
            continue
        out.append(Site(k) if k in ("embed", "resid_final") else Site(k, layer))
    return out


def test_z_through_output_projection_reproduces_attn_out(tiny, ids):
    a = tiny.adapter
    for layer in range(tiny.n_layers):
        with ap.capture(tiny, [Site("z", layer), Site("attn_out", layer)]) as acts:
            tiny.logits(ids)
        z = acts[Site("z", layer)]  # (B, T, H, D)
        with torch.no_grad():
            out = a.block_module(layer, a.spec.o_proj)(z.flatten(-2))
            if a.spec.attn_out != a.spec.attn:  # Gemma 2 normalises the attention output
                out = a.block_module(layer, a.spec.attn_out)(out)
        torch.testing.assert_close(out, acts[Site("attn_out", layer)], atol=1e-5, rtol=0)


def test_writing_back_captured_activations_changes_nothing(tiny, ids):
    # Each site on its own: q / k / v / pattern sites route attention through the eager
    # actpatch function, so base and patched runs must use the same attention path.
    for s in _sites(tiny):
        with ap.capture(tiny, [s]) as acts:
            base = tiny.logits(ids)
        with ap.intervene(tiny, {s: acts[s]}):
            patched = tiny.logits(ids)
        assert (patched - base).abs().max().item() <= 1e-6, s


def test_residual_identities(tiny, ids):
    sites = [Site(k, l) for l in range(tiny.n_layers) for k in ("resid_pre", "resid_post", "attn_out", "mlp_out")]
    if "resid_mid" in tiny.adapter.site_kinds:
        sites += [Site("resid_mid", l) for l in range(tiny.n_layers)]
    with ap.capture(tiny, sites + [Site("resid_final")]) as a:
        tiny.logits(ids)
    for l in range(tiny.n_layers):
        pre, post = a[Site("resid_pre", l)], a[Site("resid_post", l)]
        # what attention and the MLP add (Granite scales both by its residual multiplier)
        att, mlp = (tiny.adapter.residual_write(a[Site(k, l)]) for k in ("attn_out", "mlp_out"))
        nxt = a[Site("resid_pre", l + 1)] if l + 1 < tiny.n_layers else a[Site("resid_final")]
        assert torch.equal(post, nxt)
        if tiny.adapter.parallel:
            torch.testing.assert_close(post, pre + att + mlp, atol=1e-5, rtol=0)
        else:
            mid = a[Site("resid_mid", l)]
            torch.testing.assert_close(mid, pre + att, atol=1e-5, rtol=0)
            torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=0)


def test_patterns_sum_to_one_and_are_causal(tiny, ids):
    with ap.capture(tiny, [Site("pattern", l) for l in range(tiny.n_layers)]) as a:
        tiny.logits(ids)
    for l in range(tiny.n_layers):
        p = a[Site("pattern", l)]
        assert p.shape == (ids.shape[0], tiny.n_heads, ids.shape[1], ids.shape[1])
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)
        assert p.triu(diagonal=1).abs().max().item() == 0.0
        assert p.std().item() > 0.01  # not uniform: the tiny models attend selectively


def _hand_attention(model, layer, q, k, v, pattern=None):
    """Eager attention for one layer from (B, T, H, D) q and (B, T, KVH, D) k / v."""
    module = model.adapter.block_module(layer, model.adapter.spec.attn)
    cfg = model.hf.config
    groups = model.n_heads // model.n_kv_heads
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(groups, 1)
    vh = v.transpose(1, 2).repeat_interleave(groups, 1)
    scores = qh @ kh.transpose(-1, -2) * module.scaling
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    T = q.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = j <= i
    types, window = getattr(cfg, "layer_types", None), getattr(cfg, "sliding_window", None)
    if window and (types[layer] == "sliding_attention" if types else True):  # Mistral / StarCoder2: every layer
        allowed = allowed & (i - j < window)
    scores = scores.masked_fill(~allowed, -math.inf)
    if pattern is None:
        pattern = scores.softmax(-1)
    return (pattern @ vh).transpose(1, 2)  # (B, T, H, D) = z


@pytest.mark.parametrize("kind", ["q", "k", "v", "pattern"])
def test_written_qkv_pattern_match_hand_computed_attention(tiny, ids, kind):
    layer, head = 1, 1
    full = [Site(k, layer) for k in ("q", "k", "v", "pattern", "z")]
    with ap.capture(tiny, full) as clean:
        tiny.logits(ids)
    g = torch.Generator().manual_seed(1)
    target = Site(kind, layer, head=head)
    current = clean[target.full()][target.selector()]
    new = current + torch.randn(current.shape, generator=g) * current.std()
    if kind == "pattern":  # a valid causal pattern for this head
        new = torch.rand(current.shape, generator=g).tril()
        new = new / new.sum(-1, keepdim=True)
    with ap.intervene(tiny, {target: new}), ap.capture(tiny, full) as patched:
        tiny.logits(ids)
    assert torch.equal(patched[target.full()][target.selector()], new)
    q, k, v = (patched[Site(x, layer)] for x in "qkv")
    expected = _hand_attention(tiny, layer, q, k, v, patched[Site("pattern", layer)] if kind == "pattern" else None)
    torch.testing.assert_close(patched[Site("z", layer)], expected, atol=1e-5, rtol=1e-5)
    # The change matters: z moved for the affected head(s).
    assert (patched[Site("z", layer)] - clean[Site("z", layer)]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f not in PARALLEL])  # parallel: no resid_mid
def test_resid_mid_write_flows_into_mlp_and_residual(family, ids):
    tiny = tiny_model(family, n_layers=3)
    l = 0
    new = torch.randn(ids.shape[0], ids.shape[1], tiny.d_model)
    with ap.intervene(tiny, {Site("resid_mid", l): new}), ap.capture(
        tiny, [Site("resid_mid", l), Site("mlp_out", l), Site("resid_post", l)]
    ) as a:
        tiny.logits(ids)
    assert torch.equal(a[Site("resid_mid", l)], new)
    torch.testing.assert_close(a[Site("resid_post", l)], new + tiny.adapter.residual_write(a[Site("mlp_out", l)]),
                               atol=1e-5, rtol=0)


def test_sliced_write_touches_only_its_slice(tiny, ids):
    s = Site("z", 0, head=2, pos=3)
    with ap.capture(tiny, [Site("z", 0)]) as before:
        tiny.logits(ids)
    with ap.intervene(tiny, {s: 0.0}), ap.capture(tiny, [Site("z", 0)]) as after:
        tiny.logits(ids)
    z0, z1 = before[Site("z", 0)], after[Site("z", 0)]
    assert z1[:, 3, 2].abs().max().item() == 0.0
    mask = torch.ones_like(z0, dtype=torch.bool)
    mask[:, 3, 2] = False
    assert torch.equal(z0[mask], z1[mask])  # earlier positions and other heads untouched at layer 0


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def test_hooks_removed_after_exception(tiny, ids):
    impl = tiny.hf.config._attn_implementation
    n = _hook_count(tiny)
    sites = _sites(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with ap.capture(tiny, sites), ap.intervene(tiny, {s: (lambda x: x) for s in sites}):
            tiny.logits(ids)
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="bad fn"):
        def bad(x):
            raise ValueError("bad fn")
        with ap.intervene(tiny, {Site("q", 0): bad}):
            tiny.logits(ids)
    assert _hook_count(tiny) == n
    assert tiny.hf.config._attn_implementation == impl
    assert not tiny.hook_points and not tiny.attention_state.hooks and not tiny.attention_state.prefix
    assert attn_mod._ACTIVE.get() == ()  # no model is left in attention mode


def _state(hf):
    """Everything a context could leave behind on the user's model: every module's attributes,
    hooks and the config's attention implementation."""
    return ({name: sorted(vars(m)) for name, m in hf.named_modules()}, _hook_count_hf(hf),
            hf.config._attn_implementation, sorted(vars(hf.config)))


def _hook_count_hf(hf):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())


def test_user_model_is_left_exactly_as_it_was(tiny, ids):
    """No attribute written onto the user's HF model or config survives a context, also when
    the forward pass raises; two handles on one HF model keep separate hook state."""
    before = _state(tiny.hf)
    sites = _sites(tiny)
    with ap.capture(tiny, sites), ap.intervene(tiny, {s: (lambda x: x) for s in sites}):
        tiny.logits(ids)
    assert _state(tiny.hf) == before
    with pytest.raises(RuntimeError, match="boom"):
        with tiny.attention_fn(), ap.capture(tiny, [Site("pattern", 0)]):
            assert tiny.hf.config._attn_implementation == "actpatch"
            raise RuntimeError("boom")
    assert _state(tiny.hf) == before
    other = ap.Model(tiny.hf, tiny.tokenizer, name="second handle")
    with ap.capture(other, [Site("q", 0)]):
        assert other.attention_state.hooks and not tiny.attention_state.hooks
    assert _state(tiny.hf) == before


def test_intervention_inside_attention_leaves_user_impl(tiny, ids):
    impl = tiny.hf.config._attn_implementation
    with ap.capture(tiny, [Site("pattern", 0)]):
        assert tiny.hf.config._attn_implementation == "actpatch"
        with ap.capture(tiny, [Site("q", 0)]):
            pass
        assert tiny.hf.config._attn_implementation == "actpatch"
    assert tiny.hf.config._attn_implementation == impl


def test_nested_writes_apply_outer_then_inner_and_reads_see_result(tiny, ids):
    s = Site("resid_pre", 1)
    with ap.capture(tiny, [s]) as seen:
        with ap.intervene(tiny, {s: lambda x: x + 1.0}):
            with ap.intervene(tiny, {s: lambda x: x * 0.0 + 5.0}):
                tiny.logits(ids)
    assert torch.all(seen[s] == 5.0)  # inner write last, capture (outer) still after both
    with ap.intervene(tiny, {s: 5.0}):
        with ap.intervene(tiny, {s: lambda x: x + 1.0}):
            with ap.capture(tiny, [s]) as seen2:
                tiny.logits(ids)
    assert torch.all(seen2[s] == 6.0)


def test_resid_mid_and_resid_post_writes_on_one_block(ids):
    m = tiny_model("llama", n_layers=3)
    with ap.intervene(m, {Site("resid_post", 0): 2.0, Site("resid_mid", 0): 1.0}), ap.capture(
        m, [Site("resid_pre", 1)]
    ) as a:
        m.logits(ids)
    assert torch.all(a[Site("resid_pre", 1)] == 2.0)  # the later site in the block wins


def test_stop_after_ends_the_pass_once_the_site_is_computed():
    from actpatch.hooks import capture, intervene, stop_after

    m = tiny_model("llama", n_layers=3)
    ids = torch.tensor([[2, 3, 4, 5]])
    with capture(m, [Site("q", 1), Site("v", 1)]) as full:
        m.logits(ids)
    seen = []
    with capture(m, [Site("q", 1), Site("v", 1)]) as early, stop_after(m, Site("v", 1)), \
            intervene(m, {Site("mlp_out", 1): lambda x: seen.append(1)}):
        m.logits(ids)
    assert not seen  # layer 1's MLP never ran
    for s in full:  # what was computed before the stop is what a whole pass computes
        torch.testing.assert_close(early[s], full[s], atol=0, rtol=0)
    with pytest.raises(ap.errors.SiteError):
        with stop_after(m, Site("v", 7)):
            pass
