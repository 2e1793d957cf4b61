"""The computational graph of edge attribution and circuits, as frozen types.

Upstream :class:`Node` s write into the residual stream: the embeddings, every attention head,
every MLP. Downstream :class:`Port` s read it: each head's query input, each KV head's key and
value inputs, each MLP's input, the logits. An :class:`Edge` joins a node to a port it can
reach (it writes before the port reads). No magic layer numbers: the embeddings and the logits
are kinds of their own.

Two layouts (:class:`GraphLayout`) count the key and value inputs. actpatch's default, ``kv``,
gives each KV head one key and one value input, as the model computes them once per group under
grouped-query attention. MIB's, ``mib`` (the EAP-IG code behind the MIB benchmark), gives every
*query* head its own q, k and v inputs, also under grouped-query attention; MIB's edge counts and
fractions are of that graph. Without grouped-query attention the two are the same graph.

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

__all__ = ["NodeKind", "PortKind", "GraphLayout", "Node", "Port", "Edge", "Graph"]


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


class GraphLayout(str, enum.Enum):
    """How the graph counts the heads' key and value inputs (see the module docstring)."""

    KV = "kv"
    """One key and one value input per KV head (the default): what the model computes."""
    MIB = "mib"
    """One q, k and v input per query head, as MIB / EAP-IG count them also under grouped-query
    attention: MIB's edge counts (gpt2 32,491; Qwen2.5-0.5B 179,749; Gemma-2-2B 74,218)."""


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
    per_query_head: bool = False
    """A key or value input counted per query head (:attr:`GraphLayout.MIB`): ``head`` is then a
    query head, not a KV head."""

    def __str__(self) -> str:
        if self.kind is PortKind.LOGITS:
            return "logits"
        if self.kind is PortKind.MLP:
            return f"L{self.layer}.MLP"
        if self.kind is PortKind.Q or self.per_query_head:
            return f"L{self.layer}.H{self.head}.{self.kind.value}"
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
    layout: GraphLayout = GraphLayout.KV

    @classmethod
    def of(cls, model: "Model", layout: str | GraphLayout = GraphLayout.KV) -> "Graph":
        """The graph of ``model`` in ``layout``; refused where heads' writes do not add up
        (post-norms)."""
        kind = _layout(layout)
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
        return cls.shaped(model.n_layers, model.n_heads, model.n_kv_heads, parallel=caps.parallel_residual,
                          layout=kind)

    @classmethod
    def shaped(cls, n_layers: int, n_heads: int, n_kv_heads: int, *, parallel: bool = False,
               layout: str | GraphLayout = GraphLayout.KV) -> "Graph":
        """The graph of any model of this shape (no weights needed: e.g. to count a large
        model's edges).

        Example:
            >>> Graph.shaped(30, 9, 3).n_edges, Graph.shaped(30, 9, 3, layout="mib").n_edges  # SmolLM2-135M
            (70651, 123211)
        """
        kind = _layout(layout)
        L, H, KV = n_layers, n_heads, n_kv_heads
        per_query = kind is GraphLayout.MIB
        n_kv = H if per_query else KV
        nodes: list[Node] = [Node(NodeKind.EMBED)]
        ports: list[Port] = []
        for l in range(L):
            nodes += [Node(NodeKind.HEAD, l, h) for h in range(H)] + [Node(NodeKind.MLP, l)]
            ports += [Port(PortKind.Q, l, h) for h in range(H)]
            ports += [Port(k, l, j, per_query_head=per_query) for k in (PortKind.K, PortKind.V) for j in range(n_kv)]
            ports.append(Port(PortKind.MLP, l))
        ports.append(Port(PortKind.LOGITS))
        return cls(nodes=tuple(nodes), ports=tuple(ports), parallel=parallel, layout=kind)

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
        """(nodes, ports) boolean mask of the edges: :meth:`reaches` for every pair, at once."""
        last = len(self.nodes)  # above every layer: the logits
        node_layer = torch.tensor([-1 if n.kind is NodeKind.EMBED else int(n.layer or 0) for n in self.nodes])
        port_layer = torch.tensor([last if p.kind is PortKind.LOGITS else int(p.layer or 0) for p in self.ports])
        mask = node_layer[:, None] < port_layer[None, :]
        if not self.parallel:  # a layer's heads feed its own MLP
            heads = torch.tensor([n.kind is NodeKind.HEAD for n in self.nodes])
            mlps = torch.tensor([p.kind is PortKind.MLP for p in self.ports])
            mask |= (node_layer[:, None] == port_layer[None, :]) & heads[:, None] & mlps[None, :]
        return mask

    @property
    def n_edges(self) -> int:
        """How many edges the graph has (the base of MIB's fractions)."""
        return int(self.reachable.sum())

    def inputs(self, node: Node) -> list[Port]:
        """The ports through which ``node`` reads the residual stream: a head's q, k and v
        inputs (its KV head's, in the KV layout), an MLP's input; none for the embeddings."""
        if node.kind is NodeKind.MLP:
            return [Port(PortKind.MLP, node.layer)]
        if node.kind is not NodeKind.HEAD:
            return []
        l, h = node.layer, int(node.head)  # type: ignore[arg-type]
        if self.layout is GraphLayout.MIB:
            kv = [Port(k, l, h, per_query_head=True) for k in (PortKind.K, PortKind.V)]
        else:
            heads = sum(p.kind is PortKind.Q and p.layer == l for p in self.ports)
            kv_heads = sum(p.kind is PortKind.K and p.layer == l for p in self.ports)
            kv = [Port(k, l, h // (heads // kv_heads)) for k in (PortKind.K, PortKind.V)]
        return [Port(PortKind.Q, l, h)] + kv

    def edge(self, i: int, j: int) -> Edge:
        return Edge(self.nodes[i], self.ports[j])


def _layout(layout: str | GraphLayout) -> GraphLayout:
    try:
        return GraphLayout(layout)
    except ValueError:
        raise MethodError(f"layout={layout!r}: use 'kv' (one key / value input per KV head, the default) or "
                          f"'mib' (per query head, as MIB counts edges).") from None
