"""Answers as continuations: the tokens after a prompt that the metrics score, teacher-forced.

A pair's answer and alternative are token sequences; the classic experiment's single-token
answers are the one-token case of the same code. One forward pass reads both sequences: the
prompt (``T`` tokens) is followed by the answer's tokens but its last, then by the
alternative's tokens but its last. Each branch attends to the prompt and to its own earlier
tokens only, and its positions restart at ``T`` (a two-branch tree), so every branch token sees
exactly what it would see in a run of ``prompt + answer`` alone.

Layout for a group whose longest answer has ``A`` tokens and longest alternative ``B``
(shorter ones are padded with their last token; padding is never read and never attended to
by a real token)::

    continuation tokens   a_0 .. a_{A-2}     b_0 .. b_{B-2}      C = (A - 1) + (B - 1) tokens
    positions             T .. T + A - 2     T .. T + B - 2
    readouts              index 0 = position T - 1, index 1 + i = continuation token i
    answer token j        read at index j
    alternative token j   read at index 0 (j = 0) or A - 1 + j

With single tokens ``C = 0``: the one readout is the prompt's last position, as always.
Patches write prompt positions only (:func:`~actpatch.models.attention.continuation_tail`
hides the continuation from every site hook); the continuation is computed after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Continuation", "PROMPT", "ANSWER", "ALTERNATIVE"]

PROMPT, ANSWER, ALTERNATIVE = 0, 1, 2
"""Branch ids of the tree: prompt tokens, the answer's branch, the alternative's branch."""


def _padded(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, longest) padded with each sequence's last token, and the lengths (N,)."""
    lengths = torch.tensor([int(s.numel()) for s in seqs])
    width = int(lengths.max())
    out = torch.stack([torch.cat([s, s[-1:].expand(width - s.numel())]) for s in seqs])
    return out.long(), lengths


@dataclass(frozen=True)
class Continuation:
    """The answer and alternative tokens of a batch of rows, padded (see the module docstring).

    ``answer`` (N, A) and ``alternative`` (N, B) hold the token ids, ``answer_len`` and
    ``alternative_len`` (N,) the real lengths (each at least 1)."""

    answer: torch.Tensor
    answer_len: torch.Tensor
    alternative: torch.Tensor
    alternative_len: torch.Tensor

    @classmethod
    def of(cls, answers: Sequence[torch.Tensor], alternatives: Sequence[torch.Tensor]) -> "Continuation":
        """From per-row 1-D token id tensors (any lengths >= 1)."""
        a, la = _padded([torch.as_tensor(x, dtype=torch.long).flatten() for x in answers])
        b, lb = _padded([torch.as_tensor(x, dtype=torch.long).flatten() for x in alternatives])
        return cls(a, la, b, lb)

    @classmethod
    def single(cls, answers: torch.Tensor, alternatives: torch.Tensor) -> "Continuation":
        """One token each: ``answers`` and ``alternatives`` (N,)."""
        ones = torch.ones(answers.shape[0], dtype=torch.long)
        return cls(answers.long()[:, None], ones, alternatives.long()[:, None], ones.clone())

    # -- shape -----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.answer.shape[0])

    @property
    def a_width(self) -> int:
        return int(self.answer.shape[1])

    @property
    def b_width(self) -> int:
        return int(self.alternative.shape[1])

    @property
    def n_tokens(self) -> int:
        """C: tokens appended after the prompt (0 for single-token answers)."""
        return self.a_width - 1 + self.b_width - 1

    @property
    def n_readouts(self) -> int:
        """Positions whose logits the metrics read: C + 1."""
        return self.n_tokens + 1

    @property
    def is_single(self) -> bool:
        return self.n_tokens == 0

    @property
    def tokens(self) -> torch.Tensor:
        """(N, C): what follows the prompt (teacher forcing)."""
        return torch.cat([self.answer[:, :-1], self.alternative[:, :-1]], 1)

    def positions(self, prompt_len: int) -> torch.Tensor:
        """(C,) position ids of the continuation tokens after a prompt of ``prompt_len`` tokens."""
        T = int(prompt_len)
        return torch.cat([torch.arange(T, T + self.a_width - 1), torch.arange(T, T + self.b_width - 1)])

    def tree(self, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) position ids and branches of the whole sequence, prompt then continuation: what
        :meth:`~actpatch.models.handle.Model.teacher_forced` takes."""
        T = int(prompt_len)
        return (torch.cat([torch.arange(T), self.positions(T)]),
                torch.cat([torch.full((T,), PROMPT), self.branches()]))

    def branches(self) -> torch.Tensor:
        """(C,) the branch of each continuation token (:data:`ANSWER` or :data:`ALTERNATIVE`)."""
        return torch.cat([torch.full((self.a_width - 1,), ANSWER), torch.full((self.b_width - 1,), ALTERNATIVE)])

    def answer_readouts(self) -> torch.Tensor:
        """(A,) readout index predicting each answer token."""
        return torch.arange(self.a_width)

    def alternative_readouts(self) -> torch.Tensor:
        """(B,) readout index predicting each alternative token."""
        return torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(self.a_width, self.a_width + self.b_width - 1)])

    def answer_mask(self) -> torch.Tensor:
        """(N, A) True at real (not padded) answer tokens."""
        return torch.arange(self.a_width)[None] < self.answer_len[:, None]

    def alternative_mask(self) -> torch.Tensor:
        """(N, B) True at real alternative tokens."""
        return torch.arange(self.b_width)[None] < self.alternative_len[:, None]

    # -- rows ------------------------------------------------------------------------------
    def select(self, rows: torch.Tensor) -> "Continuation":
        """The rows ``rows`` (any order, repeats allowed), same padding."""
        r = rows.to(self.answer.device).long()
        return Continuation(self.answer[r], self.answer_len[r], self.alternative[r], self.alternative_len[r])

    def repeat_interleave(self, n: int) -> "Continuation":
        """Each row ``n`` times in a row (corruption draws: prompt-major)."""
        return self.select(torch.arange(self.rows).repeat_interleave(n))

    def to(self, device: torch.device | str) -> "Continuation":
        return Continuation(self.answer.to(device), self.answer_len.to(device), self.alternative.to(device),
                            self.alternative_len.to(device))

    def __repr__(self) -> str:
        return (f"Continuation({self.rows} rows, answers up to {self.a_width} tokens, alternatives up to "
                f"{self.b_width})")
