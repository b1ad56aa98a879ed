"""One policy over one simulated day: the service's own decisions over the world's draws.

Each request moves through ``routing.states``' transitions as the store would move it: a claim
(QUEUED to CLAIMED, a new lease token), SUBMITTED into a batch or RUNNING on a call, and a finish
that is *accepted only as ``settle.lua`` accepts one*: from a leased or submitted state, with the
token of the current claim. A hedged request's batch line, answering later under the old token,
is refused, exactly as the service refuses it; "delivered exactly once" is then counted from the
DELIVERED transitions, not from a filter of the simulator's own.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections import deque
from typing import Any

import numpy as np

from benchmarks.sim.batches import Batch, BatchSteps, Group
from benchmarks.sim.world import (
    ACCOUNTS,
    DAY,
    GPU_USD_PER_HOUR,
    PRICES,
    PRIORS_S,
    ROOT,
    TEMPLATES,
    Config,
    Traffic,
    World,
    poll_offsets,
)
from routing.decide.backoff import RetryPolicy, backoff_s
from routing.decide.cost import parse_prices
from routing.decide.estimates import GpuObs, LatencyObs, Observations, TurnaroundObs
from routing.decide.expected import HedgeObs, learn_hedges
from routing.decide.lanes import parse_lanes
from routing.decide.options import RouteOptions, learn
from routing.decide.ratelimit import Headroom
from routing.decide.route import decide, request_costs
from routing.models import Request, Route, ServiceConfig, prepare
from routing.states import BATCH_HELD, LEASED, State, can_transition

POLICIES = ("all-realtime", "all-batch", "static", "planner", "oracle")
FLEX: Route | None = getattr(Route, "FLEX", None)
"""The flex route, once the service's route rule knows it (issue 14); the world has it already."""
FLEX_MAX_S = 900.0
FLEX_RESERVE_S = 30.0
"""``routing.engine.realtime``'s flex budget: at most 900 s, and 30 s kept for the standard call."""
FLEX_BACKOFF = RetryPolicy(jitter=0.0)
_FINISHABLE = LEASED | BATCH_HELD


