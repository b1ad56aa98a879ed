"""The micro-batcher: one loaded model, many requests, answers that never depend on neighbours.

``Engine.run(requests)`` is the whole contract: every request gets exactly one ``LocalAnswer``,
in order. Inside, a request goes through four steps:

1. **parse** (caller's thread): a body the model cannot serve (a chat body sent to an embedding
   model, empty input, strings mixed with token arrays, a bad knob) is answered at once with a
   per-request error; nothing about it reaches a batch.
2. **tokenise** (a tokenizer thread, in chunks taken in deadline order): text becomes ids, and
   an input over the model's limit is truncated and flagged, or refused, per the models table.
   Because the chunks after the first are tokenised while the device runs the batch before, the
   forward pass never waits for the tokenizer except at the very start.
3. **pack** (``gpu_worker.packer``): the waiting inputs of *every* ``run`` call in flight form
   one pool, packed earliest deadline first with length bucketing under the token budget.
4. **forward and postprocess**: one thread at a time drives the device (the *leader*: whichever
   caller has work waiting and finds no leader). It runs batches from the shared pool, so an
   urgent request handed to ``run`` on another thread joins the very next batch instead of
   waiting for a bulk ``run`` to finish, and it hands over when its own requests are answered.

A request cancelled meanwhile (``Engine.cancel``, called when its lease is lost) or past its
``drop_after`` is dropped from the pool before the batch it would join is formed: it is answered
409 ``cancelled`` or 408 ``deadline_exceeded`` and never costs device time. One already on the
device finishes with its batch.

On out-of-memory the batch is split in halves and each half retried, and the token budget drops
to half of what failed; each batch that then succeeds grows it back by 10 % up to the configured
``max_batch_tokens``. Any other failure of a batch is bisected the same way, so one poisonous
input fails alone with a 500 and the rest of its batch is served. Nothing is ever dropped.

``stats()`` is what the worker publishes for the route choice: measured throughput while busy,
padding, queue wait, and the backlog, so it can judge whether a deadline still fits.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from gpu_worker.backends import load_backend
from gpu_worker.backends.base import Job, Piece
from gpu_worker.config import ModelSpec
from gpu_worker.errors import ConfigError, RequestError
from gpu_worker.packer import Item, pack
from gpu_worker.work import (
    BatchReport,
    ErrorBody,
    LocalAnswer,
    LocalRequest,
    _Call,
    _Slot,
    _Ticket,
)

__all__ = ["BatchReport", "Engine", "ErrorBody", "LocalAnswer", "LocalRequest"]

log = logging.getLogger(__name__)

GROWTH = 1.10
"""After an out-of-memory, each clean batch grows the budget by this factor, up to the max."""
STATS_WINDOW = 256
"""Batches (and queue waits, times four) that ``stats()`` averages over."""


class Engine:
    """One model, loaded and warmed once, serving ``run`` calls from any number of threads."""

    def __init__(
        self,
        spec: ModelSpec,
        device: torch.device,
        *,
        simulate_oom_above_tokens: int | None = None,
        admit_chunk: int | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
        warmup: bool = True,
    ) -> None:
        """``simulate_oom_above_tokens`` raises CUDA's out-of-memory error for any batch whose
        padded tokens exceed it, before the forward pass: the split-and-retry path then runs
        exactly as for a real one, on any device (tests, and drills on a real GPU).
        ``admit_chunk`` is how many inputs are tokenised at a time; ``on_batch`` is called, on
        the leading thread, after each micro-batch."""
        self.spec = spec
        self.device = device
        self.backend = load_backend(spec, device)
        self.max_batch_tokens = spec.max_batch_tokens
        self.simulate_oom_above_tokens = simulate_oom_above_tokens
        self.admit_chunk = admit_chunk or max(256, 2 * spec.max_batch_size)
        self.on_batch = on_batch
        self._cond = threading.Condition()
        self._pool: dict[Hashable, _Slot] = {}
        self._plan: deque[list[Item]] = deque()
        self._plan_stale = True
        self._leader = False
        self._keys = itertools.count()
        self._live: dict[str, list[_Ticket]] = {}
        self._reset_stats()
        if warmup:
            self._warm()

    # -- the contract ---------------------------------------------------------------------------

    def run(self, requests: Sequence[LocalRequest]) -> list[LocalAnswer]:
        """One answer per request, in order; errors are answers too, never exceptions."""
        call = _Call(left=len(requests))
        arrived = time.monotonic()
        tickets = [_Ticket(r, call, arrived) for r in requests]
        with self._cond:
            for ticket in tickets:
                self._live.setdefault(ticket.request.id, []).append(ticket)
        waiting: list[_Ticket] = []
        for ticket in tickets:
            try:
                ticket.job = self._parse(ticket.request)
                waiting.append(ticket)
            except RequestError as exc:
                self._finish(ticket, LocalAnswer.failed(ticket.request.id, exc))
        if waiting:
            waiting.sort(key=lambda t: (t.request.deadline, -t.request.priority))
            tokenizer = threading.Thread(
                target=self._admit, args=(waiting,), name="mixbatch-tokenize", daemon=True
            )
            tokenizer.start()
            try:
                self._drain(call)
            finally:
                tokenizer.join()
        with self._cond:
            for ticket in tickets:
                same = self._live.get(ticket.request.id, [])
                if ticket in same:
                    same.remove(ticket)
                if not same:
                    self._live.pop(ticket.request.id, None)
        answers = [t.answer for t in tickets]
        assert all(a is not None for a in answers), "every request is answered"
        return [a for a in answers if a is not None]

    def cancel(self, request_ids: Sequence[str]) -> int:
        """Drop these requests wherever they wait (tokenising, or in the pool): each is answered
        409 ``cancelled`` at once. A request already on the device finishes with its batch.
        Returns how many were dropped."""
        dropped = 0
        with self._cond:
            for rid in request_ids:
                for ticket in self._live.get(rid, []):
                    if ticket.answer is None and not ticket.cancelled:
                        ticket.cancelled = True
                        dropped += 1
            if dropped:
                self._drop_waiting(time.time())
                self._cond.notify_all()
        return dropped

    def _drop_waiting(self, now: float) -> int:
        """Answer and remove every pool slot whose request was cancelled or is past its
        ``drop_after`` (under the lock); the plan is made again without them."""
        gone = [
            key
            for key, slot in self._pool.items()
            if slot.ticket.cancelled or slot.ticket.request.drop_after <= now
        ]
        for key in gone:
            ticket = self._pool.pop(key).ticket
            if ticket.answer is None:
                self._finish(ticket, self._dropped(ticket))
        if gone:
            self._plan_stale = True
            self._totals["dropped"] += len(gone)
            self._cond.notify_all()  # a caller whose last request this was stops waiting
        return len(gone)

    @staticmethod
    def dropped_answer(request_id: str, *, cancelled: bool = True) -> LocalAnswer:
        """The answer of a request dropped before the device: 409 cancelled, 408 expired."""
        if cancelled:
            exc = RequestError(
                "cancelled", "cancelled before it reached the device", status_code=409
            )
        else:
            exc = RequestError(
                "deadline_exceeded",
                "past its deadline before it reached the device",
                status_code=408,
            )
        return LocalAnswer.failed(request_id, exc)

    def _dropped(self, ticket: _Ticket) -> LocalAnswer:
        return self.dropped_answer(ticket.request.id, cancelled=ticket.cancelled)

    def stats(self) -> dict[str, Any]:
        """Measured over the last batches: what the worker publishes for the route choice.

        Rates are per second *busy* (time in forward passes), so they say what the model can do,
        not how loaded it happened to be; ``None`` until a batch has run.
        """
        with self._cond:
            records = list(self._records)
            waits = list(self._waits)
            pending = len(self._pool)
            pending_tokens = sum(s.piece.cost for s in self._pool.values())
            budget = self.max_batch_tokens
            totals = dict(self._totals)
        busy = sum(r.busy_s for r in records)
        padded = sum(r.padded for r in records)
        ordered = sorted(waits)

        def rate(amount: float) -> float | None:
            return amount / busy if busy > 0 else None

        return {
            "model": self.spec.name,
            "kind": self.spec.kind,
            "device": str(self.device),
            "dtype": str(self.backend.dtype).removeprefix("torch."),
            "texts_per_s": rate(sum(r.items for r in records)),
            "tokens_per_s": rate(sum(r.tokens for r in records)),
            "output_tokens_per_s": rate(sum(r.output_tokens for r in records)),
            "padding_fraction": 1 - sum(r.tokens for r in records) / padded if padded else None,
            "queue_wait_s": statistics.fmean(waits) if waits else None,
            "queue_wait_p95_s": ordered[int(0.95 * (len(ordered) - 1))] if ordered else None,
            "pending_items": pending,
            "pending_tokens": pending_tokens,
            "max_batch_tokens": budget,
            "max_batch_tokens_configured": self.spec.max_batch_tokens,
            "max_batch_size": self.spec.max_batch_size,
            **totals,
            "measured_at": time.time(),
        }

    # -- parse and tokenise ---------------------------------------------------------------------

    def _parse(self, request: LocalRequest) -> Job:
        """The request checked; anything the backend trips over in a body is the body's fault
        (a chat template refusing a role order, say), so it is a 400 naming the cause."""
        if math.isnan(request.deadline):
            raise RequestError("invalid_request", "deadline: not a number", field="deadline")
        self.backend.check_endpoint(request.endpoint)
        try:
            return self.backend.parse(request.body)
        except RequestError:
            raise
        except Exception as exc:
            log.warning("request %s: body not understood", request.id, exc_info=True)
            raise RequestError("invalid_request", f"{type(exc).__name__}: {exc}") from None

    def _admit(self, tickets: list[_Ticket]) -> None:
        """Tokenise in chunks, most urgent first, adding each chunk to the pool as it is ready."""
        try:
            chunk: list[_Ticket] = []
            size = 0
            for ticket in tickets:
                assert ticket.job is not None
                chunk.append(ticket)
                size += ticket.job.n_inputs
                if size >= self.admit_chunk:
                    self._admit_chunk(chunk)
                    chunk, size = [], 0
            if chunk:
                self._admit_chunk(chunk)
        except Exception as exc:  # a caller waiting on these tickets must not wait forever
            log.exception("admitting %d requests failed", len(tickets))
            failure = RequestError("internal_error", f"admission failed: {exc}", status_code=500)
            with self._cond:
                for ticket in tickets:
                    if not ticket.pieces:
                        self._finish(ticket, LocalAnswer.failed(ticket.request.id, failure))
                self._cond.notify_all()

    def _admit_chunk(self, chunk: list[_Ticket]) -> None:
        jobs = [t.job for t in chunk if t.job is not None]
        try:
            outcomes = self.backend.tokenize(jobs)
        except Exception as exc:  # the chunk's requests must still be answered
            log.exception("tokenizing %d requests failed", len(chunk))
            failure = RequestError("internal_error", f"tokenizing failed: {exc}", status_code=500)
            outcomes = [failure] * len(chunk)
        now = time.time()
        with self._cond:
            for ticket, outcome in zip(chunk, outcomes, strict=True):
                if ticket.answer is not None:
                    continue
                if ticket.cancelled or ticket.request.drop_after <= now:
                    self._finish(ticket, self._dropped(ticket))
                    self._totals["dropped"] += 1
                    continue
                if isinstance(outcome, RequestError):
                    self._finish(ticket, LocalAnswer.failed(ticket.request.id, outcome))
                    continue
                ticket.pieces = outcome
                ticket.results = [None] * len(outcome)
                ticket.remaining = len(outcome)
                request = ticket.request
                for index, piece in enumerate(outcome):
                    key = next(self._keys)
                    item = Item(key, request.lane, request.deadline, piece.cost, request.priority)
                    self._pool[key] = _Slot(ticket, index, piece, item)
            self._plan_stale = True
            self._cond.notify_all()

    # -- pack and lead --------------------------------------------------------------------------

    def _drain(self, call: _Call) -> None:
        """Wait for this call's answers, leading the device whenever no one else does."""
        while True:
            with self._cond:
                while call.left and (self._leader or not self._pool):
                    self._cond.wait()
                if not call.left:
                    return
                self._leader = True
            try:
                self._lead(call)
            finally:
                with self._cond:
                    self._leader = False
                    self._cond.notify_all()

    def _lead(self, call: _Call) -> None:
        while True:
            with self._cond:
                if not call.left:
                    return
                slots = self._take()
            if not slots:
                return
            self._execute(slots)

    def _take(self) -> list[_Slot]:
        """The next batch of the plan; re-planned when the pool or the budget has changed.
        Cancelled and expired requests leave the pool first: they never reach the device."""
        self._drop_waiting(time.time())
        if self._plan_stale or not self._plan:
            items = [slot.item for slot in self._pool.values()]
            self._plan = deque(
                pack(
                    items,
                    max_batch_tokens=self.max_batch_tokens,
                    max_batch_size=self.spec.max_batch_size,
                    now=time.time(),
                )
            )
            self._plan_stale = False
        if not self._plan:
            return []
        return [self._pool.pop(item.id) for item in self._plan.popleft()]

    # -- forward and postprocess ----------------------------------------------------------------

    def _execute(self, slots: list[_Slot]) -> None:
        started = time.monotonic()
        ooms_before = self._totals["oom_events"]
        results = self._compute([s.piece for s in slots])
        busy = time.monotonic() - started
        finished: list[tuple[_Ticket, LocalAnswer]] = []
        for slot, result in zip(slots, results, strict=True):
            ticket = slot.ticket
            if ticket.answer is not None or ticket.remaining == 0:
                continue
            if isinstance(result, RequestError):
                ticket.remaining = 0
                finished.append((ticket, LocalAnswer.failed(ticket.request.id, result)))
                continue
            ticket.results[slot.index] = result
            ticket.remaining -= 1
            if ticket.remaining == 0:
                finished.append((ticket, self._answer(ticket)))
        lengths = [len(s.piece.ids) for s in slots]
        record = BatchReport(
            request_ids=tuple(s.ticket.request.id for s in slots),
            items=len(slots),
            tokens=sum(lengths),
            padded=max(lengths) * len(lengths),
            output_tokens=self.backend.output_tokens(
                [r for r in results if not isinstance(r, RequestError)]
            ),
            busy_s=busy,
        )
        with self._cond:
            for ticket, answer in finished:
                self._finish(ticket, answer)
            self._waits.extend(started - s.ticket.arrived for s in slots)
            self._records.append(record)
            self._totals["batches"] += 1
            self._totals["items"] += len(slots)
            self._totals["tokens"] += record.tokens
            self._totals["padded_tokens"] += record.padded
            if (
                self._totals["oom_events"] == ooms_before
                and self.max_batch_tokens < self.spec.max_batch_tokens
            ):
                self.max_batch_tokens = min(
                    self.spec.max_batch_tokens, math.ceil(self.max_batch_tokens * GROWTH)
                )
                self._plan_stale = True
            self._cond.notify_all()
        if self.on_batch is not None:
            try:
                self.on_batch(record)
            except Exception:  # an observer must not cost anyone an answer
                log.exception("on_batch failed")

    def _compute(self, pieces: list[Piece]) -> list[Any]:
        """Results per piece; a failing batch is split in halves until the failure is isolated."""
        try:
            return self._forward(pieces)
        except torch.cuda.OutOfMemoryError:
            self._on_oom(pieces)
            if len(pieces) == 1:
                return [
                    RequestError(
                        "out_of_memory",
                        f"one input of {pieces[0].cost} tokens does not fit in device memory",
                        status_code=503,
                    )
                ]
        except Exception as exc:
            if len(pieces) > 1:
                log.warning("a batch of %d failed (%r): bisecting", len(pieces), exc)
            else:
                log.exception("an input failed alone")
                return [
                    RequestError("internal_error", f"{type(exc).__name__}: {exc}", status_code=500)
                ]
        half = len(pieces) // 2
        return self._compute(pieces[:half]) + self._compute(pieces[half:])

    def _forward(self, pieces: list[Piece]) -> list[Any]:
        padded = max(p.cost for p in pieces) * len(pieces)
        limit = self.simulate_oom_above_tokens
        if limit is not None and padded > limit:
            raise torch.cuda.OutOfMemoryError(f"simulated: {padded} padded tokens > {limit}")
        batch = self.backend.collate(pieces)
        output = self.backend.forward(batch)
        return self.backend.postprocess(output, batch)

    def _on_oom(self, pieces: list[Piece]) -> None:
        padded = max(p.cost for p in pieces) * len(pieces)
        with self._cond:
            self.max_batch_tokens = max(1, min(self.max_batch_tokens, padded // 2))
            self._plan_stale = True
            self._totals["oom_events"] += 1
        log.warning(
            "out of memory on %d inputs (%d padded tokens): splitting, budget now %d",
            len(pieces),
            padded,
            self.max_batch_tokens,
        )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _answer(self, ticket: _Ticket) -> LocalAnswer:
        assert ticket.job is not None
        try:
            body = self.backend.answer(ticket.job, ticket.pieces, ticket.results)
        except Exception as exc:
            log.exception("assembling the answer of %s failed", ticket.request.id)
            error = RequestError("internal_error", f"{type(exc).__name__}: {exc}", status_code=500)
            return LocalAnswer.failed(ticket.request.id, error)
        truncated = any(p.truncated for p in ticket.pieces)
        return LocalAnswer(ticket.request.id, 200, body, None, truncated)

    def _finish(self, ticket: _Ticket, answer: LocalAnswer) -> None:
        if ticket.answer is None:
            ticket.answer = answer
            ticket.call.left -= 1

    # -- once per process -----------------------------------------------------------------------

    def _warm(self) -> None:
        """One real request through every step, so the first caller does not pay for lazy init."""
        body = self.backend.warmup_body()
        (answer,) = self.run([LocalRequest("warmup", self.backend.endpoint, body)])
        if not answer.ok:
            raise ConfigError(f"model {self.spec.name!r} failed its warm-up: {answer.error}")
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._records: deque[BatchReport] = deque(maxlen=STATS_WINDOW)
        self._waits: deque[float] = deque(maxlen=4 * STATS_WINDOW)
        self._totals = {
            "batches": 0,
            "items": 0,
            "tokens": 0,
            "padded_tokens": 0,
            "oom_events": 0,
            "dropped": 0,
        }
