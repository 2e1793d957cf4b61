import dataclasses

import pytest

import actpatch as ap
from actpatch import Site, SiteKind
from actpatch.errors import SiteError, UnsupportedSiteError
from actpatch.testing import tiny_model


def test_site_is_frozen_hashable_and_typed():
    s = Site("z", 1, head=2)
    assert s.kind is SiteKind.Z
    assert s == Site(SiteKind.Z, 1, head=2)
    assert len({s, Site("z", 1, head=2)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.layer = 3  # type: ignore[misc]
    assert str(s) == "z.L1.H2"
    assert s.full() == Site("z", 1)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(kind="resid_prex", layer=0), "Unknown site kind 'resid_prex'"),
        (dict(kind="resid_pre"), "needs a layer"),
        (dict(kind="embed", layer=1), "has no layer"),
        (dict(kind="resid_pre", layer=0, head=1), "has no heads"),
        (dict(kind="z", layer=-1), "negative"),
        (dict(kind="z", layer=1.5), "must be an int"),
    ],
)
def test_bad_sites_name_the_value(kwargs, fragment):
    with pytest.raises(SiteError, match=fragment.replace("(", r"\(")):
        Site(**kwargs)


def test_out_of_range_against_model():
    m = tiny_model("llama_gqa")
    with pytest.raises(SiteError, match="layer 5 is out of range; this model has layers 0..1"):
        Site("resid_pre", 5).check(m)
    with pytest.raises(SiteError, match="head 2 is out of range; this model has 2 KV heads"):
        Site("k", 0, head=2).check(m)
    Site("q", 0, head=3).check(m)  # 4 query heads: fine
    with pytest.raises(SiteError, match="position 9 is out of range for prompts of 5 tokens"):
        Site("resid_pre", 0, pos=9).check(m, seq_len=5)
    with pytest.raises(SiteError, match="index 200 is out of range for d_mlp of size 128"):
        Site("mlp_post", 0, index=200).check(m)


def test_site_kind_the_family_lacks():
    m = tiny_model("gpt_neox")
    with pytest.raises(UnsupportedSiteError, match="resid_mid does not exist in gpt_neox"):
        with ap.capture(m, [Site("resid_mid", 0)]):
            pass
    assert isinstance(UnsupportedSiteError("x"), ap.ActpatchError)


def test_selector_layouts():
    assert Site("pattern", 0, head=1, pos=2, index=0).selector() == (slice(None), 1, 2, 0)
    assert Site("k", 0, head=1, pos=3).selector() == (slice(None), 3, 1, slice(None))
    assert Site("mlp_post", 0, index=7).selector() == (slice(None), slice(None), 7)


@pytest.mark.parametrize("site", [Site("q", 23, head=3), Site("resid_final"), Site("z", 9, head=1, pos=4),
                                  Site("mlp_post", 3, index=7), Site("embed"), Site("resid_pre", 0, pos=2)])
def test_site_parse_reads_what_str_writes(site):
    assert Site.parse(str(site)) == site


@pytest.mark.parametrize("text, fragment", [("q.L1.X3", "'X3' is not L<layer>"), ("q.L1.L2", "'L2' is not"),
                                            ("zz.L1", "Unknown site kind 'zz'"), ("q.H2", "needs a layer")])
def test_site_parse_errors(text, fragment):
    with pytest.raises(SiteError, match=fragment):
        Site.parse(text)
