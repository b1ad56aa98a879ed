"""What a worker says about a task's arguments: a readable summary, never their content.

A Celery worker reports each task's arguments in several places: its INFO log lines
("received", "succeeded"), the task events Flower shows, and ``inspect`` replies. Celery uses
the message's ``argsrepr`` for most of them, but

* a producer that calls ``send_task("mixbatch.enqueue", args=[request])`` without an
  ``argsrepr`` gets Celery's default, the ``repr`` of the request: its body, in every log line
  and in Flower (``routing.contrib.common.send_enqueue`` sends the summary instead, so the
  broker's headers and the producer's own ``task-sent`` event never carry it either);
* ``inspect reserved`` and ``inspect scheduled`` (Flower's worker page calls both) ignore
  ``safe=True`` and send the raw arguments, lease tokens included.

``MixbatchTask`` (the app's ``task_cls``) gives every mixbatch task ``RedactedRequest``, which
keeps an argsrepr that is already a summary (``key=value ...``, as every mixbatch task sends)
and replaces anything else before the worker logs or reports it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Task
from celery.worker.request import Request

from routing.contrib.common import ENQUEUE_TASK, request_summary

__all__ = ["MixbatchTask", "RedactedRequest", "is_readable", "summarize"]

#: ``key=value`` pairs of ids, counts, lanes, batch ids and reasons; no Python structure reprs
_READABLE = re.compile(r"^\w+=[^\[\]{}'\"]*$")


def is_readable(text: str | None) -> bool:
    """True for ``()``, ``{}`` and ``key=value ...`` summaries; False for any raw repr."""
    return text in ("()", "{}", "", None) or bool(_READABLE.match(text or ""))


def summarize(name: str, args: Sequence[Any]) -> str:
    """A ``key=value`` stand-in for arguments whose repr would show their content: for an
    enqueued request the same summary a producer's ``send_enqueue`` sends."""
    if name == ENQUEUE_TASK and args and isinstance(args[0], Mapping):
        return request_summary(args[0])
    return f"args=hidden n={len(args)}"


class RedactedRequest(Request):
    """A worker-side request whose every report shows the summary, never the arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not is_readable(self.argsrepr):
            text = summarize(self.name, self.args)
            self._argsrepr = text
            self._request_dict["argsrepr"] = text  # the tracer logs from the request dict
        if not is_readable(self.kwargsrepr):
            text = f"kwargs=hidden n={len(self.kwargs or {})}"
            self._kwargsrepr = text
            self._request_dict["kwargsrepr"] = text

    def info(self, safe: bool = False) -> dict[str, Any]:
        """Always the safe form: ``inspect reserved/scheduled`` never pass ``safe=True``."""
        info: dict[str, Any] = super().info(safe=True)
        return info


class MixbatchTask(Task):
    """Base of every mixbatch task: ``Celery(..., task_cls="config.redaction:MixbatchTask")``."""

    Request = RedactedRequest
