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

Worlds (``--world``): ``default``; ``rate-limited`` (realtime at 20/10/10 requests a minute per
100,000 requests a day, so a hedge storm in the incident queues); ``flex-shedding`` (the flex
tier sheds 5 % at night to 80 % in the incident). Every policy sees the same draws (common random
numbers, ``benchmarks/sim/world.py``): a batch's turnaround is keyed on its account and minute,
a call's latency on its request and attempt.

Policies, on the same traffic and the same world draws (same seed):

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
delivered exactly once, counted from the service's own transitions (``routing.states``, a finish
refused unless its lease token is current, as ``settle.lua`` refuses it), refused answers
counted, misses counted per lane. The GPU is priced per busy hour (``cost_usd``) and as a
machine kept on all day (``cost_usd_gpu_always_on``).

    .venv/bin/python benchmarks/planner_sim.py                 # 1,000,000 requests, markdown
    .venv/bin/python benchmarks/planner_sim.py --n 20000 --json
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sim.engine import POLICIES, Sim
from benchmarks.sim.report import check_invariants, markdown, run_all, simulate
from benchmarks.sim.report import main as _main
from benchmarks.sim.world import LANES, TEMPLATES, WORLDS, Config, World, make_traffic

__all__ = [
    "LANES",
    "POLICIES",
    "TEMPLATES",
    "WORLDS",
    "Config",
    "Sim",
    "World",
    "check_invariants",
    "main",
    "make_traffic",
    "markdown",
    "run_all",
    "simulate",
]


def main(argv: Sequence[str] | None = None) -> int:
    return _main(argv, __doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
