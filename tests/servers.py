"""Real servers for the scale-out tests: a Redis Cluster, a Sentinel group, a RabbitMQ node.

Each is started from its own binary on free ports, in a temporary folder, and stopped by
``stop()``. Nothing here is mixbatch code: it stands up the engines a deployment would run.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from routing.models import ServiceConfig
from routing.sandbox import Knobs
from routing.store.embedded import redis_server_binary
from tasks.cli.stack import LocalStack

__all__ = ["RabbitNode", "RedisCluster", "RedisNode", "SentinelGroup", "free_ports"]


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, bus: bool = False, low: int = 20000, high: int = 40000) -> list[int]:
    """``n`` consecutive free ports (and, with ``bus``, each port + 10000: a cluster's bus)."""
    for _ in range(200):
        base = random.randrange(low, high - n)
        ports = list(range(base, base + n))
        wanted = ports + ([p + 10000 for p in ports] if bus else [])
        if all(_port_free(p) for p in wanted):
            return ports
    raise RuntimeError("no free port range found")


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class RedisNode:
    """One ``redis-server`` process with its own folder; ``args`` are extra config options."""

    def __init__(
        self, directory: Path, port: int, args: Sequence[str] = (), host: str = "127.0.0.1"
    ):
        self.dir = directory
        self.port = port
        self.host = host
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisNode:
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(),
            "--port", str(self.port), "--bind", self.host, "--dir", str(self.dir),
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
            *self.args,
        ]  # fmt: skip
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self.ping, 15, f"redis on {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=5)

    def ping(self) -> bool:
        with contextlib.closing(self.client()) as r:
            return bool(r.ping())

    def kill(self) -> None:
        """SIGKILL, as a crashed host: nothing flushed, no goodbye to the cluster."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class RedisCluster:
    """``masters`` masters, each with ``replicas`` replicas, slots split evenly, fast failover."""

    def __init__(
        self, directory: Path, masters: int = 3, replicas: int = 1, host: str = "127.0.0.1"
    ):
        count = masters * (1 + replicas)
        ports = free_ports(count, bus=True)
        opts = [
            "--cluster-enabled", "yes", "--cluster-node-timeout", "1500",
            "--cluster-replica-validity-factor", "0", "--cluster-require-full-coverage", "no",
        ]  # fmt: skip
        self.nodes = [
            RedisNode(
                directory / str(p), p, [*opts, "--cluster-config-file", f"nodes-{p}.conf"], host
            )
            for p in ports
        ]
        self.masters = masters
        self.replicas = replicas

    @property
    def url(self) -> str:
        hosts = ",".join(f"{n.host}:{n.port}" for n in self.nodes[: self.masters])
        return f"redis+cluster://{hosts}/"

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        hosts = [f"{n.host}:{n.port}" for n in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *hosts, "--cluster-replicas", str(self.replicas),
             "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        wait_until(self._ready, 60, "the cluster to be ok with every replica in sync")
        return self

    def _ready(self) -> bool:
        for node in self.nodes:
            with contextlib.closing(node.client()) as r:
                if r.cluster("info").get("cluster_state") != "ok":
                    return False
                info = r.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
        return True

    def master_of(self, key: str) -> RedisNode:
        """The node that serves ``key``'s slot now."""
        with contextlib.closing(self.live()[0].client()) as r:
            slot = int(r.execute_command("CLUSTER KEYSLOT", key))
            for start, end, master, *_ in r.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(key)

    def live(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """One master, ``replicas`` replicas and ``sentinels`` sentinels watching ``service``."""

    def __init__(
        self, directory: Path, service: str = "mbsvc", replicas: int = 1, sentinels: int = 3
    ):
        ports = free_ports(1 + replicas + sentinels)
        self.service = service
        self.master = RedisNode(directory / "master", ports[0])
        self.replicas = [
            RedisNode(directory / f"replica{i}", p, ["--replicaof", "127.0.0.1", str(ports[0])])
            for i, p in enumerate(ports[1 : 1 + replicas])
        ]
        self.sentinel_ports = ports[1 + replicas :]
        self.directory = directory
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> SentinelGroup:
        self.master.start()
        for r in self.replicas:
            r.start()
        for port in self.sentinel_ports:
            folder = self.directory / f"sentinel{port}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 4000\n"
            )
            log = (folder / "sentinel.log").open("ab")
            self.sentinels.append(
                subprocess.Popen(
                    [redis_server_binary(), str(conf), "--sentinel"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        wait_until(self._ready, 30, "sentinels to see the master and its replicas")
        return self

    def _ready(self) -> bool:
        for port in self.sentinel_ports:
            with contextlib.closing(redis.Redis(port=port, socket_timeout=2)) as s:
                state = s.sentinel_master(self.service)
                if int(state.get("num-slaves", 0)) < len(self.replicas):
                    return False
                if int(state.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1:
                    return False
        return all(
            r.client().info("replication").get("master_link_status") == "up" for r in self.replicas
        )

    def master_port(self) -> int:
        with contextlib.closing(redis.Redis(port=self.sentinel_ports[0], socket_timeout=2)) as s:
            _host, port = s.sentinel_get_master_addr_by_name(self.service)
            return int(port)

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        for node in (self.master, *self.replicas):
            node.stop()


def rabbit_binary() -> str | None:
    """Debian's ``rabbitmq-server`` when installed (``.ci/run`` installs it as root)."""
    return shutil.which("rabbitmq-server") or (
        "/usr/sbin/rabbitmq-server" if Path("/usr/sbin/rabbitmq-server").exists() else None
    )


class RabbitNode:
    """A RabbitMQ node of its own (name, ports, folders), run as the ``rabbitmq`` user.

    The node's data and logs live in a temporary folder owned by that user; it is stopped with
    ``rabbitmqctl -n NODE stop``, which a RabbitMQ node needs to shut down cleanly.
    """

    def __init__(self) -> None:
        self.port = free_ports(1, low=30000, high=32000)[0]
        self.dist_port = free_ports(1, low=32000, high=34000)[0]
        self.name = f"mbtest{self.port}@localhost"
        # its own folder straight under /tmp: the rabbitmq user cannot enter pytest's (0700)
        self.directory = Path(tempfile.mkdtemp(prefix="mixbatch-rabbit-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        d = self.directory
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "HOME": "/var/lib/rabbitmq",
        }

    def _as_rabbit(self, argv: Sequence[str]) -> list[str]:
        if os.geteuid() != 0:
            return list(argv)
        return ["runuser", "-u", "rabbitmq", "--", *argv]

    def ctl(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self._as_rabbit(["rabbitmqctl", "-n", self.name, *args]),
            env=self._env(),
            capture_output=True,
            timeout=timeout_s,
        )

    def start(self) -> RabbitNode:
        d = self.directory
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
        if os.geteuid() == 0:
            shutil.chown(d, "rabbitmq", "rabbitmq")
            for path in d.rglob("*"):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        log = (d / "server.out").open("ab")
        self.proc = subprocess.Popen(
            self._as_rabbit([rabbit_binary() or "rabbitmq-server"]),
            env=self._env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        end = time.monotonic() + 90
        while True:  # await_startup gives up at once on a node not yet registered with epmd
            done = self.ctl("await_startup", "--timeout", "60", timeout_s=90)
            if done.returncode == 0 or time.monotonic() > end or self.proc.poll() is not None:
                break
            time.sleep(1)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(
                f"RabbitMQ node {self.name} did not start: {done.stderr.decode()[-2000:]}\n"
                f"see {d / 'server.out'}"
            )
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.ctl("stop", timeout_s=60)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.directory, ignore_errors=True)


# -- one scale-out run: a workload through real workers, something killed on the way ----------


#: Leases short enough that work a dead node or worker held is taken up again within seconds.
RECOVER_FAST = {
    "MIXBATCH_LEASE_S": "6",
    "MIXBATCH_BATCH_COLLECT_LEASE_S": "5",
    "MIXBATCH_BATCH_INTENT_GRACE_S": "5",
    "MIXBATCH_DELIVERY_LEASE_S": "5",
}


#: Seconds to watch for a late duplicate after the last delivery (sweeps run every second).
SETTLE_S = float(os.environ.get("MIXBATCH_TEST_SETTLE_S", "2"))
#: Requests per scale-out run: enough for every route and a fault mid-run, no more.
RUN_N = int(os.environ.get("MIXBATCH_TEST_SCALE_N", "120"))


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitNode]:
    """One RabbitMQ node for the whole session (it takes ~10 s to start)."""
    from tests.conftest import need_server

    if rabbit_binary() is None:
        need_server("no rabbitmq-server (Debian's package; .ci/run installs it as root)")
    node = RabbitNode().start()
    yield node
    node.stop()


def delivered_counts(counts_url: str, namespace: str) -> dict[str, int]:
    """How often the callback app (tests/callback_app.py) received each request's result."""
    from tests.callback_app import counts_key

    with contextlib.closing(redis.Redis.from_url(counts_url)) as r:
        return {k.decode(): int(v) for k, v in r.hgetall(counts_key(namespace)).items()}


def start_stack(
    directory: Path,
    store_url: str,
    *,
    counts_url: str,
    knobs: Knobs,
    env: Mapping[str, str],
    namespace: str = "e2e",
    config: ServiceConfig | None = None,
    workers: Sequence[tuple[str, Sequence[str]]] = (("w1", ()), ("w2", ())),
    sandbox: Any = None,
) -> LocalStack:
    """A started stack on ``store_url``: ``workers`` (name, command to run it inside), the
    callback app counting into ``counts_url``, beat; every worker answered a ping. ``sandbox``:
    a started sandbox of the caller's (bound where the workers reach it) instead of the stack's."""
    from tests.test_e2e import FAST, ROOT, _config

    stack = LocalStack(
        directory, redis_url=store_url, namespace=namespace, knobs=knobs,
        env={**FAST, **RECOVER_FAST, **env}, sandbox=sandbox is None,
    )  # fmt: skip
    try:
        stack.start()
        if sandbox is not None:
            stack.sandbox = sandbox
        stack.publish(config or _config())
        for name, wrap in workers:
            stack.start_worker(name, concurrency=2, wrap=wrap)
        stack.start_worker(
            "callbacks", queues=["e2e.callbacks"], concurrency=2, app="tests.callback_app",
            cwd=ROOT, env={"MIXBATCH_REDIS_URL": counts_url},
        )  # fmt: skip
        stack.start_beat()
        stack.wait_workers([name for name, _ in workers] + ["callbacks"])
    except BaseException:
        stack.stop()
        raise
    return stack


def run_workload(
    stack: LocalStack,
    store_url: str,
    *,
    n: int,
    counts_url: str,
    during: Callable[[], None] | None = None,
    after_fraction: float = 0.3,
    timeout_s: float = 240,
    exactly_once: bool = True,
) -> dict[str, int]:
    """Submit ``n`` mixed requests with a Celery callback, call ``during`` once a share of them
    is delivered, then wait for every one; returns each request's delivery count.

    Every request must be answered once (its one result DONE) and delivered; delivery is at least
    once (docs/sinks.md), so a receiver that dedupes by request id, as the Django and Flask ones
    do, applies each exactly once. ``exactly_once`` True (no fault injected, or none that can
    hit a delivery in flight): the raw receipt count is 1 for every request as well; False: a
    delivery that was in flight on a killed worker or master may arrive twice, never missing."""
    from routing.client import Client
    from tasks.cli.demo import demo_workload

    callback = {"kind": "celery", "task": "e2e.record", "queue": "e2e.callbacks"}
    items = [{**item, "callback": callback} for item in demo_workload(n)]
    with Client(store_url, namespace=stack.namespace) as client:
        ids = [t.id for t in client.submit_many(items)]
    assert len(set(ids)) == n
    if during is not None:
        wait_until(
            lambda: len(delivered_counts(counts_url, stack.namespace)) >= n * after_fraction,
            timeout_s,
            f"{after_fraction:.0%} delivered before the fault",
        )
        during()
    try:
        wait_until(
            lambda: len(delivered_counts(counts_url, stack.namespace)) >= n,
            timeout_s,
            "all delivered",
        )
    except TimeoutError:
        missing = set(ids) - set(delivered_counts(counts_url, stack.namespace))
        with Client(store_url, namespace=stack.namespace) as client:
            states = Counter(client.status(i).state.value for i in missing)
        raise AssertionError(f"{len(missing)} never delivered, by state: {dict(states)}") from None
    time.sleep(SETTLE_S)  # a few sweeps more (one a second): a duplicate would show up now
    counts = delivered_counts(counts_url, stack.namespace)
    assert set(counts) == set(ids), f"{len(set(ids) - set(counts))} never delivered"
    if exactly_once:
        assert all(c == 1 for c in counts.values()), {k: c for k, c in counts.items() if c != 1}
    with Client(store_url, namespace=stack.namespace) as client:
        results = {i: client.result(i, timeout=5) for i in ids}
    assert all(r.status.value == "done" for r in results.values()), Counter(
        r.status.value for r in results.values()
    )
    return counts
