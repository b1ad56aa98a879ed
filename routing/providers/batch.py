"""The seam between mixbatch and a provider's batch API: one interface, two wire protocols.

``BatchAdapter`` is what the batch route's steps call; they never learn whether OpenAI's Files +
Batch API or Anthropic's Message Batches is behind it. Its public verbs do the bookkeeping
(checking a file against the account's caps, following pages, restarting a broken download,
normalising statuses to ``routing.providers.batch_jobs``); the retries are
``routing.providers.batch_http``'s; a protocol subclass only says which paths to hit and how to
read the replies. Its input file is written by ``write_input``, framed for its protocol.

Idempotence: a create is retried only when it certainly created nothing (an error reply, or a
connection never made); a create whose reply was lost raises at once, retryable, with a note,
because the batch may exist: the caller then runs ``find_orphan`` before creating again.
``find_orphan`` adopts only a batch that carries our tag (where the protocol keeps metadata)
and exactly our custom_ids, read from the batch itself (OpenAI: its input file; Anthropic: its
results, once it ended), so a batch of someone else's of the same size is never taken for ours.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import math
from collections.abc import Callable, Collection, Iterator
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from routing.decide.planner import PlannedBatch, body_bytes, line_frame
from routing.errors import ConfigError, InvalidRequest, MalformedInput, ProviderError
from routing.jsonl import loads
from routing.models import Endpoint, Prepared
from routing.providers.base import ProviderAccount
from routing.providers.batch_http import BatchTransport
from routing.providers.batch_jobs import BatchJob, BatchStatus, LineResult, OrphanSearch
from routing.providers.capabilities import ProviderCapabilities

__all__ = ["BatchAdapter", "batch_adapter_class", "batch_adapter_for"]

logger = logging.getLogger(__name__)


class BatchAdapter(BatchTransport):
    """One provider account's batch API. Public verbs do bookkeeping; subclasses do the wire.

    ``transport`` (client, retry policy and budget, sleep, clock, rng) goes to
    ``BatchTransport``.
    """

    route_name: ClassVar[str] = "batch"
    page_limit_max: ClassVar[int] = 100

    def __init__(
        self, account: ProviderAccount, capabilities: ProviderCapabilities, **transport: Any
    ) -> None:
        if account.kind != self.kind or capabilities.protocol != self.kind:
            raise ConfigError(
                f"{type(self).__name__} speaks the {self.kind!r} protocol, but account "
                f"{account.name!r} is {account.kind!r} and its capabilities say "
                f"{capabilities.protocol!r}; use batch_adapter_for(account, capabilities)"
            )
        capabilities.require_batch()
        super().__init__(account, **transport)
        self.capabilities = capabilities

    # -- the wire, per protocol ------------------------------------------------------------

    @abc.abstractmethod
    def _create(
        self, path: Path, endpoint: Endpoint, model: str, metadata: dict[str, str], window: str
    ) -> tuple[BatchJob, str | None]:
        """Submit; returns the batch and the provider's request id of the creating call."""
        ...

    @abc.abstractmethod
    def _batch_path(self, batch_id: str) -> str: ...

    @abc.abstractmethod
    def _job(self, obj: dict[str, Any]) -> BatchJob: ...

    @abc.abstractmethod
    def _list_page(
        self, limit: int, cursor: dict[str, str] | None
    ) -> tuple[list[BatchJob], dict[str, str] | None]:
        """One page of batches, newest first, and the query of the next page (None: last)."""
        ...

    @abc.abstractmethod
    def _result_paths(self, job: BatchJob) -> list[str]: ...

    @abc.abstractmethod
    def _line_result(self, obj: dict[str, Any]) -> LineResult | None: ...

    @abc.abstractmethod
    def _delete(self, job: BatchJob) -> None: ...

    @abc.abstractmethod
    def _orphan_candidate(self, job: BatchJob, key: str, value: str, total: int) -> bool:
        """Whether ``job`` may be the orphan, from its listing alone (tag, size)."""
        ...

    @abc.abstractmethod
    def _custom_id_paths(self, job: BatchJob) -> list[str] | None:
        """Where the batch's custom_ids can be read (lines with a ``custom_id``), or None
        while the provider does not show them yet."""
        ...

    # -- public verbs ----------------------------------------------------------------------

    @classmethod
    def write_input(
        cls, batch: PlannedBatch, lookup: Callable[[str], Prepared], fh: BinaryIO
    ) -> int:
        """Stream a planned batch's input file, the one ``create`` takes, into ``fh``.

        One line per ``fanout`` entry, in order; ``lookup`` gives the stored request for an id,
        and only the first id of each entry is looked up, since its body is sent for all of
        them. Lines are framed by ``line_frame`` of this protocol, so the bytes are the ones
        the planner counted. Returns the bytes written.
        """
        if batch.protocol != cls.kind:
            raise ValueError(f"batch {batch.key} is an {batch.protocol} batch, not {cls.kind}")
        head, middle, tail = line_frame(batch.protocol, batch.endpoint)
        written = 0
        for custom_id, ids in batch.fanout.items():
            body = body_bytes(lookup(ids[0]).body)
            line = b"".join((head, encode_basestring(custom_id).encode(), middle, body, tail))
            fh.write(line)
            written += len(line)
        return written

    def create(
        self,
        jsonl_path: Path | str,
        *,
        endpoint: Endpoint | str,
        model: str,
        metadata: dict[str, str] | None = None,
        window: str | None = None,
    ) -> BatchJob:
        """Submit the JSONL file at ``jsonl_path`` as one batch.

        The file is in the OpenAI batch input format, which every protocol takes, or in the
        one ``write_input`` writes for this protocol. It is checked against the account's caps
        first (lines, bytes, longest line) and streamed, never read whole. ``window`` defaults
        to the account's first window.
        Record the returned ``batch_id`` before anything else; see the module docstring for
        what a lost reply means.
        """
        path = Path(jsonl_path)
        if not path.is_file():
            raise InvalidRequest(f"{path} is not a readable file", field="jsonl_path")
        target = self.resolve_endpoint(endpoint)
        self.capabilities.require_model(model)
        chosen = self.capabilities.window(window)
        try:
            job, request_id = self._create(path, target, model, dict(metadata or {}), chosen)
        except ProviderError as exc:
            if exc.retryable and exc.status_code is None:
                exc.add_note(
                    "mixbatch: the batch may have been created; look for it with find_orphan "
                    "before creating it again"
                )
            raise
        logger.info(
            "%s created batch %s (%s) from %s",
            self.account.name,
            job.batch_id,
            job.raw_status,
            path.name,
            extra={
                "provider": self.account.name,
                "batch_id": job.batch_id,
                "provider_request_id": request_id,
                "endpoint": target.value,
                "model": model,
            },
        )
        return job

    def retrieve(self, batch_id: str) -> BatchJob:
        return self._job(self._json_object("GET", self._batch_path(batch_id)))

    def list(self, *, limit: int = 100, created_after: float | None = None) -> Iterator[BatchJob]:
        """Every batch of the account, newest first, following pages of ``limit`` each.

        With ``created_after`` (unix seconds) only batches created then or later; paging stops
        at the first page that reaches past it. Provider times are whole seconds, so the bound
        is rounded down.
        """
        size = max(1, min(limit, self.page_limit_max))
        floor = math.floor(created_after) if created_after is not None else None
        cursor: dict[str, str] | None = None
        while True:
            jobs, cursor = self._list_page(size, cursor)
            for job in jobs:
                if floor is None or job.created_at >= floor:
                    yield job
            if cursor is None or not jobs:
                return
            if floor is not None and min(job.created_at for job in jobs) < floor:
                return

    def cancel(self, batch_id: str) -> BatchJob:
        """Ask the provider to stop; the batch goes ``CANCELLING``, then ``CANCELLED``.

        A batch that ended before the cancel arrived is refused by the provider (a 400 or 409);
        that race is not an error for the caller, so the batch is returned as it ended.
        """
        if not self.capabilities.cancel:
            raise ProviderError(
                f"provider account {self.account.name!r} cannot cancel batches "
                "(cancel = false in its capabilities)",
                retryable=False,
            )
        try:
            return self._job(self._json_object("POST", self._batch_path(batch_id) + "/cancel"))
        except ProviderError as exc:
            if exc.status_code not in (400, 409):
                raise
            job = self.retrieve(batch_id)
            if not (job.terminal or job.status is BatchStatus.CANCELLING):
                raise
            logger.info(
                "%s batch %s is already %s; nothing to cancel",
                self.account.name,
                batch_id,
                job.status.value,
                extra={"provider": self.account.name, "batch_id": batch_id},
            )
            return job

    def results(self, job: BatchJob) -> Iterator[LineResult]:
        """Every line of a finished batch's results, streamed, in the provider's order.

        OpenAI: the output file, then the error file (both may exist; either may be missing).
        A download that breaks is started again and the lines already given are skipped, so a
        caller sees each line once. A line that is not JSON is logged and skipped: callers join
        on ``custom_id`` and must treat a request with no line as not run.
        """
        for path in self._result_paths(job):
            for number, text in self._stream_lines(path):
                try:
                    obj = loads(text)
                except ValueError:
                    obj = None
                result = self._line_result(obj) if isinstance(obj, dict) else None
                if result is None:
                    logger.error(
                        "%s batch %s: results line %d is not a result line; skipped",
                        self.account.name,
                        job.batch_id,
                        number,
                        extra={"provider": self.account.name, "batch_id": job.batch_id},
                    )
                    continue
                yield result

    def delete_inputs_outputs(self, job: BatchJob) -> None:
        """Remove what the provider keeps of a finished batch; already gone counts as done."""
        if not job.terminal:
            raise ProviderError(
                f"{self.account.name} batch {job.batch_id} is {job.status.value}: cancel it and "
                "wait for it to end before deleting its files",
                retryable=False,
            )
        self._delete(job)

    def find_orphan(
        self,
        metadata_key_value: tuple[str, str],
        *,
        custom_ids: Collection[str],
        created_after: float,
        exclude: Collection[str] = (),
    ) -> OrphanSearch:
        """The batch a create made but never recorded (a crash, a lost reply), if any.

        A candidate is a batch created at or after ``created_after``, not among ``exclude``
        (ids already recorded), that the protocol's listing allows: ``metadata[key] == value``
        where batches keep metadata (OpenAI), the request count where they do not (Anthropic).
        It is adopted only when its requests carry exactly ``custom_ids``; one whose requests
        cannot be read yet is returned as undecided. The oldest match wins.
        """
        key, value = metadata_key_value
        wanted = set(custom_ids)
        candidates = [
            job
            for job in self.list(created_after=created_after)
            if job.batch_id not in exclude and self._orphan_candidate(job, key, value, len(wanted))
        ]
        undecided: list[str] = []
        for job in sorted(candidates, key=lambda job: job.created_at):
            verdict = self._holds_exactly(job, wanted)
            if verdict is None:
                undecided.append(job.batch_id)
            elif verdict:
                return OrphanSearch(found=job)
            else:
                logger.info(
                    "%s batch %s matches %s=%s by its listing but not by its custom_ids",
                    self.account.name,
                    job.batch_id,
                    key,
                    value,
                    extra={"provider": self.account.name, "batch_id": job.batch_id},
                )
        return OrphanSearch(undecided=undecided)

    def _holds_exactly(self, job: BatchJob, wanted: set[str]) -> bool | None:
        """Whether the batch's requests are exactly ``wanted`` (None: not readable yet).

        Stops at the first custom_id that is not ours; a batch whose files are gone (404) is
        not ours to adopt.
        """
        paths = self._custom_id_paths(job)
        if paths is None:
            return None
        seen: set[str] = set()
        try:
            for path in paths:
                with contextlib.closing(self._stream_lines(path)) as lines:
                    for _, text in lines:
                        try:
                            obj = json.loads(text)
                        except ValueError:
                            return False
                        custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
                        if custom_id not in wanted or custom_id in seen:
                            return False
                        seen.add(custom_id)
        except ProviderError as exc:
            if exc.status_code == 404:
                return False
            raise
        return seen == wanted

    def _check_size(self, path: Path, lines: int, size: int, longest: int, longest_at: int) -> None:
        """Refuse a file over the account's caps: the planner should have split it."""
        cap = self.capabilities
        where = f"{path.name} for {self.account.name}"
        if lines == 0:
            raise InvalidRequest(f"{where}: the file holds no request lines", field="jsonl_path")
        if lines > cap.max_lines:
            raise InvalidRequest(
                f"{where}: {lines} lines, over max_lines {cap.max_lines}; split the batch",
                field="jsonl_path",
            )
        if size > cap.max_bytes:
            raise InvalidRequest(
                f"{where}: {size} bytes, over max_bytes {cap.max_bytes}; split the batch",
                field="jsonl_path",
            )
        if longest > cap.max_line_bytes:
            raise MalformedInput(
                f"{longest} bytes, over max_line_bytes {cap.max_line_bytes} of {self.account.name}",
                line=longest_at,
                source=path.name,
            )


