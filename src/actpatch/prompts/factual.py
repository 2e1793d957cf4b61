"""Factual recall prompts (ROME-style), paired by subject swaps: of equal token length by
default; with ``unaligned=True`` of any lengths (named positions on both sides), and with
``multi_token=True`` answers of several tokens (" New York", " Buenos Aires")."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Sequence

from ..errors import PromptError
from .promptset import PromptSet
from .vocab import token_span

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["factual", "FACTS", "RELATIONS"]

RELATIONS: dict[str, str] = {
    "located_in": "The {} is located in the city of",
    "capital_of": "{} is the capital city of",
    "language_of": "The official language of {} is",
}

# (relation, subject, answer). Answers carry their leading space; the builder keeps facts whose
# answer is one token for the model's tokenizer unless multi_token=True.
FACTS: tuple[tuple[str, str, str], ...] = (
    ("located_in", "Eiffel Tower", " Paris"),
    ("located_in", "Colosseum", " Rome"),
    ("located_in", "Big Ben", " London"),
    ("located_in", "Brandenburg Gate", " Berlin"),
    ("located_in", "Sagrada Familia", " Barcelona"),
    ("located_in", "Acropolis", " Athens"),
    ("located_in", "Kremlin", " Moscow"),
    ("located_in", "Sydney Opera House", " Sydney"),
    ("located_in", "Louvre", " Paris"),
    ("located_in", "Tower Bridge", " London"),
    ("located_in", "Parthenon", " Athens"),
    ("located_in", "Prado Museum", " Madrid"),
    ("located_in", "Space Needle", " Seattle"),
    ("located_in", "Forbidden City", " Beijing"),
    ("located_in", "Burj Khalifa", " Dubai"),
    ("located_in", "Hagia Sophia", " Istanbul"),
    ("located_in", "CN Tower", " Toronto"),
    ("located_in", "Rijksmuseum", " Amsterdam"),
    ("located_in", "Trevi Fountain", " Rome"),
    ("located_in", "Buckingham Palace", " London"),
    ("located_in", "Arc de Triomphe", " Paris"),
    ("located_in", "Reichstag building", " Berlin"),
    ("capital_of", "Paris", " France"),
    ("capital_of", "Rome", " Italy"),
    ("capital_of", "Berlin", " Germany"),
    ("capital_of", "Madrid", " Spain"),
    ("capital_of", "Tokyo", " Japan"),
    ("capital_of", "Ottawa", " Canada"),
    ("capital_of", "Cairo", " Egypt"),
    ("capital_of", "Moscow", " Russia"),
    ("capital_of", "Beijing", " China"),
    ("capital_of", "Athens", " Greece"),
    ("capital_of", "Lisbon", " Portugal"),
    ("capital_of", "Vienna", " Austria"),
    ("capital_of", "Dublin", " Ireland"),
    ("capital_of", "Oslo", " Norway"),
    ("capital_of", "Stockholm", " Sweden"),
    ("capital_of", "Warsaw", " Poland"),
    ("capital_of", "Canberra", " Australia"),
    ("capital_of", "Nairobi", " Kenya"),
    ("capital_of", "Lima", " Peru"),
    ("capital_of", "Budapest", " Hungary"),
    ("capital_of", "Helsinki", " Finland"),
    ("capital_of", "Bangkok", " Thailand"),
    ("capital_of", "Havana", " Cuba"),
    ("language_of", "France", " French"),
    ("language_of", "Germany", " German"),
    ("language_of", "Spain", " Spanish"),
    ("language_of", "Italy", " Italian"),
    ("language_of", "Japan", " Japanese"),
    ("language_of", "China", " Chinese"),
    ("language_of", "Russia", " Russian"),
    ("language_of", "Portugal", " Portuguese"),
    ("language_of", "Greece", " Greek"),
    ("language_of", "Poland", " Polish"),
    ("language_of", "Sweden", " Swedish"),
    ("language_of", "Turkey", " Turkish"),
    ("language_of", "the Netherlands", " Dutch"),
    ("language_of", "Brazil", " Portuguese"),
    ("language_of", "Mexico", " Spanish"),
    # answers of several tokens for most tokenizers
    ("located_in", "Statue of Liberty", " New York"),
    ("located_in", "Empire State Building", " New York"),
    ("located_in", "Golden Gate Bridge", " San Francisco"),
    ("located_in", "Christ the Redeemer statue", " Rio de Janeiro"),
    ("located_in", "Casa Rosada", " Buenos Aires"),
    ("located_in", "Hollywood Sign", " Los Angeles"),
    ("located_in", "Petronas Towers", " Kuala Lumpur"),
    ("located_in", "Table Mountain", " Cape Town"),
    ("located_in", "Alcatraz prison", " San Francisco"),
    ("located_in", "Times Square", " New York"),
    ("capital_of", "Wellington", " New Zealand"),
    ("capital_of", "Seoul", " South Korea"),
    ("capital_of", "Pretoria", " South Africa"),
    ("capital_of", "Riyadh", " Saudi Arabia"),
    ("capital_of", "Abu Dhabi", " the United Arab Emirates"),
    ("capital_of", "Washington, D.C.", " the United States"),
)


def factual(
    model: "Model", n: int = 32, *, seed: int = 0, relations: Sequence[str] | None = None, same_length: bool = False,
    multi_token: bool = False, unaligned: bool = False,
) -> PromptSet:
    """Factual-recall pairs: clean "The Eiffel Tower is located in the city of" -> " Paris",
    corrupted by another subject of the same relation ("The Colosseum ...") whose answer
    (" Rome") is the alternative.

    Pairs are drawn (seeded) from all valid (fact, other fact) combinations; if fewer exist than
    ``n``, all are returned. By default the two prompts have one token length and the answers
    are one token each. ``same_length=True`` keeps only pairs of the most common token length,
    so that position-resolved sweeps can run on the whole set. ``multi_token=True`` keeps
    answers of any token count (scored teacher-forced); ``unaligned=True`` pairs subjects of
    different token lengths (patched at the named positions ``subject_first`` /
    ``subject_last`` / ``end``, recorded for both prompts).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> ps = ap.prompts.factual(tiny_model("gpt2"), n=4, unaligned=True, multi_token=True)
        >>> len(ps) > 0
        True
    """
    rels = list(RELATIONS) if relations is None else list(relations)
    unknown = [r for r in rels if r not in RELATIONS]
    if unknown:
        raise PromptError(f"Unknown relation(s) {unknown}; choose from {list(RELATIONS)}.")
    usable = []
    for rel, subj, ans in FACTS:
        toks = model.to_tokens(ans)
        if rel in rels and (len(toks) == 1 or multi_token) and toks:
            prompt = RELATIONS[rel].format(subj)
            usable.append((rel, subj, ans, prompt, len(model.tokenizer(prompt)["input_ids"]), tuple(toks)))
    candidates = [
        (f, g)
        for f in usable
        for g in usable
        if f[0] == g[0] and (unaligned or f[4] == g[4]) and f[5] != g[5]
    ]
    if same_length and candidates:
        from collections import Counter

        common = Counter(f[4] for f, _ in candidates).most_common(1)[0][0]
        candidates = [(f, g) for f, g in candidates if f[4] == common and g[4] == common]
    if not candidates:
        raise PromptError("No factual pairs of equal token length with distinct one-token answers for this tokenizer; "
                          "multi_token=True / unaligned=True allow more.")
    rng = random.Random(seed)
    rng.shuffle(candidates)
    chosen = candidates[:n]
    pairs = [(f[3], g[3], f[2], g[2]) for f, g in chosen]
    attrs = [{"relation": f[0], "subject": f[1], "corrupt_subject": g[1]} for f, g in chosen]
    for a, (f, g) in zip(attrs, chosen):  # named positions (actpatch.techniques.positions)
        span = token_span(model, f[3], f[1])
        if span is not None:
            a["positions"] = {"subject_first": span[0], "subject_last": span[1]}
        other = token_span(model, g[3], g[1])
        if f[4] != g[4] and other is not None:
            a["corrupted_positions"] = {"subject_first": other[0], "subject_last": other[1]}
    return PromptSet.from_pairs(model, pairs, name="factual", attributes=attrs,
                                meta={"builder": "factual", "seed": seed, "relations": rels, "same_length": same_length,
                                      **({"multi_token": True} if multi_token else {}),
                                      **({"unaligned": True} if unaligned else {})})
