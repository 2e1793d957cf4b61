"""Reports: plotly figures, static SVGs, and one self-contained offline HTML file."""

from .html import write_report

__all__ = ["write_report"]
