"""Dictionaries that need no download: small TopK SAEs trained on first use, then cached.

No pretrained SAE ships offline, so the default experience trains its own, deterministically,
the way the dequantised model is built once (:mod:`actpatch.models.loading`):

- **text**: the Python documentation installed with Python (``pydoc_data.topics``, English
  prose and code) in windows of 64 tokens, plus the prompts of the IOI and factual builders
  (clean and corrupted, with their answers): about 30,000 tokens;
- **sites**: the residual stream after two layers (by default at 1/5 and 1/2 of the depth:
  layers 6 and 15 of the 30 of SmolLM2-135M);
- **training**: :func:`actpatch.features.train.train_topk` (2,048 features, k = 32), seeded;
  a held-out tenth of the tokens gives the quality figures, and held-out IOI prompts the
  metric's change when the reconstruction replaces the activation
  (:func:`~actpatch.features.train.dictionary_quality`); both are stored with the weights
  (``meta["quality"]``, shown by :meth:`Dictionary.summary`).

The cache (``<cache_dir>/dictionaries/<model>-<fingerprint>/<recipe>/<site>/``) is SAELens's
layout (:func:`~actpatch.features.io.save_dictionary`); the recipe's hash covers the
settings and the training tokens, so a change to either trains afresh. Nothing is committed.

Example (the bundled model; about 3 minutes on two CPU cores the first time, 163 s measured, then instant)::

    m = ap.load_model()
    early, middle = ap.features.bundled(m)
    print(early.summary())
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..errors import DictionaryError
from ..sites import Site, SiteKind
from .dictionary import Dictionary
from .io import SCHEMES, load_dictionary, save_dictionary

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model
    from ..prompts.promptset import PromptSet

__all__ = ["Recipe", "bundled", "default_sites", "corpus"]

_FORMAT = 1


@dataclass(frozen=True)
class Recipe:
    """How the bundled dictionaries are trained (every field enters the cache key)."""

    n_features: int = 2048
    k: int = 32
    steps: int = 400
    batch: int = 512
    lr: float = 2e-3
    seed: int = 0
    window: int = 64
    text_windows: int = 320
    prompts_per_builder: int = 200
    held_out: float = 0.1
    quality_prompts: int = 32
    format: int = field(default=_FORMAT)


DEFAULT_RECIPE = Recipe()
"""The recipe :func:`bundled` uses when none is given."""


def default_sites(model: "Model") -> tuple[Site, ...]:
    """The residual stream after the layers at 1/5 and 1/2 of the depth."""
    L = model.n_layers
    layers = sorted({max(0, round(L / 5)), L // 2}) if L > 1 else [0]
    return tuple(Site("resid_post", l) for l in layers)


def corpus(model: "Model", recipe: Recipe | None = None) -> list[list[int]]:
    """The training sequences (token id lists): Python's documentation in windows, then the
    builders' clean and corrupted prompts each followed by its answer's first token."""
    from pydoc_data.topics import topics

    from ..prompts import factual, ioi

    recipe = recipe or DEFAULT_RECIPE
    text = "\n\n".join(topics[key] for key in sorted(topics))
    W = recipe.window
    ids = model.tokenizer(text[: W * recipe.text_windows * 6], add_special_tokens=False)["input_ids"]
    seqs = [ids[i:i + W] for i in range(0, len(ids) - W + 1, W)][: recipe.text_windows]
    n = recipe.prompts_per_builder
    for build in (ioi, factual):
        ps = _built(build, model, n, seed=1)
        for g in ps.groups() if ps is not None else ():
            for side in (g.clean, g.corrupted):
                seqs += [row.tolist() + [int(a)] for row, a in zip(side, g.answers)]
    return seqs


def _built(build: Callable[..., "PromptSet"], model: "Model", n: int, seed: int) -> "PromptSet | None":
    """A builder's prompts, or None where the tokenizer cannot form them (e.g. the tiny
    test tokenizers, which lack the names)."""
    from ..errors import PromptError

    try:
        return build(model, n=n, seed=seed)
    except PromptError:
        return None


def bundled(model: "Model", sites: Sequence[Site | str] | None = None, *, recipe: Recipe | None = None,
            rebuild: bool = False, progress: bool = True) -> list[Dictionary]:
    """Dictionaries for ``model`` at ``sites`` (default :func:`default_sites`), from the cache
    or trained now with ``recipe`` (default :data:`DEFAULT_RECIPE`; see the module
    docstring); ``rebuild=True`` trains afresh."""
    recipe = recipe or DEFAULT_RECIPE
    chosen = [Site.parse(s) if isinstance(s, str) else s for s in (sites or default_sites(model))]
    for s in chosen:
        if s.kind not in (SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST) or s.pos is not None:
            raise DictionaryError(f"The bundled dictionaries sit on the residual stream (resid_pre / resid_mid / "
                                  f"resid_post at a layer, all positions), not at {s}.")
        s.check(model)
    seqs = corpus(model, recipe)
    key = _recipe_key(model, recipe, seqs)
    root = _model_dir(model) / key
    missing = [s for s in chosen if rebuild or not (root / _slug(s) / "cfg.json").exists()]
    if missing:
        _train(model, missing, seqs, recipe, root, progress)
    return [load_dictionary(root / _slug(s)) for s in chosen]


def _train(model: "Model", sites: list[Site], seqs: list[list[int]], recipe: Recipe, root: Path,
           progress: bool) -> None:
    from ..experiment.executor import progress_bar
    from ..prompts import ioi
    from .train import collect_activations, dictionary_quality, train_topk

    t0 = time.perf_counter()
    acts = collect_activations(model, sites, seqs)
    held = _built(ioi, model, recipe.quality_prompts, seed=99)  # not the training prompts (seed 1)
    root.mkdir(parents=True, exist_ok=True)
    with progress_bar(progress, recipe.steps * len(sites), "training dictionaries") as advance:
        for s in sites:
            t1 = time.perf_counter()
            x = acts[s]
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(recipe.seed))
            n_test = max(1, int(len(x) * recipe.held_out))
            train, test = x[perm[n_test:]], x[perm[:n_test]]
            d = train_topk(train, s, n_features=recipe.n_features, k=recipe.k, steps=recipe.steps,
                           batch=min(recipe.batch, len(train)), lr=recipe.lr, seed=recipe.seed, progress=advance)
            d = Dictionary(d.W_enc, d.b_enc, d.W_dec, d.b_dec, s, activation=d.activation, k=d.k,
                           name=f"actpatch-topk-{_slug(s)}",
                           meta={"model_name": model.name, "dataset_path": "pydoc_data.topics + ioi + factual",
                                 "context_size": recipe.window})
            quality = dictionary_quality(d, test, model=model, prompts=held)
            quality["train_s"] = round(time.perf_counter() - t1, 1)
            d.meta["quality"] = quality
            _write_atomically(d, root / _slug(s))
    (root / "recipe.json").write_text(json.dumps({**asdict(recipe), "tokens": sum(map(len, seqs)),
                                                  "build_s": round(time.perf_counter() - t0, 1)}, indent=2))


def _write_atomically(d: Dictionary, target: Path) -> None:
    from ..models.loading import building

    with building(target) as tmp:
        save_dictionary(d, tmp)


def _slug(site: Site) -> str:
    return str(site).replace(".", "_")


def _model_dir(model: "Model") -> Path:
    from ..models.loading import cache_dir

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model.name)).name)[:60] or "model"
    return cache_dir() / "dictionaries" / f"{name}-{_fingerprint(model)}"


def _fingerprint(model: "Model") -> str:
    """A short hash of the model's shape and of its embedding and first block's weights."""
    h = hashlib.sha256(f"{model.n_layers}/{model.d_model}/{model.tokenizer.vocab_size}".encode())
    params = list(model.hf.parameters())
    for p in params[:4]:
        h.update(p.detach().flatten()[:65536].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _recipe_key(model: "Model", recipe: Recipe, seqs: list[list[int]]) -> str:
    h = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    h.update(json.dumps(seqs).encode())
    return h.hexdigest()[:12]


def _from_scheme(what: str, model: "Model") -> Dictionary:
    """``load_dictionary("bundled:<site>", model=...)``."""
    return bundled(model, [what])[0]


SCHEMES["bundled"] = _from_scheme
