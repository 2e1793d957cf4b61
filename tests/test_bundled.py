"""The bundled SmolLM2-135M-Instruct: loads offline and solves IOI."""

import os
import time

import pytest
import torch

import actpatch as ap

pytestmark = pytest.mark.slow

IOI = "When Mary and John went to the store, John gave a drink to"


def test_bundled_model_loads_offline_and_solves_ioi(bundled):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    m = bundled
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.d_model, m.d_head) == (30, 9, 3, 576, 64)
    ids = torch.tensor([m.to_tokens(IOI)])
    logits = m.logits(ids, last_only=True)[0]
    (mary,), (john,) = m.to_tokens(" Mary"), m.to_tokens(" John")
    ld = (logits[mary] - logits[john]).item()
    print(f"\nIOI logit difference Mary - John: {ld:.3f}")
    assert ld > 3.0


def test_cached_load_is_fast(bundled):
    t = time.perf_counter()
    m = ap.load_model("smollm2-135m")
    dt = time.perf_counter() - t
    print(f"\ncached load: {dt:.2f} s")
    assert dt < 3.0
    assert m.weight_hash == bundled.weight_hash
