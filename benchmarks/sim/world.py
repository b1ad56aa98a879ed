"""The simulated world: traffic, prices, and the providers' and GPU's behaviour, with common random
numbers, so that every policy faces the same day.

Common random numbers: a draw is a pure function of the seed and *the event it belongs to*, not
of how many draws a policy made before it. A realtime or flex call's latency is keyed on (request,
attempt); a provider batch's turnaround on (account, the minute it was created, its rank among
that account's batches of that minute). Two policies that create a batch at the same account in
the same minute see the same turnaround; a request called realtime by both sees the same latency.
The differences between policies in the report are then the policies', not the dice's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from routing.decide.lanes import parse_lanes
from routing.models import Endpoint

ROOT = Path(__file__).resolve().parent.parent.parent
DAY = 86400.0
LANES = ("urgent", "standard", "bulk")
WORLDS = ("default", "rate-limited", "flex-shedding")

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
    flex: bool = False

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
    Template("/v1/chat/completions", "gpt-4o-mini", "openai", 0.40, 2000, 200, 2.5, flex=True),
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
RPM_LIMITED_PER_100K = {"openai": 40.0, "anthropic": 20.0, "together": 20.0}
"""The rate-limited world's requests per minute per 100,000 requests a day (scaled with --n):
enough for the urgent lane on a quiet afternoon, not for a hedge storm during the incident."""
MEDIAN_MIN = {"openai": 8.0, "anthropic": 5.0, "together": 4.0}
GPU_USD_PER_HOUR = 2.0
FLEX_MEDIAN_S = 60.0
"""Flex answers slowly: a minute at the median (lognormal, sigma 0.7), slower at the peak."""


@dataclass
class Config:
    n: int = 1_000_000
    seed: int = 7
    world: str = "default"
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


def peak(t: float) -> float:
    """0 at night, 1 at 15:00: how busy the providers are."""
    h = (t % DAY) / 3600.0
    return math.exp(-(((h - 15.0) / 3.5) ** 2) / 2)


_MASK = (1 << 64) - 1
_NORMAL = NormalDist()


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class Dice:
    """Uniforms and normals that depend only on (seed, the event's key, which draw of it)."""

    def __init__(self, seed: int) -> None:
        self.seed = _mix(seed)

    def u(self, *key: int) -> float:
        h = self.seed
        for k in key:
            h = _mix(h ^ (k & _MASK))
        return ((h >> 11) + 0.5) / float(1 << 53)

    def normal(self, *key: int) -> float:
        return _NORMAL.inv_cdf(self.u(*key))


ACCOUNT_IDS = {name: i for i, name in enumerate(sorted({*RPM, *PRIORS_S}))}


class World:
    """The providers and the GPU: everything the service cannot see in advance."""

    def __init__(self, cfg: Config) -> None:
        self.dice = Dice(cfg.seed)
        self.kind = cfg.world
        scale = cfg.n / 100_000
        self.rpm = (
            {a: max(1.0, r * scale) for a, r in RPM_LIMITED_PER_100K.items()}
            if cfg.world == "rate-limited"
            else {a: float(r) for a, r in RPM.items()}
        )
        self.rt_free: dict[str, float] = dict.fromkeys(RPM, 0.0)
        self.gpu_free = 0.0
        self.batch_rank: dict[tuple[int, int], int] = {}
        self.flex_load: list[float] = []

    def turnaround(self, t: float, account: str, size: int) -> tuple[float, bool, float]:
        """(seconds until the batch ends, expired?, share of lines done if it expired)."""
        a, minute = ACCOUNT_IDS[account], int(t // 60)
        rank = self.batch_rank.get((a, minute), 0)
        self.batch_rank[(a, minute)] = rank + 1
        dice, key = self.dice, (1, a, minute, rank)
        median = MEDIAN_MIN[account] * 60.0 * (1.0 + 5.0 * peak(t))
        incident = account == "openai" and 13 * 3600 <= t < 19 * 3600
        if incident:
            median *= 3.0
        median *= (max(size, 1) / 1000.0) ** 0.15
        seconds = median * math.exp(0.8 * dice.normal(*key, 0))
        if dice.u(*key, 1) < 0.02:
            seconds *= 1.0 + 4.0 * (1.0 - dice.u(*key, 2)) ** (-1.0 / 1.1)  # Pareto(1.1)
        if dice.u(*key, 3) < (0.05 if incident else 0.003) or seconds >= DAY:
            return DAY, True, 0.3 + 0.6 * dice.u(*key, 4)
        return max(seconds, 20.0), False, 1.0

    def realtime(
        self, t: float, account: str, base_s: float, idx: int, attempt: int
    ) -> tuple[float, float]:
        """(seconds from dispatch to answer, of which queued behind the rate limit)."""
        start = max(t, self.rt_free[account])
        self.rt_free[account] = start + 60.0 / self.rpm[account]
        key = (2, idx, attempt)
        latency = base_s * (1.0 + 0.5 * peak(t)) * math.exp(0.5 * self.dice.normal(*key, 0))
        if self.dice.u(*key, 1) < 0.005:
            latency += 10.0 + 30.0 * self.dice.u(*key, 2)
        return start - t + latency, start - t

    def flex(self, t: float, idx: int, attempt: int) -> tuple[float, bool]:
        """(seconds until flex answers or sheds, shed with a 429?). Sheds more under load: in the
        flex-shedding world 5 % at night, 60 % at the afternoon peak, 80 % in the incident."""
        key = (3, idx, attempt)
        seconds = FLEX_MEDIAN_S * (1.0 + peak(t)) * math.exp(0.7 * self.dice.normal(*key, 0))
        if self.kind == "flex-shedding":
            shed = 0.05 + 0.55 * peak(t) + (0.2 if 13 * 3600 <= t < 19 * 3600 else 0.0)
        else:
            shed = 0.01
        if self.dice.u(*key, 1) < shed:
            return 0.5 + 2.0 * self.dice.u(*key, 2), True
        return seconds, False

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
