"""The command line: configs, one-line errors, resumable runs (with a real SIGKILL), reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import actpatch as ap
from actpatch.app.cli import app
from actpatch.testing import assert_effect_close

PAIRS = [
    {"clean": "When Mary and John went to the store , John gave a drink to",
     "corrupted": "When Mary and John went to the store , Mary gave a drink to", "answer": " Mary", "alternative": " John"},
    {"clean": "When Alice and Bob went to the park , Bob gave a ball to",
     "corrupted": "When Alice and Bob went to the park , Alice gave a ball to", "answer": " Alice", "alternative": " Bob"},
    {"clean": "When Tom and Anna went to the school , Tom gave a book to",
     "corrupted": "When Tom and Anna went to the school , Anna gave a book to", "answer": " Anna", "alternative": " Tom"},
]


def write_config(tmp_path: Path, body: str, pairs=PAIRS) -> Path:
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(body)
    return cfg


TINY = """model: tiny:llama
prompts: {file: pairs.jsonl, keep_correct: false}
targets:
  - {target: resid_pre}
  - {target: z}
directions: [denoise, noise]
metrics: [logit_diff, prob]
"""


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_models_command():
    r = invoke("models")
    assert r.exit_code == 0 and "gpt_neox" in r.stdout and "smollm2-135m" in r.stdout


def test_run_writes_results_and_report(tmp_path):
    cfg = write_config(tmp_path, TINY)
    r = invoke("run", str(cfg), "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.stdout
    assert "Report:" in r.stdout
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir() if (p / "meta.json").is_file())
    assert names == ["resid_pre_denoise", "resid_pre_noise", "z_denoise", "z_noise"]
    runs = sum(ap.PatchResult.load(out / n).values.numel() * 3 for n in names)  # cells x 3 prompts, each direction
    assert f"cost estimate: about {runs:,} prompt runs (resid_pre " in r.stdout  # said before the first sweep
    assert r.stdout.index("cost estimate") < r.stdout.index("resid_pre_denoise: done")
    res = ap.PatchResult.load(out / "z_noise")
    assert res.dims == ("layer", "head") and res.metrics == ["logit_diff", "prob"]
    assert "single_direction" not in [f.code for f in res.findings]  # compared with its pair
    assert (out / "report.html").stat().st_size > 1_000_000  # plotly.js inlined
    svgs = sorted(p.name for p in (out / "figures").glob("*.svg"))
    assert "resid_pre_compare.svg" in svgs and "z_denoise_logit_diff.svg" in svgs
    assert not (out / "resid_pre_denoise" / "units").exists()
    # rebuild the report from saved results
    (out / "report.html").unlink()
    r = invoke("report", str(out))
    assert r.exit_code == 0 and (out / "report.html").is_file()
    # a damaged result or a missing directory is one line, never a traceback
    meta = out / "z_noise" / "meta.json"
    meta.write_text(meta.read_text()[:200])
    r = invoke("report", str(out))
    assert r.exit_code == 1 and "error:" in r.stderr and "not valid JSON" in r.stderr and "Traceback" not in r.stderr
    r = invoke("report", str(tmp_path / "nowhere"))
    assert r.exit_code == 1 and "no such directory" in r.stderr


@pytest.mark.parametrize("body, fragment", [
    ("model: [unclosed", "malformed YAML at line 1"),
    ("model: tiny:llama\ntargetz: []\n", "targetz: unknown key"),
    ("model: tiny:llama\nseed: many\n", "seed: Input should be a valid integer"),
    ("model: tiny:llama\nprompts: {file: nowhere.jsonl}\n", "prompts.file 'nowhere.jsonl' does not exist"),
    ("model: smollm2-135m\nprompts: {builder: ioi, n: 100000000}\ntargets: [{target: z}]\n",
     "the ioi builder makes at most"),
    ("model: smollm2-135m\nprompts: {builder: ioi, n: 200000, templates: [0]}\ntargets: [{target: z}]\n",
     "more than 100000 prompts"),
    ("model: smollm2-135m\nprompts: {builder: greater_than, n: 5000}\ntargets: [{target: z}]\n",
     "the greater_than builder makes at most"),
    ("model: tiny:llama\ntargets: [{target: resid_prez}]\n", "unknown target 'resid_prez'"),
    ("model: tiny:llama\nmetrics: [f1]\n", "unknown metric 'f1'"),
    ("model: tiny:llama\ntargets: [{target: z, grad_drop: true}]\n", "set method: atp"),
    ("model: tiny:llama\ntargets: [{target: z, method: atp, qk_fix: true}]\n", "qk_fix applies to q and k targets"),
    ("model: tiny:llama\ntargets: [{target: z, method: atp}]\nmetrics: [logit_diff, rank]\n",
     "needs differentiable metrics; remove ['rank']"),
    ("model: tiny:llama\ntargets: [{target: z, method: atpstar}]\n", "targets.0.method: Input should be 'exact' or 'atp'"),
    ("model: tiny:llama\ncircuits: {}\nmetrics: [rank]\n", "first metric, 'rank', which is discrete"),
    ("model: tiny:llama\ncircuits: {}\ncorruption: {name: mean}\n", "circuits need a corrupted run per prompt"),
    ("model: tiny:llama\ncircuits: {methods: [acdc]}\n", "circuits.methods.0: unknown methods 'acdc'; use one of 'eap', 'eap-ig', 'eap-ig-act', 'relp' or 'mask'"),
    ("model: tiny:llama\npaths: [{receivers: [q.L1.X2]}]\n", "Cannot read site 'q.L1.X2'"),
    ("model: tiny:llama\ntargets: []\n", "nothing to run: give targets, paths, circuits, das, patchscopes"),
    ("model: tiny:llama\ntargets: [{target: z, subspace: {}}]\n", "has one vector per head; give a basis file"),
    ("model: tiny:llama\ntargets: [{target: z, method: atp, subspace: {method: file, file: b.safetensors}}]\n",
     "subspace: applies to exact patching"),
    ("model: tiny:llama\ntargets: [{target: resid_pre, subspace: {k: 2}}]\n", "only method pca finds several"),
    ("model: tiny:llama\ndas: [{site: resid_pre.X1}]\n", "Cannot read site"),
    ("model: tiny:llama\ntargets: [{target: z}]\nmemory_budget: lots\n", "memory_budget='lots' is not a size; write e.g. '4GiB'"),
    ("model: tiny:llama\nprompts: {file: pairs.jsonl, keep_correct: false}\ntargets: [{target: z, method: atp}]\n"
     "memory_budget: 1KiB\n", "Attribution: one prompt needs about"),
    ("model: tiny:llama\nprompts: {file: pairs.jsonl, keep_correct: false}\ncircuits: {methods: [eap]}\n"
     "memory_budget: 1KiB\n", "one prompt needs about"),
])
def test_bad_configs_are_one_line_errors(tmp_path, body, fragment):
    cfg = write_config(tmp_path, body)
    r = invoke("run", str(cfg), "--out", str(tmp_path / "out"))
    assert r.exit_code == 1
    assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


ATP = """model: tiny:llama
prompts: {file: pairs.jsonl, keep_correct: false}
targets:
  - {target: z}
  - {target: z, method: atp}
  - {target: k, method: atp, qk_fix: true, grad_drop: true}
