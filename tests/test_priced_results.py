"""Every finished request is priced, whichever route answered it: one real run through the
realtime route, a provider batch (the sandbox over loopback HTTP) and the GPU route (the local
model, on the CPU here), then each stored result's ``cost_usd`` and ``saved_usd`` checked by
hand against the price table, and ``mixbatch costs --json`` against their sums, per route.
"""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from routing.client import Client
from routing.decide.cost import parse_prices
from routing.models import Result, Route
from routing.states import State
from tasks.cli.main import cli
from tasks.cli.stack import LocalStack
from tests.test_e2e import db_url
from tests.test_gpu_cost import (
    GPU_USD_PER_HOUR,
    REALTIME_USD_PER_MTOK,
    costs_json,
    priced_gpu_stack,
    prices_file_text,
)
from tests.test_gpu_route import embedding

#: The service worker, a gpu worker (the local model on the CPU), beat, the sandbox (its
#: batches end in two seconds), the price table plus a realtime price for the local model.
__all__ = ["db_url", "priced_gpu_stack"]

CHAT_MODEL = "gpt-4o-mini"
TABLE = parse_prices(prices_file_text())
CHAT_PRICE = TABLE.lookup("openai", CHAT_MODEL)
assert CHAT_PRICE is not None and CHAT_PRICE.batch_discount == 0.5


def chat(i: int, lane: str) -> dict[str, Any]:
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": f"question {i}: " + "why is the sky blue? " * i}],
        "max_tokens": 50,
    }
    return {"lane": lane, "endpoint": "/v1/chat/completions", "body": body}


def chat_usd(usage: dict[str, Any], *, batch: bool) -> float:
    """The table's price of a chat answer's usage, worked out here rather than by mixbatch."""
    assert CHAT_PRICE is not None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    assert cached == 0, "the sandbox reports no cache hits"
    usd = (
        usage["prompt_tokens"] * CHAT_PRICE.input_usd_per_mtok
        + usage["completion_tokens"] * CHAT_PRICE.output_usd_per_mtok
    ) / 1e6
    return usd * (1 - CHAT_PRICE.batch_discount) if batch else usd


def by_route(results: list[Result], route: Route) -> list[Result]:
    return [r for r in results if r.route is route]


@pytest.mark.timeout(300)
def test_realtime_batch_and_gpu_results_are_priced_and_costs_adds_them_up(
    priced_gpu_stack: LocalStack, db_url: str
) -> None:
    # urgent (a minute) can only be met in realtime; bulk (a day) takes the half-price batch;
    # the local model's embeddings go to the GPU.
    items = [
        *(chat(i, "urgent") for i in range(1, 4)),
        *(chat(i, "bulk") for i in range(1, 5)),
        *(embedding(f"document {i} " + "about printers " * i) for i in range(1, 6)),
    ]
    with Client(db_url, namespace="e2e") as client:
        ids = [t.id for t in client.submit_many(items)]
        results = [client.result(i, timeout=150) for i in ids]
    assert all(r.status is State.DONE for r in results), [r.error for r in results]
    assert [r.route for r in results] == [Route.REALTIME] * 3 + [Route.BATCH] * 4 + [Route.GPU] * 5

    for r in by_route(results, Route.REALTIME):
        assert r.usage and r.usage["completion_tokens"] > 0
        assert r.cost_usd == pytest.approx(chat_usd(r.usage, batch=False), rel=1e-9)
        assert r.saved_usd == pytest.approx(0.0, abs=1e-12), "realtime is the baseline"
    for r in by_route(results, Route.BATCH):
        assert r.usage and r.usage["completion_tokens"] > 0 and r.cost_usd is not None
        assert r.cost_usd == pytest.approx(chat_usd(r.usage, batch=True), rel=1e-9)
        full = chat_usd(r.usage, batch=False)
        assert r.saved_usd == pytest.approx(full - r.cost_usd, rel=1e-9)
        assert r.saved_usd == pytest.approx(r.cost_usd, rel=1e-9), "half price: saved as much"
    gpu = by_route(results, Route.GPU)
    for r in gpu:
        assert r.usage and r.usage["prompt_tokens"] > 0
        assert r.cost_usd is not None and r.cost_usd > 0, "the GPU's busy time is priced"
        realtime = r.usage["prompt_tokens"] * REALTIME_USD_PER_MTOK / 1e6
        assert r.saved_usd == pytest.approx(realtime - r.cost_usd, rel=1e-9)
    # The GPU was busy for no longer than the requests were in the service.
    span_s = max(r.finished_at or 0 for r in gpu) - min(r.created_at for r in gpu)
    assert sum(r.cost_usd or 0 for r in gpu) <= span_s * GPU_USD_PER_HOUR / 3600

    data = costs_json(db_url)
    for route in (Route.REALTIME, Route.BATCH, Route.GPU):
        answered = by_route(results, route)
        line = data["route"][route.value]
        assert line["count"] == len(answered), route
        assert line["cost"] == pytest.approx(sum(r.cost_usd or 0 for r in answered)), route
        assert line["saved"] == pytest.approx(sum(r.saved_usd or 0 for r in answered)), route
    assert data["all"]["all"]["count"] == len(results)
    assert data["all"]["all"]["cost"] == pytest.approx(sum(r.cost_usd or 0 for r in results))
    assert data["all"]["all"]["saved"] == pytest.approx(sum(r.saved_usd or 0 for r in results))


def test_costs_help_shows_the_plot_example() -> None:
    out = CliRunner().invoke(cli, ["costs", "--help"])
    assert out.exit_code == 0, out.output
    assert "mixbatch costs --plot out.png" in out.output
