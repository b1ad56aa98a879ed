"""The clock an engine step reads: wall time, elapsed time and waiting, passed in as a handle.

The ``time`` module is one; tests pass their own, so a retry wait or a Retry-After is checked
without sleeping.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float, /) -> None: ...