directions: [denoise, noise]
metrics: [logit_diff, kl]
"""


def test_run_with_attribution_targets(tmp_path):
    """method: atp runs ap.attribute with the target's axes; the estimates sit next to the exact
    sweep (same values as calling the API), GradDrop magnitudes are not compared across
    directions, and the report labels estimates."""
    cfg = write_config(tmp_path, ATP)
    out = tmp_path / "out"
    r = invoke("run", str(cfg), "--out", str(out))
    assert r.exit_code == 0, r.stdout
    names = sorted(p.name for p in out.iterdir() if (p / "meta.json").is_file())
    assert names == ["k_atp_qk_gd_denoise", "k_atp_qk_gd_noise", "z_atp_denoise", "z_atp_noise", "z_denoise", "z_noise"]
    est = ap.PatchResult.load(out / "z_atp_noise")
    assert est.info.method is ap.types.Method.ATP and est.metrics == ["logit_diff", "kl"]
    assert "single_direction" not in [f.code for f in est.findings]  # compared with its pair
    star = ap.PatchResult.load(out / "k_atp_qk_gd_noise")
    assert star.info.label == "atp*" and "single_direction" in [f.code for f in star.findings]
    from actpatch.app.runner import build_corruption, build_prompts, resolve_model
    from actpatch.app.config import load_config

    c = load_config(cfg)
    model = resolve_model(c.model)
    prompts, _ = build_prompts(model, c)
    again = ap.attribute(model, prompts, "z", direction="noise", corruption=build_corruption(c), metric=c.metrics)
    torch.testing.assert_close(est.raw["logit_diff"], again.raw["logit_diff"])
    assert "atp* estimate" in (out / "report.html").read_text()


def test_run_with_circuits(tmp_path):
    """circuits: edge scores (CSV, largest |score| first) and faithfulness curves in the report;
    the full circuit gives the clean run, the empty one the corrupted run."""
    import pandas as pd

    body = TINY.replace("  - {target: z}\n", "") + ("circuits: {methods: [eap, eap-ig, eap-ig-act], ig_steps: 2, sizes: [0, 5, 100000], "
                                                    "evaluate: mib, fractions: [0.1, 0.5, 1.0], selection: greedy, direct_vs_total: true, oracle_k: 6}\n")
    out = tmp_path / "out"
    r = invoke("run", str(write_config(tmp_path, body)), "--out", str(out))
    assert r.exit_code == 0, r.stdout
    assert "Faithfulness, EAP-IG (2 steps)" in r.stdout
    curves = json.loads((out / "circuits.json").read_text())
    assert set(curves) == {"EAP", "EAP-IG (2 steps)", "EAP-IG (2 steps, activations)"}
    for c in curves.values():
        assert_effect_close(torch.tensor(c["values"])[[0, -1]], [0.0, 1.0], c["clean"], c["corrupted"], atol=1e-5)
    edges = pd.read_csv(out / "edges_eap.csv")
    assert list(edges.columns) == ["upstream", "downstream", "score"]
    assert edges.score.abs().is_monotonic_decreasing and len(edges) > 50
    assert "Circuits" in (out / "report.html").read_text()
    mib = json.loads((out / "mib.json").read_text())
    assert set(mib) == {"EAP", "EAP-IG (2 steps)", "EAP-IG (2 steps, activations)", "random", "exact (6 edges of EAP)"}
    assert mib["exact (6 edges of EAP)"]["method"] == "exact@6+greedy"
    assert mib["EAP"]["method"] == "eap+greedy" and mib["EAP-IG (2 steps, activations)"]["method"] == "eap-ig-act+greedy"
    for v in mib.values():
        assert v["fractions"] == [0.1, 0.5, 1.0] and abs(v["absolute"][-1] - 1) < 1e-4
    from actpatch.techniques.circuit_io import from_mib_json
    from actpatch.app.runner import resolve_model

    exported, _ = from_mib_json(out / "graph_eap.json", resolve_model("tiny:llama"))
    assert exported.method == "eap" and int((~torch.isnan(exported.scores)).sum()) == len(edges)
    page = (out / "report.html").read_text()
    assert "Circuits, MIB evaluation" in page and "Direct vs total effects" in page
    dt = json.loads((out / "direct_total.json").read_text())
    assert len(dt["components"]) == len(dt["direct"]) == len(dt["total"])
    r = invoke("run", str(write_config(tmp_path, body)), "--out", str(out))  # resumes: nothing to redo
    assert r.exit_code == 0 and "circuits: already done, loaded" in r.stdout


def test_run_with_a_learned_mask_checkpoints_it(tmp_path):
    body = TINY.replace("  - {target: z}\n", "") + ("circuits: {methods: [mask], mask_steps: 3, mask_density: 0.2, "
                                                    "sizes: [0, 100000], evaluate: mib, fractions: [0.5, 1.0]}\n")
    out = tmp_path / "out"
    r = invoke("run", str(write_config(tmp_path, body)), "--out", str(out))
    assert r.exit_code == 0, r.stdout
    assert (out / "mask.safetensors").is_file() and '"step": 3' in (out / "mask.json").read_text()
    mib = json.loads((out / "mib.json").read_text())
    assert set(mib) == {"mask (3 steps)", "random"} and abs(mib["mask (3 steps)"]["absolute"][-1] - 1) < 1e-4
    assert (out / "edges_mask.csv").is_file() and (out / "graph_mask.json").is_file()


def test_run_with_path_patching(tmp_path):
    body = TINY.replace("targets:\n  - {target: resid_pre}\n  - {target: z}\n", "targets: []\n") + (
        "paths:\n  - {receivers: [resid_final]}\n  - {receivers: [q.L1.H2, k.L1.H1], layers: [0]}\n")
    out = tmp_path / "out"
    r = invoke("run", str(write_config(tmp_path, body)), "--out", str(out))
    assert r.exit_code == 0, r.stdout
    names = sorted(p.name for p in out.iterdir() if (p / "meta.json").is_file())
    assert names == sorted(f"{b}_{d}" for b in ("path_z_to_resid_final", "path_z_to_q.L1.H2+k.L1.H1")
                           for d in ("denoise", "noise"))
    res = ap.PatchResult.load(out / "path_z_to_q.L1.H2+k.L1.H1_noise")
    assert res.dims == ("layer", "head") and res.coords["layer"] == [0]
    from actpatch.app.config import load_config
    from actpatch.app.runner import build_prompts, resolve_model

    c = load_config(tmp_path / "exp.yaml")
    model = resolve_model(c.model)
    again = ap.path_sweep(model, build_prompts(model, c)[0], [ap.Site("q", 1, head=2), ap.Site("k", 1, head=1)],
                          layers=[0], direction="noise", metric=c.metrics)
    torch.testing.assert_close(res.raw["logit_diff"], again.raw["logit_diff"])


def test_run_with_named_positions(tmp_path):
    body = TINY.replace("  - {target: resid_pre}\n  - {target: z}\n",
                        "  - {target: resid_pre, positions: [first_diff, end]}\n"
                        "  - {target: mlp_out, method: atp, positions: [end]}\n")
    r = invoke("run", str(write_config(tmp_path, body)), "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.stdout
    res = ap.PatchResult.load(tmp_path / "out" / "resid_pre_noise")
    assert res.coords["pos"] == ["first_diff", "end"] and res.values.shape == (2, 2)
    assert ap.PatchResult.load(tmp_path / "out" / "mlp_out_atp_denoise").coords["pos"] == ["end"]


def test_missing_config_and_unwritable_out(tmp_path):
    r = invoke("run", str(tmp_path / "none.yaml"))
    assert r.exit_code == 1 and "does not exist" in r.stderr
    cfg = write_config(tmp_path, TINY)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = invoke("run", str(cfg), "--out", str(blocker / "sub"))
    assert r.exit_code == 1 and "not writable" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = invoke("--debug", "run", str(tmp_path / "none.yaml"))
    assert r.exit_code != 0 and isinstance(r.exception, ap.ActpatchError)


def test_changed_config_is_refused(tmp_path):
    cfg = write_config(tmp_path, TINY)
    assert invoke("run", str(cfg), "--out", str(tmp_path / "out")).exit_code == 0
    cfg.write_text(TINY.replace("metrics: [logit_diff, prob]", "metrics: [logit_diff]"))
    r = invoke("run", str(cfg), "--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and "holds an experiment of a different config" in r.stderr


SLOW = """model: tiny:llama
prompts: {file: pairs.jsonl, keep_correct: false}
targets:
  - {target: mlp_post, per_position: true, layers: [0, 1], neurons: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]}
