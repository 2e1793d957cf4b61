"""Arguments of the public entry points, checked against their annotations.

A wrong type deep inside a sweep surfaces as a bare ``AttributeError: 'object' object has no
attribute 'adapter'`` or a ``TypeError`` from torch. :func:`checked` wraps an entry point: an
unknown or missing parameter is an :class:`~actpatch.errors.ArgumentError` before anything runs;
and when the entry point fails with anything but an :class:`~actpatch.errors.ActpatchError`,
its arguments are compared with their annotations and the first of the wrong kind is named
(function, parameter, what it takes, what it got) instead of the bare error. The entry points'
own checks keep their specific messages (``layers=[99]``, a pair that is not four strings).
Only the *kind* of value is compared; enums also accept their strings, iterables are checked
element-wise only when they are lists or tuples, and an annotation this module cannot read is
not checked.
"""

from __future__ import annotations

import collections.abc as cabc
import enum
import functools
import inspect
import numbers
import types
import typing
from typing import Any, Callable, TypeVar

import torch

from .errors import ActpatchError, ArgumentError

__all__ = ["checked", "checked_namespace", "matches"]

F = TypeVar("F", bound=Callable[..., Any])


def _namespace(fn: Callable[..., Any]) -> dict[str, Any]:
    """Names an annotation may use: the function's module, plus the classes that modules import
    only for type checking."""
    from .corruption import Corruption
    from .experiment.checkpoint import UnitStore
    from .metrics import CustomMetric, Metric
    from .models.handle import Model
    from .prompts.promptset import PromptSet
    from .results import PatchResult
    from .sites import Site
    from .subspace import Subspace

    extra = {"Model": Model, "PromptSet": PromptSet, "PatchResult": PatchResult, "Site": Site, "Metric": Metric,
             "CustomMetric": CustomMetric, "Corruption": Corruption, "UnitStore": UnitStore, "Subspace": Subspace}
    try:
        from .techniques.eap import EdgeScores

        extra["EdgeScores"] = EdgeScores
    except ImportError:  # pragma: no cover
        pass
    return {**vars(typing), **extra, **getattr(inspect.unwrap(fn), "__globals__", {})}


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Each parameter's annotation, evaluated; parameters whose annotation cannot be read are left out."""
    ns = _namespace(fn)
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        ann = p.annotation
        if ann is inspect.Parameter.empty:
            continue
        try:
            for _ in range(2):  # '"Model"' under postponed annotations is a string of a string
                if isinstance(ann, str):
                    ann = eval(ann, ns)  # noqa: S307 - our own annotations
        except Exception:  # a name only a type checker knows: not checked
            continue
        if isinstance(ann, str):
            continue
        out[name] = ann
    return out


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the kind ``tp`` describes (see the module docstring)."""
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, TypeVar):
        return True
    if tp is None or tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is typing.Annotated:
        return matches(value, args[0])
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or (issubclass(tp, str) and isinstance(value, str))
    if origin in (cabc.Callable,) or tp is cabc.Callable or tp is typing.Callable:
        return callable(value)
    if origin is not None:
        if isinstance(origin, type) and issubclass(origin, cabc.Mapping):
            return isinstance(value, cabc.Mapping)
        if isinstance(origin, type) and issubclass(origin, (cabc.Iterable,)) and origin is not str:
            if isinstance(value, (str, bytes)) or not isinstance(value, cabc.Iterable):
                return False
            if origin is tuple and args and args[-1] is not Ellipsis:
                return isinstance(value, tuple) and len(value) == len(args) and all(
                    matches(v, a) for v, a in zip(value, args))
            inner = args[0] if args else Any
            if isinstance(value, (list, tuple)):
                return all(matches(v, inner) for v in value)
            return True
        return True
    if tp is torch.dtype:
        return isinstance(value, torch.dtype)
    if isinstance(tp, type):
        if getattr(tp, "_is_protocol", False):
            return True
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_describe(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp))


def checked(fn: F) -> F:
    """``fn`` with its arguments checked against its annotations before it runs."""
    sig = inspect.signature(fn)
    hints: dict[str, Any] | None = None
    label = getattr(fn, "__qualname__", getattr(fn, "__name__", "the function"))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal hints
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise ArgumentError(f"{label}(): {e}; its parameters are {', '.join(sig.parameters)}.") from None
        if hints is None:
            hints = _hints(fn)
        switches = {k: v for k, v in bound.arguments.items() if hints.get(k) in _SWITCHES}
        problem = _wrong_kind(label, sig, hints, switches)  # a flag given anything else would be read as truthy
        if problem is not None:
            raise ArgumentError(problem)
        try:
            return fn(*args, **kwargs)
        except ActpatchError:
            raise
        except Exception as e:  # a bare error from inside: name the argument of the wrong kind, if one is
            problem = _wrong_kind(label, sig, hints, bound.arguments)
            if problem is None:
                raise
            raise ArgumentError(problem) from e

    return wrapper  # type: ignore[return-value]


_SWITCHES = (bool, bool | None, int, int | None, float, float | None)
"""Annotations checked before the call: a flag or a count given anything else may be read as
truthy or never read on some path (``progress=object()``, ``seed="1"``), so nothing else would notice."""


def _wrong_kind(label: str, sig: inspect.Signature, hints: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    for name, value in arguments.items():
        tp = hints.get(name)
        kind = sig.parameters[name].kind
        if tp is None or kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if not matches(value, tp):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"{label}({name}=...) takes {_describe(tp)}, not {type(value).__name__} {shown}."
    return None


def checked_namespace(namespace: dict[str, Any], names: typing.Iterable[str]) -> None:
    """Replace each public function of a namespace module (``globals()``) by its checked form."""
    for name in names:
        fn = namespace.get(name)
        if inspect.isfunction(fn) and not hasattr(fn, "__wrapped__"):
            namespace[name] = checked(fn)
