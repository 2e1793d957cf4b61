"""What a technique will do under a memory budget, before it runs
(``ap.experiment.estimate``): each technique's own plan (:mod:`actpatch.memory`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..corruption import Corruption, parse_corruption
from ..errors import MemoryBudgetError
from ..experiment.plan import Grid, plan_for
from ..memory import MemoryPlan
from ..prompts.promptset import PromptSet
from .attribution import attribution_memory_plan, tapped_sites
from ..types import Engine
from .eap import edge_memory_plan
from .exact import choose_engine, sweep_memory_plan
from .graph import Graph

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["estimate"]


def estimate(model: "Model", prompts: PromptSet, technique: str = "atp", *, target: str = "z",
             memory_budget: "int | str | None" = None, ig_steps: int = 5, ig_target: str = "inputs",
             layout: str = "mib", n_positions: int | None = None, grad_drop: bool = False, qk_fix: bool = False,
             corruption: "str | Corruption" = "str") -> MemoryPlan:
    """What a technique will do under ``memory_budget``, before running it: prompts a chunk,
    recomputation, estimated peak bytes, forward-pass equivalents (``print`` it). Raises
    :class:`~actpatch.errors.MemoryBudgetError`, naming the smallest budget, where one prompt
    does not fit. ``technique``: ``"atp"`` / ``"relp"`` (:func:`~actpatch.attribute` of
    ``target``, with ``grad_drop`` / ``qk_fix``), ``"eap"``, ``"eap-ig"`` (``ig_steps``,
    ``ig_target``), ``"peap"`` (``n_positions`` named positions; None: every position),
    ``"sweep"`` (:func:`~actpatch.sweep` of every cell of ``target``, auto engine).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import random_pairs, tiny_model
        >>> print(ap.experiment.estimate(tiny_model("llama"), random_pairs(n=4), "eap-ig", memory_budget="512KiB"))
        Edge attribution: 3 of 4 prompt rows at a time (2 chunks), about 502.98 KiB of a 512.00 KiB budget; 17 forward-pass equivalents
    """
    corr = parse_corruption(corruption)
    draws = corr.draws
    if technique == "sweep":  # per position where the prompts share one length
        grid = plan_for(model, prompts, target, Grid(per_position=None if len(set(prompts.lengths.tolist())) == 1
                                                     else False))
        return sweep_memory_plan(model, prompts, grid, choose_engine(grid, Engine.AUTO), memory_budget, draws=draws,
                                 whole_own=corr.activation_level or "alignment" in prompts.meta)
    if technique in ("atp", "relp"):
        grid = plan_for(model, prompts, target, Grid())
        return attribution_memory_plan(model, prompts, tapped_sites(grid, qk_fix), memory_budget, grad_drop=grad_drop,
                                       draws=draws, pattern=grid.uses_attention_fn or qk_fix)
    if technique not in ("eap", "eap-ig", "peap"):
        raise MemoryBudgetError(f"estimate: technique={technique!r}; use 'atp', 'relp', 'eap', 'eap-ig', 'peap' or "
                                f"'sweep'.")
    positions = n_positions or (prompts.seq_len if technique == "peap" else 1)
    return edge_memory_plan(model, prompts, Graph.of(model, layout), memory_budget,
                            n_steps=ig_steps if technique == "eap-ig" else 1, summed=technique != "peap",
                            per_position=positions, draws=draws, ig_target=ig_target)
