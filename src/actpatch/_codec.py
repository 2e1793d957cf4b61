"""One JSON codec for the frozen records results carry, driven by their type hints: a dataclass
is an object of its fields, an enum its value, a tuple a list, a :class:`~actpatch.Site` its
string, and a union of dataclasses is told apart by their ``KIND`` tag. Adding a field to a
record needs no codec change; a field missing from saved JSON takes its default. A record whose
saved shape is its own (to read older files) defines ``to_json()`` and ``from_json(data)``.

Example:
    >>> from dataclasses import dataclass
    >>> from actpatch.types import Direction
    >>> @dataclass(frozen=True)
    ... class Note:
    ...     direction: Direction
    ...     layers: tuple[int, ...] = ()
    >>> encode(Note(Direction.NOISE, (1, 2)))
    {'direction': 'noise', 'layers': [1, 2]}
    >>> decode(Note, {"direction": "noise"}, globals())
    Note(direction=<Direction.NOISE: 'noise'>, layers=())
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from .sites import Site

__all__ = ["encode", "decode"]


def encode(obj: Any) -> Any:
    """``obj`` as JSON-ready data (dicts, lists, strings, numbers, None)."""
    if isinstance(obj, Site):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_json"):
            return obj.to_json()
        out = {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        kind = getattr(type(obj), "KIND", None)
        return {"kind": kind, **out} if kind is not None else out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    return obj


def decode(tp: Any, data: Any, namespace: dict[str, Any] | None = None) -> Any:
    """The value of type ``tp`` that :func:`encode` wrote as ``data``; ``namespace`` resolves
    the string annotations of records defined outside a module (doctests)."""
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        tagged = [a for a in options if dataclasses.is_dataclass(a) and hasattr(a, "KIND")]
        if tagged and isinstance(data, dict):
            for a in tagged:
                if a.KIND == data.get("kind"):
                    return decode(a, data, namespace)
            raise ValueError(f"unknown kind {data.get('kind')!r}; expected one of {[a.KIND for a in tagged]}")
        return decode(options[0], data, namespace) if len(options) == 1 else data
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, namespace) for v in data)
        return tuple(decode(a, v, namespace) for a, v in zip(args, data))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return [decode(arg, v, namespace) for v in data]
    if origin is dict:
        _, arg = typing.get_args(tp) or (str, Any)
        return {k: decode(arg, v, namespace) for k, v in data.items()}
    if tp is Site:
        return Site.parse(data)
    if dataclasses.is_dataclass(tp):
        if hasattr(tp, "from_json"):
            return tp.from_json(data)
        hints = typing.get_type_hints(tp, globalns=namespace)
        known = {f.name for f in dataclasses.fields(tp) if f.init}
        return tp(**{k: decode(hints[k], v, namespace) for k, v in data.items() if k in known})
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is float and isinstance(data, int):
        return float(data)
    return data
