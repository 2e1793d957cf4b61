"""`doctor` passes on every family we support and names the invariant a broken adapter breaks."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import actpatch as ap
from actpatch.app import cli
from actpatch.sites import SiteKind
from actpatch.testing import TINY_FAMILIES, tiny_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_doctor_passes_on_every_tiny_family(family):
    report = ap.doctor(tiny_model(family, n_layers=3))
    assert report.passed, [(c.name, c.error) for c in report.failed]
    assert [c.name for c in report.checks] == ["attention function", "null patch", "residual chaining",
                                               "z -> attn_out", "batched == reference"]
    assert all(c.error <= c.tolerance for c in report.checks) and report.estimates["heads sweep (all layers x heads)"] > 0
    assert "all checks pass" in report._repr_html_()


def _broken():
    """An adapter that reads attn_out at the MLP's output: the z -> attn_out invariant breaks."""
    m = tiny_model("llama", n_layers=3)
    real = m.adapter.hook_point

    def wrong(site):
        if site.kind is SiteKind.ATTN_OUT:
            return real(ap.Site("mlp_out", site.layer))
        return real(site)

    m.adapter.hook_point = wrong
    return m


def test_doctor_names_what_a_broken_adapter_breaks(monkeypatch):
    report = ap.doctor(_broken())
    assert not report.passed and [c.name for c in report.failed] == ["z -> attn_out"]
    monkeypatch.setattr("actpatch.app.runner.resolve_model", lambda name: _broken())
    r = CliRunner().invoke(cli.app, ["doctor", "tiny:llama"])
    assert r.exit_code == 1 and "FAILED: z -> attn_out" in r.stdout
    monkeypatch.undo()
    r = CliRunner().invoke(cli.app, ["doctor", "tiny:gpt2"])
    assert r.exit_code == 0 and "all checks pass" in r.stdout


@pytest.mark.slow
def test_doctor_passes_on_the_bundled_model(bundled):
    report = ap.doctor(bundled)
    print("\n" + "\n".join(f"{c.name}: {c.error:.2e} (tolerance {c.tolerance:.0e})" for c in report.checks))
    assert report.passed, [(c.name, c.error, c.tolerance) for c in report.failed]
