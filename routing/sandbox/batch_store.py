"""The sandbox's batches, of both protocols, over time: create, read, cancel, list and end them.

Free of starlette, like ``state.py``, so it can be driven and tested without HTTP. Handlers pass
in the sandbox time and the knobs, and get back records or
:class:`~routing.sandbox.batch_records.BatchRequestError`, which the HTTP layer renders in the
provider's error shape. A batch's results are written once, the first time anyone looks after
it ended (any call to the store does), so files and counts appear exactly as the batch's plan
says they should, whatever order clients poll in. What each protocol's objects and result files
look like is in ``batch_openai`` and ``batch_anthropic``; the files are ``file_store``'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from routing.sandbox import answers
from routing.sandbox.batch_anthropic import (
    ANTHROPIC_RESULTS_RETENTION_S,
    anthropic_batch_object,
    anthropic_lines,
    anthropic_results,
)
from routing.sandbox.batch_openai import openai_batch_object, openai_results, parse_openai_input
from routing.sandbox.batch_plan import (
    ANTHROPIC_CANCELLABLE,
    FINALIZING_SHARE,
    OPENAI_CANCELLABLE,
    TERMINAL_PHASES,
    Phase,
    finish_ranks,
    line_fault,
    plan_batch,
)
from routing.sandbox.batch_records import (
    RESULT_KINDS,
    BatchLine,
    BatchRequestError,
    Page,
    Protocol,
    SandboxBatch,
    jsonl_bytes,
    not_found,
)
from routing.sandbox.file_store import FILE_RETENTION_S, FileStore
from routing.sandbox.knobs import Knobs


class BatchStore(FileStore):
    """Every batch of one sandbox, beside its files and behind the same lock."""

    def __init__(self) -> None:
        super().__init__()
        self._batches: dict[str, SandboxBatch] = {}
        self._pending: set[str] = set()
        self._attempts: Counter[tuple[Protocol, str]] = Counter()
        self._created: Counter[Protocol] = Counter()
        self._lines_run: Counter[Protocol] = Counter()
        self._results: Counter[str] = Counter()

    def _clear(self) -> None:
        """Every file, batch and counter, and the attempts behind transient line faults."""
        super()._clear()
        for table in (
            self._batches,
            self._attempts,
            self._created,
            self._lines_run,
            self._results,
        ):
            table.clear()
        self._pending.clear()

    # --- creating batches -----------------------------------------------------------------

    def _with_faults(
        self, protocol: Protocol, lines: Sequence[BatchLine], knobs: Knobs
    ) -> list[BatchLine]:
        faulted = []
        for line in lines:
            attempt = self._attempts[(protocol, line.custom_id)]
            self._attempts[(protocol, line.custom_id)] += 1
            fault = line_fault(knobs.seed, line.custom_id, attempt, knobs.batch_line_fail_rate)
            faulted.append(BatchLine(line.custom_id, line.body, fault, line.invalid))
        return faulted

    def _register(self, batch: SandboxBatch, now: float) -> None:
        self._batches[batch.id] = batch
        self._pending.add(batch.id)
        self._created[batch.protocol] += 1
        self._advance(now)

    def create_openai(
        self,
        now: float,
        knobs: Knobs,
        *,
        input_file_id: str,
        endpoint: str,
        metadata: dict[str, str] | None,
        output_expires_after_s: float | None,
    ) -> dict[str, Any]:
        """Create an OpenAI batch; its input is checked now, and a bad one fails it after
        ``batch_validating_s``, as OpenAI reports validation errors on the batch, not the call.
        """
        with self._lock:
            self._advance(now)
            source = self._files.get(input_file_id)
            if source is None:
                raise BatchRequestError(
                    400,
                    f"Invalid 'input_file_id': no file with id {input_file_id!r}.",
                    param="input_file_id",
                )
            if source.purpose != "batch":
                raise BatchRequestError(
                    400,
                    f"Invalid 'input_file_id': file {input_file_id!r} has purpose "
                    f"{source.purpose!r}, but a batch needs a file uploaded with purpose 'batch'.",
                    param="input_file_id",
                )
            lines, errors = parse_openai_input(source.content, endpoint)
            batch_id, seq = self._issue("batch_")
            failed = bool(errors)
            lines = [] if failed else self._with_faults("openai", lines, knobs)
            plan = plan_batch(
                created_at=now,
                ranks=finish_ranks(batch_id, [line.custom_id for line in lines]),
                knobs=knobs,
                validating_s=knobs.batch_validating_s,
                finalizing_share=FINALIZING_SHARE,
                failed=failed,
            )
            batch = SandboxBatch(
                id=batch_id,
                seq=seq,
                protocol="openai",
                endpoint=endpoint,
                lines=lines,
                plan=plan,
                input_file_id=input_file_id,
                metadata=metadata,
                model=str(lines[0].body["model"]) if lines else None,
                errors=errors,
                output_expires_after_s=output_expires_after_s,
            )
            self._register(batch, now)
            return openai_batch_object(batch, now)

    def create_anthropic(
        self,
        now: float,
        knobs: Knobs,
        requests: Sequence[tuple[str, Mapping[str, Any]]],
        base_url: str,
    ) -> dict[str, Any]:
        """Create a Message Batch; bad params error per request at the end, as Anthropic's do."""
        with self._lock:
            self._advance(now)
            batch_id, seq = self._issue("msgbatch_")
            lines = self._with_faults("anthropic", anthropic_lines(requests), knobs)
            plan = plan_batch(
                created_at=now,
                ranks=finish_ranks(batch_id, [line.custom_id for line in lines]),
                knobs=knobs,
                validating_s=0.0,
                finalizing_share=0.0,
            )
            batch = SandboxBatch(
                id=batch_id,
                seq=seq,
                protocol="anthropic",
                endpoint=answers.MESSAGES,
                lines=lines,
                plan=plan,
            )
            self._register(batch, now)
            return anthropic_batch_object(batch, now, base_url)

    # --- reading and changing batches -----------------------------------------------------

    def _batch(self, protocol: Protocol, batch_id: str) -> SandboxBatch:
        batch = self._batches.get(batch_id)
        if batch is None or batch.protocol != protocol:
            raise not_found("Batch" if protocol == "openai" else "Message Batch", batch_id)
        return batch

    def _render(self, batch: SandboxBatch, now: float, base_url: str) -> dict[str, Any]:
        if batch.protocol == "openai":
            return openai_batch_object(batch, now)
        return anthropic_batch_object(batch, now, base_url)

    def batch_object(
        self, protocol: Protocol, now: float, batch_id: str, base_url: str = ""
    ) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            return self._render(self._batch(protocol, batch_id), now, base_url)

    def cancel(
        self, protocol: Protocol, now: float, batch_id: str, base_url: str = ""
    ) -> dict[str, Any]:
        """Start cancelling: lines that ran by now keep their results, the rest are cancelled.

        Cancelling a batch already cancelling answers it unchanged. Any other phase outside
        ``OPENAI_CANCELLABLE``/``ANTHROPIC_CANCELLABLE`` is refused with a 400, which no SDK
        retries (a 409 would be retried).
        """
        with self._lock:
            self._advance(now)
            batch = self._batch(protocol, batch_id)
            phase = batch.phase(now)
            cancellable = OPENAI_CANCELLABLE if protocol == "openai" else ANTHROPIC_CANCELLABLE
            if phase in cancellable:
                batch.plan = batch.plan.cancelled(now)
                self._advance(now)
            elif phase != Phase.CANCELLING:
                shown = phase.value if protocol == "openai" else "ended"
                raise BatchRequestError(400, f"Cannot cancel a batch with status '{shown}'.")
            return self._render(batch, now, base_url)

    def _ended(self, now: float, batch_id: str, refusal: str) -> SandboxBatch:
        """The Message Batch ``batch_id`` once it has ended; before, a 400 saying ``refusal``."""
        self._advance(now)
        batch = self._batch("anthropic", batch_id)
        if batch.phase(now) not in TERMINAL_PHASES:
            raise BatchRequestError(400, f"Message Batch {batch_id} {refusal}")
        return batch

    def delete_anthropic(self, now: float, batch_id: str) -> dict[str, Any]:
        with self._lock:
            self._ended(
                now,
                batch_id,
                "is still processing; cancel it and wait for it to end before deleting it.",
            )
            del self._batches[batch_id]
            return {"id": batch_id, "type": "message_batch_deleted"}

    def anthropic_results(self, now: float, batch_id: str) -> bytes:
        with self._lock:
            batch = self._ended(now, batch_id, "has not ended yet; its results are not available.")
            if now >= batch.plan.created_at + ANTHROPIC_RESULTS_RETENTION_S:
                raise BatchRequestError(
                    404,
                    f"The results of Message Batch {batch_id} were archived 29 days after "
                    "its creation.",
                )
            return batch.results

    def list_batches(
        self,
        protocol: Protocol,
        now: float,
        *,
        limit: int,
        after: str | None = None,
        before: str | None = None,
        base_url: str = "",
    ) -> Page:
        """A page of batches, newest first: ``after`` pages to older ones, ``before`` to newer."""
        with self._lock:
            self._advance(now)
            batches = sorted(
                (b for b in self._batches.values() if b.protocol == protocol),
                key=lambda b: b.seq,
                reverse=True,
            )
            if after is not None:
                cursor = self._cursor(after, "after_id" if protocol == "anthropic" else "after")
                older = [b for b in batches if b.seq < cursor]
                chosen, has_more = older[:limit], len(older) > limit
            elif before is not None:
                cursor = self._cursor(before, "before_id")
                newer = [b for b in batches if b.seq > cursor]
                chosen, has_more = newer[-limit:], len(newer) > limit
            else:
                chosen, has_more = batches[:limit], len(batches) > limit
            return Page([self._render(b, now, base_url) for b in chosen], has_more)

    # --- ending batches -------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Write the results of every batch that has ended by ``now`` and has none yet."""
        for batch_id in sorted(self._pending, key=lambda i: self._order[i]):
            batch = self._batches.get(batch_id)
            if batch is None:
                self._pending.discard(batch_id)
                continue
            phase = batch.phase(now)
            if phase in TERMINAL_PHASES:
                self._finish(batch, phase)
                self._pending.discard(batch_id)

    def _finish(self, batch: SandboxBatch, phase: Phase) -> None:
        ended_at = batch.plan.ended_at
        assert ended_at is not None
        if phase == Phase.FAILED:
            return
        if batch.protocol == "openai":
            results = openai_results(batch, phase, ended_at)
            batch.output_file_id = self._output_file(batch, "output", results.output, ended_at)
            batch.error_file_id = self._output_file(batch, "error", results.errors, ended_at)
            batch.usage = {
                "input_tokens": results.input_tokens,
                "output_tokens": results.output_tokens,
            }
            counts = results.counts
        else:
            records, counts = anthropic_results(batch, phase, ended_at)
            batch.results = jsonl_bytes(records)
        batch.result_counts = counts
        self._lines_run[batch.protocol] += counts["succeeded"] + counts["errored"]
        self._results.update(counts)

    def _output_file(
        self, batch: SandboxBatch, kind: str, records: list[dict[str, Any]], ended_at: float
    ) -> str | None:
        """An output or error file, or None when it would be empty (OpenAI leaves the id null)."""
        if not records:
            return None
        retention_s = batch.output_expires_after_s or FILE_RETENTION_S
        name = f"{batch.id}_{kind}.jsonl"
        return self._keep(name, "batch_output", ended_at, retention_s, jsonl_bytes(records)).id

    def stats(self, now: float) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            running = Counter(
                self._batches[i].protocol for i in self._pending if i in self._batches
            )
            protocols: tuple[Protocol, ...] = ("openai", "anthropic")
            return {
                "created": {p: self._created[p] for p in protocols},
                "running": {p: running[p] for p in protocols},
                "lines_processed": {p: self._lines_run[p] for p in protocols},
                # custom_ids sent in more than one batch: a request created twice, unless its
                # first line failed and it was retried
                "custom_ids_resent": sum(1 for n in self._attempts.values() if n > 1),
                "lines_by_result": {kind: self._results[kind] for kind in RESULT_KINDS},
                "files": len(self._files),
            }
