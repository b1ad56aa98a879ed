"""The provider batch route: flush waiting groups, submit batches, poll, collect, hedge.

* ``mixbatch.batch_flush`` (beat): decides per waiting group whether to submit now (target size
  reached, deadline at risk, submit window due, waited long enough) and sends ``batch_submit``.
* ``mixbatch.batch_submit``: takes the group's members, plans batches within the account's caps,
  writes each JSONL to a temp file, records the intent, creates, records the provider's id.
* ``mixbatch.batch_poll`` (beat): reconciles intents left by a crash (adopting the orphan found by
  listing), polls batches in flight with backoff, hedges requests whose deadline is near,
  cancels a batch none of whose requests still waits on it, and collects finished ones.

Every step re-reads the registry and the lanes, and every request transition checks its lease
token, so a repeated or lost Celery message neither loses nor doubles a request.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from config import app
from config.settings import get_settings
from routing.decide.planner import (
    ANTHROPIC_CAPS,
    OPENAI_CAPS,
    BatchCaps,
    PlannedBatch,
    body_bytes,
    input_lines,
    plan_batches,
    should_flush,
    window_due,
)
from routing.decide.route import RouteOptions, batch_margin_s, batch_turnaround_s, should_hedge
from routing.errors import MixbatchError
from routing.models import Claimed, ErrorInfo, Prepared, Route, StoredResult
from routing.providers.batch import BatchJob, BatchStatus, LineResult
from routing.states import BATCH_HELD, State
from routing.store.batches import BatchRecord, Member, group_id, split_group_id
from tasks.costs import Cost, price
from tasks.costs import record_many as record_costs
from tasks.deliver import dispatch
from tasks.explain import learned_options, observations
from tasks.runtime import batch_adapter, registry, service_config, store

log = logging.getLogger(__name__)

INTENT_GRACE_S = 60.0
COLLECT_LEASE_S = 300.0
METADATA_KEY = "mixbatch_key"


def _caps(provider: str) -> BatchCaps:
    adapter = batch_adapter(provider)
    cap = adapter.capabilities
    base = ANTHROPIC_CAPS if cap.protocol == "anthropic" else OPENAI_CAPS
    return base.model_copy(
        update={
            "max_lines": min(base.max_lines, cap.max_lines),
            "max_bytes": min(base.max_bytes, cap.max_bytes),
            "max_line_bytes": cap.max_line_bytes,
        }
    )


def _protocol(provider: str) -> str:
    return batch_adapter(provider).capabilities.protocol


def stage(claimed: list[Claimed], provider: str, now: float) -> int:
    """Hand claimed requests to the batch route: staged in their group, then SUBMITTED."""
    st, reg = store(), registry()
    by_group: dict[str, list[Claimed]] = {}
    for c in claimed:
        by_group.setdefault(
            group_id(provider, c.request.endpoint.value, c.request.model), []
        ).append(c)
    moved = 0
    for gid, items in by_group.items():
        members = [Member(id=c.id, token=c.token, deadline=c.request.deadline) for c in items]
        reg.stage(gid, members, [len(body_bytes(c.request.body)) + 96 for c in items], now)
        moved += sum(
            st.start_many(items, state=State.SUBMITTED, route=Route.BATCH, lease_s=None, now=now)
        )
    return moved


@app.task(name="mixbatch.batch_flush", acks_late=False, ignore_result=True)
def batch_flush() -> dict[str, int]:
    """Send each waiting group whose time has come to ``batch_submit``."""
    s, reg, now = get_settings(), registry(), time.time()
    options = learned_options(now)
    windows = {spec.name: spec.submit_windows for spec in service_config().lanes}
    sent = 0
    for group in reg.groups():
        provider, endpoint, model = split_group_id(group.gid)
        due_window = any(
            window_due(expr, reg.last_window(group.gid), now)
            for exprs in windows.values()
            for expr in exprs
        )
        flush, reason = should_flush(
            group.bytes,
            group.count,
            group.tightest_deadline,
            now,
            target_bytes=s.batch_target_bytes,
            # learned: this group's turnaround at its size, and the route choice's margin
            turnaround_s=_turnaround(options, provider, endpoint, model, group.count),
            margin_s=batch_margin_s(options, endpoint, model),
            max_wait_s=s.batch_max_wait_s,
            windows_due=due_window,
            oldest_enqueued_at=group.first_at,
            wait_step_s=s.batch_flush_interval_s,
            max_lines=_caps(provider).max_lines,
        )
        if flush:
            if due_window:
                reg.mark_window(group.gid, now)
            batch_submit.apply_async(
                args=[group.gid], argsrepr=f"group={group.gid} n={group.count} why={reason}"
            )
            sent += 1
    return {"groups": sent}


def _lookup(holders: dict[str, tuple[Prepared, State, str]]) -> Callable[[str], Prepared]:
    return lambda rid: holders[rid][0]


@app.task(name="mixbatch.batch_submit", acks_late=True, ignore_result=True)
def batch_submit(gid: str) -> dict[str, int]:
    """Plan and create the provider batches of one waiting group."""
    st, reg, now = store(), registry(), time.time()
    provider, _, _ = split_group_id(gid)
    caps = _caps(provider)
    taken = reg.take(gid, caps.max_lines)
    if not taken:
        return {"batches": 0}
    holders = st.holders([rid for rid, _ in taken])
    claimed = [
        Claimed(id=rid, token=token, attempts=0, request=holders[rid][0])
        for rid, token in taken
        if rid in holders and holders[rid][1] in BATCH_HELD and holders[rid][2] == token
    ]
    plan = plan_batches(
        claimed,
        provider_of=lambda _p: provider,
        protocol_of=lambda _n: _protocol(provider),  # type: ignore[arg-type,return-value]
        caps_of=lambda _n: caps,
        target_bytes=get_settings().batch_target_bytes,
    )
    tokens = {c.id: c.token for c in claimed}
    for rid, reason in plan.rejected.items():
        _fail(rid, tokens[rid], ErrorInfo(code="not_batchable", message=reason))
    made = 0
    for planned in plan.batches:
        made += _create(planned, provider, tokens, holders, now)
    return {"batches": made}


def _create(
    planned: PlannedBatch,
    provider: str,
    tokens: dict[str, str],
    holders: dict[str, tuple[Prepared, State, str]],
    now: float,
) -> int:
    reg = registry()
    members = {
        cid: [Member(id=rid, token=tokens[rid], deadline=holders[rid][0].deadline) for rid in ids]
        for cid, ids in planned.fanout.items()
    }
    record = BatchRecord(
        key=planned.key,
        provider=provider,
        protocol=planned.protocol,
        endpoint=planned.endpoint.value,
        model=planned.model or planned.models[0],
        created_at=now,
        lines=planned.line_count,
        lanes=list(planned.lanes),
        members=members,
        order=list(planned.fanout),
    )
    reg.record_intent(record)
    adapter = batch_adapter(provider)
    with tempfile.TemporaryDirectory(prefix="mixbatch-") as tmp:
        path = Path(tmp) / f"{planned.key}.jsonl"
        with path.open("wb") as fh:
            for line in input_lines(planned, _lookup(holders)):
                fh.write(line)
        metadata = {
            METADATA_KEY: planned.key,
            "mixbatch_lanes": ",".join(planned.lanes)[:500],
            "mixbatch_tenants": ",".join(planned.tenants)[:500],
        }
        try:
            job = adapter.create(
                path, endpoint=planned.endpoint, model=record.model, metadata=metadata
            )
        except MixbatchError as exc:
            if exc.retryable:
                log.warning(
                    "batch create failed; the intent is reconciled by the poller",
                    extra={
                        "batch_key": planned.key,
                        "provider": provider,
                        "error": type(exc).__name__,
                    },
                )
                return 0
            info = ErrorInfo(
                code="batch_rejected",
                message=str(exc),
                status_code=getattr(exc, "status_code", None),
            )
            for m in record.requests():
                _fail(m.id, m.token, info)
            reg.finish(record, "failed", time.time(), note=str(exc))
            return 0
    s = get_settings()
    reg.record_submitted(record, job.batch_id, time.time(), time.time() + s.batch_poll_interval_s)
    observations().batch_started(  # learned route choice: a running batch counts, censored
        provider,
        record.endpoint,
        record.model,
        batch_key=record.key,
        size=record.lines,
        at=record.submitted_at or now,
    )
    log.info(
        "batch submitted",
        extra={
            "batch_key": planned.key,
            "batch_id": job.batch_id,
            "provider": provider,
            "lines": planned.line_count,
        },
    )
    return 1


def _fail(rid: str, token: str, info: ErrorInfo) -> None:
    if store().finish(
        rid, token, State.FAILED, StoredResult(status_code=info.status_code, error=info)
    ):
        dispatch([rid])


def _requeue(rid: str, token: str, info: ErrorInfo) -> None:
    state = store().requeue(rid, token, info)
    if state is State.FAILED:
        dispatch([rid])


@app.task(name="mixbatch.batch_poll", acks_late=False, ignore_result=True)
def batch_poll() -> dict[str, int]:
    """Reconcile lost intents, then poll every batch whose next look is due."""
    reg, now = registry(), time.time()
    report = {"adopted": 0, "requeued_intents": 0, "polled": 0, "collected": 0, "hedged": 0}
    for key in reg.stale_intents(now - INTENT_GRACE_S):
        _reconcile(key, report)
    for key in reg.due(now):
        try:
            _poll_one(key, report)
        except MixbatchError as exc:
            log.warning("batch poll failed", extra={"batch_key": key, "error": str(exc)})
            reg.schedule_poll(key, time.time() + get_settings().batch_poll_interval_s)
    return report


def _reconcile(key: str, report: dict[str, int]) -> None:
    """An intent without a provider id: adopt the batch if ``create`` did happen, else requeue."""
    reg = registry()
    record = reg.get(key)
    adapter = batch_adapter(record.provider)
    orphan = adapter.find_orphan(
        (METADATA_KEY, key),
        created_after=record.created_at - 300,
        total=record.lines,
        exclude=reg.known_batch_ids(),
    )
    if orphan is not None:
        s = get_settings()
        reg.record_submitted(
            record, orphan.batch_id, time.time(), time.time() + s.batch_poll_interval_s
        )
        log.info("orphan batch adopted", extra={"batch_key": key, "batch_id": orphan.batch_id})
        report["adopted"] += 1
        return
    info = ErrorInfo(
        code="batch_not_created", message="the batch was never created; requeued", retryable=True
    )
    for m in record.requests():
        _requeue(m.id, m.token, info)
    reg.finish(record, "failed", time.time(), note="never created")
    report["requeued_intents"] += 1


def _poll_one(key: str, report: dict[str, int]) -> None:
    s, reg, now = get_settings(), registry(), time.time()
    record = reg.get(key)
    if record.batch_id is None:
        return
    adapter = batch_adapter(record.provider)
    job = adapter.retrieve(record.batch_id)
    record.last_status = job.raw_status
    record.polls += 1
    report["polled"] += 1
    if job.terminal:
        if reg.claim_collect(key, COLLECT_LEASE_S, now):
            _observe(record, now, censored=job.status is not BatchStatus.COMPLETED)
            collect(record, job)
            report["collected"] += 1
        return
    report["hedged"] += _hedge(record, now)
    if not _still_wanted(record):
        if adapter.capabilities.cancel and job.status is not BatchStatus.CANCELLING:
            try:
                adapter.cancel(record.batch_id)
            except MixbatchError as exc:
                log.warning("batch cancel failed", extra={"batch_key": key, "error": str(exc)})
        reg.finish(record, "cancelled", now, note="no request waits on it any more")
        _observe(record, now, censored=True)
        log.info("batch dropped: none of its requests waits on it", extra={"batch_key": key})
        return
    reg.save(record)
    delay = min(s.batch_poll_interval_s * 1.5 ** min(record.polls, 20), s.batch_poll_max_interval_s)
    reg.schedule_poll(key, now + delay)


def _hedge(record: BatchRecord, now: float) -> int:
    """Re-route, before they miss, the requests of a batch that is running late."""
    options = learned_options(now)
    late = [
        m
        for m in record.requests()
        if should_hedge(m.deadline, now, options, endpoint=record.endpoint, model=record.model)
    ]
    info = ErrorInfo(
        code="hedged",
        message=f"batch {record.batch_id} still {record.last_status} near the deadline; re-routed",
        retryable=True,
    )
    moved = 0
    for m in late:
        if store().requeue(m.id, m.token, info) is not None:
            moved += 1
    return moved


def _turnaround(
    options: RouteOptions, provider: str, endpoint: str, model: str, size: int
) -> float:
    """Learned turnaround of a batch of ``size`` lines, plus the flush step and poll lag."""
    found = batch_turnaround_s(options, provider, endpoint, model, size)
    return (found[0] if found else 0.0) + options.batch_overhead_s


def _observe(record: BatchRecord, now: float, *, censored: bool) -> None:
    """Record a batch's turnaround for the learned route choice (censored: no answers came)."""
    observations().record_batch(
        record.provider,
        record.endpoint,
        record.model,
        turnaround_s=now - (record.submitted_at or record.created_at),
        size=record.lines,
        at=now,
        censored=censored,
        batch_key=record.key,
    )


