"""The batched engine gives the reference engine's numbers (float32, 1e-5 absolute on raw
metrics) for every target, both directions, every family (MHA and GQA), prompts that differ at
several positions, sets of several lengths, every corruption, windows, and small chunks."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.testing import random_pairs, tiny_model

TOL = 1e-5


def _set(seed=0, lengths=(6, 8), n_per=3, diffs=((2,), (3, 5))):
    """Prompt pairs of several lengths; each length group has its own differing positions."""
    g = torch.Generator().manual_seed(seed)
    clean, corrupted, ans, alt = [], [], [], []
    for T, diff in zip(lengths, diffs):
        for _ in range(n_per):
            c = torch.randint(2, 60, (T,), generator=g)
            k = c.clone()
            for p in diff:
                k[p] = 2 + (c[p] - 2 + 1 + int(torch.randint(0, 30, (1,), generator=g))) % 58
            clean.append(c)
            corrupted.append(k)
            a = int(torch.randint(2, 60, (1,), generator=g))
            ans.append(a)
            alt.append(2 + (a - 2 + 5) % 58)
    return ap.PromptSet.from_ids(clean, corrupted, ans, alt)


def _same(model, prompts, target, tol=TOL, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("metric", ["logit_diff", "kl"])
    ref = ap.sweep(model, prompts, target, engine="reference", **kw)
    fast = ap.sweep(model, prompts, target, engine="batched", **kw)
    for m in ref.metrics:
        err = (fast.raw[m] - ref.raw[m]).abs().max().item()
        assert err <= tol, (target, m, err)
        torch.testing.assert_close(fast.clean[m], ref.clean[m], atol=tol, rtol=0)
        torch.testing.assert_close(fast.corrupted[m], ref.corrupted[m], atol=tol, rtol=0)
    assert fast.info.label == "batched" and ref.info.label == "reference"
    return ref, fast


ALL_POS = ["z", "q", "k", "v", "pattern"]
PER_POS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_target_every_family(tiny, direction):
    mixed = _set()
    one_len = _set(lengths=(7,), n_per=4, diffs=((1, 4),))
    for target in PER_POS:
        if target not in tiny.adapter.site_kinds:
            continue
        _same(tiny, one_len, target, direction=direction)
        _same(tiny, mixed, target, direction=direction, per_position=False)
    for target in ALL_POS:
        _same(tiny, mixed, target, direction=direction)
    _same(tiny, one_len, "z", direction=direction, per_position=True)
    _same(tiny, one_len, "pattern", direction=direction, per_position=True, layers=[1])
    if "mlp_post" in tiny.adapter.site_kinds:  # not in mixtures of experts
        _same(tiny, mixed, "mlp_post", direction=direction, neurons=range(0, 40, 7))
    # logit_diff alone: the batched engine computes only the answer / alternative logits (the
    # compact unembedding every default sweep uses, logit scales included); kl above needs all
    _same(tiny, one_len, "resid_pre", direction=direction, metric="logit_diff")
    _same(tiny, mixed, "z", direction=direction, metric="logit_diff")


@pytest.mark.parametrize("corruption", ["resample", "gaussian", "mean", "zero"])
def test_corruptions(corruption):
    m = tiny_model("llama_gqa", n_layers=3)
    ps = _set(lengths=(6,), n_per=4, diffs=((2, 3),))
    direction = "noise" if corruption in ("mean", "zero") else "denoise"
    c = ap.corruption.GaussianNoise(n_draws=3) if corruption == "gaussian" else corruption
    _same(m, ps, "resid_pre", direction=direction, corruption=c, seed=1)
    _same(m, ps, "z", direction=direction, corruption=c, seed=1)


def test_windows_small_chunks_and_subsets():
    m = tiny_model("qwen2", n_layers=3)
    ps = _set(lengths=(7,), n_per=3, diffs=((0, 5),))  # differs at the very first position
    _same(m, ps, "mlp_out", window=2)
    _same(m, ps, "resid_pre", chunk_size=1)
    _same(m, ps, "z", chunk_size=2, layers=[2, 0], heads=[3, 1])
    _same(m, ps, "attn_out", positions=[6, 0, 3], layers=[1])


def test_known_noops_are_not_run_and_score_the_base(monkeypatch):
    """Patches before the first differing position are never run, and score the base metric."""
    from actpatch.engine import batched

    m = tiny_model("llama", n_layers=2)
    ps = _set(lengths=(6,), n_per=2, diffs=((4,),))
    ran = []
    real = batched._run_chunk

    def spy(model, acts, source, chunk, *args):
        ran.extend(s for _, _, sites in chunk for s in sites)
        return real(model, acts, source, chunk, *args)

    monkeypatch.setattr(batched, "_run_chunk", spy)
    fast = ap.sweep(m, ps, "resid_pre", direction="denoise", engine="batched", progress=False)
    base = fast.corrupted["logit_diff"][:, None, None]
    assert torch.equal(fast.raw["logit_diff"][:, :, :4], base.expand(-1, 2, 4))
    assert {s.pos for s in ran} == {4, 5}  # only the patches at or after the first difference ran


def test_auto_engine_choice():
    m = tiny_model("gpt2")
    ps = _set(lengths=(6,), n_per=2, diffs=((2,),))
    assert ap.sweep(m, ps, "resid_pre", progress=False).info.label == "batched"
    assert ap.sweep(m, ps, "embed", progress=False).info.label == "reference"
    with pytest.raises(ap.ActpatchError, match="batched engine does not patch 'resid_final'"):
        ap.sweep(m, ps, "resid_final", engine="batched", progress=False)


@pytest.mark.slow
def test_bundled_model_ioi_batched_equals_reference(bundled):
    """30 layers of float32 on logit differences of ~5: eager (batched) against sdpa (reference)
    attention rounds differently, so the raw tolerance here is 1e-4."""
    ps = ap.prompts.ioi(bundled, n=3, templates=[0])
    for target, kw in (("resid_pre", {"layers": [0, 9, 21, 29]}), ("z", {"layers": [20, 24]})):
        ref, fast = _same(bundled, ps, target, tol=1e-4, metric="logit_diff", **kw)  # raw logit units
        err = (fast.raw["logit_diff"] - ref.raw["logit_diff"]).abs().max().item()
        print(f"\n{target}: max |batched - reference| = {err:.2e} logits")


def test_chunks_shrink_after_out_of_memory(monkeypatch):
    """An out-of-memory error halves the patches per forward pass (kept for the rest) instead of
    failing; the values are those of an unconstrained run. One patch that does not fit is one
    clear EngineError."""
    import actpatch.engine.batched as eng

    m = tiny_model("llama", n_layers=3)
    ps = random_pairs(n=2, T=6)
    kw = dict(direction="denoise", engine="batched", chunk_size=16, progress=False, neurons=range(8))  # 24 patches, one start
    expected = ap.sweep(m, ps, "mlp_post", **kw)
    real, sizes = eng._run_chunk, []

    def limited(model, acts, source, chunk, *args):
        sizes.append(len(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, acts, source, chunk, *args)

    monkeypatch.setattr(eng, "_run_chunk", limited)
    got = ap.sweep(m, ps, "mlp_post", **kw)
    torch.testing.assert_close(got.raw["logit_diff"], expected.raw["logit_diff"], atol=1e-5, rtol=0)
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) <= 2  # halved until it fits, then kept small

    def never(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(eng, "_run_chunk", never)
    with pytest.raises(ap.errors.EngineError, match="Out of memory patching one patch of 2 prompts"):
        ap.sweep(m, ps, "resid_pre", direction="denoise", engine="batched", progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("softcap,window", [(None, None), (30.0, 3)])
def test_a_shared_prefix_equals_each_row_its_own_copy(dtype, softcap, window):
    """The batched engine's K patches of Bp prompts read their prompts' cached keys / values in
    place (one product per prompt and KV head): equal to attention over every row's own copy of
    the prefix joined to its suffix keys (GQA 6 query heads over 2 KV heads; soft-capping and a
    sliding window of 3 positions). Float64 to 1e-12; bfloat16 within one rounding of its outputs
    (the partial products are summed in float32)."""
    from actpatch.models.attention import _actpatch_attention

    g = torch.Generator().manual_seed(0)
    K, Bp, H, kvh, D, P, Tq = 3, 2, 6, 2, 8, 5, 4
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = rand(K * Bp, H, Tq, D), rand(K * Bp, kvh, Tq, D), rand(K * Bp, kvh, Tq, D)
    kp, vp = rand(Bp, kvh, P, D), rand(Bp, kvh, P, D)
    module = torch.nn.Module()
    module.sliding_window = window
    m = tiny_model("llama", n_layers=1)
    with m.attention_fn(), m.attention_state.key_value_prefix({module: (kp, vp)}), \
            m.attention_state.hooked([(module, ap.SiteKind.PATTERN, 0, lambda x: None)]):
        shared, pattern = _actpatch_attention(module, q, k, v, None, softcap=softcap)
    rows = torch.arange(K * Bp) % Bp  # row r continues prompt r % Bp
    full_k, full_v = torch.cat([kp[rows], k], 2), torch.cat([vp[rows], v], 2)
    own, own_pattern = _actpatch_attention(module, q, full_k, full_v, None, softcap=softcap)
    assert pattern.shape == own_pattern.shape == (K * Bp, H, Tq, P + Tq)
    if window:  # queries at positions 5..8 see 3 positions back: prefix keys 0..2 never, 3 and 4 sometimes
        assert bool((own_pattern[..., :3] == 0).all()) and bool((own_pattern[..., 3:P] > 0).any())
    tol = 1e-12 if dtype == torch.float64 else 2 ** -7
    assert torch.allclose(shared.double(), own.double(), rtol=tol, atol=tol)
    assert torch.allclose(pattern.double(), own_pattern.double(), rtol=tol, atol=tol)


def test_host_chunks_stay_within_the_cache_budget(monkeypatch):
    """On the host a chunk holds as many patches as keep its MLP activations within
    CACHE_BYTES (the budget alone would run every head in one chunk), with the same values."""
    from actpatch.engine import batched

    m = tiny_model("llama", n_layers=3)
    m.hf.double()
    ps = _set(lengths=(7,), n_per=2, diffs=((3,),))
    whole = ap.sweep(m, ps, "z", direction="denoise", progress=False)
    sizes = []
    real = batched._run_chunk

    def spy(model, acts, source, chunk, *args):
        sizes.append(len(chunk))
        return real(model, acts, source, chunk, *args)

    monkeypatch.setattr(batched, "_run_chunk", spy)
    per_patch = 2 * (7 - 3) * m.d_mlp * 8  # 2 prompts x 4 suffix positions, float64
    monkeypatch.setattr(batched, "CACHE_BYTES", 5 * per_patch)
    assert batched.cache_patches(m, 2 * 4) == 5
    small = ap.sweep(m, ps, "z", direction="denoise", progress=False)
    n_heads = 3 * m.n_heads
    assert sizes == [5] * (n_heads // 5) + ([n_heads % 5] if n_heads % 5 else [])
    assert torch.allclose(small.raw["logit_diff"], whole.raw["logit_diff"], rtol=1e-9, atol=1e-12)
