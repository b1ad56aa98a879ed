"""``mixbatch estimate FILE`` through the real command, against a real Redis (or none at all).

The quote is checked against figures worked out here from the price table, the priors set in
the environment, and the tokenizers themselves (bpe-openai's OpenAI encodings, the local
model's ``tokenizer.json``), never against the code's own helpers. Reading what the service
observed must write nothing: the whole keyspace and Redis's own count of commands say so.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from config.settings import reset_settings
from routing.decide.cost import estimate_tokens
from routing.decide.estimate import estimate_count, prompt_texts
from routing.store.embedded import running_url
from routing.store.lanes import LaneStore
from routing.store.observations import ObservationStore
from tasks import runtime
from tasks.cli.demo import LOCAL_MODEL
from tasks.cli.main import cli
from tasks.cli.tokens import bpe_openai

Invoke = Callable[..., Result]

#: Priors the figures below are worked out from.
PRIORS = {
    "MIXBATCH_BATCH_TURNAROUND_S": '{"openai": 600, "anthropic": 900}',
    "MIXBATCH_BATCH_FLUSH_INTERVAL_S": "2",
    "MIXBATCH_BATCH_POLL_MAX_INTERVAL_S": "60",
    "MIXBATCH_REALTIME_ESTIMATE_S": "7",
    "MIXBATCH_REALTIME_CONCURRENCY": "16",
}
#: What the quote may send (reads), and what the test itself sends around it.
READ_COMMANDS = {"smembers", "hgetall", "lrange", "client", "client|setinfo", "hello", "ping"}
TEST_COMMANDS = {"config", "config|resetstat", "info", "scan", "type", "dump", "pttl"}


def line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def chat(i: int, model: str = "gpt-4o-mini", **extra: Any) -> str:
    text = f"Summarise support ticket #{i}: the printer on floor {i % 7} jams on duplex jobs."
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return line(f"t-{i}", "/v1/chat/completions", body)


def write(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(f"{ln}\n" for ln in lines))
    return path


@pytest.fixture
def invoke(redis_url: str, namespace: str, store: LaneStore) -> Iterator[Invoke]:
    """``mixbatch ARGS`` in-process, with fresh settings and handles for each invocation."""

    def run(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
        base = {
            "MIXBATCH_REDIS_URL": redis_url,
            "MIXBATCH_NAMESPACE": namespace,
            "COLUMNS": "200",
            **PRIORS,
        }
        reset_settings()
        runtime.reset()
        try:
            return CliRunner().invoke(cli, ["estimate", *args], env={**base, **(env or {})})
        finally:
            reset_settings()
            runtime.reset()

    yield run


def quote_of(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, (result.output, result.exception)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def o200k(text: str) -> int:
    return len(bpe_openai().get_encoding("o200k_base").encode(text, disallowed_special=()))


# -- the quote -------------------------------------------------------------------------------


def test_quote_of_a_chat_file_from_the_price_table_and_the_priors(
    invoke: Invoke, tmp_path: Path, store: LaneStore
) -> None:
    path = write(tmp_path / "in.jsonl", [chat(i, max_tokens=100) for i in range(40)])
    q = quote_of(invoke(str(path), "--lane", "bulk", "--deadline", "6h", "--json"))

    texts = [
        json.loads(raw)["body"]["messages"][0]["content"] for raw in path.read_text().splitlines()
    ]
    tokens = sum(o200k(t) + 4 for t in texts)  # 4: a chat message's role markers
    assert q["requests"] == 40
    assert q["token_count"] == "tokenizer"
    assert q["counted_by"] == {"gpt-4o-mini": "o200k_base (OpenAI's encoding, from bpe-openai)"}
    assert q["input_tokens"] == tokens
    assert q["output_tokens_cap"] == 40 * 100
    assert q["token_error"] is None
    assert 6 * 3600 - 60 < q["deadline_s"] <= 6 * 3600

    realtime_usd = (tokens * 0.15 + 4000 * 0.60) / 1e6  # gpt-4o-mini list prices per Mtok
    routes = q["routes"]
    assert set(routes) == {"batch", "realtime"}  # gpt-4o-mini is not a local model
    assert routes["realtime"]["usd"] == pytest.approx(realtime_usd)
    assert routes["batch"]["usd"] == pytest.approx(realtime_usd / 2)
    assert routes["batch"]["finish_s"] == pytest.approx(600 + 2 + 60)
    assert routes["realtime"]["finish_s"] == pytest.approx(7 * math.ceil(40 / 16))
    assert routes["batch"]["fits"] is True and routes["realtime"]["fits"] is True
    assert q["plan"] == {"batch": 40}, "the cheapest that fits, as the route rule decides"
    assert q["plan_usd"] == pytest.approx(realtime_usd / 2)
    assert q["warnings"] == []
    assert "priors" in q["estimates"]

    # a deadline the batch cannot meet: the rule goes realtime, and the quote says why
    tight = quote_of(invoke(str(path), "--lane", "bulk", "--deadline", "20m", "--json"))
    assert tight["routes"]["batch"]["fits"] is False
    assert tight["plan"] == {"realtime": 40}
    assert store.lane_stats("bulk").depth == 0, "an estimate enqueues nothing"


def test_text_output_names_routes_tokens_and_the_plan(invoke: Invoke, tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [chat(i) for i in range(3)])
    result = invoke(str(path))
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    for fragment in (
        "3 requests into lane standard",
        "nothing was enqueued",
        "(counted)",
        "o200k_base",
        "no body sets a cap",
        "batch",
        "realtime",
        "the route rule would send 3 to",
    ):
        assert fragment in out, (fragment, out)


def test_a_local_model_is_counted_by_its_own_tokenizer_and_quoted_on_the_gpu(
    invoke: Invoke, tmp_path: Path
) -> None:
    from gpu_worker.config import load_models

    texts = [f"embed this sentence number {i}, with punctuation!" for i in range(5)]
    path = write(
        tmp_path / "local.jsonl",
        [
            line(f"e-{i}", "/v1/embeddings", {"model": LOCAL_MODEL, "input": t})
            for i, t in enumerate(texts)
        ],
    )
    q = quote_of(invoke(str(path), "--json", env={"MIXBATCH_ROUTE_GPU_USD_PER_HOUR": "3.6"}))
    model_dir = load_models()[LOCAL_MODEL].model_dir()
    wordpiece = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert q["input_tokens"] == sum(len(wordpiece.encode(t).ids) for t in texts)
    assert q["token_count"] == "tokenizer"
    assert "own tokenizer" in q["counted_by"][LOCAL_MODEL]
    assert q["output_tokens_cap"] is None
    gpu = q["routes"]["gpu"]
    assert gpu["requests"] == 5
    # the hardware's hourly price at the prior throughput (50 texts a second): $1e-3/s / 50
    assert gpu["usd"] == pytest.approx(5 * 3.6 / 3600 / 50)
    assert gpu["finish_s"] == pytest.approx(2.0 + 5 / 50 + 1.0)  # prior wait + service + overhead
    assert q["plan"] == {"gpu": 5}


def test_a_model_without_a_tokenizer_is_an_estimate_with_its_measured_error(
    invoke: Invoke, tmp_path: Path
) -> None:
    """Anthropic's tokenizer is not public: the count is the character estimate, labelled so,
    and measured on this file's own texts against OpenAI's o200k_base, named as such."""
    texts = [
        "Write a short, friendly reply to a customer whose parcel arrived two days late.",
        "List three risks of migrating a PostgreSQL 12 cluster to version 16 in place.",
        "Translate into French: the meeting moved to Thursday at 10:30 in room B.",
    ]
    bodies = [
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 200,
            "messages": [{"role": "user", "content": t}],
        }
        for t in texts
    ]
    path = write(
        tmp_path / "claude.jsonl", [line(f"c-{i}", "/v1/messages", b) for i, b in enumerate(bodies)]
    )
    q = quote_of(invoke(str(path), "--json"))
    assert q["token_count"] == "estimate"
    assert q["counted_by"] == {"claude-haiku-4-5": "estimate (4 characters a token)"}
    assert q["input_tokens"] == sum(math.ceil(len(t) / 4) + 4 for t in texts)

    error = q["token_error"]
    ests, refs = [math.ceil(len(t) / 4) for t in texts], [o200k(t) for t in texts]
    assert error["reference"].startswith("o200k_base")
    assert error["sample"] == 3
    mean_abs = sum(abs(e - r) / r for e, r in zip(ests, refs, strict=True)) / 3
    assert error["mean_abs_pct"] == pytest.approx(100 * mean_abs, abs=0.05)
    assert error["total_pct"] == pytest.approx(100 * (sum(ests) - sum(refs)) / sum(refs), abs=0.05)

    # priced from the table: Haiku 4.5 at $1 / $5 per Mtok, half on the batch route
    usd = (q["input_tokens"] * 1.0 + 600 * 5.0) / 1e6
    assert q["routes"]["realtime"]["usd"] == pytest.approx(usd)
    assert q["routes"]["batch"]["usd"] == pytest.approx(usd / 2)
    assert q["routes"]["batch"]["finish_s"] == pytest.approx(900 + 62)

    text = " ".join(invoke(str(path)).stdout.split())
    assert "(estimated)" in text
    assert f"on 3 of this file's texts: {error['mean_abs_pct']:g}% off per text" in text
    assert "not the provider's own count" in text


def test_an_unknown_model_is_priced_as_unknown_with_a_warning(
    invoke: Invoke, tmp_path: Path
) -> None:
    path = write(tmp_path / "in.jsonl", [chat(1), chat(2, model="acme-llm-9")])
    result = invoke(str(path), "--json")
    q = quote_of(result)
    for route in ("batch", "realtime"):
        assert q["routes"][route]["usd"] is None
        assert q["routes"][route]["unpriced"] == 1
        assert q["routes"][route]["usd_priced"] > 0  # the gpt-4o-mini line is still priced
    assert q["plan_usd"] is None
    assert len(q["warnings"]) == 1 and "'acme-llm-9'" in q["warnings"][0]
    warning = " ".join(result.stderr.split())
    assert "warning:" in warning and "'acme-llm-9'" in warning and "priced as unknown" in warning
    text = invoke(str(path))
    assert "unknown (1 unpriced)" in text.stdout


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "args", "fragments"),
    [
        ([chat(1), '{"custom_id": "x", "url": '], (), ("in.jsonl", "line 2", "not JSON")),
        (
            [chat(1), chat(2), line("x", "/v1/completions", {"model": "m"})],
            (),
            ("line 3", "/v1/completions"),
        ),
        ([chat(1), line("x", "/v1/embeddings", {"input": "no model"})], (), ("line 2", "model")),
        ([chat(1)], ("--lane", "nope"), ("'nope'",)),
        ([chat(1)], ("--deadline", "2001-01-01T00:00:00Z"), ("deadline", "past")),
    ],
    ids=["not-json", "unknown-endpoint", "no-model", "unknown-lane", "deadline-in-past"],
)
def test_bad_input_is_one_line_naming_it(
    invoke: Invoke,
    tmp_path: Path,
    lines: list[str],
    args: tuple[str, ...],
    fragments: tuple[str, ...],
) -> None:
    result = invoke(str(write(tmp_path / "in.jsonl", lines)), *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    err = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])


# -- Redis: read, never written ----------------------------------------------------------------


def keyspace(r: redis.Redis) -> dict[bytes, Any]:
    return {k: (r.type(k), r.dump(k), r.pttl(k) > 0) for k in r.scan_iter(count=1000)}


def test_observed_estimates_are_read_and_nothing_is_written(
    invoke: Invoke, tmp_path: Path, store: LaneStore, redis_url: str, namespace: str
) -> None:
    now = time.time()
    obs = ObservationStore(store.redis, namespace=namespace, url=redis_url)
    for i in range(8):
        obs.record_realtime("openai", "gpt-4o-mini", latency_s=2.0, at=now - 60 + i)
    # an in-flight entry too old to be true: the service's own read would prune it
    obs.batch_started(
        "openai",
        "/v1/chat/completions",
        "gpt-4o-mini",
        batch_key="b-old",
        size=3,
        at=now - 4 * 86400,
    )
    path = write(tmp_path / "in.jsonl", [chat(i) for i in range(20)])
    r = store.redis
    before = keyspace(r)
    r.config_resetstat()
    q = quote_of(invoke(str(path), "--json"))
    after = keyspace(r)
    stats = r.info("commandstats")

    assert after == before, "estimate changed the keyspace"
    used = {name.removeprefix("cmdstat_") for name in stats}
    allowed = READ_COMMANDS | TEST_COMMANDS
    assert used <= allowed, f"commands other than reads: {sorted(used - allowed)}"
    assert {"smembers", "lrange"} <= used, "the observations were read"
    assert "observed in Redis" in q["estimates"]
    # 8 observed latencies of 2 s replace the 7 s prior: two rounds of 16 calls
    assert q["routes"]["realtime"]["finish_s"] == pytest.approx(2 * 2.0, rel=0.01)
    assert "observed" in q["routes"]["realtime"]["basis"]


def test_without_any_redis_it_quotes_on_the_priors_and_starts_nothing(
    invoke: Invoke, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    path = write(tmp_path / "in.jsonl", [chat(1)])
    env = {"MIXBATCH_REDIS_URL": None, "MIXBATCH_DATA_DIR": str(data_dir)}
    q = quote_of(invoke(str(path), "--json", env=env))
    assert q["estimates"].startswith("priors (no Redis")
    assert q["routes"]["realtime"]["finish_s"] == pytest.approx(7.0)
    assert running_url(data_dir) is None
    assert not data_dir.exists()


def test_an_unreachable_redis_falls_back_to_the_priors_without_the_password(
    invoke: Invoke, tmp_path: Path
) -> None:
    path = write(tmp_path / "in.jsonl", [chat(1)])
    dead = "redis://:hunter2@127.0.0.1:1/0"
    result = invoke(str(path), "--json", env={"MIXBATCH_REDIS_URL": dead})
    q = quote_of(result)
    assert q["estimates"].startswith("priors (Redis at redis://:***@127.0.0.1:1/0")
    assert "hunter2" not in result.output


# -- the walk that splits a body into texts ----------------------------------------------------

_text = st.text(max_size=40)
_part = st.one_of(
    _text,
    st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text"]), "text": _text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.just({"url": "x"})}),
)
_content = st.one_of(_text, st.lists(_part, max_size=3))
_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": _content}),
    max_size=4,
)
_tools = st.one_of(st.none(), st.just([{"type": "function", "function": {"name": "f"}}]))


@settings(max_examples=200, deadline=None)
@given(
    endpoint=st.sampled_from(
        ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/embeddings"]
    ),
    messages=_messages,
    instructions=_content,
    given_input=st.one_of(
        _text, st.lists(_text, max_size=3), st.lists(st.integers(0, 9), max_size=5)
    ),
    tools=_tools,
)
def test_prompt_texts_agree_with_the_cost_models_estimate(
    endpoint: str, messages: list[Any], instructions: Any, given_input: Any, tools: Any
) -> None:
    """With the character counter, the texts and fixed tokens add up to what the cost model
    (``cost.estimate_tokens``, used by the route choice) estimates for the same body."""
    body: dict[str, Any] = {"model": "m", "messages": messages, "system": instructions}
    if endpoint == "/v1/responses":
        body = {"model": "m", "instructions": instructions, "input": given_input}
    elif endpoint == "/v1/embeddings":
        body = {"model": "m", "input": given_input}
    if tools:
        body["tools"] = tools
    texts, fixed = prompt_texts(endpoint, body)
    assert estimate_count(texts, fixed) == estimate_tokens(endpoint, body)[0]