def _still_wanted(record: BatchRecord) -> bool:
    """Whether any request still waits on this batch (not cancelled, not re-routed)."""
    members = record.requests()
    holders = store().holders([m.id for m in members])
    return any(
        m.id in holders and holders[m.id][1] in BATCH_HELD and holders[m.id][2] == m.token
        for m in members
    )


def collect(record: BatchRecord, job: BatchJob) -> dict[str, int]:
    """Apply a finished batch's lines to their requests, then close the record.

    Per line: success -> DONE; a line that never ran (expired, cancelled) or failed with a
    retryable error -> back to its lane (the route choice then picks realtime if the deadline
    is near); a non-retryable error -> FAILED with the provider's message. Lines missing from the
    results are requeued. Re-applying a line is harmless: each finish checks the lease token.
    """
    reg, adapter = registry(), batch_adapter(record.provider)
    seen: set[str] = set()
    counts = {"done": 0, "failed": 0, "requeued": 0}
    if job.status is BatchStatus.FAILED:
        _collect_validation(record, job, counts)
        reg.finish(record, "failed", time.time(), note="validation failed")
        return counts
    requests = {
        rid: held[0] for rid, held in store().holders([m.id for m in record.requests()]).items()
    }
    pending = _Finishes(record.provider)
    for line in adapter.results(job):
        group = record.members.get(line.custom_id)
        if group is None:
            log.warning(
                "result line not ours", extra={"batch_key": record.key, "custom_id": line.custom_id}
            )
            continue
        seen.add(line.custom_id)
        for m in group:
            _apply(record, m, line, counts, requests.get(m.id), pending)
        if len(pending) >= _FINISH_CHUNK:
            pending.flush(counts)
    pending.flush(counts)
    lost = ErrorInfo(
        code="missing_result", message="the batch returned no line for this request", retryable=True
    )
    for cid, group in record.members.items():
        if cid not in seen:
            for m in group:
                _requeue(m.id, m.token, lost)
                counts["requeued"] += 1
    if get_settings().batch_delete_files:
        try:
            adapter.delete_inputs_outputs(job)
        except MixbatchError as exc:
            log.warning(
                "could not delete batch files", extra={"batch_key": record.key, "error": str(exc)}
            )
    reg.finish(record, "done", time.time(), note=job.raw_status)
    log.info(
        "batch collected", extra={"batch_key": record.key, "batch_id": record.batch_id, **counts}
    )
    return counts


