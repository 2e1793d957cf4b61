"""Path patching's batched path (many sender sets per pass, layers that cannot change skipped)
against the reference path (two full forward passes per sender set), on tiny models."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch import Site
from actpatch.testing import tiny_model


def _pairs(n: int = 3, T: int = 6, seed: int = 0) -> ap.PromptSet:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 60, (n, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(3, 60, (n,), generator=g)
    corrupted[:, T - 2] = torch.randint(3, 60, (n,), generator=g)
    return ap.PromptSet.from_ids(clean.tolist(), corrupted.tolist(), [7] * n, [8] * n)


RECEIVERS = {
    "final": [Site("resid_final")],
    "q": [Site("q", 2, head=1)],
    "k_v": [Site("k", 3, head=0), Site("v", 2)],
    "ungrouped_and_pos": [Site("k_ungrouped", 3, head=3, pos=4), Site("q", 1, head=0, pos=5)],
    "mixed_final": [Site("q", 2, head=2), Site("resid_final", pos=5)],
    "final_elsewhere": [Site("resid_final", pos=3)],  # not the position the readout reads
    "heads_and_final_elsewhere": [Site("q", 2, head=2), Site("resid_final", pos=3)],
}


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("receivers", list(RECEIVERS), ids=list(RECEIVERS))
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_batched_path_sweep_equals_the_reference(family, receivers, direction):
    m = tiny_model(family, n_layers=4)
    recv = [r for r in RECEIVERS[receivers] if r.head is None or r.head < (m.n_kv_heads if r.kind.value in "kv" else m.n_heads)]
    ps = _pairs()
    metric = ["logit_diff", "kl"]
    fast = ap.path_sweep(m, ps, recv, direction=direction, metric=metric, progress=False, unit_size=5)
    ref = ap.path_sweep(m, ps, recv, direction=direction, metric=metric, progress=False, engine="reference")
    for name in metric:
        torch.testing.assert_close(fast.raw[name], ref.raw[name], atol=1e-5, rtol=0)
    base = (ref.clean if direction == "noise" else ref.corrupted)["logit_diff"]
    moved = (ref.raw["logit_diff"] - base[:, None, None]).abs().max()
    if receivers != "final_elsewhere":
        assert moved > 1e-4  # some sender reaches the receivers: not trivially the base run
    else:
        assert moved < 1e-5


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_batched_sender_sets_of_mlps_and_positioned_heads_equal_the_reference(family):
    """Sender sets mixing MLP outputs and heads at one position, of several layers in one batch,
    including sets entirely after the receivers."""
    m = tiny_model(family, n_layers=4)
    ps = _pairs(n=2, T=7, seed=1)
    sets = [[Site("mlp_out", 0)], [Site("z", 1, head=2, pos=5), Site("mlp_out", 2)], [Site("z", 3, head=0)],
            [Site("mlp_out", 1, pos=2)], [Site("z", 0, pos=5)]]
    for recv in ([Site("q", 2)], [Site("resid_final")], [Site("v", 3, head=1), Site("q", 1, head=0)]):
        for s in sets:
            fast = ap.path_patch(m, ps, s, recv)
            ref = ap.path_patch(m, ps, s, recv, engine="reference")
            torch.testing.assert_close(fast.raw["logit_diff"], ref.raw["logit_diff"], atol=1e-5, rtol=0)
    mlps = ap.path_sweep(m, ps, [Site("resid_final")], sender="mlp_out", progress=False)
    mlps_ref = ap.path_sweep(m, ps, [Site("resid_final")], sender="mlp_out", progress=False, engine="reference")
    torch.testing.assert_close(mlps.raw["logit_diff"], mlps_ref.raw["logit_diff"], atol=1e-5, rtol=0)


def test_batched_path_with_noise_corruption_and_chunking(monkeypatch):
    """Gaussian-noise corruption (an embedding hook the skipped layers never see) and a memory
    budget of one prompt and one sender set per pass."""
    from actpatch.techniques.path import path_memory_plan
    from actpatch.types import Engine

    m = tiny_model("llama", n_layers=3)
    ps = _pairs()
    corr = ap.corruption.GaussianNoise(scale=0.5, n_draws=1)
    ref = ap.path_sweep(m, ps, [Site("q", 2)], corruption=corr, progress=False, engine="reference")
    cells = [((Site("z", l, head=h),), (Site("q", 2),)) for l in range(m.n_layers) for h in range(m.n_heads)]
    one = path_memory_plan(m, ps, cells, Engine.AUTO, None).per_row
    import actpatch.techniques.path as path

    sizes: list[int] = []
    batched = path._paths_batched
    monkeypatch.setattr(path, "_paths_batched", lambda model, state, chunk: (sizes.append((state.runs.rows, len(chunk))),
                                                                            batched(model, state, chunk))[1])
    fast = ap.path_sweep(m, ps, [Site("q", 2)], corruption=corr, progress=False, memory_budget=one)
    assert set(sizes) == {(1, 1)} and len(sizes) == len(ps) * len(cells)  # one prompt, one sender set a pass
    torch.testing.assert_close(fast.raw["logit_diff"], ref.raw["logit_diff"], atol=1e-5, rtol=0)
    assert (ref.raw["logit_diff"][:, :2] - ref.clean["logit_diff"][:, None, None]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["q", "k", "v_ungrouped"])
def test_receiver_sweep_cells_equal_single_path_patches(kind):
    m = tiny_model("llama_gqa", n_layers=3)
    ps = _pairs()
    senders = [Site("z", 0, head=1), Site("mlp_out", 1)]
    res = ap.path_sweep(m, ps, kind, senders=senders, progress=False, unit_size=4)
    ref = ap.path_sweep(m, ps, kind, senders=senders, progress=False, engine="reference")
    n_heads = m.n_kv_heads if kind == "k" else m.n_heads
    assert res.dims == ("layer", "kv_head" if kind == "k" else "head") and res.shape == (3, n_heads)
    torch.testing.assert_close(res.raw["logit_diff"], ref.raw["logit_diff"], atol=1e-5, rtol=0)
    for l, h in [(1, 0), (2, n_heads - 1)]:
        one = ap.path_patch(m, ps, senders, [Site(kind, l, head=h)], engine="reference")
        torch.testing.assert_close(res.raw["logit_diff"][:, l, h], one.raw["logit_diff"], atol=1e-5, rtol=0)
    # layer 0 reads nothing the senders wrote: the clean run exactly; later layers move
    assert (res.raw["logit_diff"][:, 0] - res.clean["logit_diff"][:, None]).abs().max() < 1e-5
    assert (res.raw["logit_diff"][:, 1:] - res.clean["logit_diff"][:, None, None]).abs().max() > 1e-4


def test_named_positions_resolve_per_prompt_layout():
    """Senders at "end" and a receiver's query at "first_diff", on pairs of two lengths whose
    differences sit at different indices: each layout's prompts equal the integer-position run."""
    m = tiny_model("llama", n_layers=3)
    short = [[5, 6, 7, 8, 9], [5, 6, 11, 8, 9]]
    long_ = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 12, 9, 10]]
    ps = ap.PromptSet.from_ids([short[0], long_[0], short[0]], [short[1], long_[1], short[1]], [7, 7, 20], [8, 8, 21])
    senders = [Site("z", 0, pos="first_diff"), Site("mlp_out", 1, pos="end")]
    recv = [Site("q", 2, head=1, pos="end")]
    named = ap.path_patch(m, ps, senders, recv)
    for idx, first, end in (([0, 2], 2, 4), ([1], 3, 5)):
        sub = ps.subset(idx)
        want = ap.path_patch(m, sub, [Site("z", 0, pos=first), Site("mlp_out", 1, pos=end)],
                             [Site("q", 2, head=1, pos=end)], engine="reference")
        torch.testing.assert_close(named.raw["logit_diff"][idx], want.raw["logit_diff"], atol=1e-5, rtol=0)
    # (every head frozen: a sender reaches another position's query through no path, so keys at its own)
    sweep = ap.path_sweep(m, ps, [Site("k", 2, pos="first_diff")], pos="first_diff", progress=False)
    for idx, first, end in (([0, 2], 2, 4), ([1], 3, 5)):
        want = ap.path_sweep(m, ps.subset(idx), [Site("k", 2, pos=first)], pos=first, progress=False, engine="reference")
        torch.testing.assert_close(sweep.raw["logit_diff"][idx], want.raw["logit_diff"], atol=1e-5, rtol=0)
    into = ap.path_sweep(m, ps, "k", senders=[Site("z", 0, pos="first_diff")], pos="first_diff", progress=False)
    want = ap.path_sweep(m, ps.subset([1]), "k", senders=[Site("z", 0, pos=3)], pos=3, progress=False)
    torch.testing.assert_close(into.raw["logit_diff"][[1]], want.raw["logit_diff"], atol=1e-5, rtol=0)
    assert (sweep.raw["logit_diff"] - sweep.clean["logit_diff"][:, None, None]).abs().max() > 1e-4


def test_receiver_sweep_bad_input():
    m = tiny_model("gpt2")
    with pytest.raises(ap.errors.SiteError, match="receiver='resid_final'"):
        ap.path_sweep(m, _pairs(), "resid_final", senders=[Site("z", 0)])
    with pytest.raises(ap.errors.SiteError, match="Sender q.L0"):
        ap.path_sweep(m, _pairs(), "q", senders=[Site("q", 0)])
    with pytest.raises(ap.errors.SiteError, match="give senders="):
        ap.path_sweep(m, _pairs(), "q")
    with pytest.raises(ap.errors.SiteError, match="senders=... goes with"):
        ap.path_sweep(m, _pairs(), [Site("q", 1)], senders=[Site("z", 0)])
    with pytest.raises(ap.errors.SiteError, match="store="):
        ap.path_sweep(m, _pairs(), [Site("q", 1, pos="end")], store=object())
