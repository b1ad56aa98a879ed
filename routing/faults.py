"""Fault points: a test-only hook that kills this process at a named step of a route.

The promise "nothing lost, nothing doubled" is about what happens when a worker dies between two
steps, so the tests make a real worker die exactly there. Each route calls ``fault_point(name)``
between its durable steps; nothing happens unless ``MIXBATCH_FAULT_POINTS`` names that step.

    MIXBATCH_FAULT_POINTS       comma-separated step names, e.g. "create,apply"
    MIXBATCH_FAULT_ONCE_DIR     a directory: only the first process to reach a step dies there
                                (a marker file per step), so the restarted worker goes on

The process ends with ``os._exit``: no ``finally``, no atexit, no Celery ack, the way a SIGKILL or
an OOM kill ends it. Never set these variables in production.
"""

from __future__ import annotations

import os

__all__ = ["FAULT_EXIT_CODE", "POINTS", "fault_point"]

#: Every step a test can stop at, in route order.
POINTS = (
    "take",
    "intent",
    "upload",
    "create",
    "record",
    "poll",
    "download",
    "apply",
    "deliver",
    "realtime",
    "local",
)
FAULT_EXIT_CODE = 70


def fault_point(name: str) -> None:
    """Die here if the environment names this step (and, with a once-dir, no one died here yet)."""
    wanted = os.environ.get("MIXBATCH_FAULT_POINTS")
    if not wanted or name not in wanted.split(","):
        return
    once = os.environ.get("MIXBATCH_FAULT_ONCE_DIR")
    if once:
        try:
            fd = os.open(os.path.join(once, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
    os._exit(FAULT_EXIT_CODE)
