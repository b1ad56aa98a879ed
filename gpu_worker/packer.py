"""Token-budget micro-batch packing: pure (no torch, no clock), so it is tested on any machine.

Which inputs run together decides both latency and throughput, so the rule is written down:

1. **Earliest deadline first, across lanes.** The input with the earliest deadline (ties: the
   higher lane priority, then arrival order) is the *anchor*: it is always in the next batch, so
   an urgent request never waits behind bulk work that was queued before it.
2. **A deadline-eligible window.** Only inputs whose deadline is close to the anchor's may join
   it: at most ``slack`` of the anchor's remaining time later (never less than ``min_slack_s``).
   An urgent anchor with 40 s left admits inputs due within the next 20 s, never a bulk input due
   tomorrow; a bulk anchor with 20 h left admits almost all bulk work, which is what lets bulk be
   bucketed well.
3. **Length bucketing inside the window.** The window is sorted by token count and the batch is
   a contiguous run of that order containing the anchor, as infinity's queue sorts by length:
   neighbours in length pad each other least. A run may hold at most ``max_padding`` (10 %) of
   padding; among the runs that fit, the one with the most inputs wins (fewer forward passes),
   then the one with the least padding. Without the cap, the fullest run wins even when it
   pads a 5-token query to 25; with it, small pools give smaller batches instead.
4. **The budget counts padded tokens**: the longest input times the batch size, because that is
   what the forward pass allocates. An input longer than the whole budget runs alone rather than
   never; the engine rejects or truncates such inputs before they get here.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NotRequired, TypedDict, Unpack

MAX_PADDING = 0.1
"""A batch grows only while its padding stays at most this share of its padded tokens."""
SLACK = 0.5
"""Inputs due within this share of the anchor's remaining time may join its batch."""
MIN_SLACK_S = 1.0


@dataclass(frozen=True, slots=True)
class Item:
    """One input waiting for a forward pass; ``n_tokens`` is what it costs in the budget."""

    id: Hashable
    lane: str
    deadline: float
    n_tokens: int
    priority: int = 0


def padded_tokens(lengths: Sequence[int]) -> int:
    """What one batch allocates: its longest input times its size."""
    return max(lengths, default=0) * len(lengths)


def padding_fraction(batches: Iterable[Sequence[int]]) -> float:
    """Share of the allocated tokens that are padding, over batches given as token counts."""
    real = padded = 0
    for lengths in batches:
        real += sum(lengths)
        padded += padded_tokens(lengths)
    return 0.0 if padded == 0 else 1.0 - real / padded


def _check(
    items: Sequence[Item], max_batch_tokens: int, max_batch_size: int, max_padding: float
) -> None:
    if max_batch_tokens < 1 or max_batch_size < 1:
        raise ValueError("max_batch_tokens and max_batch_size must be at least 1")
    if not 0 <= max_padding <= 1:
        raise ValueError("max_padding must be from 0 to 1")
    for item in items:
        if item.n_tokens < 1:
            raise ValueError(f"item {item.id!r}: n_tokens must be at least 1")
        if math.isnan(item.deadline):
            raise ValueError(f"item {item.id!r}: deadline is NaN")


def _best_run(
    lengths: Sequence[int], anchor: int, budget: int, size: int, max_padding: float
) -> tuple[int, int]:
    """Inclusive bounds of the run of sorted ``lengths`` that holds ``anchor`` and fits.

    For each candidate end ``j`` (the run's longest input) the run reaches back as far as the
    budget, the size and ``max_padding`` allow; the most inputs win, then the least padding.
    Reaching back adds ever shorter inputs, so a run's padding only grows with its reach, and
    the earliest allowed start only moves forward as ``j`` grows: one pass finds them all.
    """
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + length)
    best: tuple[tuple[int, int], int, int] = ((1, 0), anchor, anchor)
    start = 0
    for j in range(anchor, len(lengths)):
        longest = lengths[j]
        start = max(start, j - min(size, budget // longest) + 1)
        while start <= anchor and (j - start + 1) * longest * (1 - max_padding) > (
            prefix[j + 1] - prefix[start]
        ):
            start += 1
        if start > anchor:
            break
        count = j - start + 1
        key = (count, -(count * longest - (prefix[j + 1] - prefix[start])))
        if key > best[0]:
            best = (key, start, j)
    return best[1], best[2]


def iter_batches(
    items: Sequence[Item],
    *,
    max_batch_tokens: int,
    max_batch_size: int,
    now: float,
    max_padding: float = MAX_PADDING,
    slack: float = SLACK,
    min_slack_s: float = MIN_SLACK_S,
) -> Iterator[list[Item]]:
    """Batches in the order they should run, computed lazily; see the module docstring."""
    _check(items, max_batch_tokens, max_batch_size, max_padding)
    n = len(items)
    order = sorted(range(n), key=lambda i: (items[i].deadline, -items[i].priority, i))
    length = [items[i].n_tokens for i in order]
    taken = bytearray(n)  # by EDF rank
    window: list[tuple[int, int]] = []  # (n_tokens, EDF rank), kept sorted
    boundary = 0  # EDF ranks below this have entered the window
    head = 0  # EDF rank of the anchor
    while True:
        while head < n and taken[head]:
            head += 1
        if head == n:
            return
        deadline = items[order[head]].deadline
        horizon = deadline + max(min_slack_s, slack * (deadline - now))
        entering = []
        while boundary < n and (boundary <= head or items[order[boundary]].deadline <= horizon):
            entering.append((length[boundary], boundary))
            boundary += 1
        if entering:
            window.extend(entering)
            window.sort()
        pos = bisect.bisect_left(window, (length[head], head))
        lo = max(0, pos - max_batch_size + 1)
        hi = min(len(window), pos + max_batch_size)
        start, end = _best_run(
            [w[0] for w in window[lo:hi]], pos - lo, max_batch_tokens, max_batch_size, max_padding
        )
        chosen = window[lo + start : lo + end + 1]
        del window[lo + start : lo + end + 1]
        for _, rank in chosen:
            taken[rank] = 1
        yield [items[order[rank]] for _, rank in chosen]


class Budget(TypedDict):
    """``iter_batches``' knobs, so ``pack`` and ``next_batch`` take exactly the same ones."""

    max_batch_tokens: int
    max_batch_size: int
    now: float
    max_padding: NotRequired[float]
    slack: NotRequired[float]
    min_slack_s: NotRequired[float]


def pack(items: Sequence[Item], **budget: Unpack[Budget]) -> list[list[Item]]:
    """Every item in exactly one batch, batches in the order they should run."""
    return list(iter_batches(items, **budget))


def next_batch(items: Sequence[Item], **budget: Unpack[Budget]) -> list[Item]:
    """The batch to run now (empty when nothing waits)."""
    return next(iter_batches(items, **budget), [])
