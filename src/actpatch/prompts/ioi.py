"""Indirect object identification (Wang et al. 2022) prompts.

"When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object,
IO) over " John" (the subject, S). ABBA templates name IO first, BABA templates name S first.
"""

from __future__ import annotations

import dataclasses

import random
from typing import TYPE_CHECKING, Literal, Sequence

from ..errors import PromptError
from .promptset import PromptSet
from .vocab import single_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["ioi", "IOI_TEMPLATES", "IOI_CORRUPTIONS"]

# {A}: first-named person, {B}: second; {S2}: the repeated subject; {P}: place; {O}: object.
IOI_TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {P}, {S2} gave a {O} to",
    "When {A} and {B} got a {O} at the {P}, {S2} decided to give it to",
    "After {A} and {B} went to the {P}, {S2} gave a {O} to",
    "While {A} and {B} were working at the {P}, {S2} gave a {O} to",
    "Then, {A} and {B} went to the {P}. {S2} gave a {O} to",
    "Then, {A} and {B} had a long argument, and afterwards {S2} said to",
    "When {A} and {B} arrived at the {P}, {S2} handed a {O} to",
    "Friends {A} and {B} found a {O} at the {P}. {S2} gave it to",
    "After the lunch, {A} and {B} went to the {P}. {S2} gave a {O} to",
    "While {A} and {B} were commuting to the {P}, {S2} gave a {O} to",
    "The {P} was busy, so {A} and {B} waited. Then {S2} passed a {O} to",
    "Later, {A} and {B} went to the {P} together, and {S2} gave a {O} to",
)

NAMES = (
    "Mary John Alice Bob Tom Anna Paul Sara Mark Lucy James David Michael Sarah Emma Jack Kate Lisa Peter "
    "Daniel Laura Chris Ryan Adam Sam Ben Alex Max Eric Kevin Jason Steve Brian Jeff Scott Andrew Rachel "
    "Jennifer Jessica Amy Amanda Emily Megan Hannah Grace Rose Julia Linda Susan Karen Nancy Helen Ruth "
    "Joseph Thomas Charles George Edward Henry Frank Jake Luke Sean Tim Joe Dan Mike Nick Matt Josh "
    "Carl Paula Victoria Sophie Olivia Lily Ella Leo Oscar Harry Charlie Jacob William Richard Robert "
    "Kelly Angela Maria Anne Jane Claire Diana Martin Simon Victor Ian Gary Roger Fred Bill Rose Adam"
).split()
PLACES = "store park school office garden hospital station restaurant house beach library market church".split()
OBJECTS = "drink book ball pen key bag ring gift bottle letter card apple flower basket".split()

IOI_CORRUPTIONS = ("s2", "io_s1", "abc")
Corruption = Literal["s2", "io_s1", "abc"]


def _fill(t: str, a: str, b: str, s2: str, p: str, o: str) -> str:
    return t.format(A=a, B=b, S2=s2, P=p, O=o)


def ioi_capacity(templates: Sequence[int] | None = None, order: str = "mixed") -> int:
    """How many distinct prompt pairs :func:`ioi` can make at most (every tokenizer keeps at most
    all the names, places and objects): templates x ordered name pairs x places x objects x orders."""
    t = len(IOI_TEMPLATES) if templates is None else len(set(templates))
    return t * len(NAMES) * (len(NAMES) - 1) * len(PLACES) * len(OBJECTS) * (2 if order == "mixed" else 1)


