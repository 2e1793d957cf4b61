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

Implementation: the forward pass records every block's input (the residual stream it reads,
kept in the autograd graph). One ordinary backward pass gives the plain gradients and the
gradient at each block's output. With layer ``l`` dropped, gradients at nodes above ``l`` are
the plain ones, at nodes in ``l`` zero, and at nodes below ``l`` they are what the gradient at
block ``l``'s output gives when handed straight to block ``l``'s input (the skip connection
only): one partial backward pass from layer ``l`` down. All ``L`` scores cost about
``1 + (L - 1) / 2`` full backward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from ..errors import MethodError
from ..hooks import capture
from ..sites import Site

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["trace_blocks", "dropped_gradients", "combine"]


class Boundary(Sequence[torch.Tensor]):
    """Each block's input in layer order, then the last block's output, as recorded by the
    ``resid_pre`` / ``resid_post`` captures of the latest forward pass (kept in the graph)."""

    def __init__(self, acts: dict[Site, torch.Tensor], n_layers: int) -> None:
        self._acts, self._sites = acts, [Site("resid_pre", l) for l in range(n_layers)] + [Site("resid_post", n_layers - 1)]

    def __len__(self) -> int:
        return len(self._sites)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        return self._acts[self._sites[i]]


@contextmanager
def trace_blocks(model: "Model") -> Iterator[Boundary]:
    """For forward passes run inside the context, the yielded :class:`Boundary` holds each
    block's input, in layer order, then the last block's output; the tensors stay in the
    autograd graph. Read at the ``resid_pre`` / ``resid_post`` sites after every write, so they
    are the tensors the blocks actually receive."""
    L = model.n_layers
    # whole: with answers of several tokens the continuation's positions are part of each block's
    # contribution too (dropping a layer drops it at every position of the sequence)
    with capture(model, [Site("resid_pre", l) for l in range(L)] + [Site("resid_post", L - 1)], detach=False,
                 whole=True) as acts:
        yield Boundary(acts, L)


def dropped_gradients(
    metric: torch.Tensor, taps: dict[Site, torch.Tensor], boundary: Sequence[torch.Tensor],
) -> Iterator[dict[Site, torch.Tensor | None]]:
    """The gradient of ``metric`` at taps (tensors added at sites in the forward pass): first the
    plain gradients at every tap, then for each layer ``l = 1 .. L - 1`` the gradients with layer
    ``l``'s residual contribution dropped at the taps *below* ``l`` (above it they are the plain
    ones, in it zero, and ``l = 0`` has nothing below). ``None`` where no path is left.
    ``boundary`` comes from :func:`trace_blocks`. Keeps the graph."""
    sites = list(taps)
    n_layers = len(boundary) - 1
    lowest = min(s.layer for s in sites)  # type: ignore[type-var]
    needed = list(range(lowest + 1, n_layers))  # layers with taps below them
    out = torch.autograd.grad(metric, [taps[s] for s in sites] + [boundary[l + 1] for l in needed],
                              retain_graph=True, allow_unused=True)
    yield dict(zip(sites, out[: len(sites)]))
    at_output = dict(zip(needed, out[len(sites):]))
    for layer in range(1, n_layers):
        below = [s for s in sites if s.layer < layer]  # type: ignore[operator]
        gs: tuple = (None,) * len(below)
        if below:
            gs = torch.autograd.grad(boundary[layer], [taps[s] for s in below], grad_outputs=at_output[layer],
                                     retain_graph=True, allow_unused=True)
        yield dict(zip(below, gs))


def combine(abs_sum: torch.Tensor, n_layers: int) -> torch.Tensor:
    """``c_GD`` from the sum over dropped layers of ``|estimate|``."""
    if n_layers < 2:
        raise MethodError("GradDrop needs a model with at least two layers.")
    return abs_sum / (n_layers - 1)
