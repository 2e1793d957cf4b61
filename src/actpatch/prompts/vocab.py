"""Token-aware word filtering shared by the prompt builders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import PromptError

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model


def single_tokens(model: "Model", words: Sequence[str], *, min_count: int, what: str, prefix: str = " ") -> list[str]:
    """The words (deduplicated, in order) that ``prefix + word`` tokenises to one token."""
    if model.tokenizer is None:
        raise PromptError(f"Building {what} needs the model's tokenizer; this model has none.")
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen and len(model.to_tokens(prefix + w)) == 1:
            out.append(w)
        seen.add(w)
    if len(out) < min_count:
        raise PromptError(
            f"Only {len(out)} of {len(seen)} {what} are single tokens for this tokenizer (need {min_count}); "
            f"pass your own prompt pairs with PromptSet.from_pairs."
        )
    return out


def token_span(model: "Model", text: str, part: str) -> tuple[int, int] | None:
    """First and last token positions of the first occurrence of ``part`` in ``text``, as the
    model's tokenizer splits ``text`` (with its special tokens, like :meth:`PromptSet.from_pairs`);
    None when the tokenizer gives no character offsets or ``part`` is absent."""
    start = text.find(part)
    if start < 0 or model.tokenizer is None:
        return None
    try:
        offsets = model.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return None
    end = start + len(part)
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end]
    return (inside[0], inside[-1]) if inside else None
