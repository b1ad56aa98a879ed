"""Planner simulation: a day of mixed traffic through five routing policies, on a simulated clock.

A discrete-event simulation (an event heap plus the aggregator's beat as a 2 s tick; no sleeps)
that drives mixbatch's *real* decision code: ``routing.decide.route.decide`` (route choice),
``routing.decide.options.learn`` and ``routing.decide.estimates`` (what is learned from observations),
``routing.decide.flush.should_flush`` (a group waits to fill only while its deadline allows),
``routing.decide.hedge.should_hedge`` (re-route the requests of a late batch) and
``routing.decide.route.request_costs`` / ``routing.decide.cost`` (prices). Only the world is simulated: the
traffic, the providers' batch turnaround, realtime latency and rate limits, and a GPU.

The world (every figure is an assumption; see docs/planner.md):

* traffic: ``--n`` requests (default 1,000,000) over one day, diurnal (rate 0.4x at 03:00 to 1.6x
  at 15:00); lanes 5 % urgent (1 min), 25 % standard (1 h), 70 % bulk (24 h), from
  ``config/lanes.toml``; 40 % OpenAI chat (gpt-4o-mini), 20 % OpenAI embeddings, 25 % Anthropic
  messages (claude-haiku-4-5), 10 % embeddings and 5 % chat on models served locally
  (all-MiniLM-L6-v2, llama-3.1-8b) and also at an OpenAI-compatible account (together);
* provider batches: lognormal turnaround (sigma 0.8) whose median follows the day (x1 at night,
  x6 around 15:00: OpenAI 8 to 48 min), a Pareto tail on 2 % of batches, a slowdown of larger
  batches (size^0.15), an OpenAI incident from 13:00 to 19:00 (x3, and 5 % of batches expire),
  0.3 % of batches expiring otherwise; an expired batch ends at 24 h with 30-90 % of its lines
  done. Polled as the service polls (5 s, backing off x1.5 to 60 s);
* realtime: lognormal latency (sigma 0.5, slower at the peak), 0.5 % of calls retried after 10-40
  s, and a rate limit per account (requests per minute) that queues the excess;
* GPU: one device, 2,000 embeddings/s or 10 chat completions/s, FIFO, priced at $2/hour busy.

Policies, on the same traffic (same seed):

* ``all-realtime``: every request realtime at its default account;
* ``all-batch``: every request in a provider batch, flushed every 5 min, never hedged;
* ``static``: the provider batch issue's rule (``RouteOptions`` with the table's priors only:
  batch when slack > prior turnaround + margin, hedge with a fixed realtime estimate, no GPU);
* ``planner``: mixbatch's learned route choice (this issue), refreshed from observations every
  ``--refresh`` simulated seconds, with the GPU and the price table;
* ``oracle``: knows every batch's turnaround when it creates the batch, so it puts in a batch
  exactly the requests that batch will answer in time, and never hedges.

Reported: cost, deadline misses per lane, provider calls (realtime calls; batch API calls:
upload and create, polls, result downloads, cancels) and batches. Invariants (checked by
``check_invariants``, asserted in tests/test_planner_sim.py): every request answered and
delivered exactly once, later answers ignored and counted, misses counted per lane.

    .venv/bin/python benchmarks/planner_sim.py                 # 1,000,000 requests, markdown
    .venv/bin/python benchmarks/planner_sim.py --n 20000 --json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from routing.decide.cost import parse_prices
from routing.decide.estimates import GpuObs, LatencyObs, Observations, TurnaroundObs
from routing.decide.flush import should_flush
from routing.decide.hedge import batch_margin_s, batch_turnaround_s, hedge_alternative_s
from routing.decide.lanes import parse_lanes
from routing.decide.options import RouteOptions, learn
from routing.decide.ratelimit import Headroom
from routing.decide.route import decide, request_costs
from routing.models import Endpoint, Request, Route, ServiceConfig, prepare

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0
POLICIES = ("all-realtime", "all-batch", "static", "planner", "oracle")
LANES = ("urgent", "standard", "bulk")

PRICES = """
[providers.openai]
batch_discount = 0.5
[providers.openai.models."gpt-4o-mini"]
input_usd_per_mtok = 0.15
output_usd_per_mtok = 0.60
[providers.openai.models."text-embedding-3-small"]
input_usd_per_mtok = 0.02

