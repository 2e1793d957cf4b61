"""The main job end to end on the bundled model (small): results, circuits, report."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from actpatch.app.cli import app


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, bundled):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-prompts", "4"])
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
    # a later version's demo over this directory starts over instead of refusing it
    state = json.loads((out / "run.json").read_text())
    state["digest"] = "0" * 16
    (out / "run.json").write_text(json.dumps(state))
    (out / "stale").mkdir()
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-prompts", "4"])
    assert r.exit_code == 0 and "starting over" in r.stdout and not (out / "stale").exists()
