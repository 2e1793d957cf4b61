"""PromptSet: aligned clean / corrupted token ids with the answer tokens, validated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from ..errors import PromptError
from .continuation import Continuation

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["PromptSet", "LengthGroup"]


@dataclass(frozen=True)
class LengthGroup:
    """Prompts of one token length, stacked: what one batched forward pass can take."""

    indices: torch.Tensor  # (G,) positions in the PromptSet
    clean: torch.Tensor  # (G, T)
    corrupted: torch.Tensor  # (G, T)
    answers: torch.Tensor  # (G,) first answer tokens
    alternatives: torch.Tensor  # (G,)
    continuation: Continuation | None = None
    """The answers' tokens when some have several (teacher-forced after the prompt)."""

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])


def _show(model: "Model | None", ids: Sequence[int]) -> str:
    if model is None or model.tokenizer is None:
        return str(list(ids))
    return " | ".join(repr(model.token_str(i)) for i in ids)


@dataclass(frozen=True)
class PromptSet:
    """Clean and corrupted prompts (token ids) plus the correct and the alternative answer.

    Clean and corrupted prompts of a pair usually have the same length (symmetric token
    replacement); pairs of different lengths (an entity of two tokens against one of three) are
    *unaligned*: they are patched at named positions, matched by name in each prompt
    (:mod:`actpatch.techniques.positions`). Different pairs may differ in length. An answer is one token or several (``answer_tokens``,
    scored teacher-forced: :mod:`actpatch.prompts.continuation`); ``answers`` /
    ``alternatives`` hold the first tokens. Build with :meth:`from_pairs` (text) or
    :meth:`from_ids`, or with a builder such as :func:`actpatch.prompts.ioi`.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("gpt2")
        >>> ps = ap.PromptSet.from_pairs(m, [("When Mary and John went to the store , John gave a drink to",
        ...                                   "When Mary and John went to the store , Mary gave a drink to",
        ...                                   " Mary", " John")])
        >>> len(ps), ps.first_diff.tolist()
        (1, [9])
    """

    clean: tuple[torch.Tensor, ...]
    corrupted: tuple[torch.Tensor, ...]
    answers: torch.Tensor
    alternatives: torch.Tensor
    name: str = "custom"
    attributes: tuple[dict[str, Any], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    texts: tuple[tuple[str, ...], ...] = ()
    """Per prompt, the (clean, corrupted, answer, alternative) texts it was built from (empty
    for sets built from token ids); results record them (``res.info.prompt_texts``)."""
    answer_tokens: tuple[torch.Tensor, ...] = ()
    """Per prompt, every token of the answer (1-D); empty when every answer is one token."""
    alternative_tokens: tuple[torch.Tensor, ...] = ()
    """Per prompt, every token of the alternative; empty when every alternative is one token."""

    def __post_init__(self) -> None:
        n = len(self.clean)
        if n == 0:
            raise PromptError("The prompt set is empty; give at least one (clean, corrupted, answer, alternative).")
        if len(self.corrupted) != n or len(self.answers) != n or len(self.alternatives) != n:
            raise PromptError(
                f"Prompt set parts differ in length: {n} clean, {len(self.corrupted)} corrupted, "
                f"{len(self.answers)} answers, {len(self.alternatives)} alternatives."
            )
        for i, (c, k) in enumerate(zip(self.clean, self.corrupted)):
            if c.ndim != 1 or c.numel() == 0:
                raise PromptError(f"Prompt {i}: clean ids must be a non-empty 1-D tensor, got shape {tuple(c.shape)}.")
            if k.ndim != 1 or k.numel() == 0:
                raise PromptError(f"Prompt {i}: corrupted ids must be a non-empty 1-D tensor, got shape "
                                  f"{tuple(k.shape)}.")
        self._check_continuations(n)
        same = [] if self.answer_tokens else (self.answers == self.alternatives).nonzero().flatten().tolist()
        if same:
            raise PromptError(
                f"Prompt(s) {same}: answer and alternative are the same token {int(self.answers[same[0]])}; "
                f"the logit difference would be 0. Pick an alternative answer that differs."
            )
        if not self.attributes:
            object.__setattr__(self, "attributes", tuple({} for _ in range(n)))

    def _check_continuations(self, n: int) -> None:
        """Multi-token answers: one non-empty sequence each, first tokens equal to ``answers``,
        answer and alternative different; all single tokens are stored as ``answers`` alone."""
        if not self.answer_tokens and not self.alternative_tokens:
            return
        if len(self.answer_tokens) != n or len(self.alternative_tokens) != n:
            raise PromptError(f"answer_tokens has {len(self.answer_tokens)} and alternative_tokens "
                              f"{len(self.alternative_tokens)} entries for {n} prompts; give one per prompt.")
        problems = []
        for i, (a, b) in enumerate(zip(self.answer_tokens, self.alternative_tokens)):
            if a.ndim != 1 or b.ndim != 1 or a.numel() == 0 or b.numel() == 0:
                problems.append(f"Prompt {i}: an empty answer or alternative ({a.tolist()} vs {b.tolist()}); "
                                f"give at least one token each.")
            elif int(a[0]) != int(self.answers[i]) or int(b[0]) != int(self.alternatives[i]):
                problems.append(f"Prompt {i}: answers / alternatives must hold the first tokens of answer_tokens / "
                                f"alternative_tokens (internal mismatch).")
            elif a.numel() == b.numel() and bool((a == b).all()):
                problems.append(f"Prompt {i}: answer and alternative are the same tokens {a.tolist()}; the logit "
                                f"difference would be 0. Pick an alternative that differs.")
        if problems:
            raise PromptError("\n".join(problems[:10]))
        if all(a.numel() == 1 and b.numel() == 1 for a, b in zip(self.answer_tokens, self.alternative_tokens)):
            object.__setattr__(self, "answer_tokens", ())
            object.__setattr__(self, "alternative_tokens", ())

    @property
    def multi_token(self) -> bool:
        """Whether some answer or alternative has more than one token."""
        return bool(self.answer_tokens)

    def answer_ids(self, index: int) -> torch.Tensor:
        """Every token of prompt ``index``'s answer."""
        return self.answer_tokens[index] if self.answer_tokens else self.answers[index : index + 1]

    def alternative_ids(self, index: int) -> torch.Tensor:
        """Every token of prompt ``index``'s alternative."""
        return self.alternative_tokens[index] if self.alternative_tokens else self.alternatives[index : index + 1]

    @property
    def continuation_lengths(self) -> torch.Tensor:
        """Per prompt, the longest of its answer and alternative (tokens read after the prompt)."""
        if not self.answer_tokens:
            return torch.ones(len(self), dtype=torch.long)
        return torch.tensor([max(a.numel(), b.numel()) for a, b in zip(self.answer_tokens, self.alternative_tokens)])

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_ids(
        cls,
        clean: Iterable[Sequence[int] | torch.Tensor],
        corrupted: Iterable[Sequence[int] | torch.Tensor],
        answers: Sequence[int | Sequence[int]] | torch.Tensor,
        alternatives: Sequence[int | Sequence[int]] | torch.Tensor,
        *,
        name: str = "custom",
        attributes: Sequence[dict[str, Any]] | None = None,
        meta: dict[str, Any] | None = None,
        texts: Sequence[Sequence[str]] = (),
    ) -> "PromptSet":
        """Build from token ids (a tensor of shape (N, T), or lists of per-prompt ids). Each
        answer and alternative is one id or a sequence of ids (teacher-forced after the prompt)."""
        as_t = lambda x: torch.as_tensor(x, dtype=torch.long).flatten()  # noqa: E731
        a_seqs = [as_t(a) for a in answers] if not isinstance(answers, torch.Tensor) or answers.ndim > 1 else None
        b_seqs = [as_t(b) for b in alternatives] if not isinstance(alternatives, torch.Tensor) or alternatives.ndim > 1 else None
        multi = a_seqs is not None and b_seqs is not None and any(x.numel() != 1 for x in a_seqs + b_seqs)
        first = lambda seqs, given: (torch.stack([x[0] if x.numel() else torch.tensor(-1) for x in seqs])  # noqa: E731
                                     if seqs is not None and seqs else torch.as_tensor(given, dtype=torch.long).flatten())
        return cls(
            clean=tuple(as_t(c) for c in clean),
            corrupted=tuple(as_t(c) for c in corrupted),
            answers=first(a_seqs, answers) if multi else torch.as_tensor(answers, dtype=torch.long).flatten(),
            alternatives=first(b_seqs, alternatives) if multi else torch.as_tensor(alternatives, dtype=torch.long).flatten(),
            name=name,
            attributes=tuple(dict(a) for a in attributes) if attributes else (),
            meta=dict(meta or {}),
            texts=tuple(tuple(str(x) for x in t) for t in texts),
            answer_tokens=tuple(a_seqs) if multi else (),  # type: ignore[arg-type]
            alternative_tokens=tuple(b_seqs) if multi else (),  # type: ignore[arg-type]
        )

    @classmethod
    def from_pairs(
        cls,
        model: "Model",
        pairs: Sequence[tuple[str, str, str, str]],
        *,
        name: str = "custom",
        attributes: Sequence[dict[str, Any]] | None = None,
        meta: dict[str, Any] | None = None,
        labels: Sequence[str] | None = None,
    ) -> "PromptSet":
        """Tokenise ``(clean, corrupted, answer, alternative)`` texts with the model's tokenizer.

        Answers may be several tokens (``" Buenos Aires"``): the metrics then score them
        teacher-forced (see :func:`actpatch.metrics.compute_metrics`). Every pair is checked
        before anything is refused: one :class:`PromptError` lists each bad pair (``labels``
        name them, e.g. a file's line numbers; default ``Pair i``), showing both tokenisations
        side by side when clean and corrupted differ in token length, and naming empty or
        identical answers.
        """
        if not hasattr(model, "tokenizer") or not hasattr(model, "to_tokens"):
            raise PromptError(f"from_pairs() takes a model first (ap.load_model(...)), not {type(model).__name__}.")
        if model.tokenizer is None:
            raise PromptError("This model has no tokenizer; use PromptSet.from_ids with token ids.")
        for what, value, kind in (("attributes", attributes, Sequence), ("meta", meta, dict), ("labels", labels, Sequence)):
            if value is not None and (not isinstance(value, kind) or isinstance(value, str)):
                raise PromptError(f"from_pairs({what}=...) takes a {'list' if kind is Sequence else 'dict'}, not "
                                  f"{type(value).__name__}.")
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise PromptError(f"Prompt pairs must be a list of (clean, corrupted, answer, alternative) tuples, got "
                              f"{type(pairs).__name__}.")
        if not pairs:
            raise PromptError("No prompt pairs given; pass a non-empty list of (clean, corrupted, answer, alternative).")
        if labels is not None and len(labels) != len(pairs):
            raise PromptError(f"labels= names {len(labels)} pairs but there are {len(pairs)}.")
        clean, corrupted, answers, alts = [], [], [], []
        problems: list[str] = []
        for i, pair in enumerate(pairs):
            where = labels[i] if labels is not None else f"Pair {i}"
            problem, ids = _tokenise_pair(model, pair, where)
            if problem:
                problems.append(problem)
                continue
            c, k, a, b = ids
            clean.append(c)
            corrupted.append(k)
            answers.append(a)
            alts.append(b)
        if problems:
            shown = problems[:10]
            more = f"\n... and {len(problems) - 10} more bad pairs" if len(problems) > 10 else ""
            head = f"{len(problems)} of {len(pairs)} prompt pairs cannot be used:\n" if len(problems) > 1 else ""
            raise PromptError(head + "\n".join(shown) + more)
        return cls.from_ids(clean, corrupted, answers, alts, name=name, attributes=attributes, meta=meta,
                            texts=[tuple(p) for p in pairs])

    @classmethod
    def from_file(cls, model: "Model", path: str | Path, *, name: str | None = None) -> "PromptSet":
        """Prompt pairs from a JSONL or CSV file (see :mod:`actpatch.prompts.files`): clean,
        corrupted, answer, alternative, and optionally named ``positions`` and ``attributes``.
        Every bad record is reported at once, by its line in the file.

        Example:
            >>> import json, tempfile, pathlib
            >>> import actpatch as ap
            >>> from actpatch.testing import tiny_model
            >>> f = pathlib.Path(tempfile.mkdtemp()) / "pairs.jsonl"
            >>> _ = f.write_text(json.dumps({"clean": "When Mary and John went", "corrupted": "When Mary and Bob went",
            ...                              "answer": " Mary", "alternative": " John", "positions": {"S": 3}}))
            >>> ps = ap.PromptSet.from_file(tiny_model("gpt2"), f)
            >>> len(ps), ps.attributes[0]["positions"]
            (1, {'S': 3})
        """
        from .files import read_prompt_file

        records = read_prompt_file(path)
        attrs = [{**r.attributes, **({"positions": r.positions} if r.positions else {}),
                  **({"corrupted_positions": r.corrupted_positions} if r.corrupted_positions else {})} for r in records]
        ps = cls.from_pairs(model, [r.pair for r in records], name=name or Path(path).stem, attributes=attrs,
                            labels=[r.where for r in records])
        beyond = [f"{r.where}: {side}position {k!r} = {v} is past the {side or 'clean '}prompt's {c.numel()} tokens "
                  f"(0 to {c.numel() - 1})."
                  for r, clean, corrupted in zip(records, ps.clean, ps.corrupted)
                  for side, named, c in (("", r.positions, clean), ("corrupted ", r.corrupted_positions, corrupted))
                  for k, v in named.items() if v >= c.numel()]
        if beyond:
            raise PromptError(f"{path}: named positions outside their prompts:\n" + "\n".join(beyond[:20]))
        return ps

    def __repr__(self) -> str:
        """A summary: name, size, token lengths and the first pair, never the tensors."""
        lengths = sorted(set(self.lengths.tolist()))
        shown = ", ".join(map(str, lengths[:5])) + (", ..." if len(lengths) > 5 else "")
        first = ""
        if self.texts:
            c, k, a, b = (list(self.texts[0]) + ["", "", "", ""])[:4]
            first = f"; first: {c[-40:]!r} -> {a!r} vs {b!r} (corrupted {k[-40:]!r})"
        else:
            first = f"; first answer id {int(self.answers[0])} vs {int(self.alternatives[0])}"
        return f"PromptSet({self.name!r}, {len(self)} pairs, {'length' if len(lengths) == 1 else 'lengths'} {shown}{first})"

    # -- views -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.clean)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([c.numel() for c in self.clean])

    @property
    def corrupted_lengths(self) -> torch.Tensor:
        return torch.tensor([k.numel() for k in self.corrupted])

    @property
    def aligned(self) -> bool:
        """Whether every pair's clean and corrupted prompts have the same token length (so that
        positions mean the same index in both)."""
        return all(c.numel() == k.numel() for c, k in zip(self.clean, self.corrupted))

    def unaligned_pairs(self) -> list[int]:
        """The pairs whose clean and corrupted prompts differ in length."""
        return [i for i, (c, k) in enumerate(zip(self.clean, self.corrupted)) if c.numel() != k.numel()]

    def with_positions(self, name: str, pairs: Sequence[tuple[int, int] | int]) -> "PromptSet":
        """A copy with the position ``name`` added to every pair: ``pairs[i]`` is (clean index,
        corrupted index) of pair ``i`` (one int: the same index in both). Explicit alignments of
        unaligned pairs, or a name for any position of aligned ones."""
        if not isinstance(name, str) or not name:
            raise PromptError(f"with_positions: give a position name (a non-empty string), got {name!r}.")
        if len(pairs) != len(self):
            raise PromptError(f"with_positions({name!r}): {len(pairs)} positions for {len(self)} pairs; give one "
                              f"(clean index, corrupted index) per pair.")
        attrs = []
        for i, (a, p) in enumerate(zip(self.attributes, pairs)):
            c, k = (p, p) if isinstance(p, int) else tuple(p)
            Tc, Tk = self.clean[i].numel(), self.corrupted[i].numel()
            if not (isinstance(c, int) and isinstance(k, int) and 0 <= c < Tc and 0 <= k < Tk):
                raise PromptError(f"with_positions({name!r}): pair {i} gets {p!r}; its prompts have {Tc} (clean) and "
                                  f"{Tk} (corrupted) tokens.")
            a = dict(a)
            a["positions"] = {**(a.get("positions") or {}), name: c}
            a["corrupted_positions"] = {**(a.get("corrupted_positions") or a.get("positions") or {}), name: k}
            attrs.append(a)
        return dataclasses.replace(self, attributes=tuple(attrs))

    @property
    def first_diff(self) -> torch.Tensor:
        """Per prompt, the first position where clean and corrupted differ (the length if none)."""
        return torch.tensor([common_prefix(c, k) for c, k in zip(self.clean, self.corrupted)])

    def diff_mask(self, index: int) -> torch.Tensor:
        """Boolean (T,) mask of positions where prompt ``index``'s clean and corrupted differ."""
        if self.clean[index].numel() != self.corrupted[index].numel():
            raise PromptError(f"Pair {index} has prompts of different lengths ({self.clean[index].numel()} and "
                              f"{self.corrupted[index].numel()} tokens): positions do not match one to one. Patch "
                              f"at named positions with corruption='str'.")
        return self.clean[index] != self.corrupted[index]

    @property
    def seq_len(self) -> int:
        """The common token length; raises when prompts differ in length."""
        lengths = sorted(set(self.lengths.tolist()))
        if len(lengths) != 1:
            raise PromptError(
                f"Prompts have different token lengths {lengths}; position-resolved results need one length. "
                f"Use prompts.split_by_length() and sweep each part, or build prompts from templates of one "
                f"length (e.g. ap.prompts.ioi(model, templates=[0, 1]))."
            )
        return lengths[0]

    def groups(self) -> list[LengthGroup]:
        """Prompts grouped by token length, in order of first appearance."""
        by_len: dict[tuple[int, int], list[int]] = {}
        for i, (c, k) in enumerate(zip(self.clean, self.corrupted)):
            by_len.setdefault((c.numel(), k.numel()), []).append(i)
        out = []
        for idx in by_len.values():
            ix = torch.tensor(idx)
            out.append(
                LengthGroup(
                    indices=ix,
                    clean=torch.stack([self.clean[i] for i in idx]),
                    corrupted=torch.stack([self.corrupted[i] for i in idx]),
                    answers=self.answers[ix],
                    alternatives=self.alternatives[ix],
                    continuation=Continuation.of([self.answer_tokens[i] for i in idx],
                                                 [self.alternative_tokens[i] for i in idx]) if self.multi_token else None,
                )
            )
        return out

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "PromptSet":
        """The prompts at ``indices`` (same order)."""
        idx = [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
        return PromptSet(
            clean=tuple(self.clean[i] for i in idx),
            corrupted=tuple(self.corrupted[i] for i in idx),
            answers=self.answers[idx],
            alternatives=self.alternatives[idx],
            name=self.name,
            attributes=tuple(self.attributes[i] for i in idx),
            meta=dict(self.meta),
            texts=tuple(self.texts[i] for i in idx) if self.texts else (),
            answer_tokens=tuple(self.answer_tokens[i] for i in idx) if self.answer_tokens else (),
            alternative_tokens=tuple(self.alternative_tokens[i] for i in idx) if self.alternative_tokens else (),
        )

    def split_by_length(self) -> list["PromptSet"]:
        """One PromptSet per token length."""
        return [self.subset(g.indices) for g in self.groups()]

    def position_labels(self, model: "Model") -> list[str]:
        """Labels for the position axis: ``"i:token"`` from the first prompt, with ``*`` where
        clean prompts of the set differ at that position."""
        T = self.seq_len
        stacked = torch.stack(list(self.clean))
        varies = (stacked != stacked[0]).any(0)
        return [f"{i}:{model.token_str(int(stacked[0, i]))}{'*' if varies[i] else ''}" for i in range(T)]

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for provenance."""
        return {
            "name": self.name,
            "n_prompts": len(self),
            "lengths": sorted(set(self.lengths.tolist())),
            **({"unaligned_pairs": len(self.unaligned_pairs())} if not self.aligned else {}),
            **({"answer_tokens": sorted(set(self.continuation_lengths.tolist()))} if self.multi_token else {}),
            **self.meta,
        }


_FIELDS = ("clean", "corrupted", "answer", "alternative")


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens two prompts share (the shorter length if one starts the other)."""
    n = min(a.numel(), b.numel())
    d = (a[:n] != b[:n]).nonzero()
    return int(d[0]) if len(d) else n


def common_suffix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many trailing tokens two prompts share, not overlapping their common prefix."""
    n = min(a.numel(), b.numel()) - common_prefix(a, b)
    d = (a.flip(0)[:n] != b.flip(0)[:n]).nonzero()
    return int(d[0]) if len(d) else n


def _tokenise_pair(model: "Model", pair: Any, where: str) -> tuple[str | None, tuple]:
    """(None, (clean ids, corrupted ids, answer id, alternative id)) or (what is wrong, ())."""
    if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence):
        return f"{where} has 1 fields ({pair!r:.60}); expected (clean, corrupted, answer, alternative).", ()
    if len(pair) != 4:
        return f"{where} has {len(pair)} fields; expected (clean, corrupted, answer, alternative).", ()
    for part, value in zip(_FIELDS, pair):
        if not isinstance(value, str):
            return (f"{where}: {part} is {value!r}, not text; give strings (answers with their leading space, "
                    f"e.g. ' Mary')."), ()
    c_txt, k_txt, a_txt, b_txt = pair
    if not c_txt or not k_txt:
        return f"{where}: empty prompt text.", ()
    c = model.tokenizer(c_txt)["input_ids"]
    k = model.tokenizer(k_txt)["input_ids"]
    ans = []
    for label, txt in (("answer", a_txt), ("alternative", b_txt)):
        toks = model.to_tokens(txt)
        if not toks:
            return f"{where}: the {label} {txt!r} has no tokens; give the text the model should continue with.", ()
        ans.append(toks)
    if ans[0] == ans[1]:
        return (f"{where}: answer {a_txt!r} and alternative {b_txt!r} are the same tokens ({_show(model, ans[0])}); "
                f"the logit difference would be 0. Pick an alternative that differs."), ()
    return None, (c, k, ans[0], ans[1])
