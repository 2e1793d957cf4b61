"""The Ray executor on a local 2-CPU Ray: bit-identical to the local executor, a killed worker's
units retried, a killed driver resumed, models that cannot be shipped refused.

One Ray instance serves the module (starting it takes a few seconds); every test uses tiny
models, which workers rebuild from their recipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import ray
import torch

import actpatch as ap
from actpatch.experiment.checkpoint import UnitStore
from actpatch.testing import random_pairs, tiny_model, without_final_norm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray with 2 CPUs; yields its address (for a second driver process). The driver
    runs one torch thread, like each worker: equal thread counts give equal bits on CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if ray.is_initialized():  # left by another test or page: this module needs its own 2-CPU Ray
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="class")
def executor(cluster):
    """Two actors for the tests of one class, stopped after it (the 2-CPU cluster holds no more)."""
    with ap.experiment.RayExecutor(workers=2) as ex:
        yield ex


def _same(a: ap.PatchResult, b: ap.PatchResult) -> None:
    for m in a.raw:
        assert torch.equal(a.raw[m], b.raw[m]), m  # bit for bit, not merely close
        assert torch.equal(a.clean[m], b.clean[m]) and torch.equal(a.corrupted[m], b.corrupted[m])


class TestOnOneSetOfWorkers:
    """Sweeps on two actors started once for the class (starting them, each loading its model,
    is most of these tests' time); the tests after the class start their own."""

    @pytest.mark.parametrize("target, options", [
        ("resid_pre", {"per_position": False}),
        ("z", {"direction": "denoise"}),
        ("mlp_post", {"corruption": "resample"}),
        ("attn_out", {"engine": "reference", "metric": ["logit_diff", "kl"], "per_position": False}),
    ])
    def test_ray_equals_local_bit_for_bit(self, executor, target, options):
        m = tiny_model("llama_gqa", n_layers=3)
        ps = ap.PromptSet.from_ids([*random_pairs(n=3, T=6).clean, *random_pairs(n=2, T=7, seed=1).clean],
                                   [*random_pairs(n=3, T=6).corrupted, *random_pairs(n=2, T=7, seed=1).corrupted],
                                   [5, 6, 7, 8, 9], [61] * 5)  # two length groups
        local = ap.sweep(m, ps, target, executor="local", unit_size=3, progress=False, **options)
        remote = ap.sweep(m, ps, target, executor=executor, unit_size=3, progress=False, **options)
        _same(local, remote)
        assert local.raw["logit_diff"].std() > 0.05  # real, varied values (not all one number)

    def test_ray_path_sweep_equals_local(self, executor):
        m = tiny_model("llama", n_layers=3)
        ps = random_pairs(n=3, T=6)
        receivers = [ap.Site("resid_final")]
        local = ap.path_sweep(m, ps, receivers, executor="local", unit_size=2, progress=False)
        _same(local, ap.path_sweep(m, ps, receivers, executor=executor, unit_size=2, progress=False))

    def test_ray_runs_chunks_of_prompts_under_a_budget_as_local_does(self, executor):
        """Workers rebuild a chunk of a length group from its units' prompts (a memory budget)."""
        m = tiny_model("llama_gqa", n_layers=3)
        ps = random_pairs(n=5, T=6)
        two = 2 * ap.experiment.estimate(m, ps, "sweep", target="z").per_row  # prompts 0-1, 2-3, 4
        for kw in ({}, {"corruption": "mean"}):
            local = ap.sweep(m, ps, "z", executor="local", unit_size=5, progress=False, memory_budget=two, **kw)
            _same(local, ap.sweep(m, ps, "z", executor=executor, unit_size=5, progress=False, memory_budget=two, **kw))
            whole = ap.sweep(m, ps, "z", progress=False, **kw)
            assert torch.allclose(local.raw["logit_diff"], whole.raw["logit_diff"], rtol=0, atol=1e-5)

    def test_models_that_cannot_be_shipped_are_refused(self, executor):
        ps = random_pairs(n=2, T=5)
        built = tiny_model("llama")
        in_memory = ap.Model(built.hf, built.tokenizer)
        with pytest.raises(ap.errors.ExecutorError, match="built in memory"):
            ap.sweep(in_memory, ps, "resid_pre", executor=executor, progress=False)
        changed = without_final_norm(tiny_model("llama"))
        with pytest.raises(ap.errors.ExecutorError, match="changed after loading"):
            ap.sweep(changed, ps, "resid_pre", executor=executor, progress=False)

    def test_ray_activation_corruptions_and_subspaces_equal_local(self, executor):
        """Set-level corruption statistics (gaussian's noise scale, mean activations) and a subspace
        travel with the job."""
        m = tiny_model("llama", n_layers=3)
        ps = random_pairs(n=3, T=6)
        basis = torch.linalg.qr(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))[0].T
        for kw in ({"corruption": "gaussian", "direction": "denoise"}, {"corruption": "mean"},
                   {"subspace": ap.subspaces.Subspace(basis), "check_subspace": False}):
            target = "resid_pre" if "subspace" in kw else "z"
            local = ap.sweep(m, ps, target, executor="local", unit_size=3, progress=False, **kw)
            _same(local, ap.sweep(m, ps, target, executor=executor, unit_size=3, progress=False, **kw))


