"""The computational graph of edge attribution and circuits, as frozen types.

Upstream :class:`Node` s write into the residual stream: the embeddings, every attention head,
every MLP. Downstream :class:`Port` s read it: each head's query input, each KV head's key and
value inputs, each MLP's input, the logits. An :class:`Edge` joins a node to a port it can
reach (it writes before the port reads). No magic layer numbers: the embeddings and the logits
are kinds of their own.

Example:
    >>> from actpatch.testing import tiny_model
    >>> g = Graph.of(tiny_model("llama", n_layers=2))
    >>> [str(n) for n in g.nodes[:3]], str(g.ports[-1])
    (['embed', 'L0.H0', 'L0.H1'], 'logits')
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from ..errors import MethodError
from ..sites import SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["NodeKind", "PortKind", "Node", "Port", "Edge", "Graph"]


class NodeKind(str, enum.Enum):
    """What writes into the residual stream."""

    EMBED = "embed"
    """The token embeddings (with any position embedding): what block 0 reads."""
    HEAD = "head"
    """One attention head's write through the output projection."""
    MLP = "mlp"
    """One MLP's output."""


class PortKind(str, enum.Enum):
    """What reads the residual stream."""

    Q = "q"
    """A head's query input."""
    K = "k"
    """A KV head's key input."""
    V = "v"
    """A KV head's value input."""
    MLP = "mlp"
    """An MLP's input (the ``mlp_in`` site)."""
    LOGITS = "logits"
    """The final residual stream, read by the unembedding."""


@dataclass(frozen=True)
class Node:
    """An upstream node: ``Node(NodeKind.HEAD, 3, 1)`` is head 1 of layer 3."""

    kind: NodeKind
    layer: int | None = None
    head: int | None = None

    def __str__(self) -> str:
        if self.kind is NodeKind.EMBED:
            return "embed"
        return f"L{self.layer}.H{self.head}" if self.kind is NodeKind.HEAD else f"L{self.layer}.MLP"


@dataclass(frozen=True)
class Port:
    """A downstream input: ``Port(PortKind.K, 2, 0)`` is KV head 0's key input in layer 2."""

    kind: PortKind
    layer: int | None = None
    head: int | None = None

    def __str__(self) -> str:
        if self.kind is PortKind.LOGITS:
            return "logits"
        if self.kind is PortKind.MLP:
            return f"L{self.layer}.MLP"
        if self.kind is PortKind.Q:
            return f"L{self.layer}.H{self.head}.q"
        return f"L{self.layer}.KV{self.head}.{self.kind.value}"


@dataclass(frozen=True)
class Edge:
    """``upstream`` writes what ``downstream`` reads."""

    upstream: Node
    downstream: Port

    def __str__(self) -> str:
        return f"{self.upstream} -> {self.downstream}"


@dataclass(frozen=True)
class Graph:
    """Every node and port of a model, in layer order, and which node reaches which port."""

    nodes: tuple[Node, ...]
    ports: tuple[Port, ...]
    parallel: bool
    """Attention and MLP of a layer read the same input: a layer's heads do not feed its MLP."""

    @classmethod
    def of(cls, model: "Model") -> "Graph":
        """The graph of ``model``; refused where heads' writes do not add up (post-norms)."""
        caps = model.adapter.capabilities
        if not caps.heads_write_additively:
            raise MethodError(
                f"The {model.family} family normalises the attention output after the output projection, so heads' "
                f"writes do not add up; edge attribution and circuits need per-head writes (gpt2, llama, gpt_neox)."
            )
        if SiteKind.MLP_IN not in model.adapter.site_kinds:
            raise MethodError(
                f"In the {model.family} family attention and the MLP read one shared norm of the residual stream, so "
                f"an edge into the MLP cannot be patched apart from the edges into the heads; edge attribution and "
                f"circuits need an MLP input of its own (gpt2, llama, gpt_neox...)."
            )
        L, H, KV = model.n_layers, model.n_heads, model.n_kv_heads
        nodes: list[Node] = [Node(NodeKind.EMBED)]
        ports: list[Port] = []
        for l in range(L):
            nodes += [Node(NodeKind.HEAD, l, h) for h in range(H)] + [Node(NodeKind.MLP, l)]
            ports += [Port(PortKind.Q, l, h) for h in range(H)]
            ports += [Port(PortKind.K, l, j) for j in range(KV)] + [Port(PortKind.V, l, j) for j in range(KV)]
            ports.append(Port(PortKind.MLP, l))
        ports.append(Port(PortKind.LOGITS))
        return cls(nodes=tuple(nodes), ports=tuple(ports), parallel=caps.parallel_residual)

    @cached_property
    def node_index(self) -> dict[Node, int]:
        return {n: i for i, n in enumerate(self.nodes)}

    @cached_property
    def port_index(self) -> dict[Port, int]:
        return {p: j for j, p in enumerate(self.ports)}

    def reaches(self, node: Node, port: Port) -> bool:
        """Whether ``node`` writes before ``port`` reads."""
        if node.kind is NodeKind.EMBED or port.kind is PortKind.LOGITS:
            return True
        nl, pl = int(node.layer or 0), int(port.layer or 0)  # heads, MLPs and their ports have layers
        if nl < pl:
            return True
        return port.kind is PortKind.MLP and node.kind is NodeKind.HEAD and nl == pl and not self.parallel

    @cached_property
    def reachable(self) -> torch.Tensor:
        """(nodes, ports) boolean mask of the edges."""
        return torch.tensor([[self.reaches(n, p) for p in self.ports] for n in self.nodes], dtype=torch.bool)

    def edge(self, i: int, j: int) -> Edge:
        return Edge(self.nodes[i], self.ports[j])
