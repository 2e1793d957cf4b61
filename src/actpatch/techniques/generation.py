"""``generate``: what the model writes under a patch, with a key / value cache.

The prompt runs once with ``patches`` written at its positions (as :func:`actpatch.intervene`
does); its keys and values are cached *as the attention used them* (after any q / k / v
write), so every new token attends to the patched prompt exactly as a full forward pass over
prompt + generated tokens would. ``every_step`` patches are written at each new position (a
steering vector, an ablated head), never at the prompt. The unpatched continuation is generated
next to it (``baseline=True``), and a notebook shows the two side by side.

Greedy decoding is deterministic; ``greedy=False`` samples from ``softmax(logits /
temperature)`` with a seeded generator. Batches are prompts of one token length.

Example:
    >>> import torch, actpatch as ap
    >>> from actpatch.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> out = ap.generate(model, [1, 2, 3], patches={ap.Site("resid_pre", 1, pos=2): 0.0}, max_new_tokens=3)
    >>> tuple(out.tokens.shape), tuple(out.baseline_tokens.shape)
    ((1, 3), (1, 3))
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PromptError, SiteError
from ..hooks import Value, capture, intervene
from ..sites import Site

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["generate", "Generation", "prompt_ids"]


@dataclasses.dataclass(frozen=True)
class Generation:
    """Continuations of a batch of prompts under patches (and without them).

    Attributes:
        prompt: the prompt ids ``(B, T)``.
        tokens: the generated ids ``(B, N)`` under the patches.
        logits: the logits that chose them ``(B, N, vocab)`` (step ``j`` predicts ``tokens[:, j]``).
        baseline_tokens / baseline_logits: the same without any patch (None when not asked for).
        text / baseline_text: decoded continuations, one string per prompt (``#id`` tokens when
            the model has no tokenizer).
    """

    prompt: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor
    text: tuple[str, ...]
    baseline_tokens: torch.Tensor | None = None
    baseline_logits: torch.Tensor | None = None
    baseline_text: tuple[str, ...] | None = None
    prompt_text: tuple[str, ...] = ()

    @property
    def changed(self) -> torch.Tensor:
        """``(B,)``: whether the patched continuation differs from the unpatched one."""
        if self.baseline_tokens is None:
            raise PromptError("This generation has no baseline; call ap.generate(..., baseline=True).")
        return (self.tokens != self.baseline_tokens).any(1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ids and text of the prompts and both continuations (not the logits)."""
        return {"prompt": self.prompt.tolist(), "prompt_text": list(self.prompt_text), "tokens": self.tokens.tolist(),
                "text": list(self.text),
                "baseline_tokens": None if self.baseline_tokens is None else self.baseline_tokens.tolist(),
                "baseline_text": None if self.baseline_text is None else list(self.baseline_text)}

    def __repr__(self) -> str:
        lines = [f"Generation({self.tokens.shape[0]} prompt(s), {self.tokens.shape[1]} new tokens)"]
        for i, text in enumerate(self.text):
            head = self.prompt_text[i] if self.prompt_text else ""
            lines.append(f"  [{i}] {head!r}\n      patched:   {text!r}")
            if self.baseline_text is not None:
                lines.append(f"      unpatched: {self.baseline_text[i]!r}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = []
        for i, text in enumerate(self.text):
            base = "" if self.baseline_text is None else html.escape(self.baseline_text[i])
            head = html.escape(self.prompt_text[i]) if self.prompt_text else str(i)
            rows.append(f"<tr><td>{head}</td><td><b>{html.escape(text)}</b></td><td>{base}</td></tr>")
        return ("<table><thead><tr><th>prompt</th><th>patched</th><th>unpatched</th></tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>")


def prompt_ids(model: "Model", prompt: Any) -> torch.Tensor:
    """``(B, T)`` ids of a prompt given as text, a list of ids, a list of texts of one token
    length, or a tensor (1-D or 2-D)."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.long()
        ids = ids[None] if ids.dim() == 1 else ids
    elif isinstance(prompt, str):
        ids = torch.tensor([_encode(model, prompt)])
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        rows = [_encode(model, p) for p in prompt]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise PromptError(f"The prompts tokenise to different lengths ({lengths}); generate for each length "
                              f"separately (one call per length).")
        ids = torch.tensor(rows)
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, int) for p in prompt):
        ids = torch.tensor([list(prompt)])
    else:
        raise PromptError(f"prompt={prompt!r:.60}: give text, a list of texts, a list of token ids or a tensor of ids.")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise PromptError(f"The prompt has shape {tuple(ids.shape)}; give at least one token per prompt.")
    if int(ids.min()) < 0 or int(ids.max()) >= model.vocab_size:
        raise PromptError(f"Token ids must lie in 0..{model.vocab_size - 1}; got {int(ids.min())}..{int(ids.max())}.")
    return ids


def _encode(model: "Model", text: str) -> list[int]:
    if model.tokenizer is None:
        raise PromptError("This model has no tokenizer; pass token ids instead of text.")
    ids = list(model.tokenizer(text)["input_ids"])
    if not ids:
        raise PromptError(f"The prompt {text!r} has no tokens.")
    return ids


def _at_prompt(patches: Mapping[Site, Value], T: int) -> dict[Site, Value]:
    """The prompt patches at token indices (negative positions counted from the prompt's end)."""
    out: dict[Site, Value] = {}
    for site, value in patches.items():
        if isinstance(site.pos, str):
            raise SiteError(f"{site}: generate takes token indices (pos=<int>, negative from the end), not names.")
        if isinstance(site.pos, int):
            pos = T + site.pos if site.pos < 0 else site.pos
            if not 0 <= pos < T:
                raise SiteError(f"{site}: position {site.pos} is outside the prompt ({T} tokens: 0..{T - 1}).")
            site = site.at(pos)
        out[site] = value
    return out


def generate(
    model: "Model",
    prompt: Any,
    patches: Mapping[Site, Value] | None = None,
    *,
    every_step: Mapping[Site, Value] | None = None,
    max_new_tokens: int = 20,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    baseline: bool = True,
) -> Generation:
    """Generate ``max_new_tokens`` tokens after ``prompt`` with ``patches`` at its positions.

    Args:
        prompt: text, a list of texts of one token length, a list of ids, or ids ``(B, T)``.
        patches: ``{Site: value}`` written while the prompt runs (as :func:`actpatch.intervene`:
            a tensor broadcast onto the site's slice, a number, or a function of it); a site
            without a position covers every prompt position, negative positions count from
            the prompt's end.
        every_step: ``{Site without a position: value}`` written at each new position (the
            slice there has one position), never at the prompt.
        greedy: argmax decoding (deterministic); else sampling at ``temperature`` from ``seed``.
        baseline: also generate without any patch, for comparison.

    Returns:
        a :class:`Generation` (tokens, logits, text; the baseline's too).
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise PromptError(f"max_new_tokens={max_new_tokens!r}: generate at least one token (max_new_tokens >= 1).")
    if not greedy and not temperature > 0:
        raise PromptError(f"temperature={temperature!r}: sampling needs a temperature > 0 (or greedy=True).")
    ids = prompt_ids(model, prompt)
    B, T = ids.shape
    limit = model.context_length
    if limit is not None and T + max_new_tokens > limit:
        raise PromptError(f"{T} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's context of "
                          f"{limit} tokens; generate at most {limit - T} tokens.")
    at_prompt = _at_prompt(patches or {}, T)
    steps = dict(every_step or {})
    for site in steps:
        if site.pos is not None:
            raise SiteError(f"{site}: every_step patches apply at each new position; drop pos={site.pos!r}.")
    for site in (*at_prompt, *steps):
        site.check(model)
    tokens, logits = decode(model, ids, at_prompt, steps, max_new_tokens, greedy, temperature, seed)
    base_tokens = base_logits = None
    if baseline:
        base_tokens, base_logits = decode(model, ids, {}, {}, max_new_tokens, greedy, temperature, seed)
    return Generation(
        prompt=ids, tokens=tokens, logits=logits, text=_texts(model, tokens),
        baseline_tokens=base_tokens, baseline_logits=base_logits,
        baseline_text=None if base_tokens is None else _texts(model, base_tokens),
        prompt_text=_texts(model, ids),
    )


def _texts(model: "Model", tokens: torch.Tensor) -> tuple[str, ...]:
    if model.tokenizer is None:
        return tuple(" ".join(f"#{int(t)}" for t in row) for row in tokens)
    return tuple(model.tokenizer.decode(row.tolist()) for row in tokens)


def decode(model: "Model", ids: torch.Tensor, at_prompt: Mapping[Site, Value], steps: Mapping[Site, Value],
           n: int, greedy: bool = True, temperature: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding loop: ``(tokens (B, n), logits (B, n, vocab))``. Step 0 runs the prompt with
    ``at_prompt`` written and caches every layer's keys and values as the attention used them;
    each later step runs one new token against that cache with ``steps`` written."""
    B, T = ids.shape
    L = model.n_layers
    attn = [model.adapter.attention(l) for l in range(L)]
    kv_sites = [Site(kind, l) for l in range(L) for kind in ("k", "v")]
    gen = torch.Generator().manual_seed(seed)
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    tokens, logits = [], []
    state = model.attention_state
    with torch.inference_mode(), model.attention_fn():
        for step in range(n):
            if step == 0:
                inp, positions, writes = ids, torch.arange(T), at_prompt
            else:
                inp, positions, writes = tokens[-1][:, None], torch.tensor([T + step - 1]), steps
            upto = int(positions[-1]) + 1  # keys: every position so far
            prefix = {attn[l]: cache[l] for l in range(L)} if cache else {}
            with state.branched(torch.arange(upto), torch.zeros(upto, dtype=torch.long)), \
                    state.key_value_prefix(prefix), intervene(model, writes), \
                    capture(model, kv_sites, whole=True) as kv:
                out = model.hf(input_ids=inp.to(model.device), position_ids=positions[None].to(model.device),
                               use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu()
            new = [(kv[Site("k", l)].transpose(1, 2), kv[Site("v", l)].transpose(1, 2)) for l in range(L)]
            cache = new if not cache else [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                                           for (k0, v0), (k1, v1) in zip(cache, new)]
            logits.append(out)
            if greedy:
                tokens.append(out.argmax(-1))
            else:
                probs = torch.softmax(out / temperature, -1)
                tokens.append(torch.multinomial(probs, 1, generator=gen)[:, 0])
    return torch.stack(tokens, 1), torch.stack(logits, 1)