#: Lines applied per pipelined round trip while collecting.
_FINISH_CHUNK = 1000


class _Finishes:
    """Finishes of one collection, sent in pipelined chunks; costs and deliveries follow."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.items: list[tuple[str, str, State, StoredResult]] = []
        self.priced: list[tuple[Prepared, Cost] | None] = []
        self.requests: list[Prepared | None] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(
        self,
        m: Member,
        outcome: State,
        result: StoredResult,
        priced: tuple[Prepared, Cost] | None,
        request: Prepared | None,
    ) -> None:
        self.items.append((m.id, m.token, outcome, result))
        self.priced.append(priced)
        self.requests.append(request)

    def flush(self, counts: dict[str, int]) -> None:
        if not self.items:
            return
        st = store()
        won = st.finish_many(self.items)
        to_sink: list[str] = []
        stored_only: list[str] = []
        ledger: list[tuple[Prepared, Route, Cost]] = []
        rows = zip(self.items, self.priced, self.requests, won, strict=True)
        for (rid, _, outcome, _), priced, request, ok in rows:
            if not ok:
                continue
            counts["done" if outcome is State.DONE else "failed"] += 1
            if request is not None and request.callback is None:
                stored_only.append(rid)
            else:
                to_sink.append(rid)
            if priced is not None:
                ledger.append((priced[0], Route.BATCH, priced[1]))
        record_costs(st, ledger)
        st.delivered_many(stored_only)
        dispatch(to_sink)
        self.items, self.priced, self.requests = [], [], []


def _apply(
    record: BatchRecord,
    m: Member,
    line: LineResult,
    counts: dict[str, int],
    request: Prepared | None,
    pending: _Finishes,
) -> None:
    if line.ok:
        body = line.body or {}
        usage = body.get("usage")
        usage = usage if isinstance(usage, dict) else None
        result = StoredResult(
            status_code=line.status_code or 200,
            body=body,
            usage=usage,
            provider=record.provider,
            batch_id=record.batch_id,
        )
        priced = None
        if request is not None:
            cost = price(request, record.provider, Route.BATCH, usage)
            result = result.model_copy(update=cost.model_dump())
            priced = (request, cost)
        pending.add(m, State.DONE, result, priced, request)
        return
    error = line.error or ErrorInfo(code="unknown", message="no answer")
    if error.retryable or error.code in ("expired", "cancelled"):
        _requeue(m.id, m.token, error.model_copy(update={"retryable": True}))
        counts["requeued"] += 1
        return
    failed = StoredResult(
        status_code=line.status_code, body=line.body, error=error, provider=record.provider
    )
    pending.add(m, State.FAILED, failed, None, request)


def _collect_validation(record: BatchRecord, job: BatchJob, counts: dict[str, int]) -> None:
    """A batch refused at validation: fail the lines it names, resubmit the valid ones."""
    bad: dict[str, str] = {}
    for err in job.validation_errors:
        cid = err.custom_id
        if cid is None and err.line is not None and 0 < err.line <= len(record.order):
            cid = record.order[err.line - 1]
        if cid is not None:
            bad[cid] = f"{err.code}: {err.message}"
    for cid, group in record.members.items():
        for m in group:
            if cid in bad:
                _fail(
                    m.id,
                    m.token,
                    ErrorInfo(code="invalid_request", message=bad[cid], status_code=400),
                )
                counts["failed"] += 1
            else:
                info = ErrorInfo(
                    code="batch_validation_failed",
                    message="another line of its batch was invalid; resubmitted",
                    retryable=True,
                )
                store().requeue(m.id, m.token, info, ready_at=time.time())
                counts["requeued"] += 1
