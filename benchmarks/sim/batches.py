"""The batch route of the simulated service: groups flushed by ``should_flush``, batches polled
with the service's backoff, late members hedged by ``should_hedge``, results collected under the
members' lease tokens. A mixin of ``benchmarks.sim.engine.Sim``, which owns the state."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from benchmarks.sim.world import PRIORS_S, TEMPLATES, Config, World
from routing.decide.estimates import TurnaroundObs
from routing.decide.flush import should_flush
from routing.decide.hedge import batch_margin_s, batch_turnaround_s, should_hedge
from routing.decide.options import RouteOptions
from routing.models import Route


class Batch:
    __slots__ = (
        "account",
        "alive",
        "cost",
        "created",
        "done_frac",
        "end",
        "expired",
        "gid",
        "hedged",
        "members",
        "poll",
        "ptr",
        "tmpl",
        "tokens",
    )

    def __init__(
        self,
        gid: str,
        account: str,
        tmpl: int,
        members: list[int],
        tokens: list[int],
        created: float,
        cost: float,
    ) -> None:
        self.gid, self.account, self.tmpl, self.members = gid, account, tmpl, members
        self.tokens, self.created, self.cost = tokens, created, cost
        self.alive, self.ptr, self.poll = len(members), 0, 0
        self.hedged: set[int] = set()
        self.end, self.expired, self.done_frac = 0.0, False, 1.0


@dataclass
class Group:
    members: list[int] = field(default_factory=list)
    bytes: int = 0
    tightest: float = math.inf
    first_at: float = 0.0


class BatchSteps(ABC):
    """What ``Sim`` does with provider batches; the attributes and steps below are ``Sim``'s."""

    policy: str
    cfg: Config
    world: World
    options: RouteOptions
    static: list[RouteOptions]
    deadline: list[float]
    tmpl: list[int]
    lane: list[int]
    token: list[int]
    groups: dict[str, Group]
    open: dict[int, Batch]
    polls: list[float]
    counts: dict[str, int]
    cost: dict[str, float]
    cost_lane: list[float]
    costs: list[dict[tuple[Route, str], float | None]]
    wasted: float
    hedged_from: dict[int, str]
    obs_batch: dict[str, deque[TurnaroundObs]]

    @abstractmethod
    def push(self, at: float, kind: int, payload: Any) -> None: ...

    @abstractmethod
    def route(self, idx: int, now: float) -> None: ...

    @abstractmethod
    def requeue(self, idx: int, token: int) -> bool: ...

    @abstractmethod
    def answer(self, idx: int, token: int, at: float, route: int) -> None: ...

    @abstractmethod
    def oracle_fast(self, idx: int, now: float) -> None: ...

    # -- steps ----------------------------------------------------------------------------------

    def flush_groups(self, now: float) -> None:
        cfg = self.cfg
        for gid, g in self.groups.items():
            if not g.members:
                continue
            account, endpoint, model = gid.split("|", 2)
            if self.policy == "planner":
                found = batch_turnaround_s(self.options, account, endpoint, model, len(g.members))
                turnaround = (found[0] if found else 0.0) + self.options.batch_overhead_s
                margin = batch_margin_s(self.options, endpoint, model)
                tightest: float | None = g.tightest
            elif self.policy == "static":
                turnaround, margin, tightest = PRIORS_S[account], cfg.margin_s, g.tightest
            else:
                turnaround, margin, tightest = 0.0, 0.0, None
            flush, _ = should_flush(
                g.bytes,
                len(g.members),
                tightest,
                now,
                target_bytes=cfg.target_bytes,
                turnaround_s=turnaround,
                margin_s=margin,
                max_wait_s=cfg.max_wait_s,
                windows_due=False,
                oldest_enqueued_at=g.first_at,
                wait_step_s=cfg.tick_s,
                max_lines=cfg.max_lines,
            )
            if flush:
                members = sorted(g.members, key=self.deadline.__getitem__)
                g.members, g.bytes, g.tightest = [], 0, math.inf
                self.create_batch(gid, account, members, now)

    def seen_at(self, created: float, end: float) -> tuple[float, int]:
        """When the poller sees a batch that ends at ``end``, and how many polls that took."""
        offsets = self.polls
        lo, hi = 0, len(offsets) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if created + offsets[mid] >= end:
                hi = mid
            else:
                lo = mid + 1
        return created + offsets[lo], lo + 1

    def create_batch(self, gid: str, account: str, members: list[int], now: float) -> None:
        k = self.tmpl[members[0]]
        seconds, expired, done = self.world.turnaround(now, account, len(members))
        if self.policy == "oracle":
            seen, _ = self.seen_at(now, now + seconds)
            keep = [] if expired else [i for i in members if self.deadline[i] >= seen]
            for i in members:
                if expired or self.deadline[i] < seen:
                    self.requeue(i, self.token[i])
                    self.oracle_fast(i, now)
            members = keep
            if not members:
                return
        usd = (self.costs[k].get((Route.BATCH, account)) or 0.0) * len(members)
        b = Batch(gid, account, k, members, [self.token[i] for i in members], now, usd)
        b.end, b.expired, b.done_frac = now + seconds, expired, done
        self.counts["batches"] += 1
        self.counts["batch_calls"] += 2  # upload the file, create the batch
        self.open[id(b)] = b
        self.push(now + self.polls[0], 1, b)

    def poll(self, b: Batch, now: float) -> None:
        """One poll: collect a batch that ended, else hedge its late requests, else wait."""
        if id(b) not in self.open:
            return
        self.counts["batch_calls"] += 1
        b.poll += 1
        if now >= b.end:
            self.collect(b, now)
            return
        if self.policy in ("planner", "static"):
            t = TEMPLATES[b.tmpl]
            planner = self.policy == "planner"
            options = self.options if planner else self.static[b.tmpl]
            where = {"endpoint": t.endpoint, "model": t.model} if planner else {}
            members, deadline = b.members, self.deadline
            while b.ptr < len(members) and should_hedge(
                deadline[members[b.ptr]], now, options, **where
            ):
                idx, token = members[b.ptr], b.tokens[b.ptr]
                b.ptr += 1
                if not self.requeue(idx, token):
                    continue
                b.hedged.add(idx)
                b.alive -= 1
                self.counts["hedged"] += 1
                self.hedged_from[idx] = f"{b.account}|{t.model}"
                self.route(idx, now)
            if b.alive <= 0:
                self.cancel(b, now)
                return
        self.push(b.created + self.polls[min(b.poll, len(self.polls) - 1)], 1, b)

    def cancel(self, b: Batch, now: float) -> None:
        """Nobody waits on the batch any more: cancel it; the lines that ran are still billed."""
        del self.open[id(b)]
        self.counts["batch_calls"] += 1
        self.counts["batches_cancelled"] += 1
        ran = min(1.0, (now - b.created) / max(b.end - b.created, 1.0))
        self.cost["batch"] += b.cost * ran
        self.wasted += b.cost * ran
        self.bill_lines(b, b.members, ran)
        self.observe_batch(b, now, censored=True)

    def collect(self, b: Batch, now: float) -> None:
        del self.open[id(b)]
        self.counts["batch_calls"] += 1  # download the results
        line_usd = b.cost / max(len(b.members), 1)
        done = int(len(b.members) * b.done_frac) if b.expired else len(b.members)
        self.counts["batches_expired"] += int(b.expired)
        for pos, (idx, token) in enumerate(zip(b.members, b.tokens, strict=True)):
            if pos < done:
                self.answer(idx, token, now, 2)
                if idx in b.hedged:
                    self.wasted += line_usd
            elif self.requeue(idx, token):
                self.counts["rerouted_expired"] += 1
                self.route(idx, now)
        self.cost["batch"] += line_usd * done
        self.bill_lines(b, b.members[:done], 1.0)
        self.observe_batch(b, now, censored=b.expired)

    def bill_lines(self, b: Batch, members: list[int], share: float) -> None:
        line_usd = b.cost / max(len(b.members), 1) * share
        for idx in members:
            self.cost_lane[self.lane[idx]] += line_usd

    def observe_batch(self, b: Batch, now: float, *, censored: bool) -> None:
        if self.policy != "planner":
            return
        obs = TurnaroundObs(now, now - b.created, len(b.members), censored)
        self.obs_batch.setdefault(b.gid, deque(maxlen=500)).append(obs)