class Sim(BatchSteps):
    """One policy over the whole traffic."""

    def __init__(self, policy: str, traffic: Traffic, cfg: Config) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} (one of {', '.join(POLICIES)})")
        self.policy, self.cfg, self.tr = policy, cfg, traffic
        self.world = World(cfg)
        self.n = len(traffic.arrival)
        self.deadline: list[float] = traffic.deadline.tolist()
        self.tmpl: list[int] = traffic.tmpl.tolist()
        self.lane: list[int] = traffic.lane.tolist()
        self.state: list[State] = [State.QUEUED] * self.n
        self.token = [0] * self.n
        self.attempt = [0] * self.n
        self.delivered_at = np.full(self.n, np.nan)
        self.deliveries = np.zeros(self.n, dtype=np.int16)
        self.answers = np.zeros(self.n, dtype=np.int16)
        self.final_route = np.zeros(self.n, dtype=np.int8)
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.groups: dict[str, Group] = {}
        self.open: dict[int, Batch] = {}
        self.polls = poll_offsets(cfg)
        self.counts = dict.fromkeys(
            (
                "realtime_calls",
                "flex_calls",
                "flex_shed",
                "batch_calls",
                "batches",
                "batches_expired",
                "batches_cancelled",
                "hedged",
                "gpu_requests",
                "late_answers",
                "rerouted_expired",
            ),
            0,
        )
        self.cost = {"realtime": 0.0, "batch": 0.0, "gpu": 0.0, "flex": 0.0}
        self.cost_lane = [0.0, 0.0, 0.0]
        self.gpu_busy_s = 0.0
        self.wasted = 0.0
        self.hedged_from: dict[int, str] = {}
        self.base = RouteOptions(
            batch_turnaround_s=dict(PRIORS_S),
            margin_s=cfg.margin_s,
            hedge_margin_s=cfg.hedge_margin_s,
            realtime_estimate_s=30.0,
            quantile=cfg.quantile,
            half_life_s=cfg.half_life_s,
            batch_overhead_s=cfg.tick_s + cfg.poll_max_s,
            accounts={k: tuple(v) for k, v in ACCOUNTS.items()},
            prices=parse_prices(PRICES, source="planner_sim prices"),
            local_models=frozenset(t.model for t in TEMPLATES if t.local),
            gpu_usd_per_hour=GPU_USD_PER_HOUR,
            gpu_prior_texts_per_s=10.0,
            flex_models={t.account: frozenset({t.model}) for t in TEMPLATES if t.flex},
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
        self.obs_hedge: dict[str, deque[HedgeObs]] = {}
        self.headroom: dict[str, Headroom] = {}
        self.pending_obs: list[tuple[float, int, str, str, Any]] = []
        self.gpu_reported: dict[str, float] = {}

    # -- the service's state machine -------------------------------------------------------------

    def move(self, idx: int, to: State) -> None:
        """One transition, allowed by ``routing.states`` or the simulation is wrong."""
        src = self.state[idx]
        if not can_transition(src, to):
            raise AssertionError(f"request {idx}: {src} -> {to} is not a transition")
        self.state[idx] = to

    def claim(self, idx: int, to: State) -> int:
        """QUEUED -> CLAIMED -> ``to`` under a new lease token (what the aggregator does)."""
        self.move(idx, State.CLAIMED)
        self.token[idx] += 1
        self.move(idx, to)
        return self.token[idx]

    def requeue(self, idx: int, token: int) -> bool:
        """A retryable end or a hedge: back to the lane, only while ``token`` is still current."""
        if self.token[idx] != token or self.state[idx] not in _FINISHABLE:
            return False
        self.move(idx, State.QUEUED)
        return True

    def answer(self, idx: int, token: int, at: float, route: int) -> None:
        """An answer landed: finished as ``settle.lua`` finishes (token and state checked), then
        delivered; one the store would refuse is counted and changes nothing."""
        self.answers[idx] += 1
        if self.token[idx] != token or self.state[idx] not in _FINISHABLE:
            self.counts["late_answers"] += 1
            return
        self.move(idx, State.DONE)
        self.move(idx, State.DELIVERED)
        self.deliveries[idx] += 1
        self.delivered_at[idx] = at
        self.final_route[idx] = route
        key = self.hedged_from.pop(idx, None)
        if key is not None and self.policy == "planner":
            obs = HedgeObs(at, at <= self.deadline[idx])
            self.obs_hedge.setdefault(key, deque(maxlen=500)).append(obs)

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

    def charge(self, idx: int, route: str, usd: float) -> None:
        self.cost[route] += usd
        self.cost_lane[self.lane[idx]] += usd

    # -- routes ---------------------------------------------------------------------------------

    def to_realtime(self, idx: int, account: str, now: float) -> None:
        self.call_realtime(idx, self.claim(idx, State.RUNNING), account, now)

    def call_realtime(self, idx: int, token: int, account: str, now: float) -> None:
        """One standard-tier call under the lease ``token`` (a claim, or flex's fallback)."""
        t = TEMPLATES[self.tmpl[idx]]
        self.attempt[idx] += 1
        took, queued = self.world.realtime(now, account, t.latency_s, idx, self.attempt[idx])
        self.counts["realtime_calls"] += 1
        usd = self.costs[self.tmpl[idx]].get((Route.REALTIME, account)) or 0.0
        self.charge(idx, "realtime", usd)
        self.push(now + took, 0, (idx, token, 1))
        key = f"{account}|{t.model}"
        self.observe_later(now + took, "r", key, LatencyObs(now + took, took))
        if queued > 1.0 and self.policy == "planner":
            self.headroom[key] = Headroom(at=now, remaining_requests=0, reset_at=now + queued)

    def to_flex(self, idx: int, account: str, now: float) -> None:
        """A flex call as ``routing.engine.realtime`` makes it: retried with backoff while shed
        (429), for the slack less the standard call's reserve, then the standard tier."""
        t = TEMPLATES[self.tmpl[idx]]
        token = self.claim(idx, State.RUNNING)
        budget = max(0.0, min(FLEX_MAX_S, self.deadline[idx] - now - FLEX_RESERVE_S))
        elapsed, tries = 0.0, 0
        while True:
            self.attempt[idx] += 1
            tries += 1
            took, shed = self.world.flex(now + elapsed, idx, self.attempt[idx])
            self.counts["flex_calls"] += 1
            if not shed:
                break
            self.counts["flex_shed"] += 1
            elapsed += took + backoff_s(tries, FLEX_BACKOFF)
            if elapsed >= budget:
                break
        key = f"{account}@flex|{t.model}"
        if not shed:
            assert FLEX is not None
            usd = self.costs[self.tmpl[idx]].get((FLEX, account)) or 0.0
            self.charge(idx, "flex", usd)
            self.push(now + elapsed + took, 0, (idx, token, 4))
            at = now + elapsed + took
            self.observe_later(at, "r", key, LatencyObs(at, elapsed + took))
            return
        if self.policy == "planner":  # the shed is noted: flex looks slower for a while
            self.headroom[key] = Headroom(
                at=now + elapsed, remaining_requests=0, reset_at=now + 2 * elapsed
            )
        # the standard call, made when flex gave up (in time order: the rate limit is shared)
        self.push(now + elapsed, 2, (idx, token, account))

    def to_gpu(self, idx: int, now: float) -> None:
        t = TEMPLATES[self.tmpl[idx]]
        token = self.claim(idx, State.RUNNING)
        start, finish, wait = self.world.gpu(now, t.gpu_per_s, self.options.gpu_overhead_s)
        self.counts["gpu_requests"] += 1
        self.gpu_busy_s += finish - start
        self.charge(idx, "gpu", self.gpu_usd[self.tmpl[idx]])
        self.push(finish, 0, (idx, token, 3))
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
        self.claim(idx, State.SUBMITTED)
        g.members.append(idx)
        g.bytes += self.line_bytes[self.tmpl[idx]]
        g.tightest = min(g.tightest, self.deadline[idx])

    def route(self, idx: int, now: float) -> None:
        """Where a request goes, by policy (on arrival, after a hedge, a shed, an expiry)."""
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
            d = decide(
                endpoint=t.endpoint,
                model=t.model,
                deadline=self.deadline[idx],
                now=now,
                options=options,
                costs=self.costs[k] if policy == "planner" else None,
            )
            if d.route is Route.BATCH:
                self.to_batch(idx, d.provider, now)
            elif d.route is Route.GPU:
                self.to_gpu(idx, now)
            elif FLEX is not None and d.route is FLEX:
                self.to_flex(idx, d.provider, now)
            else:
                self.to_realtime(idx, d.provider, now)

    def oracle_fast(self, idx: int, now: float) -> None:
        """The oracle outside a batch: the GPU when it serves the model, flex when the oracle
        knows flex answers in time (the service routes flex), else realtime."""
        t = TEMPLATES[self.tmpl[idx]]
        if t.local:
            self.to_gpu(idx, now)
            return
        if FLEX is not None and t.flex:
            took, shed = self.world.flex(now, idx, self.attempt[idx] + 1)
            if not shed and now + took <= self.deadline[idx] - self.cfg.tick_s:
                self.to_flex(idx, t.account, now)
                return
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
        learned = learn(self.base, seen, now)
        self.options = learn_hedges(learned, {k: list(v) for k, v in self.obs_hedge.items()}, now)
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
        from benchmarks.sim.report import report

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
                    idx, token, code = payload
                    self.answer(idx, token, at, code)
                elif kind == 1:
                    self.poll(payload, at)
                else:
                    idx, token, account = payload
                    self.call_realtime(idx, token, account, at)
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
        return report(self, time.perf_counter() - started, DAY)
