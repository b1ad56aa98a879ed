"""The provider batch route's steps: stage, flush, submit, reconcile, poll, hedge.

* ``stage``: claimed requests join their group (provider, endpoint, model), then go SUBMITTED.
* ``groups_due``: which waiting groups should be submitted now (target size reached, deadline
  at risk, submit window due, waited long enough), each with its reason.
* ``submit``: takes a group's members into a durable take, plans batches within the account's
  caps, and per batch records the intent (releasing its members from the take), writes the
  input file, creates, records the provider's id.
* ``poll``: reconciles what a dead worker left (a take: its members requeued; an intent:
  the orphan adopted by our tag and custom_ids, or its members requeued), polls batches in
  flight with backoff, hedges requests whose deadline is near, cancels a batch none of whose
  requests still waits on it, and collects finished ones (``batch_collect``).

Every step re-reads the registry and the lanes, and every request transition checks its lease
token, so a repeated or lost message neither loses nor doubles a request. A worker beats the
take and intent it works on (``beating``), so only a dead worker's look stale. Each step
takes its handles (``BatchHandles``) and reads time only through ``h.clock`` (the beat thread
too). ``fault_point`` marks the steps a test can kill a worker between.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Callable
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
    beating,
    fail,
    held,
    poll_delay_s,
    requeue,
)
from routing.errors import MixbatchError, ProviderError
from routing.faults import fault_point
from routing.models import Claimed, ErrorInfo, Route
from routing.providers.batch_jobs import BatchStatus
from routing.states import State
from routing.store.batches import BatchRecord, GroupInfo, Member, group_id, split_group_id
from routing.store.hedges import HedgeStore

__all__ = [
    "METADATA_KEY",
    "TakeReaped",
    "create",
    "groups_due",
    "hedge",
    "poll",
    "poll_one",
    "reap_take",
    "reconcile",
    "stage",
    "still_wanted",
    "submit",
]

log = logging.getLogger(__name__)

#: An orphan is looked for among batches created from this long before its intent (clocks differ).
ORPHAN_LOOKBACK_S = 300.0
#: What ``poll`` reports, each a count.
REPORT = (
    "requeued_taken",
    "adopted",
    "undecided_intents",
    "requeued_intents",
    "polled",
    "collected",
    "hedged",
)
_TAKE_LOST = ErrorInfo(
    code="batch_take_lost",
    message="its flusher died before the batch was recorded; requeued",
    retryable=True,
)
_NEVER_CREATED = ErrorInfo(
    code="batch_not_created", message="the batch was never created; requeued", retryable=True
)
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

    The members are taken into a durable take, beaten while this runs, and each batch's intent
    releases its own from it: a worker that dies anywhere here leaves every taken request
    referenced by the take or an intent, for ``poll`` to reconcile. A taken request no longer
    held for the batch (requeued meanwhile, cancelled) is left out; one still CLAIMED under the
    staging token is kept, since its worker is about to mark it SUBMITTED.
    """
    provider, _, _ = split_group_id(gid)
    adapter = h.adapter(provider)
    caps = batch_caps(adapter)
    take_id = uuid.uuid4().hex
    taken = h.registry.take(gid, caps.max_lines, take_id, h.clock())
    if not taken:
        return 0
    fault_point("take")
    made = 0
    with beating(h, takes=[take_id]):
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
        try:
            for planned in plan.batches:
                made += create(h, planned, tokens, holders, take_id=take_id)
        except TakeReaped:
            log.warning("batch take reaped while submitting", extra={"group": gid})
            return made
    h.registry.close_take(take_id)
    return made


class TakeReaped(Exception):
    """The take was reconciled while its worker still ran (it looked dead): stop submitting."""


