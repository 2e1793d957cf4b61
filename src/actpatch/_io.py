"""Reading saved results defensively: every way a result directory can be wrong (missing,
incomplete, truncated, hand-edited, another program's files) becomes one
:class:`~actpatch.ResultError` naming the file, the problem and the fix. Tensors are read with
safetensors only; nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from .errors import ResultError
from .findings import Finding, Origin

if TYPE_CHECKING:  # pragma: no cover
    from .results import PatchResult

T = TypeVar("T")

__all__ = ["read_result", "read_json", "write_named", "read_named"]

_FIX = "Re-run the experiment (or `actpatch run` it again: finished results are kept) to write it anew."


def write_named(items: "Mapping[str, Any]", path: str | Path) -> None:
    """Write ``{name: item.to_dict()}`` as JSON (faithfulness curves, MIB evaluations...)."""
    Path(path).write_text(json.dumps({k: v.to_dict() for k, v in items.items()}, indent=1))


def read_named(path: str | Path, from_dict: "Callable[[Any], T]", what: str) -> "dict[str, T]":
    """Read what :func:`write_named` wrote, each entry through ``from_dict``; {} when the file
    does not exist, one :class:`ResultError` when it is not ``what``."""
    p = Path(path)
    if not p.is_file():
        return {}
    data = read_json(p, what)
    try:
        return {str(k): from_dict(v) for k, v in data.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ResultError(f"{p}: not {what} ({type(e).__name__}: {e}); delete it and re-run that step.") from None


def read_json(path: Path, what: str) -> Any:
    """Parsed JSON of ``path``; :class:`ResultError` when it is missing or not JSON."""
    if not path.is_file():
        raise ResultError(f"{path}: missing; {what} needs it. {_FIX}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultError(f"{path}: not valid JSON ({e}); the file is truncated or not {what}'s. {_FIX}") from None


def read_result(cls: type["PatchResult"], p: Path) -> "PatchResult":
    """The result saved in ``p``, built by ``cls`` (which decodes its own info: this module
    never imports the result layer above it)."""
    readable = cls.READABLE_FORMATS
    if not p.exists():
        raise ResultError(f"{p} is not a saved PatchResult: no such directory. Pass a directory written by "
                          f"PatchResult.save().")
    if not p.is_dir():
        raise ResultError(f"{p} is a file; a saved PatchResult is a directory with meta.json and tensors.safetensors.")
    if not (p / "meta.json").is_file() or not (p / "tensors.safetensors").is_file():
        raise ResultError(f"{p} is not a saved PatchResult (needs meta.json and tensors.safetensors); it may be an "
                          f"unfinished run. {_FIX}")
    meta = read_json(p / "meta.json", "a saved PatchResult")
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise ResultError(f"{p / 'meta.json'}: not an actpatch result (no format_version). {_FIX}")
    version = meta["format_version"]
    if version not in readable:
        raise ResultError(f"{p}: format version {version!r}; this actpatch reads {', '.join(map(str, readable))}. "
                          f"Use the actpatch version that wrote it, or re-run the experiment.")
    tensors = _tensors(p / "tensors.safetensors")
    try:
        dims, coords, metrics = tuple(meta["dims"]), dict(meta["coords"]), list(meta["metrics"])
        info = cls.decode_info(meta, version, metrics)
        findings = [_finding(f) for f in meta.get("findings", [])]
        raw = {m: tensors[f"raw/{m}"] for m in metrics}
        clean = {m: tensors[f"clean/{m}"] for m in metrics}
        corrupted = {m: tensors[f"corrupted/{m}"] for m in metrics}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ResultError(f"{p}: meta.json and tensors do not fit together or a field is malformed "
                          f"({type(e).__name__}: {e}); was it edited by hand? {_FIX}") from None
    if not metrics:
        raise ResultError(f"{p}/meta.json lists no metrics. {_FIX}")
    shape = tuple(len(coords.get(d, ())) for d in dims)
    n = clean[metrics[0]].shape
    for m in metrics:
        if tuple(raw[m].shape[1:]) != shape or raw[m].shape[:1] != n or clean[m].shape != n or corrupted[m].shape != n:
            raise ResultError(f"{p}: tensors for {m!r} have shape {tuple(raw[m].shape)} but the coordinates say "
                              f"(n_prompts, {', '.join(map(str, shape))}); was meta.json edited by hand? {_FIX}")
    return cls(dims=dims, coords=coords, raw=raw, clean=clean, corrupted=corrupted, info=info, findings=findings)


def _finding(d: dict[str, Any]) -> Finding:
    """A saved finding; one saved before findings recorded their origin (formats 1 and 2) is a
    check's when a check emits its code, else the technique's."""
    from .checks import CHECK_CODES

    legacy = Origin.CHECK if d.get("code") in CHECK_CODES else Origin.TECHNIQUE
    return Finding.from_dict(d, default_origin=legacy)


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ResultError(f"{path}: not a readable safetensors file ({e}); it is truncated or of another "
                          f"format. {_FIX}") from None
