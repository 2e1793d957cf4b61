"""k_ungrouped / v_ungrouped: the keys and values as each query head reads them.

The reference is an independent model: the grouped-query model's ungrouped copy (one KV head per
query head, its projections' rows repeated), whose plain ``k`` / ``v`` sites are the ungrouped
sites of the original."""

from __future__ import annotations

import functools

import pytest
import torch

import actpatch as ap
from actpatch import Site
from actpatch.errors import SiteError
from actpatch.testing import UNGROUPABLE, tiny_model, ungrouped_copy


@functools.lru_cache(maxsize=None)
def _pair(family: str):
    m = tiny_model(family, n_layers=3)
    return m, ungrouped_copy(m)


IDS = torch.tensor([[2, 5, 9, 11, 4, 7], [3, 8, 9, 12, 4, 6]])


@pytest.mark.parametrize("family", UNGROUPABLE)
def test_ungrouped_sites_are_the_ungrouped_models_keys_and_values(family):
    m, wide = _pair(family)
    g = m.n_heads // m.n_kv_heads
    assert g > 1 and wide.n_kv_heads == m.n_heads
    sites = [Site(k, 1) for k in ("k", "v", "k_ungrouped", "v_ungrouped")]
    with ap.capture(m, sites) as a:
        logits = m.logits(IDS)
    with ap.capture(wide, [Site("k", 1), Site("v", 1)]) as b:
        wide_logits = wide.logits(IDS)
    assert (logits - wide_logits).abs().max() < 1e-5
    for kind in ("k", "v"):
        ungrouped = a[Site(f"{kind}_ungrouped", 1)]
        assert ungrouped.shape == (2, 6, m.n_heads, m.d_head)
        torch.testing.assert_close(ungrouped, a[Site(kind, 1)].repeat_interleave(g, 2), atol=0, rtol=0)
        torch.testing.assert_close(ungrouped, b[Site(kind, 1)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", UNGROUPABLE)
def test_writing_one_query_heads_key_equals_writing_that_head_in_the_ungrouped_model(family):
    m, wide = _pair(family)
    g = torch.Generator().manual_seed(1)
    for kind in ("k", "v"):
        for head in (0, m.n_heads - 1):
            value = torch.randn(2, 3, m.d_head, generator=g)  # positions 2..4 of query head `head`
            ours = Site(f"{kind}_ungrouped", 2, head=head)
            with ap.intervene(m, {Site(ours.kind, 2, head=head, pos=p): value[:, i] for i, p in enumerate((2, 3, 4))}):
                got = m.logits(IDS)
            with ap.intervene(wide, {Site(kind, 2, head=head, pos=p): value[:, i] for i, p in enumerate((2, 3, 4))}):
                want = wide.logits(IDS)
            assert (got - want).abs().max() < 1e-5, (kind, head)
            # and it is not the grouped write: the other heads of the group keep their keys
            with ap.intervene(m, {Site(kind, 2, head=head // (m.n_heads // m.n_kv_heads), pos=p): value[:, i]
                                  for i, p in enumerate((2, 3, 4))}):
                grouped = m.logits(IDS)
            assert (got - grouped).abs().max() > 1e-3, (kind, head)


def test_sweeps_of_ungrouped_keys_batched_equal_reference_and_the_ungrouped_model():
    m, wide = _pair("llama_gqa")
    ps = ap.PromptSet.from_ids(IDS.tolist(), [[2, 5, 10, 11, 4, 7], [3, 8, 10, 12, 4, 6]], [13, 14], [14, 13])
    fast = ap.sweep(m, ps, "k_ungrouped", engine="batched", progress=False)
    ref = ap.sweep(m, ps, "k_ungrouped", engine="reference", progress=False)
    other = ap.sweep(wide, ps, "k", engine="reference", progress=False)
    assert fast.raw[fast.metric].shape == (2, 3, m.n_heads)  # (prompts, layers, heads)
    assert (fast.raw[fast.metric] - ref.raw[ref.metric]).abs().max() < 1e-5
    assert (fast.raw[fast.metric] - other.raw[other.metric]).abs().max() < 1e-5
    assert fast.raw[fast.metric].abs().max() > 1e-2  # the sweep moves the metric


def test_ungrouped_head_out_of_range_names_query_heads():
    m, _ = _pair("llama_gqa")
    with pytest.raises(SiteError, match="4 heads"):
        Site("k_ungrouped", 0, head=4).check(m)


def test_a_kv_site_beyond_the_kv_heads_points_to_the_query_heads_copy():
    m, _ = _pair("llama_gqa")
    with pytest.raises(SiteError, match=r"KV head 1's.*Site\('k_ungrouped', 0, head=3\)"):
        Site("k", 0, head=3).check(m)


def test_path_patching_into_one_query_heads_values_equals_the_ungrouped_model():
    m, wide = _pair("llama_gqa")
    ps = ap.PromptSet.from_ids(IDS.tolist(), [[2, 5, 10, 11, 4, 7], [3, 8, 10, 12, 4, 6]], [13, 14], [14, 13])
    senders = [Site("z", 0, head=1), Site("mlp_out", 0)]
    for kind in ("k", "v"):
        got = ap.path_patch(m, ps, senders, [Site(f"{kind}_ungrouped", 2, head=3)])
        want = ap.path_patch(wide, ps, senders, [Site(kind, 2, head=3)])
        assert abs(float(got.raw[got.metric].mean()) - float(want.raw[want.metric].mean())) < 1e-5
        grouped = ap.path_patch(m, ps, senders, [Site(kind, 2, head=1)])  # the whole group of heads 2 and 3
        assert abs(float(got.raw[got.metric].mean()) - float(grouped.raw[grouped.metric].mean())) > 1e-4
