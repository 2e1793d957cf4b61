"""The colour scale every heatmap uses: diverging, centred on the result's *no-effect* value
(0 for denoising, 1 for noising), with its range read from the data.

A noising result's unimportant cells sit at 1; centring on 0 would paint them all dark and hide
the components whose patch *raises* the metric (negative components, value > 1). Here white is
always "the patch changed nothing", blue is "the metric went up", red "the metric went down",
and the half-range is at least one full clean-corrupted difference (so colour intensity reads
as a share of the whole effect) and grows to the largest deviation in the data, so overshoot
and negative components keep distinct colours instead of being clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Scale", "BLUE", "RED"]

BLUE = (33, 102, 172)
"""The colour of the far positive end (metric higher than with no patch)."""
RED = (178, 24, 43)
"""The colour of the far negative end (metric lower than with no patch)."""
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Scale:
    """A diverging scale: ``centre`` is white, ``centre ± span`` the full colours."""

    centre: float
    span: float

    @classmethod
    def of(cls, values: torch.Tensor, centre: float) -> "Scale":
        """The scale for ``values`` (normalised; NaN ignored) around ``centre``."""
        finite = values[torch.isfinite(values)]
        reach = float((finite.double() - centre).abs().max()) if finite.numel() else 0.0
        return cls(centre=float(centre), span=max(1.0, reach))

    @property
    def low(self) -> float:
        return self.centre - self.span

    @property
    def high(self) -> float:
        return self.centre + self.span

    def position(self, v: float) -> float:
        """Where ``v`` falls: -1 (full red) … 0 (white, no effect) … +1 (full blue); NaN stays NaN."""
        if math.isnan(v):
            return v
        return max(-1.0, min(1.0, (v - self.centre) / self.span))

    def rgb(self, v: float) -> tuple[int, int, int] | None:
        """The colour of ``v`` on the scale (None for NaN)."""
        p = self.position(v)
        if math.isnan(p):
            return None
        end = BLUE if p > 0 else RED
        a = abs(p)
        r, g, b = (round(w + (c - w) * a) for w, c in zip(WHITE, end))
        return r, g, b

    def hex(self, v: float, nan: str = "#dddddd") -> str:
        c = self.rgb(v)
        return nan if c is None else "#{:02x}{:02x}{:02x}".format(*c)

    def describe(self) -> str:
        """The legend in words, true for every rendering of this scale."""
        return (f"white = {self.centre:g} (no effect); blue: metric higher, full at {self.high:+.2f}; "
                f"red: metric lower, full at {self.low:+.2f}")
