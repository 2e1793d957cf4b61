"""GradDrop: AtP*'s remedy for cancelling direct and indirect effects (Kramár et al. 2024).

A component can reach the metric directly and through later layers, with the two paths of
opposite sign: their first-order sum is near zero although patching the component matters (the
later path is non-linear, so the cancellation is not exact). GradDrop recomputes the AtP
estimate ``L`` times; the ``l``-th time the gradient is not propagated through layer ``l``'s
contribution to the residual stream (it still flows along the residual connection past layer
``l``), which removes every path through that layer. The score of a node ``n`` is::

    c_GD(n) = E_x [ 1 / (L - 1) * sum over l = 1..L of | I_AtP+GD_l(n; x) | ]

where ``I_AtP+GD_l`` is AtP's estimate with layer ``l`` dropped. For a node in layer ``j`` the
term ``l = j`` is zero (every path from the node passes through its own layer's output), and
the terms ``l < j`` equal plain AtP, hence the ``L - 1``. For a node in the last layer,
``c_GD = |AtP|``. The score is a magnitude: it ranks nodes, it has no sign.

Sources: Kramár, Lieberum, Shah & Nanda 2024, "AtP*: An efficient and scalable method for
localizing LLM behaviour to components", section on cancellation (GradDrop) and its equation
for ``c_AtP+GD``; the formula was checked against an independent replication of the paper
(koayon/atp_star, which implements the same ``1 / (L - 1)`` mean of absolute values) and the
paper's public summaries ("iteratively zeroing gradients at layers contributing to the indirect
effects").

Implementation: a gate on each block's output, the identity in the forward pass; in the
backward pass of a dropped layer it hands the incoming gradient to the block's *input* instead
of its output, so nothing flows through the block's attention or MLP.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .hooks import READ, _add

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model

__all__ = ["LayerDrop", "drop_gradients"]


class LayerDrop:
    """Which layer's residual contribution the next backward pass skips (``None``: none)."""

    def __init__(self) -> None:
        self.layer: int | None = None


class _Gate(torch.autograd.Function):
    """``out`` in the forward pass; backward: the gradient goes to ``out`` (through the block),
    or, when the block's layer is dropped, straight to the block's input ``inp``."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, inp: torch.Tensor, state: LayerDrop, layer: int) -> torch.Tensor:
        ctx.state, ctx.layer = state, layer
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        if ctx.state.layer == ctx.layer:
            return None, grad, None, None
        return grad, None, None, None


@contextmanager
def drop_gradients(model: "Model") -> Iterator[LayerDrop]:
    """Gate every block for forward passes run inside the context; set ``.layer`` on the yielded
    :class:`LayerDrop` before each backward pass to choose the dropped layer.

    The gates run after every write and read at the block boundary, so they wrap the output the
    next block actually receives.
    """
    state = LayerDrop()
    with ExitStack() as stack:
        for layer, block in enumerate(model.adapter.blocks):
            inputs: list[torch.Tensor] = []

            def keep(x: torch.Tensor, inputs: list = inputs) -> None:
                inputs[:] = [x]

            def gate(x: torch.Tensor, inputs: list = inputs, layer: int = layer) -> torch.Tensor | None:
                if not (torch.is_grad_enabled() and inputs):
                    return None
                return _Gate.apply(x, inputs.pop(), state, layer)

            stack.callback(_add(block, "input", keep, READ))
            stack.callback(_add(block, "output", gate, READ))
        yield state


def combine(abs_sum: torch.Tensor, n_layers: int) -> torch.Tensor:
    """``c_GD`` from the sum over dropped layers of ``|estimate|``."""
    if n_layers < 2:
        raise ValueError("GradDrop needs a model with at least two layers.")
    return abs_sum / (n_layers - 1)
