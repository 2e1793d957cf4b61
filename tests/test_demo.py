"""The main job end to end on the bundled model (small): results, circuits, report."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from actpatch.app.cli import app
from actpatch.app.demo import clear_stale_demo, demo_config


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, bundled):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-prompts", "2"])
    assert r.exit_code == 0, r.stdout
    assert "Report:" in r.stdout and "Faithfulness, EAP" in r.stdout
    assert "…" not in r.stdout and "+..." not in r.stdout  # every value printed whole (80 columns here)
    listed = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert listed.exit_code == 0 and re.search(r"complete\s*│\s*9/9", listed.stdout) and "smollm2-135m" in listed.stdout
    names = sorted(p.name for p in out.iterdir() if (p / "meta.json").is_file())
    assert names == sorted(f"{t}_{d}" for t in ("resid_pre", "attn_out", "mlp_out", "z") for d in ("denoise", "noise"))
    curves = json.loads((out / "circuits.json").read_text())
    assert set(curves) == {"EAP", "EAP-IG (5 steps)"} and curves["EAP"]["values"][-1] > 0.8
    page = (out / "report.html").read_text()
    assert "Both directions compared" in page and "Circuits" in page and "Provenance" in page
    assert (out / "edges_eap-ig.csv").is_file()
    # the directory is this demo's own run: it is kept (and resumed), not started over
    assert not clear_stale_demo(out, demo_config(2)) and (out / "report.html").is_file()


def test_a_stale_demo_directory_starts_over_and_other_runs_are_kept(tmp_path):
    """An earlier version's demo (same builder and templates, another digest) is deleted before
    the run; another experiment's directory and a fresh demo's are not."""
    cfg = demo_config(4)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale").mkdir()
    state = cfg.model_dump(mode="json")
    (out / "run.json").write_text(json.dumps({"digest": "0" * 16, "config": {"prompts": state["prompts"]}}))
    assert clear_stale_demo(out, cfg) and not out.exists()
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"digest": cfg.digest(), "config": {"prompts": state["prompts"]}}))
    assert not clear_stale_demo(out, cfg) and out.exists()
    other = dict(state["prompts"], templates=[1])
    (out / "run.json").write_text(json.dumps({"digest": "0" * 16, "config": {"prompts": other}}))
    assert not clear_stale_demo(out, cfg) and out.exists()
    assert not clear_stale_demo(tmp_path / "missing", cfg)
