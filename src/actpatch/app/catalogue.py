"""The catalogue of experiment directories (``actpatch runs`` / ``actpatch show``), read from
the saved files only: ``run.json`` (the config), ``status.json`` (written as the experiment
starts, finishes or fails) and the results' ``meta.json``."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._io import read_json
from ..errors import OutputDirError
from .config import PathConfig, TargetConfig

__all__ = ["Entry", "find_experiments", "describe", "write_status"]

STATUS_FILE = "status.json"


def write_status(out: Path, status: str, **fields: Any) -> None:
    """Record an experiment's status (``running``, ``complete`` or ``failed``) atomically."""
    data = dict(read_json(out / STATUS_FILE, "an experiment directory")) if (out / STATUS_FILE).is_file() else {}
    data.update(status=status, **fields, updated=dt.datetime.now().isoformat(timespec="seconds"))
    tmp = out / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, out / STATUS_FILE)


@dataclass(frozen=True)
class Entry:
    """One experiment directory, as its files describe it."""

    path: Path
    model: str
    prompts: str
    targets: list[str]
    date: str
    status: str
    """``complete``, ``partial`` (stopped or still running), ``failed``, or ``saved`` (results
    saved from Python with ``res.save``, no run around them)."""
    done: int
    expected: int
    error: str = ""


def _expected(cfg: dict[str, Any]) -> list[str]:
    """The result directories a saved config makes, named as the runner names them (the
    sections' own ``name``); a section this version cannot read counts as never done."""
    dirs = [d for d in cfg.get("directions", [])]
    names = []
    for key, section in (("targets", TargetConfig), ("paths", PathConfig)):
        for i, t in enumerate(cfg.get(key, [])):
            try:
                base = section.model_validate(t).name
            except ValidationError:
                base = f"<unreadable {key}[{i}]>"
            names += [f"{base}_{d}" for d in dirs]
    return names


def saved_results(p: Path) -> list[Path]:
    """The result folders at ``p``: ``p`` itself when it is one (``res.save(p)``), else its
    subfolders that are."""
    if (p / "meta.json").is_file():
        return [p]
    return sorted(c for c in p.iterdir() if (c / "meta.json").is_file()) if p.is_dir() else []


def _describe_saved(p: Path, found: list[Path]) -> Entry:
    """An entry for results saved from Python: what their own meta.json files say."""
    metas = [read_json(f / "meta.json", "a saved result") for f in found]
    infos = [m.get("info", {}) if isinstance(m, dict) else {} for m in metas]
    models = sorted({str(i.get("provenance", {}).get("model", "?")) for i in infos})
    sets = sorted({f"{i.get('provenance', {}).get('prompts', {}).get('name', '?')} "
                   f"n={i.get('provenance', {}).get('prompts', {}).get('n_prompts', '?')}" for i in infos})
    when = max((f / "meta.json").stat().st_mtime for f in found)
    names = [f.name for f in found] if found != [p] else [p.name]
    return Entry(path=p, model=", ".join(models), prompts=", ".join(sets), targets=names,
                 date=dt.datetime.fromtimestamp(when).isoformat(timespec="seconds").replace("T", " "),
                 status="saved", done=len(found), expected=len(found))


def describe(path: str | Path) -> Entry:
    """The catalogue entry of one experiment directory, or of results saved with ``res.save``
    (one result folder, or a folder of them)."""
    p = Path(path)
    state = p / "run.json"
    if not state.is_file():
        found = saved_results(p)
        if found:
            return _describe_saved(p, found)
        raise OutputDirError(f"{p} is neither an experiment directory (no run.json) nor a saved result (no "
                             f"meta.json); `actpatch runs DIR` lists them.")
    saved = read_json(state, "an experiment directory")
    cfg = saved.get("config", {}) if isinstance(saved, dict) else {}
    expected = _expected(cfg)
    done = sum((p / name / "meta.json").is_file() for name in expected)
    circuits = cfg.get("circuits") is not None
    complete = done == len(expected) and (not circuits or (p / "circuits.json").is_file())
    status_data = read_json(p / STATUS_FILE, "an experiment directory") if (p / STATUS_FILE).is_file() else {}
    failed = isinstance(status_data, dict) and status_data.get("status") == "failed"
    status = "failed" if failed and not complete else "complete" if complete else "partial"
    when = status_data.get("updated") if isinstance(status_data, dict) else None
    date = when or dt.datetime.fromtimestamp(state.stat().st_mtime).isoformat(timespec="seconds")
    pc = cfg.get("prompts", {})
    prompts = (f"{pc.get('builder')} n={pc.get('n')}" if pc.get("builder") else Path(str(pc.get("file"))).name) if pc else "?"
    targets = sorted({n.rsplit("_", 1)[0] for n in expected}) + (["circuits"] if circuits else [])
    return Entry(path=p, model=str(cfg.get("model", "?")), prompts=prompts, targets=targets,
                 date=date.replace("T", " "), status=status, done=done + (circuits and (p / "circuits.json").is_file()),
                 expected=len(expected) + circuits,
                 error=str(status_data.get("error", "")) if isinstance(status_data, dict) and failed else "")


def find_experiments(root: str | Path, depth: int = 3) -> list[Entry]:
    """Every experiment directory (one holding ``run.json``) and every folder of results saved
    from Python at most ``depth`` levels below ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        raise OutputDirError(f"{root}: no such directory; give the folder your experiments write to (default: out).")
    found: list[Path] = []

    def walk(d: Path, level: int) -> None:
        if (d / "run.json").is_file() or (d / "meta.json").is_file():  # a run, or one saved result
            found.append(d)
            return
        children = sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith("."))
        if any((c / "meta.json").is_file() for c in children):  # a folder of saved results
            found.append(d)
        if level < depth:
            for child in children:
                if not (child / "meta.json").is_file():
                    walk(child, level + 1)

    walk(root, 0)
    return sorted((describe(d) for d in found), key=lambda e: e.date, reverse=True)
