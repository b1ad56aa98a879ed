"""Workers on several hosts: two Linux network namespaces, each with its own address on a bridge
the test makes, each running its own workers against a Redis Cluster (and a broker) on the host
side. Requests are submitted from a third place, the host itself. One namespace's workers are
SIGKILLed mid-run; the other host's workers finish their leased work, and every request is
answered and delivered exactly once. Needs root (``ip netns``); CI runs as root.
"""

from __future__ import annotations

import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from routing.sandbox import Knobs
from routing.sandbox.server import SandboxServer
from tests.conftest import need_server
from tests.servers import (
    RUN_N,
    RedisCluster,
    RedisNode,
    free_ports,
    run_workload,
    start_stack,
)

pytestmark = pytest.mark.timeout(300)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    """A bridge with the host's address and ``n`` namespaces, each on a veth pair into it."""

    def __init__(self, n: int = 2) -> None:
        tag = uuid.uuid4().hex[:5]
        self.net = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"mbbr{tag}"
        self.names = [f"mbhost{tag}{i}" for i in range(n)]
        self.host_ip = f"{self.net}.1"

    def start(self) -> Hosts:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.names):
            outside, inside = f"{ns[-6:]}o", f"{ns[-6:]}i"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", self.bridge, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{self.net}.{i + 2}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def wrap(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def stop(self) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0:
        need_server("network namespaces need root")
    h = Hosts()
    try:
        h.start()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        h.stop()
        need_server(f"`ip netns` is not possible here: {exc}")
    yield h
    h.stop()


def test_two_hosts_one_killed_everything_delivered_once(hosts: Hosts, tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path / "cluster", host=hosts.host_ip).start()
    broker = RedisNode(tmp_path / "broker", free_ports(1)[0], host=hosts.host_ip).start()
    knobs = Knobs(latency_ms=200, batch_turnaround_s=1.0)
    sandbox = SandboxServer(host=hosts.host_ip, knobs=knobs).start()
    try:
        stack = start_stack(
            tmp_path / "stack", cluster.url, counts_url=broker.url, knobs=knobs,
            env={"MIXBATCH_BROKER_URL": broker.url}, sandbox=sandbox,
            workers=[("a1", hosts.wrap(0)), ("b1", hosts.wrap(1))],
        )  # fmt: skip
    except BaseException:
        sandbox.stop()
        broker.stop()
        cluster.stop()
        raise
    try:

        def kill_host_a() -> None:
            # both hosts really work the lanes: the cluster sees clients from both addresses
            seen = {
                c["addr"].rpartition(":")[0]
                for node in cluster.nodes
                for c in node.client().client_list()
            }
            assert {f"{hosts.net}.2", f"{hosts.net}.3"} <= seen, seen
            stack.kill("a1")

        run_workload(
            stack, cluster.url, n=RUN_N, counts_url=broker.url, during=kill_host_a,
            after_fraction=0.2, exactly_once=False,
        )  # fmt: skip
    finally:
        stack.stop()
        broker.stop()
        cluster.stop()
