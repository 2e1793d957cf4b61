"""Figure entry points that keep ``import actpatch`` light: plotly is imported on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from .models.handle import Model

__all__ = ["plot_attention"]


def plot_attention(model: "Model", tokens: Sequence[int] | torch.Tensor | str, heads: Sequence[tuple[int, int]],
                   title: str | None = None) -> "go.Figure":
    """Attention patterns of chosen ``heads`` ((layer, head) pairs) on one prompt (text or token
    ids): query position x key position, tokens on both axes, one panel per head.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> fig = ap.plot_attention(tiny_model("llama"), [2, 5, 9, 4], heads=[(0, 1), (1, 3)])
        >>> len(fig.data)
        2
    """
    from .report.figures import attention_figure

    return attention_figure(model, tokens, heads, title)
