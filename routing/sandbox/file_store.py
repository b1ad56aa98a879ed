"""The sandbox's OpenAI Files: uploads, batches' output and error files, and the ids of both.

``FileStore`` holds the lock, the id sequence and the files; ``batch_store.BatchStore`` extends
it with batches, whose results are written here as files. Ids are ordered by a sequence number
that outlives deletion, so a listing cursor naming a deleted object still pages from where it
stood.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from routing.sandbox.batch_openai import unix_s
from routing.sandbox.batch_records import BatchRequestError, Page, new_id, not_found

FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
FILE_RETENTION_S = 30 * 24 * 3600
CONTENT_CHUNK_BYTES = 64 * 1024


def chunked(content: bytes) -> Iterator[bytes]:
    """Stored bytes in pieces, so a large results file is streamed rather than sent whole."""
    for start in range(0, len(content), CONTENT_CHUNK_BYTES):
        yield content[start : start + CONTENT_CHUNK_BYTES]


@dataclass
class StoredFile:
    """An OpenAI file: an uploaded batch input, or a batch's output or error file."""

    id: str
    seq: int
    filename: str
    purpose: str
    created_at: float
    expires_at: float | None
    content: bytes

    def to_object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": unix_s(self.created_at),
            "expires_at": unix_s(self.expires_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class FileStore:
    """Every file of one sandbox behind one lock: handlers run on the server's event loop while
    ``stats`` is read from the test's or demo's thread.

    Every public call first brings the store up to ``now`` (``_advance``), so a batch that has
    ended by then has its output files here whichever call looks first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._order: dict[str, int] = {}
        self._files: dict[str, StoredFile] = {}

    def reset(self) -> None:
        """Forget everything the store holds."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._order.clear()
        self._files.clear()

    def _advance(self, now: float) -> None:
        """Write whatever has come due by ``now``; files alone have nothing due."""

    def _issue(self, prefix: str) -> tuple[str, int]:
        object_id, seq = new_id(prefix), next(self._seq)
        self._order[object_id] = seq
        return object_id, seq

    def _keep(
        self,
        filename: str,
        purpose: str,
        created_at: float,
        expires_after_s: float | None,
        content: bytes,
    ) -> StoredFile:
        file_id, seq = self._issue("file-")
        expires_at = None if expires_after_s is None else created_at + expires_after_s
        stored = StoredFile(file_id, seq, filename, purpose, created_at, expires_at, content)
        self._files[file_id] = stored
        return stored

    def add_file(
        self,
        now: float,
        *,
        filename: str,
        purpose: str,
        content: bytes,
        expires_after_s: float | None,
    ) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            if expires_after_s is None and purpose == "batch":
                expires_after_s = FILE_RETENTION_S
            return self._keep(filename, purpose, now, expires_after_s, content).to_object()

    def _file(self, file_id: str) -> StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            raise not_found("File", file_id)
        return stored

    def file_object(self, now: float, file_id: str) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            return self._file(file_id).to_object()

    def file_content(self, now: float, file_id: str) -> StoredFile:
        """The stored file; its bytes never change, so it can be streamed outside the lock."""
        with self._lock:
            self._advance(now)
            return self._file(file_id)

    def delete_file(self, now: float, file_id: str) -> dict[str, Any]:
        with self._lock:
            self._advance(now)
            self._file(file_id)
            del self._files[file_id]
            return {"id": file_id, "object": "file", "deleted": True}

    def list_files(
        self, now: float, *, after: str | None, limit: int, order: str, purpose: str | None
    ) -> Page:
        with self._lock:
            self._advance(now)
            files = [f for f in self._files.values() if purpose is None or f.purpose == purpose]
            descending = order == "desc"
            files.sort(key=lambda f: f.seq, reverse=descending)
            if after is not None:
                cursor = self._cursor(after, "after")
                files = [f for f in files if (f.seq < cursor if descending else f.seq > cursor)]
            return Page([f.to_object() for f in files[:limit]], len(files) > limit)

    def _cursor(self, object_id: str, param: str) -> int:
        seq = self._order.get(object_id)
        if seq is None:
            raise BatchRequestError(
                400, f"Invalid '{param}': no object with id {object_id!r}.", param=param
            )
        return seq
