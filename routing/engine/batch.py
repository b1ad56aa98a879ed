"""The provider batch route's steps: stage, flush, submit, reconcile, poll, hedge.

* ``stage``: claimed requests join their group (provider, endpoint, model), then go SUBMITTED.
* ``groups_due``: which waiting groups should be submitted now (target size reached, deadline
  at risk, submit window due, waited long enough), each with its reason.
* ``submit``: takes a group's members, plans batches within the account's caps, writes each
  input file, records the intent, creates, records the provider's id.
* ``poll``: reconciles intents left by a crash (adopting the orphan found by listing), polls
  batches in flight with backoff, hedges requests whose deadline is near, cancels a batch none
  of whose requests still waits on it, and collects finished ones (``batch_collect``).

Every step re-reads the registry and the lanes, and every request transition checks its lease
token, so a repeated or lost message neither loses nor doubles a request. Each takes its
handles (``BatchHandles``) and reads time only through ``h.clock``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from routing.decide.flush import should_flush, window_due
from routing.decide.hedge import batch_margin_s, batch_turnaround_s, should_hedge
from routing.decide.options import RouteOptions
from routing.decide.planner import PlannedBatch, body_bytes, plan_batches
from routing.engine.batch_collect import collect
from routing.engine.batch_handles import (
    BatchHandles,
    Holders,
    batch_caps,
    fail,
    held,
    poll_delay_s,
    requeue,
)
from routing.errors import MixbatchError, ProviderError
from routing.models import Claimed, ErrorInfo, Route
from routing.providers.batch_jobs import BatchStatus
from routing.states import State
from routing.store.batches import BatchRecord, GroupInfo, Member, group_id, split_group_id

__all__ = [
    "COLLECT_LEASE_S",
    "INTENT_GRACE_S",
    "METADATA_KEY",
    "create",
    "groups_due",
    "hedge",
    "poll",
    "poll_one",
    "reconcile",
    "stage",
    "still_wanted",
    "submit",
]

log = logging.getLogger(__name__)

#: An intent older than this without a provider id was left by a crash: reconcile it.
INTENT_GRACE_S = 60.0
#: How long one collector holds a finished batch before another may take it over.
COLLECT_LEASE_S = 300.0
#: The metadata key every created batch is tagged with, so an unrecorded one can be found.
METADATA_KEY = "mixbatch_key"
#: Bytes a line adds to its body in a group's size estimate (the JSONL envelope, roughly).
LINE_OVERHEAD = 96


def stage(h: BatchHandles, claimed: list[Claimed], provider: str, now: float) -> int:
    """Hand claimed requests to the batch route: staged in their group, then SUBMITTED."""
    by_group: dict[str, list[Claimed]] = {}
    for c in claimed:
        gid = group_id(provider, c.request.endpoint.value, c.request.model)
        by_group.setdefault(gid, []).append(c)
    moved = 0
    for gid, items in by_group.items():
        members = [Member(id=c.id, token=c.token, deadline=c.request.deadline) for c in items]
        sizes = [len(body_bytes(c.request.body)) + LINE_OVERHEAD for c in items]
        h.registry.stage(gid, members, sizes, now)
        started = h.store.start_many(
            items, state=State.SUBMITTED, route=Route.BATCH, lease_s=None, now=now
        )
        moved += sum(started)
    return moved


def groups_due(h: BatchHandles) -> list[tuple[GroupInfo, str]]:
    """The waiting groups whose time has come, each with why; a due window is marked as used."""
    now = h.clock()
    options = h.options(now)
    windows = h.settings.submit_windows
    due: list[tuple[GroupInfo, str]] = []
    for group in h.registry.groups():
        provider, endpoint, model = split_group_id(group.gid)
        last = h.registry.last_window(group.gid) if windows else None
        window = any(window_due(expr, last, now) for expr in windows)
        go, reason = should_flush(
            group.bytes,
            group.count,
            group.tightest_deadline,
            now,
            target_bytes=h.settings.target_bytes,
            # learned: this group's turnaround at its size, and the route choice's margin
            turnaround_s=_turnaround_s(options, provider, endpoint, model, group.count),
            margin_s=batch_margin_s(options, endpoint, model),
            max_wait_s=h.settings.max_wait_s,
            windows_due=window,
            oldest_enqueued_at=group.first_at,
            wait_step_s=h.settings.flush_interval_s,
            max_lines=batch_caps(h.adapter(provider)).max_lines,
        )
        if go:
            if window:
                h.registry.mark_window(group.gid, now)
            due.append((group, reason))
    return due


def submit(h: BatchHandles, gid: str) -> int:
    """Plan and create the provider batches of one waiting group; returns how many were made.

    A taken request that is no longer held for the batch (requeued meanwhile, cancelled) is
    left out; one still CLAIMED under the staging token is kept, since its worker is about to
    mark it SUBMITTED.
    """
    provider, _, _ = split_group_id(gid)
    adapter = h.adapter(provider)
    caps = batch_caps(adapter)
    taken = h.registry.take(gid, caps.max_lines)
    if not taken:
        return 0
    holders = h.store.holders([rid for rid, _ in taken])
    claimed = [
        Claimed(id=rid, token=token, attempts=0, request=holders[rid][0])
        for rid, token in taken
        if held(holders, rid, token)
    ]
    protocol = adapter.capabilities.protocol
    plan = plan_batches(
        claimed,
        provider_of=lambda _request: provider,
        protocol_of=lambda _account: protocol,
        caps_of=lambda _account: caps,
        target_bytes=h.settings.target_bytes,
    )
    tokens = {c.id: c.token for c in claimed}
    for rid, reason in plan.rejected.items():
        fail(h, rid, tokens[rid], ErrorInfo(code="not_batchable", message=reason))
    return sum(create(h, planned, tokens, holders) for planned in plan.batches)


def create(
    h: BatchHandles, planned: PlannedBatch, tokens: dict[str, str], holders: Holders
) -> bool:
    """Record the intent, write the input file, create the batch, record the provider's id.

    A retryable failure leaves the intent for ``reconcile`` (the batch may exist); any other
    fails the batch's requests with the provider's reason.
    """
    members = {
        cid: [Member(id=rid, token=tokens[rid], deadline=holders[rid][0].deadline) for rid in ids]
        for cid, ids in planned.fanout.items()
    }
    record = BatchRecord(
        key=planned.key,
        provider=planned.provider,
        protocol=planned.protocol,
        endpoint=planned.endpoint.value,
        model=planned.model or planned.models[0],
        created_at=h.clock(),
        lines=planned.line_count,
        lanes=list(planned.lanes),
        members=members,
        order=list(planned.fanout),
    )
    h.registry.record_intent(record)
    adapter = h.adapter(planned.provider)
    metadata = {
        METADATA_KEY: planned.key,
        "mixbatch_lanes": ",".join(planned.lanes)[:500],
        "mixbatch_tenants": ",".join(planned.tenants)[:500],
    }
    with tempfile.TemporaryDirectory(prefix="mixbatch-") as tmp:
        path = Path(tmp) / f"{planned.key}.jsonl"
        with path.open("wb") as fh:
            adapter.write_input(planned, lambda rid: holders[rid][0], fh)
        try:
            job = adapter.create(
                path, endpoint=planned.endpoint, model=record.model, metadata=metadata
            )
        except MixbatchError as exc:
            _refused(h, record, exc)
            return False
    now = h.clock()
    h.registry.record_submitted(record, job.batch_id, now, now + h.settings.poll_interval_s)
    h.observations.batch_started(  # learned route choice: a running batch counts, censored
        record.provider,
        record.endpoint,
        record.model,
        batch_key=record.key,
        size=record.lines,
        at=now,
    )
    log.info(
        "batch submitted",
        extra={
            "batch_key": record.key,
            "batch_id": job.batch_id,
            "provider": record.provider,
            "lines": record.lines,
        },
    )
    return True


def _refused(h: BatchHandles, record: BatchRecord, exc: MixbatchError) -> None:
    if exc.retryable:
        log.warning(
            "batch create failed; the intent is reconciled by the poller",
            extra={
                "batch_key": record.key,
                "provider": record.provider,
                "error": type(exc).__name__,
            },
        )
        return
    status = exc.status_code if isinstance(exc, ProviderError) else None
    info = ErrorInfo(code="batch_rejected", message=str(exc), status_code=status)
    for m in record.requests():
        fail(h, m.id, m.token, info)
    h.registry.finish(record, "failed", h.clock(), note=str(exc))


def poll(h: BatchHandles) -> dict[str, int]:
    """Reconcile lost intents, then poll every batch whose next look is due."""
    now = h.clock()
    report = {"adopted": 0, "requeued_intents": 0, "polled": 0, "collected": 0, "hedged": 0}
    for key in h.registry.stale_intents(now - INTENT_GRACE_S):
        reconcile(h, key, report)
    for key in h.registry.due(now):
        try:
            poll_one(h, key, report)
        except MixbatchError as exc:
            log.warning("batch poll failed", extra={"batch_key": key, "error": str(exc)})
            h.registry.schedule_poll(key, h.clock() + h.settings.poll_interval_s)
    return report


def reconcile(h: BatchHandles, key: str, report: dict[str, int]) -> None:
    """An intent without a provider id: adopt the batch if ``create`` did happen, else requeue."""
    record = h.registry.get(key)
    orphan = h.adapter(record.provider).find_orphan(
        (METADATA_KEY, key),
        created_after=record.created_at - 300,
        total=record.lines,
        exclude=h.registry.known_batch_ids(),
    )
    now = h.clock()
    if orphan is not None:
        h.registry.record_submitted(record, orphan.batch_id, now, now + h.settings.poll_interval_s)
        log.info("orphan batch adopted", extra={"batch_key": key, "batch_id": orphan.batch_id})
        report["adopted"] += 1
        return
    info = ErrorInfo(
        code="batch_not_created", message="the batch was never created; requeued", retryable=True
    )
    for m in record.requests():
        requeue(h, m.id, m.token, info)
    h.registry.finish(record, "failed", now, note="never created")
    report["requeued_intents"] += 1


def poll_one(h: BatchHandles, key: str, report: dict[str, int]) -> None:
    """One look at one batch: collect it, hedge its late requests, drop it, or look again later."""
    now = h.clock()
    record = h.registry.get(key)
    if record.batch_id is None:
        return
    adapter = h.adapter(record.provider)
    job = adapter.retrieve(record.batch_id)
    record.last_status = job.raw_status
    record.polls += 1
    report["polled"] += 1
    if job.terminal:
        if h.registry.claim_collect(key, COLLECT_LEASE_S, now):
            _observe(h, record, now, censored=job.status is not BatchStatus.COMPLETED)
            collect(h, record, job)
            report["collected"] += 1
        return
    report["hedged"] += hedge(h, record, now)
    if not still_wanted(h, record):
        if adapter.capabilities.cancel and job.status is not BatchStatus.CANCELLING:
            try:
                adapter.cancel(record.batch_id)
            except MixbatchError as exc:
                log.warning("batch cancel failed", extra={"batch_key": key, "error": str(exc)})
        h.registry.finish(record, "cancelled", now, note="no request waits on it any more")
        _observe(h, record, now, censored=True)
        log.info("batch dropped: none of its requests waits on it", extra={"batch_key": key})
        return
    h.registry.save(record)
    h.registry.schedule_poll(key, now + poll_delay_s(h.settings, record.polls))


def hedge(h: BatchHandles, record: BatchRecord, now: float) -> int:
    """Re-route, before they miss, the requests of a batch that is running late."""
    options = h.options(now)
    info = ErrorInfo(
        code="hedged",
        message=f"batch {record.batch_id} still {record.last_status} near the deadline; re-routed",
        retryable=True,
    )
    moved = 0
    for m in record.requests():
        late = should_hedge(m.deadline, now, options, endpoint=record.endpoint, model=record.model)
        if late and requeue(h, m.id, m.token, info) is not None:
            moved += 1
    return moved


def still_wanted(h: BatchHandles, record: BatchRecord) -> bool:
    """Whether any request still waits on this batch (not cancelled, not re-routed)."""
    members = record.requests()
    holders = h.store.holders([m.id for m in members])
    return any(held(holders, m.id, m.token) for m in members)


def _turnaround_s(
    options: RouteOptions, provider: str, endpoint: str, model: str, size: int
) -> float:
    """Learned turnaround of a batch of ``size`` lines, plus the flush step and poll lag."""
    found = batch_turnaround_s(options, provider, endpoint, model, size)
    return (found[0] if found else 0.0) + options.batch_overhead_s


def _observe(h: BatchHandles, record: BatchRecord, now: float, *, censored: bool) -> None:
    """Record a batch's turnaround for the learned route choice (censored: no answers came)."""
    h.observations.record_batch(
        record.provider,
        record.endpoint,
        record.model,
        turnaround_s=now - (record.submitted_at or record.created_at),
        size=record.lines,
        at=now,
        censored=censored,
        batch_key=record.key,
    )
