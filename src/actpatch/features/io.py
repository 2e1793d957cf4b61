"""Reading and writing dictionaries in SAELens's on-disk layout.

A dictionary folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` (d_in,
d_sae), ``b_enc``, ``W_dec`` (d_sae, d_out), ``b_dec``, and ``threshold`` for JumpReLU,
``topk_threshold`` for a BatchTopK training checkpoint, ``W_skip`` for a skip transcoder).
``cfg.json`` is read in SAELens's current form (``architecture``, ``d_in``, ``d_sae``,
``apply_b_dec_to_input``, ``normalize_activations``, ``k``, ``metadata.hook_name``) and its
older flat form (``hook_name``, ``hook_layer``, ``activation_fn_str``,
``activation_fn_kwargs``). The hook name becomes an actpatch :class:`~actpatch.Site`:

- TransformerLens names: ``blocks.{l}.hook_resid_pre`` / ``hook_resid_mid`` /
  ``hook_resid_post`` / ``hook_attn_out`` / ``hook_mlp_out`` / ``hook_mlp_in``,
  ``blocks.{l}.attn.hook_z``, ``blocks.{l}.mlp.hook_post``;
- Hugging Face module names (``model.layers.{l}``, ``model.layers.{l}.mlp``, ...), resolved
  against the model's adapter (pass ``model=``): the site whose hook point is that module's
  output.

Anything else (an unknown name or architecture, a per-head hook, a pickled checkpoint) is
refused by name, never guessed. Weights are never unpickled.

Example:
    >>> import tempfile, torch
    >>> from actpatch import Site
    >>> from actpatch.features import Dictionary, load_dictionary, save_dictionary
    >>> d = Dictionary.random(Site("resid_pre", 1), d_in=8, n_features=16, activation="topk", k=4)
    >>> folder = tempfile.mkdtemp()
    >>> save_dictionary(d, folder)
    >>> e = load_dictionary(folder)
    >>> e.site, e.activation.value, e.k, bool(torch.equal(e.W_dec, d.W_dec))
    (Site(kind=<SiteKind.RESID_PRE: 'resid_pre'>, layer=1, head=None, pos=None, index=None), 'topk', 4, True)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import DictionaryError
from ..sites import Site, SiteKind
from .dictionary import Activation, Dictionary, Normalization

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["load_dictionary", "save_dictionary", "site_of_hook", "hook_of_site", "CFG_FILE", "WEIGHTS_FILE"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_PICKLES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")

_TL_HOOKS = {
    "hook_resid_pre": SiteKind.RESID_PRE, "hook_resid_mid": SiteKind.RESID_MID,
    "hook_resid_post": SiteKind.RESID_POST, "hook_attn_out": SiteKind.ATTN_OUT, "hook_mlp_out": SiteKind.MLP_OUT,
    "hook_mlp_in": SiteKind.MLP_IN, "attn.hook_z": SiteKind.Z, "mlp.hook_post": SiteKind.MLP_POST,
}
_TL_NAMES = {kind: hook for hook, kind in _TL_HOOKS.items()}
_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")

# SAELens architecture -> (activation, transcoder, skip)
_ARCHITECTURES = {
    "standard": (Activation.RELU, False, False), "relu": (Activation.RELU, False, False),
    "jumprelu": (Activation.JUMPRELU, False, False), "batchtopk": (Activation.JUMPRELU, False, False),
    "topk": (Activation.TOPK, False, False),
    "transcoder": (Activation.RELU, True, False), "skip_transcoder": (Activation.RELU, True, True),
    "jumprelu_transcoder": (Activation.JUMPRELU, True, False),
}


def hook_of_site(site: Site) -> str:
    """The TransformerLens hook name of a dictionary site (``blocks.3.hook_resid_post``)."""
    return f"blocks.{site.layer}.{_TL_NAMES[site.kind]}"


def site_of_hook(name: str, model: "Model | None" = None) -> Site:
    """The site a hook name denotes: a TransformerLens name, or (with ``model``) a Hugging Face
    module name whose output is a dictionary site of that model."""
    text = str(name).strip()
    m = _TL.match(text)
    if m and m.group(2) in _TL_HOOKS:
        return Site(_TL_HOOKS[m.group(2)], int(m.group(1)))
    if m and m.group(2) == "ln2.hook_normalized":
        raise DictionaryError(f"Hook {text!r} is the MLP's normalised input, which actpatch does not expose as a site "
                              f"(its sites before the norm are mlp_in / resid_mid); a transcoder reading it cannot be "
                              f"attached exactly yet.")
    if model is not None:
        site = _module_site(model, text)
        if site is not None:
            return site
    known = ", ".join(f"blocks.{{l}}.{h}" for h in _TL_HOOKS)
    hint = "" if model is not None else " A Hugging Face module name needs the model: load_dictionary(path, model=m)."
    raise DictionaryError(f"Hook name {text!r} is not one actpatch reads; it understands {known}, and Hugging Face "
                          f"module names whose output is a residual, attention or MLP output.{hint} Or pass site= "
                          f"explicitly.")


def _module_site(model: "Model", name: str) -> Site | None:
    try:
        module = model.hf.get_submodule(name)
    except AttributeError:
        try:
            module = model.hf.get_submodule(f"model.{name}")
        except AttributeError:
            return None
    for layer in range(model.n_layers):
        for kind in (SiteKind.RESID_POST, SiteKind.ATTN_OUT, SiteKind.MLP_OUT):
            site = Site(kind, layer)
            try:
                if model.adapter.hook_point(site) == (module, "output"):
                    return site
            except Exception:  # a kind this family lacks
                continue
    return None


def _folder(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix in _PICKLES:
            raise DictionaryError(_pickle_message(p))
        p = p.parent
    if not p.is_dir():
        raise DictionaryError(f"No dictionary folder at {str(p)!r}: give a folder holding {CFG_FILE} and "
                              f"{WEIGHTS_FILE} (SAELens's layout).")
    missing = [f for f in (CFG_FILE, WEIGHTS_FILE) if not (p / f).is_file()]
    if missing:
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in _PICKLES)
        if pickles and WEIGHTS_FILE in missing:
            raise DictionaryError(_pickle_message(p / pickles[0]))
        raise DictionaryError(f"Dictionary folder {str(p)!r} lacks {' and '.join(missing)} (SAELens's layout: "
                              f"{CFG_FILE} + {WEIGHTS_FILE}).")
    return p


def _pickle_message(path: Path) -> str:
    return (f"{str(path)!r} is a pickled checkpoint; actpatch never unpickles files (they can run code). Convert it "
            f"once where you trust it: sd = torch.load(path, weights_only=True); "
            f"safetensors.torch.save_file(sd, '{WEIGHTS_FILE}'), next to a {CFG_FILE}.")


SCHEMES: dict[str, Callable[[str, "Model"], Dictionary]] = {}
"""Sources named ``"<scheme>:<what>"`` that :func:`load_dictionary` resolves for a model;
:mod:`actpatch.features.builtin` registers ``"bundled"``."""


def load_dictionary(source: Any, *, model: "Model | None" = None, site: Site | None = None,
                    reads: Site | None = None, name: str | None = None) -> Dictionary:
    """Read a dictionary: a folder in SAELens's layout, or an object with the same weights (an
    ``sae_lens`` SAE: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and a ``cfg``). ``site`` /
    ``reads`` override the hook names; ``model`` resolves Hugging Face module names.

    ``"bundled:<site>"`` (e.g. ``"bundled:resid_post.L6"``, with ``model=``) gives the
    dictionary actpatch trains for the model at that residual-stream site on first use
    (:mod:`actpatch.features.builtin`).

    Example: ``d = ap.load_dictionary("saes/layer8")``; ``print(d.summary())``."""
    if isinstance(source, Dictionary):
        return source
    scheme = source.split(":", 1)[0] if isinstance(source, str) and ":" in source else None
    if scheme in SCHEMES:
        if model is None:
            raise DictionaryError(f"{source!r} is trained for a model: pass model=, e.g. "
                                  f"ap.load_dictionary({source!r}, model=ap.load_model()).")
        return SCHEMES[scheme](source.split(":", 1)[1].strip(), model)  # type: ignore[union-attr]
    if isinstance(source, (str, Path)):
        folder = _folder(source)
        try:
            cfg = json.loads((folder / CFG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise DictionaryError(f"{str(folder / CFG_FILE)!r} is not valid JSON ({e}).") from None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            weights = load_file(str(folder / WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise DictionaryError(f"{str(folder / WEIGHTS_FILE)!r} cannot be read as safetensors ({e}).") from None
        default_name = folder.name
    elif all(hasattr(source, w) for w in ("W_enc", "W_dec", "b_enc", "b_dec")) and hasattr(source, "cfg"):
        cfg = source.cfg.to_dict() if hasattr(source.cfg, "to_dict") else dict(vars(source.cfg))
        weights = {k: v.detach().cpu() for k, v in source.state_dict().items()}
        default_name = type(source).__name__
    else:
        raise DictionaryError(f"load_dictionary() takes a folder path (SAELens's layout) or an SAE object with "
                              f"W_enc / b_enc / W_dec / b_dec and a cfg, got {type(source).__name__}.")
    if not isinstance(cfg, dict):
        raise DictionaryError(f"The dictionary config must be a JSON object, got {type(cfg).__name__}.")
    return _from_parts(cfg, weights, model=model, site=site, reads=reads, name=name or default_name)


def _from_parts(cfg: dict[str, Any], weights: dict[str, torch.Tensor], *, model: "Model | None", site: Site | None,
                reads: Site | None, name: str) -> Dictionary:
    ours = cfg.get("actpatch") or {}
    meta = {**cfg, **(cfg.get("metadata") or cfg.get("meta") or {})}
    arch = str(cfg.get("architecture", "standard"))
    if arch not in _ARCHITECTURES:
        raise DictionaryError(f"Dictionary architecture {arch!r} is not one actpatch reads ("
                              f"{', '.join(sorted(_ARCHITECTURES))}).")
    activation, transcoder, skip = _ARCHITECTURES[arch]
    fn = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu")
    if arch == "standard" and fn == "topk":
        activation = Activation.TOPK
    elif fn not in ("relu", "topk"):
        raise DictionaryError(f"Activation function {fn!r} is not one actpatch reads (relu, topk, jumprelu).")
    if ours.get("activation"):
        activation = Activation(ours["activation"])
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if cfg.get("finetuning_scaling_factor"):
        raise DictionaryError("This dictionary uses SAELens's finetuning scaling factor; fold it into W_dec first "
                              "(sae.fold_activation_norm_scaling_factor or a re-export).")
    if meta.get("hook_head_index") is not None:
        raise DictionaryError(f"This dictionary reads one head (hook_head_index={meta['hook_head_index']}); actpatch "
                              f"attaches dictionaries to whole sites.")
    normalization, scale = _normalization(cfg, ours)
    hook_in = meta.get("hook_name")
    if site is None and reads is None and ours.get("site"):
        site = Site.parse(ours["site"])
        reads = Site.parse(ours["reads"]) if ours.get("reads") else None
    elif transcoder:
        if reads is None:
            reads = site_of_hook(_needed(hook_in, "hook_name"), model)
        if site is None:
            site = site_of_hook(_needed(cfg.get("hook_name_out") or meta.get("hook_name_out"), "hook_name_out"), model)
    elif site is None:
        site = site_of_hook(_needed(hook_in, "hook_name"), model)
    w = _weights(weights, activation, arch, skip)
    if w["W_enc"].dim() == 2 and cfg.get("d_sae") not in (None, w["W_enc"].shape[1]):
        raise DictionaryError(f"cfg.json says d_sae={cfg['d_sae']}, but W_enc has {w['W_enc'].shape[1]} features.")
    keep = {key: meta[key] for key in ("model_name", "hook_name", "hook_name_out", "dataset_path", "context_size")
            if meta.get(key) is not None}
    if ours.get("quality"):
        keep["quality"] = ours["quality"]
    return Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], site, reads=reads, activation=activation,
                      k=None if k is None else int(k), threshold=w.get("threshold"),
                      apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), normalization=normalization,
                      scale=scale, W_skip=w.get("W_skip"), name=ours.get("name") or name, meta=keep)


def _needed(value: Any, key: str) -> str:
    if not value:
        raise DictionaryError(f"cfg.json has no {key}: actpatch cannot tell which site the dictionary belongs to; "
                              f"pass site= (and reads= for a transcoder).")
    return str(value)


def _normalization(cfg: dict[str, Any], ours: dict[str, Any]) -> tuple[Normalization, float | None]:
    if ours.get("normalization"):
        return Normalization(ours["normalization"]), ours.get("scale")
    norm = str(cfg.get("normalize_activations") or "none")
    if norm == "expected_average_only_in":
        factor = cfg.get("norm_scaling_factor") or cfg.get("activation_scaling_factor")
        if not factor:
            raise DictionaryError("normalize_activations='expected_average_only_in' needs its factor: add "
                                  "norm_scaling_factor to cfg.json (SAELens's pretrained table lists it), or fold it "
                                  "into the weights.")
        return Normalization.SCALE, float(factor)
    try:
        return Normalization(norm), None
    except ValueError:
        raise DictionaryError(f"normalize_activations={norm!r} is not one actpatch reads (none, "
                              f"expected_average_only_in, constant_norm_rescale, layer_norm).") from None


def _weights(weights: dict[str, torch.Tensor], activation: Activation, arch: str, skip: bool) -> dict[str, torch.Tensor]:
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
    missing = [k for k in need if k not in weights]
    if activation is Activation.JUMPRELU and "threshold" not in weights and "topk_threshold" not in weights:
        missing.append("threshold")
    if missing:
        raise DictionaryError(f"{WEIGHTS_FILE} lacks {', '.join(missing)} (architecture {arch!r}); it holds "
                              f"{', '.join(sorted(weights)) or 'nothing'}.")
    out = {k: weights[k] for k in need}
    if activation is Activation.JUMPRELU:
        out["threshold"] = weights["threshold"] if "threshold" in weights else weights["topk_threshold"].reshape(1)
    return out


def save_dictionary(d: Dictionary, path: str | Path) -> None:
    """Write ``d`` in SAELens's layout (readable by SAELens when its architecture is one of
    SAELens's); actpatch's own fields (the sites, quality figures) ride along under
    ``"actpatch"`` in cfg.json."""
    from safetensors.torch import save_file

    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    arch = {Activation.RELU: "standard", Activation.JUMPRELU: "jumprelu", Activation.TOPK: "topk"}[d.activation]
    if d.is_transcoder:
        arch = "skip_transcoder" if d.W_skip is not None else \
            ("jumprelu_transcoder" if d.activation is Activation.JUMPRELU else "transcoder")
    hook = hook_of_site(d.input_site)
    meta = {"hook_name": hook, "hook_layer": d.input_site.layer, "hook_head_index": None,
            **{k: v for k, v in d.meta.items() if k in ("model_name", "dataset_path", "context_size")}}
    norm = "expected_average_only_in" if d.normalization is Normalization.SCALE else d.normalization.value
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": d.d_in, "d_sae": d.n_features, "dtype": str(d.dtype).removeprefix("torch."),
        "device": "cpu", "apply_b_dec_to_input": d.apply_b_dec_to_input, "normalize_activations": norm,
        "reshape_activations": "hook_z" if d.input_site.kind == SiteKind.Z else "none", "metadata": meta,
        "hook_name": hook, "hook_layer": d.input_site.layer,
    }
    if d.normalization is Normalization.SCALE:
        cfg["norm_scaling_factor"] = d.scale
    if d.k is not None:
        cfg["k"] = d.k
    if d.is_transcoder:
        cfg.update(d_out=d.d_out, hook_name_out=hook_of_site(d.site), hook_layer_out=d.site.layer)
    cfg["actpatch"] = {"site": str(d.site), "reads": None if d.reads is None else str(d.reads),
                       "activation": d.activation.value, "normalization": d.normalization.value, "scale": d.scale,
                       "name": d.name, "quality": d.meta.get("quality")}
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if d.threshold is not None:
        tensors["threshold"] = d.threshold
    if d.W_skip is not None:
        tensors["W_skip"] = d.W_skip
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2))