[providers.anthropic]
batch_discount = 0.5
[providers.anthropic.models."claude-haiku-4-5"]
input_usd_per_mtok = 1.00
output_usd_per_mtok = 5.00

[providers.together]
batch_discount = 0.5
[providers.together.models."all-MiniLM-L6-v2"]
input_usd_per_mtok = 0.01
[providers.together.models."llama-3.1-8b-instruct"]
input_usd_per_mtok = 0.18
output_usd_per_mtok = 0.18
"""


@dataclass(frozen=True)
class Template:
    """One kind of request: what it asks, where it goes by default, how the world treats it."""

    endpoint: str
    model: str
    account: str
    share: float
    chars: int
    max_tokens: int | None
    latency_s: float
    local: bool = False
    gpu_per_s: float = 0.0

    def body(self) -> dict[str, Any]:
        text = ("lorem ipsum " * (self.chars // 12 + 1))[: self.chars]
        if self.endpoint == Endpoint.EMBEDDINGS.value:
            return {"model": self.model, "input": text}
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
        }
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        return body


TEMPLATES = (
    Template("/v1/chat/completions", "gpt-4o-mini", "openai", 0.40, 2000, 200, 2.5),
    Template("/v1/embeddings", "text-embedding-3-small", "openai", 0.20, 1200, None, 0.4),
    Template("/v1/messages", "claude-haiku-4-5", "anthropic", 0.25, 2400, 200, 3.0),
    Template("/v1/embeddings", "all-MiniLM-L6-v2", "together", 0.10, 400, None, 0.3, True, 2000.0),
    Template(
        "/v1/chat/completions",
        "llama-3.1-8b-instruct",
        "together",
        0.05,
        1600,
        150,
        1.5,
        True,
        10.0,
    ),
)
ACCOUNTS = {
    "/v1/chat/completions": ("openai", "together"),
    "/v1/embeddings": ("openai", "together"),
    "/v1/messages": ("anthropic",),
}
PRIORS_S = {"openai": 7200.0, "anthropic": 3600.0, "together": 1800.0}
"""``expected_turnaround`` of config/providers.toml: the static rule's, and the planner's prior."""
RPM = {"openai": 10_000, "anthropic": 4_000, "together": 3_000}
MEDIAN_MIN = {"openai": 8.0, "anthropic": 5.0, "together": 4.0}
GPU_USD_PER_HOUR = 2.0


@dataclass
class Config:
    n: int = 1_000_000
    seed: int = 7
    tick_s: float = 2.0
    refresh_s: float = 60.0
    quantile: float = 0.95
    margin_s: float = 600.0
    hedge_margin_s: float = 120.0
    max_wait_s: float = 300.0
    target_bytes: int = 20 * 1024 * 1024
    max_lines: int = 50_000
    poll_s: float = 5.0
    poll_max_s: float = 60.0
    half_life_s: float = 7200.0


@dataclass
class Traffic:
    arrival: np.ndarray
    lane: np.ndarray
    tmpl: np.ndarray
    deadline: np.ndarray


def lane_deadlines() -> tuple[float, ...]:
    """The lanes' default deadlines, from the same file the service reads."""
    lanes = {s.name: s for s in parse_lanes((ROOT / "config" / "lanes.toml").read_text())}
    return tuple(lanes[name].deadline_s for name in LANES)


