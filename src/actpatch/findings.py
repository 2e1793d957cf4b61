"""Findings: what a careful reader should know about a result, as data.

Checks (:mod:`actpatch.checks`) and techniques return :class:`Finding` objects; results carry
them (``res.findings``) and the CLI and report render them. Codes are stable identifiers that
tests and users can filter on. This module depends on nothing else in actpatch, so every other
module can use it.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

__all__ = ["Level", "Origin", "Finding", "sort_findings", "from_technique", "technique_findings"]


class Level(str, enum.Enum):
    """How much a finding matters."""

    INFO = "info"
    """Context worth knowing; nothing is wrong."""
    WARNING = "warning"
    """The result may mislead; read the advice."""
    ERROR = "error"
    """Part of the result is undefined or the experiment is broken."""


class Origin(str, enum.Enum):
    """Who stated a finding, which decides what happens to it when a result changes."""

    CHECK = "check"
    """A best-practice check of the result (:func:`actpatch.check`): recomputed whenever the
    result's prompts change (``subset``, ``concat``, ``split_by``, merged named positions)."""
    TECHNIQUE = "technique"
    """The technique that made the result (an attribution caveat, the subspace illusion check):
    not recomputable from the result, so kept, once, through every change of prompts."""


LEVEL_COLOURS = {Level.ERROR: "#b2182b", Level.WARNING: "#e08214", Level.INFO: "#2166ac"}
"""The colour of each level wherever findings are drawn."""


@dataclass(frozen=True)
class Finding:
    """One observation about an experiment: ``level``, stable ``code``, what was seen
    (``message``, with numbers), what to do (``advice``) and who said it (``origin``)."""

    level: Level
    code: str
    message: str
    advice: str = ""
    origin: Origin = Origin.CHECK

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = self.level.value
        d["origin"] = self.origin.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, default_origin: Origin = Origin.CHECK) -> "Finding":
        """Inverse of :meth:`to_dict`; ``default_origin`` for findings saved before origins
        were recorded."""
        origin = Origin(d["origin"]) if d.get("origin") else default_origin
        return cls(Level(d["level"]), d["code"], d["message"], d.get("advice", ""), origin)

    def __str__(self) -> str:
        return f"[{self.level.value}] {self.code}: {self.message}" + (f" -> {self.advice}" if self.advice else "")

    def to_html(self, where: str = "") -> str:
        """The one HTML form of a finding (notebooks, summaries and the report): coloured by
        level, with class ``finding <level>`` for the report's styles; ``where`` names the
        result it is about."""
        import html

        colour = LEVEL_COLOURS[self.level]
        about = f" ({html.escape(where)})" if where else ""
        advice = f"<div class='advice'><i>{html.escape(self.advice)}</i></div>" if self.advice else ""
        return (f"<div class='finding {self.level.value}'><b style='color:{colour}'>{html.escape(self.level.value)}"
                f"</b> <code>{html.escape(self.code)}</code>{about}: {html.escape(self.message)}{advice}</div>")

    def _repr_html_(self) -> str:
        return self.to_html()


def sort_findings(found: list[Finding]) -> list[Finding]:
    """Errors first, then warnings, then information; order kept within a level."""
    order = {Level.ERROR: 0, Level.WARNING: 1, Level.INFO: 2}
    return sorted(found, key=lambda f: order[f.level])


def from_technique(found: "Iterable[Finding]") -> list[Finding]:
    """``found`` marked as stated by a technique (:attr:`Origin.TECHNIQUE`)."""
    return [f if f.origin is Origin.TECHNIQUE else replace(f, origin=Origin.TECHNIQUE) for f in found]


def technique_findings(found: "Iterable[Finding]") -> list[Finding]:
    """The technique findings among ``found``, each once (by code and message): what a result
    keeps when its prompts change and its check findings are recomputed."""
    seen: dict[tuple[str, str], Finding] = {}
    for f in found:
        if f.origin is Origin.TECHNIQUE:
            seen.setdefault((f.code, f.message), f)
    return list(seen.values())
