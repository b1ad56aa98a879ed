"""What the sandbox's Gemini, Bedrock and Mistral imitations share: routes, jobs and their clock.

Each of these providers has its own error shape and its own authentication header, so their
routes are built by :func:`native_route` rather than ``app.provider_route``: counted, delayed
and key-checked the same way, errors rendered by the protocol's ``render``. A job is a
:class:`NativeJob`: its lines, when it starts and ends on the sandbox clock, and how it ends
(finished, expired before it started, timed out part way, cancelled), fixed from the knobs when
it is created so a later knob change never rewrites it. Line answers keep the sandbox's answer
contract, and ``batch_line_fail_rate`` fails the same custom_ids as in the other protocols.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from routing.sandbox.batch_plan import line_fault
from routing.sandbox.knobs import Knobs
from routing.sandbox.state import SandboxState

__all__ = [
    "NativeError",
    "NativeJob",
    "NativeStore",
    "native_route",
    "native_store",
]


class NativeError(Exception):
    """An error answer of a native protocol; ``kind`` is the protocol's own error name."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        self.status = status
        self.message = message
        self.kind = kind
        super().__init__(message)


NativeHandler = Callable[[Request, SandboxState], Awaitable[Response | dict[str, Any]]]


def native_route(
    path: str,
    handler: NativeHandler,
    *,
    render: Callable[[NativeError], Response],
    has_key: Callable[[Request], bool],
    methods: Sequence[str] = ("POST",),
) -> Route:
    """A route of a native protocol: counted, delayed, key-checked, errors in its shape."""

    async def endpoint(request: Request) -> Response:
        state: SandboxState = request.app.state.sandbox
        state.record_call(path)
        try:
            await state.pause(state.latency_s(request.headers))
            if not has_key(request):
                raise NativeError(401, "an API key or signature is required (any works)")
            result = await handler(request, state)
        except NativeError as exc:
            return render(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        return JSONResponse(result) if isinstance(result, dict) else result

    return Route(path, endpoint, methods=list(methods), name=path)


@dataclass
class NativeJob:
    """One batch job on the sandbox clock.

    ``lines`` are (custom_id, body) in input order. The job starts at ``start`` and ends at
    ``end``; ``never_starts`` makes it wait until ``end`` and expire with nothing run;
    ``done_fraction`` below 1 ends it timed out with only that share of lines run.
    """

    protocol: str
    job_id: str
    model: str
    endpoint: str
    lines: list[tuple[str, dict[str, Any]]]
    created: float
    start: float
    end: float
    faults: dict[str, int | None]
    never_starts: bool = False
    done_fraction: float = 1.0
    cancelled_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def phase(self, now: float) -> str:
        """``pending``, ``running``, ``succeeded``, ``expired``, ``timeout`` or ``cancelled``."""
        if self.cancelled_at is not None and self.cancelled_at <= now:
            return "cancelled"
        if now >= self.end:
            if self.never_starts:
                return "expired"
            return "succeeded" if self.done_fraction >= 1.0 else "timeout"
        if self.never_starts or now < self.start:
            return "pending"
        return "running"

    @property
    def ended_at(self) -> float | None:
        return self.cancelled_at if self.cancelled_at is not None else self.end

    def ran(self, now: float) -> list[tuple[str, dict[str, Any], int | None]]:
        """(custom_id, body, fault status or None) of each line that ran by ``now``."""
        phase = self.phase(now)
        if phase in ("pending", "running", "expired", "cancelled"):
            return []
        count = round(len(self.lines) * min(1.0, self.done_fraction))
        return [(cid, body, self.faults.get(cid)) for cid, body in self.lines[:count]]

    def counts(self, now: float) -> tuple[int, int, int]:
        """(total, succeeded, failed) as the job reports them by ``now``."""
        ran = self.ran(now)
        failed = sum(1 for *_, fault in ran if fault is not None)
        return len(self.lines), len(ran) - failed, failed


class NativeStore:
    """Every native job and object of one sandbox; one lock, reset with the sandbox."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, NativeJob] = {}
        self.objects: dict[tuple[str, str], bytes] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, str] = {}
        self._seq = 0

    def reset(self) -> None:
        with self.lock:
            self.jobs.clear()
            self.objects.clear()
            self.files.clear()
            self.tokens.clear()

    def next_id(self, prefix: str) -> str:
        with self.lock:
            self._seq += 1
            return f"{prefix}{self._seq:06d}"

    def new_job(
        self,
        state: SandboxState,
        protocol: str,
        *,
        model: str,
        endpoint: str,
        lines: list[tuple[str, dict[str, Any]]],
        never_starts: bool = False,
        expire_after_s: float | None = None,
        done_fraction: float = 1.0,
    ) -> NativeJob:
        """A job whose timeline is fixed now, from the knobs."""
        knobs: Knobs = state.knobs
        now = state.clock.now()
        end = now + (
            expire_after_s if never_starts and expire_after_s else knobs.batch_turnaround_s
        )
        faults = {
            cid: line_fault(knobs.seed, cid, 0, knobs.batch_line_fail_rate) for cid, _ in lines
        }
        job = NativeJob(
            protocol=protocol,
            job_id=self.next_id(f"{protocol}-"),
            model=model,
            endpoint=endpoint,
            lines=lines,
            created=now,
            start=now + min(knobs.batch_validating_s, knobs.batch_turnaround_s),
            end=end,
            faults=faults,
            never_starts=never_starts,
            done_fraction=done_fraction,
        )
        with self.lock:
            self.jobs[job.job_id] = job
        return job

    def job(self, job_id: str, protocol: str) -> NativeJob:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None or job.protocol != protocol:
            raise NativeError(404, f"batch job {job_id!r} not found", "NOT_FOUND")
        return job

    def listed(self, protocol: str) -> list[NativeJob]:
        """The protocol's jobs, newest first."""
        with self.lock:
            jobs = [j for j in self.jobs.values() if j.protocol == protocol]
        return sorted(jobs, key=lambda j: (j.created, j.job_id), reverse=True)

    def cancel(self, job: NativeJob, now: float) -> bool:
        """Cancel a job still running; False when it had already ended."""
        with self.lock:
            if job.phase(now) not in ("pending", "running"):
                return False
            job.cancelled_at = now
            return True


_STORES_LOCK = threading.Lock()


def native_store(state: SandboxState) -> NativeStore:
    """The native store of ``state``, made on first use and reset with it."""
    with _STORES_LOCK:
        store = getattr(state, "native", None)
        if store is None:
            store = NativeStore()
            state.native = store  # type: ignore[attr-defined]
            reset = state.reset

            def reset_both() -> None:
                reset()
                store.reset()

            state.reset = reset_both  # type: ignore[method-assign]
        return store


def native_routes() -> list[BaseRoute]:
    """Gemini, Bedrock (with its S3 subset) and Mistral; imported when routes are built."""
    from routing.sandbox.batch_bedrock import bedrock_routes, s3_routes
    from routing.sandbox.batch_gemini import gemini_routes
    from routing.sandbox.batch_mistral import mistral_routes

    return [*gemini_routes(), *bedrock_routes(), *s3_routes(), *mistral_routes()]