def make_traffic(n: int, seed: int) -> Traffic:
    """Arrivals over one day with a diurnal curve; lanes and request kinds drawn by share."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, DAY, 24 * 60 + 1)
    rate = 1.0 + 0.6 * np.sin(2 * np.pi * (grid / DAY - 0.375))
    cdf = np.concatenate([[0.0], np.cumsum((rate[1:] + rate[:-1]) / 2 * np.diff(grid))])
    cdf /= cdf[-1]
    arrival = np.interp(np.sort(rng.random(n)), cdf, grid)
    lane = rng.choice(3, size=n, p=[0.05, 0.25, 0.70])
    tmpl = rng.choice(len(TEMPLATES), size=n, p=[t.share for t in TEMPLATES])
    deadline = arrival + np.array(lane_deadlines())[lane]
    return Traffic(arrival, lane.astype(np.int8), tmpl.astype(np.int8), deadline)


def _peak(t: float) -> float:
    """0 at night, 1 at 15:00: how busy the providers are."""
    h = (t % DAY) / 3600.0
    return math.exp(-(((h - 15.0) / 3.5) ** 2) / 2)


class World:
    """The providers and the GPU: everything the service cannot see in advance."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.rt_free: dict[str, float] = dict.fromkeys(RPM, 0.0)
        self.gpu_free = 0.0

    def turnaround(self, t: float, account: str, size: int) -> tuple[float, bool, float]:
        """(seconds until the batch ends, expired?, share of lines done if it expired)."""
        rng = self.rng
        median = MEDIAN_MIN[account] * 60.0 * (1.0 + 5.0 * _peak(t))
        incident = account == "openai" and 13 * 3600 <= t < 19 * 3600
        if incident:
            median *= 3.0
        median *= (max(size, 1) / 1000.0) ** 0.15
        seconds = median * math.exp(0.8 * rng.gauss(0.0, 1.0))
        if rng.random() < 0.02:
            seconds *= 1.0 + 4.0 * rng.paretovariate(1.1)
        if rng.random() < (0.05 if incident else 0.003) or seconds >= DAY:
            return DAY, True, rng.uniform(0.3, 0.9)
        return max(seconds, 20.0), False, 1.0

    def realtime(self, t: float, account: str, base_s: float) -> tuple[float, float]:
        """(seconds from dispatch to answer, of which queued behind the rate limit)."""
        start = max(t, self.rt_free[account])
        self.rt_free[account] = start + 60.0 / RPM[account]
        latency = base_s * (1.0 + 0.5 * _peak(t)) * math.exp(0.5 * self.rng.gauss(0.0, 1.0))
        if self.rng.random() < 0.005:
            latency += self.rng.uniform(10.0, 40.0)
        return start - t + latency, start - t

    def gpu(self, t: float, per_s: float, overhead_s: float) -> tuple[float, float, float]:
        """(start, finish, queue wait) of one item on the GPU."""
        start = max(t + overhead_s, self.gpu_free)
        self.gpu_free = start + 1.0 / per_s
        return start, self.gpu_free, start - t - overhead_s


def poll_offsets(cfg: Config) -> list[float]:
    """Seconds after create of each poll: the service's backoff (x1.5, capped), for 26 h."""
    out, at, k = [], 0.0, 0
    while at < DAY + 7200:
        at += min(cfg.poll_s * 1.5**k, cfg.poll_max_s)
        out.append(at)
        k += 1
    return out


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
    )

    def __init__(
        self, gid: str, account: str, tmpl: int, members: list[int], created: float, cost: float
    ) -> None:
        self.gid, self.account, self.tmpl, self.members = gid, account, tmpl, members
        self.created, self.cost = created, cost
        self.alive, self.ptr, self.poll = len(members), 0, 0
        self.hedged: set[int] = set()
        self.end, self.expired, self.done_frac = 0.0, False, 1.0


@dataclass
class Group:
    members: list[int] = field(default_factory=list)
    bytes: int = 0
    tightest: float = math.inf
    first_at: float = 0.0