directions: [noise]
metrics: [logit_diff, kl]
engine: reference
unit_size: 16
"""


def _run_cli(cfg: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "actpatch.app.cli", "run", str(cfg), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    cfg = write_config(tmp_path, SLOW)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _run_cli(cfg, killed)
    units = killed / "mlp_post_noise" / "units"
    deadline = time.time() + 120
    while time.time() < deadline and (not units.is_dir() or len(list(units.glob("*.safetensors"))) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # frozen mid-run, so what is counted is what the kill leaves
    n_before = len(list(units.glob("*.safetensors")))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= n_before and not (killed / "mlp_post_noise" / "meta.json").exists()
    resumed = _run_cli(cfg, killed)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert "resuming from" in log
    full = _run_cli(cfg, clean)
    full.communicate(timeout=300)
    assert full.returncode == 0
    a, b = ap.PatchResult.load(killed / "mlp_post_noise"), ap.PatchResult.load(clean / "mlp_post_noise")
    for m in a.metrics:
        assert torch.equal(a.raw[m], b.raw[m]) and torch.equal(a.clean[m], b.clean[m])
        assert torch.equal(a.corrupted[m], b.corrupted[m])
    assert a.shape == (2, 32, 14)


def test_every_position_a_config_names_is_checked_before_anything_runs(tmp_path):
    body = TINY.replace("  - {target: z}\n", "  - {target: z}\n  - {target: resid_pre, positions: [end, S7]}\n"
                        ) + "das: [{site: resid_pre.L1, position: IO9, k: 1, steps: 2}, {site: resid_pre.L1, position: 40}]\n"
    cfg = write_config(tmp_path, body)
    t0 = time.time()
    r = invoke("run", str(cfg), "--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and time.time() - t0 < 60
    for fragment in ("targets[2].positions: 'S7' is not a named position of prompt(s) 0, 1, 2",
                     "das[0].position: 'IO9' is not a named position", "das[1].position: position 40 is outside",
                     "nothing was run"):
        assert fragment in r.stderr, r.stderr
    assert not list((tmp_path / "out").glob("*_denoise"))  # the targets before the bad names did not run


def test_das_file_names_are_sanitised():
    from actpatch.app.config import DASConfig

    name = DASConfig(site="resid_pre.L1", position="../../etc/passwd").name
    assert "/" not in name and ".." not in name and name.startswith("das_resid_pre.L1") and name.endswith("_k1")
    assert DASConfig(site="resid_pre.L1", position="end").name == "das_resid_pre.L1.end_k1"


def test_a_second_run_on_a_busy_folder_is_refused_in_one_line(tmp_path):
    """Two real processes on one --out: the second is refused at once, naming the first's pid;
    the first ends with its results intact. (A killed run's lock is taken over: see the SIGKILL
    test, whose resumed run starts on the folder the killed one held.) The first run is paused
    (SIGSTOP) while the second starts, so the first cannot finish during the second's start-up,
    however loaded the machine is."""
    cfg = write_config(tmp_path, SLOW)
    out = tmp_path / "out"
    first = _run_cli(cfg, out)
    try:
        units = out / "mlp_post_noise" / "units"
        deadline = time.time() + 120
        while time.time() < deadline and not (units.is_dir() and list(units.glob("*.safetensors"))):
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before the second could meet it"
        t0 = time.time()
        second = _run_cli(cfg, out)
        log2, _ = second.communicate(timeout=120)
        elapsed = time.time() - t0
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 1, log2
        assert f"is in use by another actpatch run (pid {first.pid}, started" in log2 and "Traceback" not in log2, log2
        assert len(log2.strip().splitlines()) == 1 and elapsed < 60, log2
        log1, _ = first.communicate(timeout=300)
        assert first.returncode == 0, log1
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert ap.PatchResult.load(out / "mlp_post_noise").shape == (2, 32, 14)
    rerun = _run_cli(cfg, out)  # the lock went with the first process
    assert rerun.communicate(timeout=300)[0] and rerun.returncode == 0


def test_run_with_subspace_targets_and_das(tmp_path):
    """subspace: per-layer difference-of-means bases (the same numbers as the API), a basis file,
    the check's numbers in the report; das: jobs write their basis and record, and resume."""
    from safetensors.torch import save_file

    save_file({"basis": torch.eye(64)[:2].contiguous()}, str(tmp_path / "basis.safetensors"))
    body = TINY.replace("  - {target: z}\n", (
        "  - {target: resid_pre, layers: [1], positions: [end], subspace: {method: diff_of_means, position: end}}\n"
        "  - {target: mlp_post, layers: [1], per_position: false, subspace: {method: file, file: "
        + str(tmp_path / "basis.safetensors") + "}}\n")).replace("directions: [denoise, noise]",
        "directions: [denoise]") + "das: [{site: resid_pre.L1, position: end, k: 1, steps: 5}]\n"
    cfg = write_config(tmp_path, body)
    out = tmp_path / "out"
    r = invoke("run", str(cfg), "--out", str(out))
    assert r.exit_code == 1 and "width 64 but mlp_post vectors have d_mlp = 128" in r.stderr  # a wrong file, named
    save_file({"basis": torch.eye(128)[:2].contiguous()}, str(tmp_path / "basis.safetensors"))
    r = invoke("run", str(cfg), "--out", str(out))
    assert r.exit_code == 0, r.stdout + r.stderr
    res = ap.PatchResult.load(out / "resid_pre_sub_diff_of_means_denoise")
    assert res.info.subspace["method"] == "diff_of_means" and res.info.subspace["layers"] == [1]
    assert str(res.info.subspace_check.site).startswith("resid_pre.L")
    from actpatch.app.config import load_config
    from actpatch.app.runner import build_prompts, resolve_model

    c = load_config(cfg)
    model = resolve_model(c.model)
    prompts, _ = build_prompts(model, c)
    bases = {1: ap.subspaces.diff_of_means(model, prompts, ap.Site("resid_pre", 1), position="end").basis_for(None)}
    again = ap.sweep(model, prompts, "resid_pre", layers=[1], positions=["end"], direction="denoise", subspace=bases)
    torch.testing.assert_close(res.raw["logit_diff"], again.raw["logit_diff"], atol=1e-6, rtol=0)
    das = json.loads((out / "das_resid_pre.L1.end_k1.json").read_text())
    assert das["steps"] == 5 and das["site"].startswith("resid_pre.L1.pos") and len(das["curve"]) == 1
    from actpatch.app.subspaces import load_das

    record = load_das(out)["das_resid_pre.L1.end_k1"]  # typed, through the codec
    assert record.steps == 5 and record.site.kind is ap.SiteKind.RESID_PRE and len(record.curve) == 1
    assert (out / "das_resid_pre.L1.end_k1.safetensors").is_file()
    page = (out / "report.html").read_text()
    assert "<h2>Subspaces</h2>" in page and "<h2>DAS</h2>" in page and "MLP output projection" in page
    import html as _html

    (mlp_dir,) = out.glob("mlp_post_sub*_denoise")
    for checked in (res, ap.PatchResult.load(mlp_dir)):  # the typed verdict, shown next to its result
        c = checked.info.subspace_check
        assert c.verdict is not None and _html.escape(c.summary()) in page
    assert res.info.subspace_check.verdict is ap.subspaces.SubspaceVerdict.UNSPLIT
    r = invoke("run", str(cfg), "--out", str(out))
    assert r.exit_code == 0 and "das_resid_pre.L1.end_k1: already done, loaded" in r.stdout


