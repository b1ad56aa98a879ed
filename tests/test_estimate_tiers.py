"""``mixbatch estimate`` quotes the flex tier, and the priority tier where it is opted in, per
route with the tier's own price and latency, in text and in ``--json``.

Figures are worked out here from config/prices.toml's list prices (gpt-5-mini: $0.25 in, $2 out
per Mtok; flex 50 % off; priority +80 %), four characters a token (no tokenizer is mapped
to gpt-5-mini) and the priors in the environment (flex: the providers table's 10 minutes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from routing.store.lanes import LaneStore
from tests.test_e2e import ROOT
from tests.test_estimate import Invoke, chat, invoke, quote_of, write

__all__ = ["invoke"]  # the fixture, shared with tests/test_estimate.py

MODEL = "gpt-5-mini"
N = 16


def _file(tmp_path: Path) -> tuple[Path, float]:
    """N gpt-5-mini requests capped at 100 output tokens, and their list (standard) price."""
    path = write(tmp_path / "in.jsonl", [chat(i, model=MODEL, max_tokens=100) for i in range(N)])
    texts = [
        json.loads(raw)["body"]["messages"][0]["content"] for raw in path.read_text().splitlines()
    ]
    tokens = sum(math.ceil(len(t) / 4) + 4 for t in texts)  # no tokenizer maps gpt-5-mini
    return path, (tokens * 0.25 + N * 100 * 2.00) / 1e6


def test_flex_is_quoted_at_batch_rates_with_its_own_latency(
    invoke: Invoke, tmp_path: Path, store: LaneStore
) -> None:
    path, list_usd = _file(tmp_path)
    q = quote_of(invoke(str(path), "--lane", "standard", "--deadline", "20m", "--json"))
    routes = q["routes"]
    assert set(routes) == {"batch", "flex", "realtime"}, "priority is off by default"
    assert routes["realtime"]["usd"] == pytest.approx(list_usd)
    assert routes["flex"]["usd"] == pytest.approx(list_usd / 2)
    assert routes["flex"]["usd"] == pytest.approx(routes["batch"]["usd"])
    assert routes["flex"]["requests"] == N
    rounds = math.ceil(N / 16)
    assert routes["flex"]["finish_s"] == pytest.approx(600 * rounds)
    assert routes["flex"]["fits"] is True and routes["batch"]["fits"] is False
    assert "openai" in routes["flex"]["basis"] and MODEL in routes["flex"]["basis"]
    # flex is the cheapest that meets a 20 minute deadline, and the plan is priced at it
    assert q["plan"] == {"flex": N}
    assert q["plan_usd"] == pytest.approx(list_usd / 2)

    text = invoke(str(path), "--lane", "standard", "--deadline", "20m")
    assert text.exit_code == 0, text.output
    row = next(ln for ln in text.stdout.splitlines() if ln.strip("│┃ ").startswith("flex"))
    assert f"${list_usd / 2:,.4f}" in row and "yes" in row
    assert f"{N} to flex" in text.stdout


def test_a_model_without_flex_gets_no_flex_quote(invoke: Invoke, tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [chat(i, model="gpt-4o-mini") for i in range(3)])
    q = quote_of(invoke(str(path), "--json"))
    assert "flex" not in q["routes"] and "priority" not in q["routes"]


def test_priority_is_quoted_at_its_premium_where_opted_in(invoke: Invoke, tmp_path: Path) -> None:
    path, list_usd = _file(tmp_path)
    providers = tmp_path / "providers.toml"
    text = (ROOT / "config" / "providers.toml").read_text()
    assert "priority = false" in text
    providers.write_text(text.replace("priority = false", "priority = true", 1))
    env = {"MIXBATCH_PROVIDERS_FILE": str(providers)}
    q = quote_of(invoke(str(path), "--lane", "urgent", "--json", env=env))
    priority = q["routes"]["priority"]
    assert priority["usd"] == pytest.approx(list_usd * 1.8)
    assert priority["requests"] == N
    # no priority latency observed yet: the standard tier's estimate (7 s) per round
    assert priority["finish_s"] == pytest.approx(7 * math.ceil(N / 16))
