"""Lossless speculative decoding with the model as its own drafter: the bookkeeping, no model calls.

A RAR model was trained on random orders, so after the cells decided so far one forward can also ask
it for cells further along the order (extra position queries, as parallel decoding does). Those
answers are proposals ``q``. The next forward feeds the proposals in order with their position tokens
and so reads the model's true conditional ``p`` at each of them; speculative sampling (Leviathan et
al. 2023, Chen et al. 2023) accepts a proposal with probability ``min(1, p/q)`` and on the first
rejection draws from the normalised ``max(0, p - q)``. Every decided code is then distributed
exactly as in one-cell-per-step decoding. The loop that feeds the model is
``rar_llm.sampling.loop.speculate``; this module holds its state and the acceptance rule.

Each image keeps its own frontier: ``done`` cells decided, then ``pending`` proposals waiting for
their check, all indexed by the cell's place in the image's order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from rar_llm.sampling.decoding import draw


@dataclass
class SpeculativeStats:
    """What a run of speculative decoding did: forwards, and proposals checked / accepted by lookahead.

    A proposal's lookahead ``j`` is how many cells past the decided frontier it sat when it was made
    (1: the next cell to decide).
    """

    forwards: int = 0
    cells: int = 0
    checked: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)

    def acceptance(self) -> dict[int, float]:
        """Accepted share of the checked proposals, by lookahead."""
        return {j: self.accepted[j] / n for j, n in sorted(self.checked.items()) if n}


@dataclass
class Drafts:
    """Per image: the decided prefix of its order and the proposals in flight, by cell."""

    done: torch.Tensor  # (B,) cells decided
    pending: torch.Tensor  # (B,) proposals right after them, to be checked by the next forward
    codes: torch.Tensor  # (B, n) proposed codes by cell
    probs: torch.Tensor  # (B, n, K) the distribution each proposal was drawn from
    ahead: torch.Tensor  # (B, n) its lookahead when it was made

    @classmethod
    def start(cls, batch: int, n: int, codebook: int, known: int, device: torch.device) -> "Drafts":
        long = dict(dtype=torch.long, device=device)
        return cls(torch.full((batch,), known, **long), torch.zeros(batch, **long), torch.zeros(batch, n, **long),
                   torch.zeros(batch, n, codebook, device=device), torch.zeros(batch, n, **long))


def accepts(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The acceptance rule: ``u < p(x) / q(x)`` for ``u`` uniform in [0, 1)."""
    return u * q_x < p_x


def pick(probs: torch.Tensor, generator: torch.Generator | None, greedy: bool) -> torch.Tensor:
    """A draw from ``probs``; greedy takes the best code and leaves the generator untouched."""
    return probs.argmax(-1) if greedy else draw(probs, generator)


def check(
    drafts: Drafts, target: torch.Tensor, queries: torch.Tensor, k: int, generator: torch.Generator | None,
    stats: SpeculativeStats | None = None, greedy: bool = False,
) -> torch.Tensor:
    """One round's verdict; updates ``drafts`` and returns the decided codes by cell, ``-1`` where undecided.

    ``target``: ``(B, J, K)`` the model's (guided, filtered) distribution at the cells ``done + t``, read at
    the pending proposals (``t < pending``, exact given the proposals before them) and at the
    ``queries`` cells after them (``t < pending + queries``; the first one exact, the rest new proposals).
    At most ``k`` proposals stay in flight. ``greedy`` (one-hot targets, temperature 0) draws no random numbers.
    """
    B, J, _ = target.shape
    n = drafts.codes.shape[1]
    t = torch.arange(J, device=target.device)
    cell = (drafts.done[:, None] + t).clamp(max=n - 1)
    pending = drafts.pending[:, None]
    is_query = (t >= pending) & (t < pending + queries[:, None])
    # new proposals at the query cells: the first query sees every pending proposal, so once they are all
    # accepted its draw is exact (its proposal distribution is its target: accepted with probability 1)
    proposed = pick(target, generator, greedy)
    rows = torch.arange(B, device=target.device)[:, None].expand(B, J)
    drafts.codes[rows[is_query], cell[is_query]] = proposed[is_query]
    drafts.probs[rows[is_query], cell[is_query]] = target[is_query]
    codes = drafts.codes.gather(1, cell)
    q = drafts.probs[rows, cell]  # (B, J, K)
    p_x = target.gather(2, codes[..., None])[..., 0]
    q_x = q.gather(2, codes[..., None])[..., 0]
    u = torch.zeros(B, J, device=target.device) if greedy else torch.rand(B, J, generator=generator, device=target.device)
    ok = accepts(p_x, q_x, u) | (t == pending)
    checked = (t <= pending) & (t < pending + queries[:, None])
    run = (ok & checked).long().cumprod(1).sum(1)  # leading accepted cells
    rejected = run < drafts.pending
    if stats is not None:
        seen = (t < pending) & (t <= run[:, None])
        ahead = drafts.ahead.gather(1, cell)
        stats.checked.update(ahead[seen].tolist())
        stats.accepted.update(ahead[seen & (t < run[:, None])].tolist())
    decided = torch.where(t < run[:, None], codes, torch.full_like(codes, -1))
    if rejected.any():  # the first rejected cell draws from the normalised max(0, p - q)
        r = rows[rejected, 0]
        at = run[rejected]
        residual = (target[r, at] - q[r, at]).clamp(min=0)
        empty = residual.sum(-1, keepdim=True) <= 0  # p == q to rounding: p itself
        residual = torch.where(empty, target[r, at], residual)
        decided[r, at] = pick(residual / residual.sum(-1, keepdim=True), generator, greedy)
    start = drafts.done.clone()
    drafts.done = drafts.done + run + rejected.long()
    drafts.pending = (start + drafts.pending + queries - drafts.done).clamp(0, k)
    new = is_query & (cell >= drafts.done[:, None])
    drafts.ahead[rows[new], cell[new]] = (cell - drafts.done[:, None] + 1)[new]
    if stats is not None:
        stats.cells += int((drafts.done - start).sum())
    return decided
