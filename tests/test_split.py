"""Models placed by accelerate: a device map (every layer named, here all on the CPU) and CPU
offloading (weights on the meta device between calls, held by accelerate's hooks). Every
technique gives the plain model's numbers. Real multi-GPU splits need GPUs:
benchmarks/gpu_check.py runs one when two are present."""

from __future__ import annotations

import accelerate
import pytest
import torch

import actpatch as ap
from actpatch.testing import random_pairs, tiny_model


def _placed(how: str) -> ap.Model:
    m = tiny_model("llama_gqa", n_layers=3)
    if how == "device_map":
        dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
              **{f"model.layers.{i}": "cpu" for i in range(3)}}
        accelerate.dispatch_model(m.hf, device_map=dm, force_hooks=True)  # hooks as with several devices
    else:
        accelerate.cpu_offload(m.hf, execution_device="cpu")
        assert next(m.hf.parameters()).device.type == "meta"
    return m


@pytest.mark.parametrize("how", ["device_map", "offload"])
def test_every_technique_on_a_placed_model(how):
    plain, placed = tiny_model("llama_gqa", n_layers=3), _placed(how)
    assert placed.is_dispatched and not plain.is_dispatched and placed.device == torch.device("cpu")
    assert placed.weight_hash == plain.weight_hash  # offloaded weights are read from the hooks
    ps = random_pairs(n=3, T=6)
    for target in ("resid_pre", "z", "mlp_post"):
        for engine in ("batched", "reference"):
            a = ap.sweep(plain, ps, target, engine=engine, progress=False)
            b = ap.sweep(placed, ps, target, engine=engine, progress=False)
            torch.testing.assert_close(b.raw["logit_diff"], a.raw["logit_diff"], atol=1e-5, rtol=0)
    a, b = ap.attribute(plain, ps, "z"), ap.attribute(placed, ps, "z")
    torch.testing.assert_close(b.raw["logit_diff"], a.raw["logit_diff"], atol=1e-5, rtol=0)
    ea, eb = ap.edge_attribution(plain, ps), ap.edge_attribution(placed, ps)
    torch.testing.assert_close(eb.scores, ea.scores, atol=1e-5, rtol=0, equal_nan=True)
    keep = ap.circuits.top_edges(ea, 20)
    torch.testing.assert_close(ap.circuits.run_circuit(placed, ps, keep), ap.circuits.run_circuit(plain, ps, keep), atol=1e-5, rtol=0)
    rec = [ap.Site("resid_final")]
    torch.testing.assert_close(ap.path_sweep(placed, ps, rec, progress=False).raw["logit_diff"],
                               ap.path_sweep(plain, ps, rec, progress=False).raw["logit_diff"], atol=1e-5, rtol=0)
    assert float(ea.scores.nan_to_num(0).abs().max()) > 1e-3  # a real signal compared, not zeros


def test_placements_this_machine_cannot_run_are_refused(monkeypatch):
    layers = {f"model.layers.{l}": "cpu" for l in range(29)}  # layer 29 nowhere
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu", **layers}
    with pytest.raises(ap.errors.DeviceError, match="leaves model.layers.29 nowhere"):
        ap.load_model(device_map=dm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ap.errors.DeviceError, match="sees no CUDA device"):
        ap.load_model(device="cuda")
    with pytest.raises(ap.errors.DeviceError, match="sees no CUDA device"):
        ap.load_model(device_map={**dm, "model.layers.29": 0})
