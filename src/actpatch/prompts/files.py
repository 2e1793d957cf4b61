"""Prompt files: JSONL (one object per line) or CSV (a header row), read into pairs, their named
positions and attributes, with every bad record reported at once by its line number.

Each record has ``clean``, ``corrupted``, ``answer`` and ``alternative`` (text; answers with
their leading space), and optionally ``positions`` (named token positions, ``{"S2": 10}`` in
JSONL, the same JSON or ``S2=10;IO=4`` in a CSV cell; indices of the clean prompt),
``corrupted_positions`` (the same names' indices in the corrupted prompt, for pairs of different
lengths: an alignment by name) and ``attributes`` (an object of anything to group prompts by,
JSONL only). Any other key is refused by name: a misspelt
``postions`` would otherwise be dropped silently.

Example:
    >>> import json, tempfile, pathlib
    >>> from actpatch.prompts.files import read_prompt_file
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "pairs.jsonl"
    >>> _ = f.write_text(json.dumps({"clean": "a b", "corrupted": "a c", "answer": " x", "alternative": " y",
    ...                              "positions": {"B": 1}}) + "\\n")
    >>> rows = read_prompt_file(f)
    >>> rows[0].pair, rows[0].positions, rows[0].where
    (('a b', 'a c', ' x', ' y'), {'B': 1}, 'pairs.jsonl line 1')
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PromptError

__all__ = ["PromptRecord", "read_prompt_file", "FIELDS", "OPTIONAL"]

FIELDS = ("clean", "corrupted", "answer", "alternative")
OPTIONAL = ("positions", "corrupted_positions", "attributes")


@dataclass(frozen=True)
class PromptRecord:
    """One record of a prompt file."""

    pair: tuple[str, str, str, str]
    positions: dict[str, int] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    """How errors name it: ``pairs.jsonl line 3`` (CSV lines count the header)."""
    corrupted_positions: dict[str, int] = field(default_factory=dict)


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Every record of a JSONL or CSV prompt file; one :class:`PromptError` lists every bad one."""
    p = Path(path)
    if not p.is_file():
        raise PromptError(f"{p}: no such prompt file.")
    raw: list[tuple[str, Any]] = []  # (where, record)
    problems: list[str] = []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{p}: not a UTF-8 text file ({e.reason}); give JSONL or CSV.") from None
    if p.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(text.splitlines())
            rows = list(reader)
        except csv.Error as e:
            raise PromptError(f"{p}: not a readable CSV file ({e}).") from None
        header = reader.fieldnames or []
        unknown = [h for h in header if h not in FIELDS + OPTIONAL]
        if unknown or "attributes" in header:
            bad = unknown + (["attributes"] if "attributes" in header else [])
            raise PromptError(f"{p}: unknown column(s) {bad}; a CSV prompt file has {', '.join(FIELDS)} and "
                              f"optionally positions and corrupted_positions (attributes need JSONL).")
        raw = [(f"{p.name} line {i + 2}", r) for i, r in enumerate(rows)]
    else:
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                raw.append((f"{p.name} line {i + 1}", json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"{p.name} line {i + 1}: not valid JSON ({e.msg}).")
    out = []
    for where, r in raw:
        problem, record = _record(where, r)
        if problem:
            problems.append(problem)
        else:
            out.append(record)
    if problems:
        shown = "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise PromptError(f"{p}: {len(problems)} bad record(s):\n{shown}")
    if not out:
        raise PromptError(f"{p}: no prompt records; each line (JSONL) or row (CSV) needs {', '.join(FIELDS)}.")
    return out


def _record(where: str, r: Any) -> tuple[str | None, PromptRecord | None]:
    if not isinstance(r, dict):
        return f"{where}: expected an object with {', '.join(FIELDS)}, got {type(r).__name__} {r!r:.60}.", None
    unknown = [k for k in r if k not in FIELDS + OPTIONAL]
    if unknown:
        return (f"{where}: unknown key(s) {unknown}; a record has {', '.join(FIELDS)} and optionally "
                f"{', '.join(OPTIONAL)}."), None
    missing = [k for k in FIELDS if k not in r or r[k] is None]
    if missing:
        return f"{where}: missing {missing}; each record needs {', '.join(FIELDS)}.", None
    bad = [k for k in FIELDS if not isinstance(r[k], str)]
    if bad:
        return f"{where}: {bad[0]} is {r[bad[0]]!r}, not text; quote it.", None
    positions, problem = _positions(where, r.get("positions"))
    if problem:
        return problem, None
    corrupted_positions, problem = _positions(where, r.get("corrupted_positions"))
    if problem:
        return problem.replace("positions", "corrupted_positions", 1), None
    attributes = r.get("attributes") or {}
    if not isinstance(attributes, dict):
        return f"{where}: attributes must be an object ({{\"template\": 3}}), got {type(attributes).__name__}.", None
    return None, PromptRecord(tuple(r[k] for k in FIELDS), positions, dict(attributes), where,  # type: ignore[arg-type]
                              corrupted_positions)


def _positions(where: str, value: Any) -> tuple[dict[str, int], str | None]:
    """Named positions from an object, its JSON text, or ``name=index;name=index``."""
    if value in (None, ""):
        return {}, None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                return {}, f"{where}: positions {text!r:.60} is not valid JSON ({e.msg})."
        else:
            value = {}
            for part in filter(None, (x.strip() for x in text.split(";"))):
                name, sep, index = part.partition("=")
                if not sep:
                    return {}, f"{where}: positions {text!r:.60}: write name=index;name=index, e.g. S2=10;IO=4."
                value[name.strip()] = index.strip()
    if not isinstance(value, dict):
        return {}, f"{where}: positions must map names to token indices, e.g. {{\"S2\": 10}}."
    out = {}
    for name, index in value.items():
        try:
            as_int = int(index)
        except (TypeError, ValueError):
            return {}, f"{where}: position {name!r} is {index!r}, not a token index."
        if isinstance(index, float) and index != as_int or as_int < 0:
            return {}, f"{where}: position {name!r} is {index!r}, not a token index (0, 1, ...)."
        out[str(name)] = as_int
    return out, None
