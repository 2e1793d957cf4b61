"""Greater-than prompts (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17"."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ..errors import PromptError
from .promptset import PromptSet

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["greater_than", "GT_TEMPLATES"]

GT_TEMPLATES: tuple[str, ...] = (
    "The war lasted from the year {c}{yy} to the year {c}",
    "The expedition lasted from the year {c}{yy} to the year {c}",
    "The drought lasted from the year {c}{yy} to the year {c}",
    "The reign lasted from the year {c}{yy} to the year {c}",
)


def greater_than_capacity() -> int:
    """How many distinct prompt pairs :func:`greater_than` makes: one per start year 20..89 and template."""
    return 70 * len(GT_TEMPLATES)


def greater_than(model: "Model", n: int = 32, *, seed: int = 0, century: int = 17) -> PromptSet:
    """Greater-than pairs. The clean start year ends in ``YY`` (20..89); the corrupted one in
    ``01``. The continuation is the tens digit of the end year (digits are single tokens in
    most tokenizers). Answer: the digit one above YY's tens digit (a year surely later);
    alternative: the digit one below (surely earlier). Logit difference answer - alternative
    then measures "end year > start year".

    What is measured, exactly: tokenizers that split numbers into single digits (SmolLM2,
    Gemma 3, Llama 3...) emit the end year's two digits as two tokens, so the first one, the
    tens digit, is the answer; the ones digit is never scored. "17|8" vs "17|6" for start year
    1769 is a coarser question than Hanna et al.'s two-digit token (GPT-2), but the same
    comparison. Where years tokenise differently between prompts the builder refuses, since
    clean and corrupted prompts would not align.
    """
    if not 1 <= n <= greater_than_capacity():
        raise PromptError(f"n={n}: greater_than makes 1 to {greater_than_capacity()} distinct prompts (start years "
                          f"20-89 x {len(GT_TEMPLATES)} templates); ask for that many at most.")
    rng = random.Random(seed)
    pairs, attrs = [], []
    for i in range(n):
        yy = rng.randint(20, 89)
        tpl = GT_TEMPLATES[i % len(GT_TEMPLATES)]
        clean = tpl.format(c=century, yy=f"{yy:02d}")
        corrupted = tpl.format(c=century, yy="01")
        tens = yy // 10
        pairs.append((clean, corrupted, str(tens + 1), str(tens - 1)))
        attrs.append({"yy": yy, "template": i % len(GT_TEMPLATES)})
    ps = PromptSet.from_pairs(model, pairs, name="greater_than", attributes=attrs,
                              meta={"builder": "greater_than", "seed": seed, "century": century})
    if len(set(ps.lengths.tolist())) > len(GT_TEMPLATES):
        raise PromptError("Year tokenisation varies between prompts; this tokenizer does not split digits.")
    return ps