def ioi(
    model: "Model",
    n: int = 32,
    *,
    seed: int = 0,
    corruption: Corruption = "s2",
    templates: Sequence[int] | None = None,
    order: Literal["mixed", "ABBA", "BABA"] = "mixed",
) -> PromptSet:
    """IOI prompt pairs for symmetric token replacement.

    Names, places and objects are filtered to single tokens of ``model``'s tokenizer, so every
    template has one token length and clean / corrupted prompts align position by position.

    Corruptions:
        ``"s2"``: the second mention of the subject becomes the IO name ("..., Mary gave a drink
        to"): the answer flips. ``"io_s1"``: the two names are exchanged at every mention: the
        answer flips and three positions differ. ``"abc"``: three fresh names, no IO to find.

    Args:
        n: number of prompt pairs. seed: makes the set reproducible.
        templates: indices into :data:`IOI_TEMPLATES` (default all). order: ABBA, BABA or both.

    Example:
        >>> import actpatch as ap
        >>> ps = ap.prompts.ioi(ap.load_model(), n=4, templates=[0])
        >>> ps.texts[0]
        ('When Nancy and Bill went to the garden, Bill gave a bottle to', 'When Nancy and Bill went to the garden, Nancy gave a bottle to', ' Nancy', ' Bill')
    """
    if corruption not in IOI_CORRUPTIONS:
        raise PromptError(f"Unknown IOI corruption {corruption!r}; choose one of {IOI_CORRUPTIONS}.")
    if n < 1:
        raise PromptError(f"n={n}: ask for at least one prompt.")
    tids = list(range(len(IOI_TEMPLATES))) if templates is None else list(templates)
    bad = [t for t in tids if not 0 <= t < len(IOI_TEMPLATES)]
    if bad or not tids:
        raise PromptError(f"templates={list(templates or [])}: valid indices are 0..{len(IOI_TEMPLATES) - 1}.")
    names = single_tokens(model, NAMES, min_count=3, what="IOI names")
    places = single_tokens(model, PLACES, min_count=1, what="IOI places")
    objects = single_tokens(model, OBJECTS, min_count=1, what="IOI objects")
    most = len(tids) * len(names) * (len(names) - 1) * len(places) * len(objects) * (2 if order == "mixed" else 1)
    if n > most:
        raise PromptError(f"n={n}: this tokenizer leaves {len(names)} names, {len(places)} places and {len(objects)} "
                          f"objects, so ioi makes at most {most} distinct prompts with these templates; ask for fewer.")
    rng = random.Random(seed)
    pairs, attrs = [], []
    for i in range(n):
        t = tids[i % len(tids)]
        io, s, c1, c2 = rng.sample(names, 4)
        p, o = rng.choice(places), rng.choice(objects)
        abba = order == "ABBA" or (order == "mixed" and i % 2 == 0)
        a, b = (io, s) if abba else (s, io)
        clean = _fill(IOI_TEMPLATES[t], a, b, s, p, o)
        if corruption == "s2":
            corrupted = _fill(IOI_TEMPLATES[t], a, b, io, p, o)
        elif corruption == "io_s1":
            corrupted = _fill(IOI_TEMPLATES[t], b, a, io, p, o)
        else:
            corrupted = _fill(IOI_TEMPLATES[t], c1, c2, rng.choice([n_ for n_ in names if n_ not in (io, s, c1, c2)]), p, o)
        pairs.append((clean, corrupted, " " + io, " " + s))
        attrs.append({"template": t, "order": "ABBA" if abba else "BABA", "io": io, "s": s})
    ps = PromptSet.from_pairs(
        model, pairs, name="ioi", attributes=attrs,
        meta={"builder": "ioi", "seed": seed, "corruption": corruption, "templates": tids, "order": order},
    )
    for a, ids in zip(attrs, ps.clean):  # named positions (actpatch.roles): IO, S1, S1+1, S2
        a["positions"] = _name_positions(model, ids.tolist(), a["io"], a["s"])
    return dataclasses.replace(ps, attributes=tuple(attrs))


def _name_positions(model: "Model", ids: list[int], io: str, s: str) -> dict[str, int]:
    io_id, s_id = model.to_tokens(" " + io)[0], model.to_tokens(" " + s)[0]
    io_at = [i for i, t in enumerate(ids) if t == io_id]
    s_at = [i for i, t in enumerate(ids) if t == s_id]
    out = {"IO": io_at[0]} if len(io_at) == 1 else {}
    if len(s_at) == 2:
        out.update({"S1": s_at[0], "S1+1": s_at[0] + 1, "S2": s_at[1]})
    return out