JOBS = """model: tiny:llama
prompts: {file: pairs.jsonl, keep_correct: false}
targets: []
patchscopes:
  - {name: ident, sources: ["When Mary and John", "the store"], layers: [0, 1], target_prompt: "Mary John Mary John the"}
  - {name: lens, sources: ["When Mary and John"], target_prompt: null}
interchanges:
  - {name: end_into_s2, patches: ["resid_pre.L1.posend -> resid_pre.L1.pos9", "resid_pre.L0.pos0 -> resid_pre.L0.pos1 + mlp_out.L0.pos1 -> mlp_out.L0.pos2"]}
generations:
  - {name: ablate, prompt: "When Mary and John went", patches: {"resid_pre.L1": 0.0}, max_new_tokens: 3}
"""


def test_patchscopes_interchanges_and_generations_run_resume_and_report(tmp_path):
    cfg = write_config(tmp_path, JOBS)
    out = tmp_path / "out"
    r = invoke("run", str(cfg), "--out", str(out))
    assert r.exit_code == 0, r.stderr
    saved = {p.name for p in out.glob("*.json")}
    assert {"patchscope_ident.json", "patchscope_lens.json", "interchange_end_into_s2.json", "generation_ablate.json"} <= saved
    from actpatch.app.extras import load_extras
    from actpatch.techniques.patchscope import patchscope

    extras = load_extras(out)
    model = ap.testing.tiny_model("llama")
    again = patchscope(model, ["When Mary and John", "the store"], "resid_post", layers=[0, 1],
                       target_prompt="Mary John Mary John the")
    assert torch.equal(extras["patchscope"]["ident"].tokens, again.tokens)
    inter = extras["interchange"]["end_into_s2"]
    assert len(inter["labels"]) == 2 and len(inter["values"]["logit_diff"][0]) == len(PAIRS)
    page = (out / "report.html").read_text()
    assert "<h2>Patchscopes</h2>" in page and "<h2>Interchanges</h2>" in page and "<h2>Patched generation</h2>" in page
    r = invoke("run", str(cfg), "--out", str(out))  # resumed: every job loaded, none rerun
    assert r.exit_code == 0 and r.stdout.count("already done, loaded") == 4, r.stdout
    assert invoke("report", str(out)).exit_code == 0


