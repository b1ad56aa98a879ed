"""A whole mixbatch on one machine: Redis, the sandbox provider, workers and beat.

``mixbatch demo`` and the end-to-end tests both use it, so the demo exercises exactly what the
tests prove. Workers and beat are real ``celery`` processes; the embedded Redis and the sandbox
belong to this process and stop with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from config.queues import GPU_QUEUE, SERVICE_QUEUES
from routing.errors import ConfigError
from routing.models import ServiceConfig
from routing.sandbox import Knobs
from routing.store.embedded import EmbeddedRedis
from routing.store.lanes import LaneStore

SANDBOX_KEY = "sk-sandbox-not-a-real-key"


class LocalStack:
    """Start with ``start()`` (or ``with``); every process started here is stopped by ``stop()``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        redis_url: str | None = None,
        namespace: str = "mb",
        sandbox: bool = True,
        knobs: Knobs | None = None,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir or self.data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.namespace = namespace
        self.use_sandbox = sandbox
        self.knobs = knobs
        self.extra_env = dict(env or {})
        self.redis_server: EmbeddedRedis | None = None
        self.sandbox: Any = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> LocalStack:
        if self.redis_url is None:
            self.redis_server = EmbeddedRedis(self.data_dir / "redis").start()
            self.redis_url = self.redis_server.url
        if self.use_sandbox:
            from routing.sandbox.server import SandboxServer

            self.sandbox = SandboxServer(knobs=self.knobs).start()
        return self

    @property
    def url(self) -> str:
        if self.redis_url is None:
            raise ConfigError("the stack is not started")
        return self.redis_url

    def env(self) -> dict[str, str]:
        """Environment for every child: one Redis, one namespace, providers at the sandbox."""
        env = dict(os.environ)
        env.update(
            {
                "MIXBATCH_REDIS_URL": self.url,
                "MIXBATCH_NAMESPACE": self.namespace,
                "MIXBATCH_DATA_DIR": str(self.data_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.sandbox is not None:
            env.update(
                {
                    "OPENAI_BASE_URL": self.sandbox.openai_base_url,
                    "OPENAI_API_KEY": SANDBOX_KEY,
                    "ANTHROPIC_BASE_URL": self.sandbox.anthropic_base_url,
                    "ANTHROPIC_API_KEY": SANDBOX_KEY,
                }
            )
        env.update(self.extra_env)
        return env

    def store(self) -> LaneStore:
        return LaneStore.from_url(self.url, namespace=self.namespace)

    def publish(self, config: ServiceConfig) -> None:
        st = self.store()
        try:
            st.publish_config(config)
        finally:
            st.close()

    def _spawn(
        self,
        name: str,
        argv: Sequence[str],
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            list(argv),
            env={**self.env(), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_worker(
        self,
        name: str = "worker",
        *,
        queues: Sequence[str] = SERVICE_QUEUES,
        concurrency: int = 2,
        app: str = "config",
        loglevel: str = "WARNING",
        cwd: Path | None = None,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
        wrap: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """A celery worker; ``env`` is added to this worker's environment only; ``wrap`` runs it
        inside a command (``ip netns exec HOST``: another host, tests/test_hosts.py)."""
        argv = [
            *wrap,
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-Q", ",".join(queues), "-c", str(concurrency), "-n", f"{name}@%h", "-P", pool,
            "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle", "-l", loglevel,
        ]  # fmt: skip
        return self._spawn(name, argv, cwd, env)

    def start_gpu_worker(
        self, name: str = "gpu", *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """The local route's worker: the gpu queue, solo pool, one message at a time."""
        return self.start_worker(name, queues=[GPU_QUEUE], concurrency=1, pool="solo", env=env)

    def start_beat(self, *, loglevel: str = "WARNING") -> subprocess.Popen[bytes]:
        schedule = self.data_dir / "celerybeat-schedule"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "beat",
            "-s",
            str(schedule),
            "-l",
            loglevel,
        ]
        return self._spawn("beat", argv)

    def wait_workers(self, names: Sequence[str], timeout_s: float = 60.0) -> None:
        """Until every named worker answers a ping (so a caller never races a cold start)."""
        from celery import Celery

        host = os.uname().nodename
        wanted = {f"{n}@{host}" for n in names}
        end = time.monotonic() + timeout_s
        broker = self.extra_env.get("MIXBATCH_BROKER_URL", self.url)
        pinger = Celery("mixbatch-stack", broker=broker, set_as_current=False)
        if "MIXBATCH_BROKER_MASTER_NAME" in self.extra_env:  # a sentinel:// broker
            master = self.extra_env["MIXBATCH_BROKER_MASTER_NAME"]
            pinger.conf.broker_transport_options = {"master_name": master}
        try:
            while time.monotonic() < end:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"{name} exited with {proc.returncode}: see {self.log_dir / name}.log"
                        )
                replies = pinger.control.ping(timeout=0.5)
                if wanted <= {k for r in replies for k in r}:
                    return
        finally:
            pinger.close()
        raise TimeoutError(f"workers {sorted(wanted)} did not answer within {timeout_s}s")

    def kill(self, name: str) -> None:
        """SIGKILL a process and its children (a prefork worker's pool), as a crash would."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_process(self, name: str, timeout_s: float = 15.0) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_process(name)
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self.sandbox is not None:
            self.sandbox.stop()
            self.sandbox = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
