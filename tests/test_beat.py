"""Beat with RedBeat: two beat processes never double-fire, and the standby takes over when the
one holding the lock dies.

The beats run the service's own schedule (``config.celeryconfig``) with the settings
``config.ops.redbeat_config`` adds for ``MIXBATCH_BEAT_SCHEDULER=redbeat``. No worker runs, so
every message a beat sends stays in the broker's ``mixbatch.control`` list, where the test
counts ``mixbatch.sweep`` firings (one per second) and the gaps between them.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from config.ops import OpsSettings, redbeat_config
from config.queues import CONTROL_QUEUE
from tasks.cli.stack import LocalStack

# Applies the RedBeat settings whatever celeryconfig already does, then runs `celery beat`.
LAUNCH = """
from config.celery_app import app
from config.ops import redbeat_config
from config.settings import get_settings
s = get_settings()
app.conf.update(redbeat_config(s.broker_url(), s.namespace))
app.start(["beat", "-l", "INFO"])
"""
LOCK_TIMEOUT_S = 3
FIRE_EVERY_S = 1.0
SCHEDULE = {
    "MIXBATCH_SWEEP_INTERVAL_S": str(FIRE_EVERY_S),
    # the other entries fire once at start, then not again during the test
    "MIXBATCH_AGGREGATE_INTERVAL_S": "3600",
    "MIXBATCH_BATCH_FLUSH_INTERVAL_S": "3600",
    "MIXBATCH_BATCH_POLL_INTERVAL_S": "3600",
    "MIXBATCH_BEAT_SCHEDULER": "redbeat",
    "MIXBATCH_BEAT_LOCK_TIMEOUT_S": str(LOCK_TIMEOUT_S),
    "MIXBATCH_BEAT_MAX_LOOP_INTERVAL_S": "1",
}


class Firings:
    """Watches the control queue and notes when each new ``mixbatch.sweep`` message appears."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.seen = 0
        self.times: list[float] = []

    def poll(self) -> None:
        raw = self.client.lrange(CONTROL_QUEUE, 0, -1)
        sweeps = sum(json.loads(m)["headers"]["task"] == "mixbatch.sweep" for m in raw)
        now = time.monotonic()
        self.times.extend([now] * (sweeps - self.seen))
        self.seen = sweeps

    def watch(self, seconds: float) -> list[float]:
        """Firing times during the next ``seconds``."""
        start = len(self.times)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            time.sleep(0.05)
        return self.times[start:]

    def until_next(self, timeout_s: float) -> float:
        start, began = self.seen, time.monotonic()
        while time.monotonic() - began < timeout_s:
            self.poll()
            if self.seen > start:
                return time.monotonic() - began
            time.sleep(0.05)
        raise AssertionError(f"no sweep fired within {timeout_s}s")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    st = LocalStack(tmp_path / "stack", namespace="bt", sandbox=False, env=SCHEDULE).start()
    try:
        yield st
    finally:
        st.stop()


def start_beat(stack: LocalStack, name: str) -> None:
    log = (stack.log_dir / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH],
        env=stack.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parent.parent,
        start_new_session=True,
    )
    log.close()
    stack.procs[name] = proc


@pytest.mark.timeout(90)
def test_two_redbeat_beats_fire_each_entry_once_and_fail_over(stack: LocalStack) -> None:
    client = redis.Redis.from_url(stack.url)
    firings = Firings(client)
    start_beat(stack, "beat-a")
    firings.until_next(30)  # beat-a holds the lock and fires
    start_beat(stack, "beat-b")
    time.sleep(1.5)  # beat-b is up and waiting on the lock

    window_s = 6.0
    fired = firings.watch(window_s)
    assert stack.procs["beat-b"].poll() is None, (stack.log_dir / "beat-b.log").read_text()
    assert window_s / FIRE_EVERY_S - 2 <= len(fired) <= window_s / FIRE_EVERY_S + 1, fired
    gaps = [b - a for a, b in itertools.pairwise(fired)]
    assert min(gaps) > FIRE_EVERY_S / 2, f"two firings {min(gaps):.2f}s apart: double-fired"
    assert "Acquired lock" not in (stack.log_dir / "beat-b.log").read_text()

    # The holder dies without releasing the lock: the standby fires once the lock times out.
    holder = stack.procs.pop("beat-a")
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    waited = firings.until_next(LOCK_TIMEOUT_S + 10)
    assert waited <= LOCK_TIMEOUT_S + 3, f"took {waited:.1f}s to take over"
    assert "Acquired lock" in (stack.log_dir / "beat-b.log").read_text()
    after = firings.watch(3.0)
    assert 2 <= len(after) <= 4, after
    client.close()


def test_redbeat_settings_are_explicit_and_namespaced() -> None:
    ops = OpsSettings(beat_scheduler="redbeat", beat_lock_timeout_s=20, beat_max_loop_interval_s=4)
    conf = redbeat_config("redis://:pw@host:6379/2", "prod", ops)
    assert conf == {
        "beat_scheduler": "redbeat.RedBeatScheduler",
        "redbeat_redis_url": "redis://:pw@host:6379/2",
        "redbeat_redis_options": {},
        "redbeat_key_prefix": "prod:redbeat:",
        "redbeat_lock_timeout": 20,
        "beat_max_loop_interval": 4,
    }
    assert redbeat_config("redis://h/0", "prod", OpsSettings(beat_scheduler="file")) == {}
