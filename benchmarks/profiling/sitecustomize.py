"""cProfile inside every Celery pool process, for ``benchmarks/provider_batch.py --profile``.

Python imports ``sitecustomize`` at start when its folder is on ``PYTHONPATH``; the benchmark
puts this folder there only when asked to profile, with ``MIXBATCH_BENCH_PROFILE`` naming the
folder the profiles go to. A pool process starts its profiler when it is forked and rewrites
``<pid>.prof`` after each task (a pool process is killed, not asked, at the end of a run, so
the last dump is what survives; the profiler runs in the task thread, so the dump is there).
"""

from __future__ import annotations

import os
from typing import Any

_DIR = os.environ.get("MIXBATCH_BENCH_PROFILE")


def _start(**_: Any) -> None:
    import cProfile

    from celery.signals import task_postrun

    assert _DIR is not None
    profiler = cProfile.Profile()
    path = os.path.join(_DIR, f"{os.getpid()}.prof")

    def after(**_: Any) -> None:
        profiler.disable()
        profiler.dump_stats(path + ".tmp")  # a process killed mid-write leaves the last one
        os.replace(path + ".tmp", path)
        profiler.enable()

    task_postrun.connect(after, weak=False)
    profiler.enable()


if _DIR:
    try:
        from celery.signals import worker_process_init

        worker_process_init.connect(_start, weak=False)
    except ImportError:  # not a Celery process
        pass
