"""Half precision: bfloat16 results agree with float32 on the bundled model, and effects within
the rounding of half-precision logits are reported as noise."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.testing import random_pairs, tiny_model


def test_effects_within_rounding_are_flagged_only_in_half_precision():
    import dataclasses

    ps = random_pairs(n=3, T=6, diff=(4,))
    m = tiny_model("llama", n_layers=2)
    full = ap.sweep(m, ps, "resid_pre", direction="denoise", progress=False)
    assert full.info.provenance.dtype == "float32" and "precision_noise" not in [f.code for f in full.findings]
    m.hf.to(torch.bfloat16)
    half = ap.sweep(m, ps, "resid_pre", direction="denoise", progress=False)
    assert half.info.provenance.dtype == "bfloat16"
    # move two cells by 1e-3 of the gap, far below bf16's rounding of these logits (4 * 2^-8 * max / gap)
    b = half.baselines["logit_diff"]
    gap = b["clean"] - b["corrupted"]
    raw = half.raw["logit_diff"].clone()
    raw[:, 0, 1] += 1e-3 * gap
    raw[:, 1, 0] += 1e-3 * gap
    nudged = dataclasses.replace(half, raw={"logit_diff": raw})
    found = [f for f in ap.check(nudged) if f.code == "precision_noise"]
    assert len(found) == 1 and found[0].message.startswith("logit_diff: 2 of 12 cells") and "bfloat16" in found[0].message
    as_fp32 = dataclasses.replace(nudged, info=nudged.info.replace(
        provenance=dataclasses.replace(nudged.info.provenance, dtype="float32")))
    assert "precision_noise" not in [f.code for f in ap.check(as_fp32)]


@pytest.mark.slow
def test_bfloat16_agrees_with_float32_on_the_bundled_model(bundled):
    """Within 0.02 of the clean - corrupted gap on every cell (measured: 0.0035); metrics are
    computed in float32 from the half-precision logits."""
    half = ap.load_model(dtype=torch.bfloat16)
    ps = ap.prompts.ioi(bundled, n=8, seed=0, templates=[0])
    for target, kw in (("resid_pre", {"layers": [0, 10, 20, 29]}), ("z", {"layers": [20, 23]})):
        a = ap.sweep(bundled, ps, target, direction="denoise", progress=False, **kw)
        b = ap.sweep(half, ps, target, direction="denoise", progress=False, **kw)
        assert b.info.provenance.dtype == "bfloat16"
        err = float((a.values - b.values).abs().max())
        print(f"\n{target}: max |fp32 - bf16| = {err:.4f} of the gap")
        assert err < 0.02


def test_a_model_loaded_with_a_device_map_patches_like_the_original(tmp_path):
    """load_model(device_map=...) leaves placement to accelerate (no .to() afterwards); on a
    CPU-only machine every layer lands on cpu and the numbers equal the unmapped model's."""
    m = tiny_model("llama_gqa", n_layers=2)
    m.hf.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    layout = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}
    # device= is ignored under a device map (it would be an error here: this machine has no CUDA)
    mapped = ap.load_model(str(tmp_path), device_map=layout, device="cuda")
    assert all(p.device.type == "cpu" for p in mapped.hf.parameters())
    ps = random_pairs(n=2, T=5, diff=(1, 3))
    a = ap.sweep(m, ps, "z", direction="noise", progress=False)
    b = ap.sweep(mapped, ps, "z", direction="noise", progress=False)
    torch.testing.assert_close(a.raw["logit_diff"], b.raw["logit_diff"], atol=1e-5, rtol=0)