def create(
    h: BatchHandles,
    planned: PlannedBatch,
    tokens: dict[str, str],
    holders: Holders,
    *,
    take_id: str = "",
) -> bool:
    """Record the intent, write the input file, create the batch, record the provider's id.

    The intent gets its own time and is beaten until its id is recorded, so it looks stale
    only once its worker died. A retryable failure leaves the intent for ``reconcile`` (the
    batch may exist); any other fails the batch's requests with the provider's reason.
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
    if not h.registry.record_intent(record, take_id):
        raise TakeReaped(take_id)
    fault_point("intent")
    adapter = h.adapter(planned.provider)
    metadata = {
        METADATA_KEY: planned.key,
        "mixbatch_lanes": ",".join(planned.lanes)[:500],
        "mixbatch_tenants": ",".join(planned.tenants)[:500],
    }
    with beating(h, intents=[record.key]):
        with tempfile.TemporaryDirectory(prefix="mixbatch-") as tmp:
            path = Path(tmp) / f"{planned.key}.jsonl"
            with path.open("wb") as fh:
                adapter.write_input(planned, lambda rid: holders[rid][0], fh)
            try:
                job = adapter.create(
                    path,
                    endpoint=planned.endpoint,
                    model=record.model,
                    metadata=metadata,
                    window=adapter.capabilities.window_for(planned.tightest_deadline - h.clock()),
                )
            except MixbatchError as exc:
                _refused(h, record, exc)
                return False
        fault_point("create")
        now = h.clock()
        first_poll = now + h.settings.poll_interval_s
        recorded = h.registry.record_submitted(record, job.batch_id, now, first_poll)
    if not recorded:
        _reaped_meanwhile(h, record, job.batch_id)
        return False
    fault_point("record")
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


def _reaped_meanwhile(h: BatchHandles, record: BatchRecord, batch_id: str) -> None:
    """The intent was reconciled while create ran: adopted (nothing to do) or requeued (the
    batch this worker just made answers no one: cancel it)."""
    if h.registry.get(record.key).batch_id == batch_id:
        return
    log.warning(
        "batch created after its intent was reconciled; cancelling it",
        extra={"batch_key": record.key, "batch_id": batch_id},
    )
    adapter = h.adapter(record.provider)
    if adapter.capabilities.cancel:
        try:
            adapter.cancel(batch_id)
        except MixbatchError as exc:
            log.warning("batch cancel failed", extra={"batch_id": batch_id, "error": str(exc)})


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
    """Reconcile what dead workers left (takes, intents), then poll every batch that is due."""
    now = h.clock()
    report = dict.fromkeys(REPORT, 0)
    older = now - h.settings.intent_grace_s
    steps: list[tuple[Callable[[BatchHandles, str, dict[str, int]], None], str]]
    steps = [(reap_take, t) for t in h.registry.stale_takes(older)]
    steps += [(reconcile, k) for k in h.registry.stale_intents(older)]
    steps += [(poll_one, k) for k in h.registry.due(now)]
    for step, name in steps:
        try:
            step(h, name, report)
        except MixbatchError as exc:
            log.warning(
                "batch poll step failed",
                extra={"step": step.__name__, "item": name, "error": str(exc)},
            )
            if step is poll_one:
                h.registry.schedule_poll(name, h.clock() + h.settings.poll_interval_s)
    return report


def reap_take(h: BatchHandles, take_id: str, report: dict[str, int]) -> None:
    """A take whose worker died before recording every intent: its members go back."""
    now = h.clock()
    if not h.registry.reap("take", take_id, now - h.settings.intent_grace_s, now):
        return
    with beating(h, reaping=[f"take:{take_id}"]):
        for rid, token in h.registry.take_members(take_id).items():
            if requeue(h, rid, token, _TAKE_LOST) is not None:
                report["requeued_taken"] += 1
    h.registry.drop_reaped_take(take_id)


def reconcile(h: BatchHandles, key: str, report: dict[str, int]) -> None:
    """An intent whose worker died without a provider id: adopt the batch if ``create`` did
    happen (our tag and exactly our custom_ids), wait while a candidate cannot be read yet,
    else requeue its members."""
    now = h.clock()
    if not h.registry.reap("intent", key, now - h.settings.intent_grace_s, now):
        return
    record = h.registry.get(key)
    with beating(h, reaping=[f"intent:{key}"]):
        search = h.adapter(record.provider).find_orphan(
            (METADATA_KEY, key),
            custom_ids=list(record.members),
            created_after=record.created_at - ORPHAN_LOOKBACK_S,
            exclude=h.registry.known_batch_ids(),
        )
    now = h.clock()
    if search.found is not None:
        batch_id = search.found.batch_id
        first_poll = now + h.settings.poll_interval_s
        if h.registry.record_submitted(record, batch_id, now, first_poll, by="reaper"):
            log.info("orphan batch adopted", extra={"batch_key": key, "batch_id": batch_id})
            report["adopted"] += 1
        return
    if search.undecided:  # looked at again once the grace passes; late requests are hedged
        report["hedged"] += hedge(h, record, now)
        report["undecided_intents"] += 1
        log.info(
            "intent waits on a batch whose requests cannot be read yet",
            extra={"batch_key": key, "batch_ids": search.undecided},
        )
        return
    for m in record.requests():
        requeue(h, m.id, m.token, _NEVER_CREATED)
    if h.registry.abandon(record, h.clock(), "never created"):
        report["requeued_intents"] += 1


def poll_one(h: BatchHandles, key: str, report: dict[str, int]) -> None:
    """One look at one batch: collect it, hedge its late requests, drop it, or look again later."""
    now = h.clock()
    record = h.registry.get(key)
    if record.batch_id is None:
        return
    adapter = h.adapter(record.provider)
    job = adapter.retrieve(record.batch_id)
    fault_point("poll")
    record.last_status = job.raw_status
    record.polls += 1
    report["polled"] += 1
    if job.terminal:
        if h.registry.claim_collect(key, h.settings.collect_lease_s, now):
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
    if h.registry.save(record):  # refused: written since it was read (collected, closed)
        h.registry.schedule_poll(key, now + poll_delay_s(h.settings, record.polls))


def hedge(h: BatchHandles, record: BatchRecord, now: float) -> int:
    """Re-route, before they miss, the requests of a batch that is running late."""
    options = h.options(now)
    info = ErrorInfo(
        code="hedged",
        message=(
            f"batch {record.batch_id or record.key} still {record.last_status or record.state}"
            " near the deadline; re-routed"
        ),
        retryable=True,
    )
    moved = 0
    hedged: list[tuple[str, float]] = []  # (id, deadline) sent back to their lanes
    for m in record.requests():
        late = should_hedge(m.deadline, now, options, endpoint=record.endpoint, model=record.model)
        state = requeue(h, m.id, m.token, info) if late else None
        moved += state is not None
        if state is State.QUEUED:  # judged once it finishes: how often hedges meet deadlines
            hedged.append((m.id, m.deadline))
    HedgeStore.of(h.store).hedged(record.provider, record.model, hedged, now)
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