class Sim:
    """One policy over the whole traffic."""

    def __init__(self, policy: str, traffic: Traffic, cfg: Config) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} (one of {', '.join(POLICIES)})")
        self.policy, self.cfg, self.tr = policy, cfg, traffic
        self.world = World(cfg.seed * 1000 + POLICIES.index(policy))
        self.n = len(traffic.arrival)
        self.deadline: list[float] = traffic.deadline.tolist()
        self.tmpl: list[int] = traffic.tmpl.tolist()
        self.delivered_at = np.full(self.n, np.nan)
        self.deliveries = np.zeros(self.n, dtype=np.int16)
        self.answers = np.zeros(self.n, dtype=np.int16)
        self.final_route = np.zeros(self.n, dtype=np.int8)
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.groups: dict[str, Group] = {}
        self.open: dict[int, Batch] = {}
        self.polls = poll_offsets(cfg)
        self.counts = {
            "realtime_calls": 0,
            "batch_calls": 0,
            "batches": 0,
            "batches_expired": 0,
            "batches_cancelled": 0,
            "hedged": 0,
            "gpu_requests": 0,
            "late_answers": 0,
            "rerouted_expired": 0,
        }
        self.cost = {"realtime": 0.0, "batch": 0.0, "gpu": 0.0}
        self.lane: list[int] = traffic.lane.tolist()
        self.cost_lane = [0.0, 0.0, 0.0]
        self.wasted = 0.0
        prices = parse_prices(PRICES, source="planner_sim prices")
        self.base = RouteOptions(
            batch_turnaround_s=dict(PRIORS_S),
            margin_s=cfg.margin_s,
            hedge_margin_s=cfg.hedge_margin_s,
            realtime_estimate_s=30.0,
            quantile=cfg.quantile,
            half_life_s=cfg.half_life_s,
            batch_overhead_s=cfg.tick_s + cfg.poll_max_s,
            accounts={k: tuple(v) for k, v in ACCOUNTS.items()},
            prices=prices,
            local_models=frozenset(t.model for t in TEMPLATES if t.local),
            gpu_usd_per_hour=GPU_USD_PER_HOUR,
            gpu_prior_texts_per_s=10.0,
        )
        self.options = self.base
        # the provider batch issue's rule: priors, no prices, no GPU, one account per model
        self.static = [
            RouteOptions(
                batch_turnaround_s=dict(PRIORS_S),
                margin_s=cfg.margin_s,
                hedge_margin_s=cfg.hedge_margin_s,
                realtime_estimate_s=30.0,
                accounts={t.endpoint: (t.account,)},
            )
            for t in TEMPLATES
        ]
        cfgs = ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text()))
        self.costs: list[dict[tuple[Route, str], float | None]] = []
        self.line_bytes: list[int] = []
        for t in TEMPLATES:
            req = prepare(Request(lane="bulk", endpoint=t.endpoint, body=t.body()), cfgs, 0.0)
            costs, _ = request_costs(req, self.base)
            self.costs.append(costs)
            self.line_bytes.append(len(json.dumps(t.body())) + 96)
        self.gpu_usd = [
            GPU_USD_PER_HOUR / 3600.0 / t.gpu_per_s if t.local else 0.0 for t in TEMPLATES
        ]
        # observations (the planner's; the store's shape: bounded, newest kept)
        self.obs_batch: dict[str, deque[TurnaroundObs]] = {}
        self.obs_rt: dict[str, deque[LatencyObs]] = {}
        self.obs_gpu: dict[str, deque[GpuObs]] = {}
        self.headroom: dict[str, Headroom] = {}
        self.pending_obs: list[tuple[float, int, str, str, Any]] = []
        self.gpu_reported: dict[str, float] = {}

    # -- plumbing -------------------------------------------------------------------------------

    def push(self, at: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))

    def observe_later(self, at: float, kind: str, key: str, obs: Any) -> None:
        """An observation the service learns only when it happens (a call's end)."""
        if self.policy != "planner":
            return
        self.seq += 1
        heapq.heappush(self.pending_obs, (at, self.seq, kind, key, obs))

    def release_obs(self, now: float) -> None:
        pending = self.pending_obs
        while pending and pending[0][0] <= now:
            _, _, kind, key, obs = heapq.heappop(pending)
            store = self.obs_rt if kind == "r" else self.obs_gpu
            store.setdefault(key, deque(maxlen=500)).append(obs)

    def deliver(self, idx: int, at: float, route: int) -> None:
        """An answer landed: the first one is delivered, a later one is ignored (and counted)."""
        self.answers[idx] += 1
        if self.deliveries[idx]:
            self.counts["late_answers"] += 1
            return
        self.deliveries[idx] += 1
        self.delivered_at[idx] = at
        self.final_route[idx] = route

    # -- routes ---------------------------------------------------------------------------------

    def to_realtime(self, idx: int, account: str, now: float) -> None:
        t = TEMPLATES[self.tmpl[idx]]
        took, queued = self.world.realtime(now, account, t.latency_s)
        self.counts["realtime_calls"] += 1
        usd = self.costs[self.tmpl[idx]].get((Route.REALTIME, account)) or 0.0
        self.cost["realtime"] += usd
        self.cost_lane[self.lane[idx]] += usd
        self.push(now + took, 0, (idx, 1))
        key = f"{account}|{t.model}"
        self.observe_later(now + took, "r", key, LatencyObs(now + took, took))
        if queued > 1.0 and self.policy == "planner":
            self.headroom[key] = Headroom(at=now, remaining_requests=0, reset_at=now + queued)

    def to_gpu(self, idx: int, now: float) -> None:
        t = TEMPLATES[self.tmpl[idx]]
        start, finish, wait = self.world.gpu(now, t.gpu_per_s, self.options.gpu_overhead_s)
        self.counts["gpu_requests"] += 1
        self.cost["gpu"] += self.gpu_usd[self.tmpl[idx]]
        self.cost_lane[self.lane[idx]] += self.gpu_usd[self.tmpl[idx]]
        self.push(finish, 0, (idx, 3))
        if start - self.gpu_reported.get(t.model, -1e9) >= 10.0:
            self.gpu_reported[t.model] = start
            self.observe_later(start, "g", t.model, GpuObs(start, t.gpu_per_s, wait))

    def to_batch(self, idx: int, account: str, now: float) -> None:
        t = TEMPLATES[self.tmpl[idx]]
        gid = f"{account}|{t.endpoint}|{t.model}"
        g = self.groups.get(gid)
        if g is None:
            g = self.groups[gid] = Group(first_at=now)
        if not g.members:
            g.first_at = now
        g.members.append(idx)
        g.bytes += self.line_bytes[self.tmpl[idx]]
        g.tightest = min(g.tightest, self.deadline[idx])

    def route(self, idx: int, now: float) -> None:
        """Where a request goes, by policy (on arrival, after a hedge, after an expiry)."""
        k = self.tmpl[idx]
        t = TEMPLATES[k]
        policy = self.policy
        if policy == "all-realtime":
            self.to_realtime(idx, t.account, now)
        elif policy == "all-batch":
            self.to_batch(idx, t.account, now)
        elif policy == "oracle":
            self.oracle_route(idx, now)
        else:
            options = self.options if policy == "planner" else self.static[k]
            costs = self.costs[k] if policy == "planner" else None
            d = decide(
                endpoint=t.endpoint,
                model=t.model,
                deadline=self.deadline[idx],
                now=now,
                options=options,
                costs=costs,
            )
            if d.route is Route.BATCH:
                self.to_batch(idx, d.provider, now)
            elif d.route is Route.GPU:
                self.to_gpu(idx, now)
            else:
                self.to_realtime(idx, d.provider, now)

    def oracle_fast(self, idx: int, now: float) -> None:
        """The oracle's route outside a batch: the GPU when it serves the model, else realtime."""
        t = TEMPLATES[self.tmpl[idx]]
        if t.local:
            self.to_gpu(idx, now)
        else:
            self.to_realtime(idx, t.account, now)

    def oracle_route(self, idx: int, now: float) -> None:
        k = self.tmpl[idx]
        t = TEMPLATES[k]
        batch_usd = self.costs[k].get((Route.BATCH, t.account)) or 0.0
        if t.local and self.gpu_usd[k] <= batch_usd:
            self.to_gpu(idx, now)
        elif self.deadline[idx] - now > self.cfg.max_wait_s + 120.0:
            self.to_batch(idx, t.account, now)
        else:
            self.oracle_fast(idx, now)

    # -- batches --------------------------------------------------------------------------------

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
                    self.oracle_fast(i, now)
            members = keep
            if not members:
                return
        usd = (self.costs[k].get((Route.BATCH, account)) or 0.0) * len(members)
        b = Batch(gid, account, k, members, now, usd)
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
            options = self.options if self.policy == "planner" else self.static[b.tmpl]
            threshold = (
                hedge_alternative_s(options, t.endpoint, t.model)
                if self.policy == "planner"
                else hedge_alternative_s(options)
            ) + options.hedge_margin_s
            members, deadline = b.members, self.deadline
            while b.ptr < len(members) and deadline[members[b.ptr]] - now < threshold:
                idx = members[b.ptr]
                b.ptr += 1
                if self.deliveries[idx]:
                    continue
                b.hedged.add(idx)
                b.alive -= 1
                self.counts["hedged"] += 1
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
        if b.expired:
            self.counts["batches_expired"] += 1
            done = int(len(b.members) * b.done_frac)
            for pos, idx in enumerate(b.members):
                if pos < done:
                    self.deliver(idx, now, 2)
                    if idx in b.hedged:
                        self.wasted += line_usd
                elif idx not in b.hedged and not self.deliveries[idx]:
                    self.counts["rerouted_expired"] += 1
                    self.route(idx, now)
            self.cost["batch"] += line_usd * done
            self.bill_lines(b, b.members[:done], 1.0)
        else:
            for idx in b.members:
                self.deliver(idx, now, 2)
                if idx in b.hedged:
                    self.wasted += line_usd
            self.cost["batch"] += b.cost
            self.bill_lines(b, b.members, 1.0)
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

    # -- learning -------------------------------------------------------------------------------

    def refresh(self, now: float) -> None:
        """What the aggregator does every few seconds: snapshot the observations, learn."""
        inflight: dict[str, list[TurnaroundObs]] = {}
        for b in self.open.values():
            inflight.setdefault(b.gid, []).append(
                TurnaroundObs(now, now - b.created, len(b.members), True)
            )
        seen = Observations.model_construct(
            batch={k: list(v) for k, v in self.obs_batch.items()},
            inflight=inflight,
            realtime={k: list(v) for k, v in self.obs_rt.items()},
            headroom=dict(self.headroom),
            gpu={k: list(v) for k, v in self.obs_gpu.items()},
            gpu_aliases={},
        )
        self.options = learn(self.base, seen, now)
        # the GPU worker's heartbeat: alive, with its current backlog as the wait
        for t in TEMPLATES:
            if t.local and now - self.gpu_reported.get(t.model, -1e9) >= 60.0:
                self.gpu_reported[t.model] = now
                backlog = max(0.0, self.world.gpu_free - now)
                self.obs_gpu.setdefault(t.model, deque(maxlen=500)).append(
                    GpuObs(now, t.gpu_per_s, backlog)
                )

    # -- the clock ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = self.cfg
        arrival = self.tr.arrival
        n, nxt = self.n, 0
        now = 0.0
        next_refresh = 0.0
        events = self.events
        while nxt < n or events or any(g.members for g in self.groups.values()):
            if self.policy == "planner":
                self.release_obs(now)
                if now >= next_refresh:
                    self.refresh(now)
                    next_refresh = now + cfg.refresh_s
            while events and events[0][0] <= now:
                at, _, kind, payload = heapq.heappop(events)
                if kind == 0:
                    idx, route = payload
                    self.deliver(idx, at, route)
                else:
                    self.poll(payload, at)
            end = int(np.searchsorted(arrival, now, side="right"))
            for idx in range(nxt, end):
                self.route(idx, now)
            nxt = end
            self.flush_groups(now)
            now += cfg.tick_s
            if not any(g.members for g in self.groups.values()):
                # nothing waits to be flushed: jump to the next arrival or event
                upcoming = [float(arrival[nxt])] if nxt < n else []
                if events:
                    upcoming.append(events[0][0])
                if upcoming:
                    target = min(upcoming)
                    if target > now:
                        now = math.ceil(target / cfg.tick_s) * cfg.tick_s
        return self.report(time.perf_counter() - started)

    def report(self, wall_s: float) -> dict[str, Any]:
        lane = self.tr.lane
        late = self.delivered_at > self.tr.deadline
        misses = {name: int(np.sum(late & (lane == i))) for i, name in enumerate(LANES)}
        totals = {name: int(np.sum(lane == i)) for i, name in enumerate(LANES)}
        return {
            "policy": self.policy,
            "n": self.n,
            "cost_usd": sum(self.cost.values()),
            "cost_by_route": dict(self.cost),
            "cost_by_lane": dict(zip(LANES, self.cost_lane, strict=True)),
            "wasted_usd": self.wasted,
            "misses": misses,
            "lane_requests": totals,
            "miss_rate": {k: misses[k] / totals[k] if totals[k] else 0.0 for k in LANES},
            "lost": int(np.sum(self.deliveries == 0)),
            "delivered_twice": int(np.sum(self.deliveries > 1)),
            "unanswered": int(np.sum(self.answers == 0)),
            "answers": int(np.sum(self.answers)),
            "undelivered_with_time": int(
                np.sum(np.isnan(self.delivered_at) & (self.deliveries > 0))
            ),
            "late_counted": int(np.sum(late)),
            "routes": {
                name: int(np.sum(self.final_route == code))
                for code, name in ((1, "realtime"), (2, "batch"), (3, "gpu"))
            },
            **self.counts,
            "wall_s": wall_s,
        }


