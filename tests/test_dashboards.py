"""The shipped Grafana dashboard and Prometheus alert rules name only metrics that a live
``mixbatch metrics`` endpoint serves, and promtool accepts both the rules and the scrape.

Without ``promtool`` on PATH the promtool checks skip on a laptop and fail in CI (``CI=true``):
``.ci/run`` installs Debian's ``prometheus`` package, which ships it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from routing.store.lanes import LaneStore
from tests.conftest import need_server
from tests.test_metrics import _base_env, _get_until_up, free_port, populated  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "mixbatch.json"
RULES = ROOT / "docs" / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\bmixbatch_[a-z_]+\b")


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_exprs() -> list[str]:
    """The rules file's lines, comments left out (promtool, below, checks its structure)."""
    return [ln for ln in RULES.read_text().splitlines() if not ln.lstrip().startswith("#")]


@pytest.fixture
def scrape(populated: LaneStore, redis_url: str, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    """The text of one HTTP scrape of a real ``mixbatch metrics`` process over ``populated``,
    after a sweep heartbeat (so the sweeper's timestamp is served too)."""
    populated.beat(1_700_000_000.0)
    port = free_port()
    env = {
        **_base_env(),
        "MIXBATCH_REDIS_URL": redis_url,
        "MIXBATCH_NAMESPACE": populated.keys.ns,
        "MIXBATCH_METRICS_PORT": str(port),
    }
    argv = [sys.executable, "-m", "tasks.cli.main", "metrics"]
    with (tmp_path / "metrics.log").open("wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield _get_until_up(f"http://127.0.0.1:{port}/metrics", proc)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def served_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_dashboard_covers_what_the_issue_asks() -> None:
    used = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    for name in (
        "mixbatch_lane_depth",
        "mixbatch_lane_min_slack_seconds",
        "mixbatch_deadline_misses_total",
        "mixbatch_cost_usd_total",
        "mixbatch_saved_usd_total",
        "mixbatch_provider_batches_in_flight",
    ):
        assert name in used, name


def test_every_metric_in_the_dashboard_and_rules_is_served(scrape: str) -> None:
    served = served_names(scrape)
    for source, exprs in (("dashboard", dashboard_exprs()), ("rules", rule_exprs())):
        used = {m for e in exprs for m in METRIC.findall(e)}
        assert used, source
        assert used <= served, (
            f"{source} names metrics the endpoint does not serve: {used - served}"
        )


def test_the_rules_alert_on_slack_misses_sweeper_and_redis() -> None:
    exprs = " ".join(rule_exprs())
    assert "mixbatch_lane_min_slack_seconds < 60" in exprs
    for name in (
        "mixbatch_deadline_misses_total",
        "mixbatch_last_sweep_timestamp_seconds",
        "mixbatch_redis_up",
    ):
        assert name in exprs, name


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        need_server("promtool is not on PATH (Debian: apt-get install prometheus)")
    assert found is not None
    return found


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_a_live_scrape(scrape: str) -> None:
    done = subprocess.run(
        [_promtool(), "check", "metrics"],
        input=scrape,
        capture_output=True,
        text=True,
        check=False,
    )
    # promtool exits 3 for lint warnings (naming style) and 1 for a malformed exposition.
    assert done.returncode in (0, 3), done.stdout + done.stderr
    assert "error" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
