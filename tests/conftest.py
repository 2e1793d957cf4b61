"""Shared fixtures: tiny random-init models of every family (no download), the bundled model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import functools

import pytest
import torch

from actpatch.testing import TINY_FAMILIES, tiny_model

# `make test` runs two pytest workers (pytest-xdist): one thread each, so they do not fight
# over the cores; a plain `pytest` run keeps two threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@functools.lru_cache(maxsize=None)
def _tiny(family: str):
    return tiny_model(family, n_layers=3)


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request):
    """A 3-layer tiny model of each family (MHA and GQA variants)."""
    return _tiny(request.param)


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct, loaded offline."""
    import actpatch as ap

    return ap.load_model("smollm2-135m")


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, 60, (2, 7), generator=g)