@pytest.mark.parametrize("body, fragment", [
    ("interchanges: [{name: a, patches: ['resid_pre.L1.pos0 resid_pre.L1.pos2']}]\n", "write 'source site -> base site'"),
    ("generations: [{name: g, prompt: hi, max_new_tokens: 0}]\n", "max_new_tokens"),
    ("patchscopes: [{name: p}, {name: p}]\n", "every job needs its own name"),
    ("patchscopes: [{name: p, site: z}]\n", "patchscopes.0.site"),
])
def test_bad_job_sections_are_one_line_errors(tmp_path, body, fragment):
    cfg = write_config(tmp_path, "model: tiny:llama\ntargets: []\n" + body)
    r = invoke("run", str(cfg), "--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and fragment in r.stderr, r.stderr


def test_a_feature_circuit_job_runs_resumes_and_reports(tmp_path):
    from actpatch.features import Dictionary, save_dictionary

    m = ap.testing.tiny_model("llama")
    for layer in (0, 1):
        save_dictionary(Dictionary.random(ap.Site("resid_post", layer), d_in=m.d_model, n_features=16, seed=layer),
                        tmp_path / f"sae{layer}")
    cfg = write_config(tmp_path, "model: tiny:llama\nprompts: {file: pairs.jsonl, keep_correct: false}\ntargets: []\n"
                                 "dictionaries: {sources: [sae0, sae1], sizes: [1, 10, 100], validate_k: 3}\n")
    out = tmp_path / "out"
    r = invoke("run", str(cfg), "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert "feature circuit:" in r.stdout and "rank correlation resid_post.L0" in r.stdout, r.stdout
    from actpatch.app.extras import load_extras

    data = load_extras(out)["features"]["circuit"]
    assert data["sizes"][:2] == [1, 10] and len(data["faithfulness"]) == 3  # 100 clipped to the scored nodes
    assert data["sizes"][2] == len(data["nodes"]) <= 100
    assert set(data["validation"]) == {"resid_post.L0", "resid_post.L1"}
    page = (out / "report.html").read_text()
    assert "<h2>Feature circuit</h2>" in page and "Top edges" in page
    r = invoke("run", str(cfg), "--out", str(out))
    assert r.exit_code == 0 and "feature circuit: already done, loaded" in r.stdout


def test_a_feature_circuit_job_needs_a_differentiable_first_metric(tmp_path):
    cfg = write_config(tmp_path, "model: tiny:llama\ntargets: []\nmetrics: [accuracy]\ndictionaries: {}\n")
    r = invoke("run", str(cfg), "--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and "feature circuit scores nodes" in r.stderr, r.stderr