def check_invariants(report: dict[str, Any]) -> None:
    """No request lost, none delivered twice, every later answer counted, misses per lane add up."""
    assert report["lost"] == 0, f"{report['policy']}: {report['lost']} requests never delivered"
    assert report["delivered_twice"] == 0, f"{report['policy']}: delivered twice"
    assert report["unanswered"] == 0, f"{report['policy']}: requests without an answer"
    assert report["undelivered_with_time"] == 0
    assert report["answers"] == report["n"] + report["late_answers"], (
        f"{report['policy']}: answers {report['answers']} != requests {report['n']} "
        f"+ ignored late answers {report['late_answers']}"
    )
    assert sum(report["misses"].values()) == report["late_counted"]
    assert sum(report["routes"].values()) == report["n"]


def simulate(policy: str, cfg: Config) -> dict[str, Any]:
    traffic = make_traffic(cfg.n, cfg.seed)
    report = Sim(policy, traffic, cfg).run()
    check_invariants(report)
    return report


def run_all(cfg: Config, policies: Sequence[str] = POLICIES, jobs: int = 1) -> list[dict[str, Any]]:
    if jobs <= 1:
        return [simulate(p, cfg) for p in policies]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(simulate, policies, [cfg] * len(policies)))


def _pct(x: float) -> str:
    return f"{x * 100:.3f} %"