def batch_adapter_class(protocol: str) -> type[BatchAdapter]:
    """The adapter class that speaks ``protocol``; its ``write_input`` writes that protocol's file."""
    from routing.providers.anthropic_batch import AnthropicBatchAdapter
    from routing.providers.bedrock_batch import BedrockBatchAdapter
    from routing.providers.gemini_batch import GeminiBatchAdapter
    from routing.providers.mistral_batch import MistralBatchAdapter
    from routing.providers.openai_batch import OpenAIBatchAdapter

    adapters: dict[str, type[BatchAdapter]] = {
        OpenAIBatchAdapter.kind: OpenAIBatchAdapter,
        AnthropicBatchAdapter.kind: AnthropicBatchAdapter,
        GeminiBatchAdapter.kind: GeminiBatchAdapter,
        BedrockBatchAdapter.kind: BedrockBatchAdapter,
        MistralBatchAdapter.kind: MistralBatchAdapter,
    }
    try:
        return adapters[protocol]
    except KeyError:
        raise ConfigError(
            f"no batch adapter speaks protocol {protocol!r} (protocols: {', '.join(adapters)})"
        ) from None


def batch_adapter_for(
    account: ProviderAccount, capabilities: ProviderCapabilities, **options: Any
) -> BatchAdapter:
    """The batch adapter for the account's protocol; ``options`` go to its constructor."""
    return batch_adapter_class(capabilities.protocol)(account, capabilities, **options)
