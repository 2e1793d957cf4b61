"""Layer-wise relevance propagation rules as changes of the backward pass (RelP).

Relevance patching (RelP, Jafari et al. 2025) is attribution patching with the gradient of the
metric replaced by LRP's propagation coefficients. Each rule below is written so that the
forward pass is *bit-identical* to the model's own and only the backward pass changes; then one
ordinary backward pass yields the coefficients, and every gradient method of actpatch (node and
edge attribution) becomes its RelP variant by running inside :func:`relevance_rules`:

``ln`` (LN-rule, Ali et al. 2022)
    Norms (LayerNorm, RMSNorm and their family variants) pass relevance as if their scale
    ``1 / sqrt(var + eps)`` were a constant: ``y' = y - (y0 - b) (r(x) / r0 - 1)``, whose
    value is ``y`` and whose Jacobian is the norm's with the scale frozen (``y0``, ``r0``: the
    detached output and scale; ``b``: the bias). It needs no family detail beyond whether the
    norm centres its input, its epsilon and its bias.
``identity`` (Identity-rule)
    Element-wise activations (GELU, SiLU...) pass relevance as if they were linear:
    ``y' = y + (x - x0) * y0 / x0`` (gradient ``act(x) / x``).
``half`` (Half-rule)
    A gated MLP's product ``act(gate) * up`` passes half of the relevance to each factor:
    ``h' = h / 2 + (h / 2).detach()`` at the down projection's input, before any hook there,
    so the gradient *at* the neurons is the plain one and what flows below them is halved.
``ah`` (AH-rule, Ali et al. 2022)
    Attention patterns are held constant: relevance flows through the values only. Off by
    default, as in the authors' code (their demo uses ``ln``, ``identity`` and ``half``).

With all four rules a model without biases (and without soft-capped logits) is locally linear
in its input embeddings, so ``sum(embed * coefficient) == metric`` (LRP's conservation): the
test of this module. Linear layers use the 0-rule (the plain gradient).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
import transformers.activations

from ..errors import MethodError, UnsupportedArchitectureError
from ..sites import SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from .handle import Model

__all__ = ["RULES", "DEFAULT_RULES", "relevance_rules", "check_rules"]

RULES = ("ln", "identity", "half", "ah")
"""Every rule :func:`relevance_rules` knows."""
DEFAULT_RULES = ("ln", "identity", "half")
"""RelP's rules as the authors' code applies them by default (attention gradients kept)."""

_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Softplus)
_OLMO_EPS = 1e-5  # OlmoLayerNorm calls F.layer_norm with eps=1e-5 and keeps no attribute


def check_rules(model: "Model", rules: Sequence[str]) -> tuple[str, ...]:
    """``rules`` validated for ``model`` (before any computation)."""
    if isinstance(rules, str) or not all(isinstance(r, str) for r in rules):
        raise MethodError(f"rules={rules!r}: give a list of rule names from {', '.join(RULES)}.")
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise MethodError(f"Unknown relevance rule(s) {unknown}; choose from {', '.join(RULES)}.")
    if model.adapter.capabilities.mixture_of_experts and "half" in rules:
        raise UnsupportedArchitectureError(
            f"RelP on {model.adapter.family}: the half rule for a mixture of experts (router weights times "
            f"expert outputs) is not implemented. Use method='atp' (plain gradients) on this model.")
    if "ln" in rules:  # a norm of a class the LN rule does not know would keep its plain gradient, silently
        odd = sorted({type(m).__name__ for m in model.hf.modules() if "norm" in type(m).__name__.lower()
                      and not type(m).__name__.endswith("PerHead") and _norm_kind(m) is None})
        if odd:
            raise UnsupportedArchitectureError(
                f"RelP's LN rule does not know the norm class(es) {', '.join(odd)}: their scale would pass relevance "
                f"as a plain gradient and it would not be conserved. Use method='atp' on this model, or rules "
                f"without 'ln'.")
    return tuple(dict.fromkeys(rules))


def _norm_kind(module: nn.Module) -> tuple[bool, float] | None:
    """(centres its input, epsilon) of a norm module, or None for anything else."""
    name = type(module).__name__
    if name.endswith("PerHead"):  # StableLM's per-head q / k norms: a list of nn.LayerNorm, hooked one by one
        return None
    if isinstance(module, nn.LayerNorm):
        return True, float(module.eps)
    if name.endswith("RMSNorm") or name.endswith("LayerNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None and name == "OlmoLayerNorm":
            eps = _OLMO_EPS
        if eps is None:
            raise UnsupportedArchitectureError(
                f"RelP's LN rule: the norm {name} states no epsilon (variance_epsilon / eps); it is not verified. "
                f"Use method='atp' on this model.")
        return name.endswith("LayerNorm"), float(eps)
    return None


def _ln_rule(centred: bool, eps: float):  # noqa: ANN202 - a torch forward hook
    def hook(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
        x = args[0].float()
        u = x - x.mean(-1, keepdim=True) if centred else x
        r = torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
        rho = r / r.detach()  # 1 exactly; its gradient is the scale's, divided by the scale
        bias = getattr(module, "bias", None)
        y0 = output.detach().float() - (bias.detach().float() if isinstance(bias, torch.Tensor) else 0.0)
        return output - (y0 * (rho - 1.0)).to(output.dtype)
    return hook


def _identity_rule(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    x0 = x.detach()
    stable = x0 + ((x0 == 0).to(x0.dtype) + x0.sign()) * 1e-6  # away from 0, as RelP's code does
    return output.detach() + (x - x0) * (output.detach() / stable)


def _half_rule(module: nn.Module, args: tuple) -> tuple:
    h = args[0]
    return (h * 0.5 + (h * 0.5).detach(), *args[1:])


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACTIVATIONS) or type(module).__module__ == transformers.activations.__name__


@contextmanager
def relevance_rules(model: "Model", rules: Sequence[str] = DEFAULT_RULES) -> Iterator[None]:
    """While open, ``model``'s backward pass follows the LRP ``rules`` (see the module's
    docstring); its forward pass is unchanged, bit for bit. Nestable with every other hook:
    the rules run before actpatch's own hooks on the same modules, so a tap at a norm's output
    or at the neurons reads the coefficient *at* that point."""
    rules = check_rules(model, rules)
    adapter = model.adapter
    handles = []
    with ExitStack() as stack:
        try:
            for module in adapter.hf_model.modules():
                kind = _norm_kind(module) if "ln" in rules else None
                if kind is not None:
                    handles.append(module.register_forward_hook(_ln_rule(*kind), prepend=True))
                elif "identity" in rules and _is_activation(module):
                    handles.append(module.register_forward_hook(_identity_rule, prepend=True))
            if "half" in rules and adapter.spec.gated_mlp:
                for l in range(adapter.n_layers):
                    down = adapter.block_module(l, adapter.spec.mlp_down)  # type: ignore[arg-type]
                    handles.append(down.register_forward_pre_hook(_half_rule, prepend=True))
            if "ah" in rules:
                stack.enter_context(model.attention_state.hooked(
                    [(adapter.attention(l), SiteKind.PATTERN, -10, torch.Tensor.detach) for l in range(adapter.n_layers)]))
            yield
        finally:
            for h in handles:
                h.remove()
