"""GPU work is priced: a real gpu worker (on the CPU here) answers, each stored result carries
its share of the micro-batch's busy time at ``MIXBATCH_ROUTE_GPU_USD_PER_HOUR`` and what the
cheapest realtime price would have cost more, and ``mixbatch costs`` adds up to the results."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from config.settings import reset_settings
from routing.client import Client
from routing.decide.cost import PriceTable, parse_prices
from routing.engine.pricing import price_gpu
from routing.models import Endpoint, Prepared, Route
from routing.states import State
from tasks import runtime
from tasks.cli.demo import LOCAL_MODEL
from tasks.cli.main import cli
from tasks.cli.stack import LocalStack
from tests.test_e2e import db_url
from tests.test_gpu_route import embedding, running_gpu_stack, submit

__all__ = ["db_url"]

#: USD per million input tokens of the local model at the realtime provider: what GPU saves.
REALTIME_USD_PER_MTOK = 1000.0
GPU_USD_PER_HOUR = 36.0


def prices_file_text() -> str:
    """The shipped table, plus a realtime price for the local model at ``openai``."""
    text = (Path(__file__).parents[1] / "config" / "prices.toml").read_text()
    return text + (
        f'\n[providers.openai.models."{LOCAL_MODEL}"]\n'
        f"input_usd_per_mtok = {REALTIME_USD_PER_MTOK}\n"
    )


def prices_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(prices_file_text())
    return path


@pytest.fixture
def priced_gpu_stack(tmp_path: Path, db_url: str) -> Iterator[LocalStack]:
    env = {
        "MIXBATCH_GPU_CHUNK": "4",
        "MIXBATCH_PRICES_FILE": str(prices_file(tmp_path)),
        "MIXBATCH_ROUTE_GPU_USD_PER_HOUR": str(GPU_USD_PER_HOUR),
    }
    with running_gpu_stack(tmp_path, db_url, **env) as stack:
        yield stack


def costs_json(url: str, *args: str) -> dict[str, dict[str, dict[str, float]]]:
    env = {"MIXBATCH_REDIS_URL": url, "MIXBATCH_NAMESPACE": "e2e", "COLUMNS": "200"}
    reset_settings()
    runtime.reset()
    try:
        out = CliRunner().invoke(cli, ["costs", "--json", *args], env=env)
    finally:
        reset_settings()
    assert out.exit_code == 0, out.output
    data: dict[str, dict[str, dict[str, float]]] = json.loads(out.stdout)
    return data


@pytest.mark.timeout(300)
def test_gpu_results_are_priced_and_the_ledger_adds_up(
    priced_gpu_stack: LocalStack, db_url: str
) -> None:
    ids = submit(db_url, [embedding(f"document {i} " + "about printers " * i) for i in range(10)])
    with Client(db_url, namespace="e2e") as client:
        results = [client.result(i, timeout=120) for i in ids]
    for r in results:
        assert r.status is State.DONE and r.route is Route.GPU, r
        assert r.usage and r.usage["prompt_tokens"] > 0
        assert r.cost_usd is not None and r.cost_usd > 0, "the GPU's busy time is priced"
        realtime = r.usage["prompt_tokens"] * REALTIME_USD_PER_MTOK / 1e6
        assert r.saved_usd == pytest.approx(realtime - r.cost_usd)
    data = costs_json(db_url)
    gpu = data["route"]["gpu"]
    assert gpu["count"] == len(results)
    assert gpu["cost"] == pytest.approx(sum(r.cost_usd or 0 for r in results))
    assert gpu["saved"] == pytest.approx(sum(r.saved_usd or 0 for r in results))
    assert data["all"]["all"]["cost"] == pytest.approx(gpu["cost"])


def prepared(text: str) -> Prepared:
    return Prepared(
        tenant="default",
        custom_id=None,
        lane="standard",
        deadline=1e9 + 3600,
        endpoint=Endpoint.EMBEDDINGS,
        model=LOCAL_MODEL,
        body={"model": LOCAL_MODEL, "input": text},
        metadata={},
        callback=None,
        max_attempts=3,
        created_at=1e9,
    )


def test_a_micro_batch_is_split_by_token_share_or_evenly() -> None:
    table = PriceTable(prices={})
    req = prepared("x")
    by_tokens = price_gpu(
        table, 3600.0, [(req, {"prompt_tokens": 1}), (req, {"prompt_tokens": 3})], 2.0
    )
    assert [c.cost_usd for c in by_tokens] == pytest.approx([0.5, 1.5])
    assert all(c.saved_usd == 0.0 and c.priced for c in by_tokens), "no realtime price: no saving"
    even = price_gpu(table, 3600.0, [(req, {"prompt_tokens": 5}), (req, None)], 2.0)
    assert [c.cost_usd for c in even] == pytest.approx([1.0, 1.0])
    assert price_gpu(table, 3600.0, [], 2.0) == []
    priced = parse_prices(prices_file_text())
    (one,) = price_gpu(priced, 3600.0, [(req, {"prompt_tokens": 1000})], 0.5)
    assert one.cost_usd == pytest.approx(0.5)
    assert one.saved_usd == pytest.approx(1000 * REALTIME_USD_PER_MTOK / 1e6 - 0.5)
