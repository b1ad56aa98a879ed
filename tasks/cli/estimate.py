"""``mixbatch estimate FILE``: what a file would cost and when it would be answered, per route,
before anything is enqueued.

    mixbatch estimate batch.jsonl --lane bulk --deadline 6h
    mixbatch estimate batch.jsonl --json

The file is checked as ``submit`` checks it (a bad line is named), against the lanes table on
this machine, so it needs no running service. Prices come from the price table and times from
the route options' priors, or from what the service has observed when its Redis answers; Redis
is only read (``_ReadOnly``), never written, and an embedded Redis is never started for it. The
quote itself is ``routing.decide.estimate.quote``; token counting is ``tasks.cli.tokens``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from routing.decide.estimate import Counted, Quote, TokenError, estimate_count, prompt_texts
from routing.decide.options import RouteOptions
from routing.errors import InvalidRequest, MalformedInput, MixbatchError
from routing.models import Prepared, coerce_request, prepare
from tasks.cli.handles import load_settings
from tasks.cli.output import age, console, err_console, example, print_json
from tasks.cli.submit import file_items
from tasks.cli.tokens import Tokenizers

__all__ = ["estimate"]

#: Texts of estimated requests the estimate is measured on, at most.
ERROR_SAMPLE = 200


class _ReadOnly:
    """A Redis client (or pipeline) that only reads: a quote changes nothing in the service.

    The observation snapshot also drops in-flight entries too old to be true (``hdel``); that
    write is left to the service's own next read.
    """

    _READS = frozenset({"smembers", "hgetall", "lrange", "execute", "register_script"})

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def pipeline(self, transaction: bool = True) -> _ReadOnly:
        return _ReadOnly(self._inner.pipeline(transaction=transaction))

    def hdel(self, *_: object) -> int:
        return 0

    def __getattr__(self, name: str) -> Any:
        if name not in self._READS:
            raise AttributeError(f"{name}: a quote only reads Redis")
        return getattr(self._inner, name)


def _observed(s: Any, options: RouteOptions, now: float) -> tuple[RouteOptions, str]:
    """The options with what the service observed, when its Redis answers; else the priors."""

    from routing.decide.options import learn
    from routing.store.base import redact_url
    from routing.store.connect import connect
    from routing.store.embedded import running_url
    from routing.store.observations import ObservationStore

    url = s.redis_url or running_url(s.data_dir)
    if not url:
        return options, "priors (no Redis to read observations from)"
    client = connect(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        obs = ObservationStore(
            _ReadOnly(client),  # type: ignore[arg-type]
            namespace=s.namespace,
            url=url,
            max_per_key=s.route_obs_max,
        )
        seen = obs.snapshot(now)
    except MixbatchError:
        return options, f"priors (Redis at {redact_url(url)} did not answer)"
    finally:
        client.close()
    return learn(options, seen, now), f"observed in Redis at {redact_url(url)}, else priors"


def _prepare(
    file: Path, lines: Sequence[Any], items: list[dict[str, Any]], config: Any, now: float
) -> list[Prepared]:
    out: list[Prepared] = []
    for line, item in zip(lines, items, strict=True):
        try:
            out.append(prepare(coerce_request(item), config, now))
        except InvalidRequest as exc:
            raise MalformedInput(str(exc), line=line.line, source=str(file)) from None
    return out


def _count(
    requests: Sequence[Prepared], toks: Tokenizers
) -> tuple[list[Counted], dict[str, str], list[str]]:
    """Each request's input tokens; which counter counted each model; the estimated texts."""
    counted: list[Counted] = []
    by_model: dict[str, str] = {}
    estimated: list[str] = []
    for req in requests:
        texts, fixed = prompt_texts(req.endpoint, req.body)
        counter = toks.for_model(req.model)
        if counter is None:
            counted.append(Counted(input_tokens=estimate_count(texts, fixed), by="estimate"))
            by_model[req.model] = "estimate (4 characters a token)"
            estimated.extend(t for t in texts if t.strip())
        else:
            tokens = sum(counter.count(t) for t in texts) + fixed
            counted.append(Counted(input_tokens=tokens, by="tokenizer"))
            by_model[req.model] = counter.name
    return counted, by_model, estimated


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def _print(q: Quote, report: dict[str, Any]) -> None:
    console.print(
        f"[bold]{q.requests}[/] requests into lane {escape(report['lane'])}, "
        f"deadline in {age(q.deadline_s)}; nothing was enqueued",
        highlight=False,
    )
    kind = "counted" if q.token_count == "tokenizer" else "estimated"
    console.print(f"input tokens: {q.input_tokens:,} ({kind})", highlight=False)
    for model, how in report["counted_by"].items():
        console.print(f"  {escape(model)}: {escape(how)}", highlight=False)
    error: TokenError | None = report["token_error"]
    if q.token_count == "estimate":
        if error is not None and error.sample:
            console.print(
                f"  the estimate against {escape(error.reference)} on {error.sample} of this "
                f"file's texts: {error.mean_abs_pct:g}% off per text on average, "
                f"{error.total_pct:+g}% in total (not the provider's own count)",
                highlight=False,
            )
        else:
            console.print("  the estimate's error was not measured: no tokenizer installed")
    if q.output_tokens_cap is not None:
        console.print(
            f"output tokens: at most {q.output_tokens_cap:,} (the cap of {q.capped} of "
            f"{q.requests} requests); costs assume {q.output_tokens_expected:,}",
            highlight=False,
        )
    else:
        console.print(
            f"output tokens: no body sets a cap; costs assume {q.output_tokens_expected:,}",
            highlight=False,
        )
    table = Table(title=f"per route (times: {report['estimates']})")
    for col in ("route", "requests", "cost", "finish", "fits the deadline"):
        table.add_column(col, justify="left" if col == "route" else "right")
    for name, r in q.routes.items():
        cost = _usd(r.usd) if not r.unpriced else f"unknown ({r.unpriced} unpriced)"
        finish = "never (down)" if math.isinf(r.finish_s) else age(r.finish_s)
        table.add_row(name, str(r.requests), cost, finish, "yes" if r.fits else "no")
    console.print(table)
    plan = ", ".join(f"{n} to {route}" for route, n in q.plan.items())
    console.print(f"the route rule would send {plan} now, for {_usd(q.plan_usd)}", highlight=False)


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--lane", default="standard", show_default=True)
@click.option(
    "--deadline", default=None, help="relative (90s, 15m, 6h, 1d) or ISO time; default: the lane's"
)
@click.option("--json", "as_json", is_flag=True, help="print the quote as JSON")
@example("estimate")
def estimate(file: Path, lane: str, deadline: str | None, as_json: bool) -> None:
    """Price a file in the OpenAI batch input format before enqueueing it: the request count,
    input tokens (the model's own tokenizer where one is installed, else an estimate, with its
    measured error), the output cap, and per route (batch, gpu, flex, realtime, and priority
    where opted in) the cost in USD at that tier's price and the expected finish; then what the
    route rule would do now. Writes nothing to Redis.

    An unknown model is priced as unknown, with a warning."""
    from config.providers import capabilities
    from routing.decide.estimate import measure_error, quote
    from routing.providers.capabilities import tier_options
    from tasks.runtime import route_options

    s = load_settings()
    config = s.service_config()
    config.lane(lane)
    lines, items = file_items(file, lane=lane, deadline=deadline, tenant="default")
    now = time.time()
    requests = _prepare(file, lines, items, config, now)
    lanes = frozenset(spec.name for spec in config.lanes if spec.priority_tier)
    tiers = {**tier_options(capabilities(s)), "priority_lanes": lanes}
    options, source = _observed(s, route_options().model_copy(update=tiers), now)
    toks = Tokenizers(s.gpu_models_file)
    counted, by_model, estimated = _count(requests, toks)
    error = None
    if estimated:
        reference = toks.reference()
        if reference is not None:
            error = measure_error(estimated[:ERROR_SAMPLE], reference.count, reference.name)
    q = quote(requests, counted, options, now=now, realtime_concurrency=s.realtime_concurrency)
    report = {
        "file": str(file),
        "lane": lane,
        "counted_by": by_model,
        "token_error": error,
        "estimates": source,
    }
    for warning in q.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if as_json:
        data = q.model_dump(mode="json")
        data.update({**report, "token_error": error.model_dump() if error else None})
        print_json(data)
        return
    _print(q, report)
