"""``mixbatch costs --plot``: the ledger keeps hourly totals by route (each hour's hash expires),
and the command draws them to a valid PNG, or names the extra to install without matplotlib."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from config.settings import reset_settings
from routing.models import Route
from routing.store import ledger
from routing.store.lanes import LaneStore
from tasks import runtime
from tasks.cli.main import cli
from tests.test_gpu_cost import prepared

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cost(usd: float, saved: float) -> ledger.Cost:
    return ledger.Cost(cost_usd=usd, saved_usd=saved, estimated_usd=usd, priced=True)


def invoke(redis_url: str, namespace: str, *args: str) -> Result:
    env = {"MIXBATCH_REDIS_URL": redis_url, "MIXBATCH_NAMESPACE": namespace, "COLUMNS": "200"}
    reset_settings()
    runtime.reset()
    try:
        return CliRunner().invoke(cli, ["costs", *args], env=env)
    finally:
        reset_settings()


def fill(store: LaneStore, now: float) -> None:
    req = prepared("x")
    for back, route, usd in ((5, Route.GPU, 0.2), (2, Route.BATCH, 0.5), (0, Route.REALTIME, 1.0)):
        at = now - back * 3600
        ledger.record_many(
            store, [(req, route, cost(usd, usd / 2)), (req, Route.GPU, cost(0.1, 0))], at=at
        )


def test_hourly_totals_by_route_expire_and_sum_to_the_totals(store: LaneStore) -> None:
    now = time.time()
    fill(store, now)
    hours = ledger.series(store, 24, now=now)
    assert [int((now - h.hour_start) // 3600) for h in hours] == [5, 2, 0]
    assert hours[0].routes["gpu"] == {"cost": pytest.approx(0.3), "saved": 0.1, "count": 2}
    assert hours[1].routes["batch"]["cost"] == pytest.approx(0.5)
    assert hours[2].routes["all"]["count"] == 2
    totals = ledger.totals(store)
    assert sum(h.routes["all"]["cost"] for h in hours) == pytest.approx(
        totals["all"]["all"]["cost"]
    )
    ttl = store.redis.ttl(store.keys.ledger_hour(int(now // 3600)))
    assert 0 < ttl <= ledger.HOUR_TTL_S, "an hour's totals are not kept for good"
    assert ledger.series(store, 3, now=now)[0].routes.keys() == {"batch", "gpu", "all"}


def test_costs_plot_writes_a_png(
    store: LaneStore, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib import image

    fill(store, time.time())
    out = tmp_path / "costs.png"
    result = invoke(redis_url, namespace, "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(out)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert "gpu" in result.stdout, "the totals are still printed"


def test_costs_plot_without_matplotlib_names_the_extra(
    store: LaneStore,
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "costs.png"
    result = invoke(redis_url, namespace, "--plot", str(out))
    assert result.exit_code != 0
    assert "mixbatch[plot]" in result.output
    assert not out.exists()
