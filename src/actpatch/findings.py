"""Findings: what a careful reader should know about a result, as data.

Checks (:mod:`actpatch.checks`) and techniques return :class:`Finding` objects; results carry
them (``res.findings``) and the CLI and report render them. Codes are stable identifiers that
tests and users can filter on. This module depends on nothing else in actpatch, so every other
module can use it.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Level", "Finding", "sort_findings"]


class Level(str, enum.Enum):
    """How much a finding matters."""

    INFO = "info"
    """Context worth knowing; nothing is wrong."""
    WARNING = "warning"
    """The result may mislead; read the advice."""
    ERROR = "error"
    """Part of the result is undefined or the experiment is broken."""


@dataclass(frozen=True)
class Finding:
    """One observation about an experiment: ``level``, stable ``code``, what was seen
    (``message``, with numbers) and what to do (``advice``)."""

    level: Level
    code: str
    message: str
    advice: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = self.level.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Finding":
        return cls(Level(d["level"]), d["code"], d["message"], d.get("advice", ""))

    def __str__(self) -> str:
        return f"[{self.level.value}] {self.code}: {self.message}" + (f" -> {self.advice}" if self.advice else "")

    def _repr_html_(self) -> str:
        import html

        colour = {"error": "#b2182b", "warning": "#e08214", "info": "#2166ac"}[self.level.value]
        advice = f"<br><i>{html.escape(self.advice)}</i>" if self.advice else ""
        return (f"<div><b style='color:{colour}'>{html.escape(self.level.value)}</b> <code>{html.escape(self.code)}"
                f"</code>: {html.escape(self.message)}{advice}</div>")


def sort_findings(found: list[Finding]) -> list[Finding]:
    """Errors first, then warnings, then information; order kept within a level."""
    order = {Level.ERROR: 0, Level.WARNING: 1, Level.INFO: 2}
    return sorted(found, key=lambda f: order[f.level])