def test_killed_worker_units_are_retried(cluster):
    """ray.kill an actor once the first unit is back: its unit (in flight or next) is sent to a
    replacement actor; the result is identical and every unit counted once."""
    m = tiny_model("gpt2", n_layers=3)
    ps = random_pairs(n=3, T=6)
    local = ap.sweep(m, ps, "mlp_post", executor="local", unit_size=4, progress=False)

    class KillOnce(ap.experiment.RayExecutor):
        killed = False

        def map(self, job, runs, state, todo, *, store=None, advance=None):
            counted = []

            def kill_after_first(k):
                counted.append(k)
                if not self.killed:
                    self.killed = True
                    for a in self._actors:  # both: whatever is in flight dies
                        ray.kill(a)

            out = super().map(job, runs, state, todo, store=store, advance=kill_after_first)
            assert sum(counted) == len(job.plan.patches)  # each cell counted once
            return out

    with KillOnce(workers=2) as ex:
        remote = ap.sweep(m, ps, "mlp_post", executor=ex, unit_size=4, progress=False)
        assert ex.killed and ex.restarts >= 1
    _same(local, remote)


DRIVER = """
import sys, time
import ray
import torch
import actpatch as ap
import actpatch.experiment.ray_executor as rx
from actpatch.experiment.checkpoint import UnitStore
from actpatch.testing import random_pairs, tiny_model

keep = rx.keep_unit
def slow_keep(store, unit, values):  # saved, then slow: the test kills this driver mid-run
    keep(store, unit, values)
    time.sleep(0.4)
rx.keep_unit = slow_keep
torch.set_num_threads(1)
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
m = tiny_model("llama", n_layers=3)
ap.sweep(m, random_pairs(n=3, T=6), "mlp_post", executor="ray", unit_size=4, store=UnitStore(sys.argv[2]),
         progress=False)
print("finished")
"""


def test_killed_driver_resumes(cluster, tmp_path):
    """SIGKILL a driver process mid-sweep; the units it saved are reused by the next run, which
    finishes with the local executor's numbers."""
    units = tmp_path / "units"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(script), cluster, str(units)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and len(UnitStore(units)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=30)[0].decode()
    m = tiny_model("llama", n_layers=3)
    ps = random_pairs(n=3, T=6)
    local = ap.sweep(m, ps, "mlp_post", executor="local", unit_size=4, progress=False)
    total = -(-local.values.numel() // 4)  # units of 4 patches, one length group
    saved = len(UnitStore(units))
    assert "finished" not in out and 2 <= saved < total, (saved, total, out[-2000:])
    with ap.experiment.RayExecutor(workers=2) as ex:
        resumed = ap.sweep(m, ps, "mlp_post", executor=ex, unit_size=4, store=UnitStore(units), progress=False)
    _same(local, resumed)
    assert len(UnitStore(units)) == total


def test_executor_input_errors(monkeypatch):
    with pytest.raises(ap.errors.ExecutorError, match="local.*ray"):
        ap.sweep(tiny_model("llama"), random_pairs(n=2, T=5), "resid_pre", executor="dask", progress=False)
    with pytest.raises(ap.errors.ExecutorError, match="workers"):
        ap.experiment.RayExecutor(workers=0)
    with pytest.raises(ap.errors.ExecutorError, match="host:port"):
        _probe("nowhere")
    with pytest.raises(ap.errors.ExecutorError, match="No Ray cluster reachable"):
        _probe("127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ap.errors.ExecutorError, match=r"pip install 'actpatch\[ray\]'"):
        ap.sweep(tiny_model("llama"), random_pairs(n=2, T=5), "resid_pre", executor="ray", progress=False)


def _probe(address):
    from actpatch.experiment.ray_executor import _probe as probe

    return probe(address)


def test_cli_run_with_ray_executor(cluster, tmp_path, monkeypatch):
    """`actpatch run CONFIG --executor ray --address ...` gives the local run's results."""
    from typer.testing import CliRunner

    from actpatch.app.cli import app

    pairs = [{"clean": f"When Mary and John went to the {w} , John gave a drink to",
              "corrupted": f"When Mary and John went to the {w} , Mary gave a drink to",
              "answer": " Mary", "alternative": " John"} for w in ("store", "park", "school")]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    (tmp_path / "exp.yaml").write_text(textwrap.dedent("""\
        model: tiny:llama
        prompts: {file: pairs.jsonl, keep_correct: false}
        targets: [{target: resid_pre}, {target: z}]
        paths: [{receivers: [resid_final]}]
        directions: [noise]
        metrics: [logit_diff]
        unit_size: 5
        """))
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "local")])
    assert r.exit_code == 0, r.stdout
    r = runner.invoke(app, ["run", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "ray"), "--executor", "ray",
                            "--address", cluster, "--workers", "2"])
    assert r.exit_code == 0, r.stdout
    names = sorted(p.name for p in (tmp_path / "local").iterdir() if (p / "meta.json").is_file())
    assert len(names) == 3
    for name in names:
        _same(ap.PatchResult.load(tmp_path / "local" / name), ap.PatchResult.load(tmp_path / "ray" / name))
    r = runner.invoke(app, ["run", str(tmp_path / "exp.yaml"), "--executor", "local", "--workers", "2"])
    assert r.exit_code == 1 and "--executor ray" in r.stderr
    assert json.loads((tmp_path / "ray" / "status.json").read_text())["status"] == "complete"


def test_workers_that_cannot_start_or_load_are_one_clear_error(cluster):
    from actpatch.models.recipe import Recipe

    ps = random_pairs(n=2, T=5)
    m = tiny_model("llama")
    with pytest.raises(ap.errors.ExecutorError, match=r"did not start within 3 s; the cluster has \d+ CPUs and 0 GPUs free"):
        ap.sweep(m, ps, "resid_pre", executor=ap.experiment.RayExecutor(workers=3, start_timeout=3), progress=False)
    m.recipe = Recipe("actpatch.models.loading:load_model", ("/no/such/model",), {})
    with pytest.raises(ap.errors.ExecutorError, match="could not load load_model\\('/no/such/model'\\).*check the path"):
        ap.sweep(m, ps, "resid_pre", executor=ap.experiment.RayExecutor(workers=1), progress=False)