def markdown(reports: list[dict[str, Any]]) -> str:
    by = {r["policy"]: r for r in reports}
    oracle = by.get("oracle", {}).get("cost_usd")
    realtime = by.get("all-realtime", {}).get("cost_usd")
    lines = [
        "| policy | cost (USD) | vs oracle | vs all-realtime | missed urgent | missed standard "
        "| missed bulk | realtime calls | batch API calls | batches (expired, cancelled) "
        "| hedged | GPU requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        cost = r["cost_usd"]
        vs_oracle = f"{(cost / oracle - 1) * 100:+.1f} %" if oracle else "-"
        vs_rt = f"{(cost / realtime - 1) * 100:+.1f} %" if realtime else "-"
        m, rate = r["misses"], r["miss_rate"]
        lines.append(
            f"| {r['policy']} | {cost:,.2f} | {vs_oracle} | {vs_rt} "
            + " ".join(f"| {m[k]:,} ({_pct(rate[k])})" for k in LANES)
            + f" | {r['realtime_calls']:,} | {r['batch_calls']:,} | {r['batches']:,} "
            f"({r['batches_expired']:,}, {r['batches_cancelled']:,}) | {r['hedged']:,} "
            f"| {r['gpu_requests']:,} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="requests in the day")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--quantile", type=float, default=0.95)
    ap.add_argument("--margin", type=float, default=600.0, help="MIXBATCH_BATCH_MARGIN_S")
    ap.add_argument("--half-life", type=float, default=7200.0, help="MIXBATCH_ROUTE_HALF_LIFE_S")
    ap.add_argument("--refresh", type=float, default=60.0, help="simulated s between re-learns")
    ap.add_argument("--jobs", type=int, default=2, help="policies run in parallel processes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r} (one of {', '.join(POLICIES)})")
    cfg = Config(
        n=args.n,
        seed=args.seed,
        quantile=args.quantile,
        refresh_s=args.refresh,
        margin_s=args.margin,
        half_life_s=args.half_life,
    )
    started = time.perf_counter()
    reports = run_all(cfg, policies, args.jobs)
    if args.json:
        json.dump({"config": cfg.__dict__, "reports": reports}, sys.stdout, indent=2)
        print()
    else:
        print(markdown(reports))
        print(f"\n{cfg.n:,} requests, seed {cfg.seed}, {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
