"""Ray clusters of several nodes on one host: one network namespace per node, joined by
veth links to a bridge in the head's namespace, each node with its own IP address (and,
optionally, `tc netem` delay on its link). Needs root (``ip netns``); the tests that use
it skip with the reason elsewhere.

Every process of a node runs inside its namespace, so stopping a node is killing what
``ip netns pids`` lists for it: no ``ray stop``, which would reach every Ray process on
the host. Only addresses inside these namespaces are used.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SUBNET_PREFIX = "10.77"
RAY_PORT = 6379
_made = itertools.count()


def netns_unavailable() -> str | None:
    """Why a namespace cluster cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2)"
    probe = f"fsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (pip install 'fineserve[ray]')"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class NetnsCluster:
    """``with NetnsCluster(2) as c: c.run_in(0, [...])``: node 0 is the Ray head at
    ``c.ip(0)``; the others join it. ``delay_ms`` is netem delay on each node's link (one
    way, so a round trip between two workers' namespaces costs four times it)."""

    def __init__(self, nodes: int = 2, delay_ms: float = 0.0, cpus_per_node: int = 1) -> None:
        self.nodes = nodes
        self.delay_ms = delay_ms
        self.cpus = cpus_per_node
        # Interface names are at most 15 characters: keep the tag short and unique.
        index = next(_made)
        self.tag = f"fs{os.getpid() % 10000}c{index}"
        # A subnet of its own: Ray refuses a head at an address another cluster's session
        # files (in the shared /tmp/ray) still name.
        self.subnet = f"{SUBNET_PREFIX}.{(os.getpid() + index) % 250}"
        self.names = [f"{self.tag}n{i}" for i in range(nodes)]
        self._ray: list[subprocess.Popen[str]] = []
        self._logs: list[Any] = []
        self.log_dir = Path(f"/tmp/{self.tag}-logs")
        #: The environment every process of the cluster gets: Ray's token authentication
        #: (on by default for a new head since Ray 2.5x) with one token for the cluster,
        #: as the README tells a multi-machine cluster to share it.
        self.token = secrets.token_hex(16)
        # Ray's session files (and its "current cluster" address, which a later
        # ray.init() with no address would try) in a directory of this cluster's own.
        self.ray_tmp = Path(f"/tmp/{self.tag}-ray")
        self.env = dict(
            os.environ,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_TMPDIR=str(self.ray_tmp),
        )
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)

    def ip(self, node: int) -> str:
        return f"{self.subnet}.{node + 1}"

    @property
    def address(self) -> str:
        return f"{self.ip(0)}:{RAY_PORT}"

    def _netns(self, node: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[node]]

    def __enter__(self) -> NetnsCluster:
        try:
            self._build()
            self.start_ray()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        bridge = f"{self.tag}br"
        head = self.names[0]
        for name in self.names:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        # A bridge in the head's namespace; each node (the head too) has a veth into it.
        _ip("-n", head, "link", "add", bridge, "type", "bridge")
        _ip("-n", head, "link", "set", bridge, "up")
        for i, name in enumerate(self.names):
            inner, outer = f"{self.tag}v{i}", f"{self.tag}p{i}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", name)
            _ip("link", "set", outer, "netns", head)
            _ip("-n", head, "link", "set", outer, "master", bridge)
            _ip("-n", head, "link", "set", outer, "up")
            _ip("-n", name, "addr", "add", f"{self.ip(i)}/24", "dev", inner)
            _ip("-n", name, "link", "set", inner, "up")
            if self.delay_ms > 0:
                subprocess.run(
                    [*self._netns(i), "tc", "qdisc", "add", "dev", inner, "root", "netem",
                     "delay", f"{self.delay_ms}ms"],
                    check=True, capture_output=True,
                )  # fmt: skip

    def start_ray(self) -> None:
        self.log_dir.mkdir(exist_ok=True)
        self.ray_tmp.mkdir(exist_ok=True)
        ray_bin = str(Path(sys.executable).parent / "ray")
        common = ["--num-cpus", str(self.cpus), "--disable-usage-stats", "--block"]
        head = ["--head", "--port", str(RAY_PORT), "--include-dashboard", "false"]
        for i in range(self.nodes):
            role = head if i == 0 else ["--address", self.address]
            log = (self.log_dir / f"node{i}.log").open("w")
            self._logs.append(log)
            command = [
                *self._netns(i), ray_bin, "start", *role, "--node-ip-address", self.ip(i),
                *common,
            ]  # fmt: skip
            node = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, text=True,
                start_new_session=True,
            )  # fmt: skip
            self._ray.append(node)
            if i == 0:
                self._wait_for_head()
        self.wait_for_nodes(self.nodes)

    def _wait_for_head(self) -> None:
        if not self.wait_port(0, RAY_PORT, lambda: self._ray[0].poll() is None):
            raise RuntimeError(f"Ray head did not start: {self.logs(0)[-2000:]}")

    def wait_port(
        self, node: int, port: int, alive: Any = lambda: True, timeout_s: float = 60.0
    ) -> bool:
        """Whether something listens on ``port`` at ``node``'s address, within the time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive():
            probe = subprocess.run(
                [*self._netns(node), sys.executable, "-c",
                 f"import socket; socket.create_connection(('{self.ip(node)}', {port}), 1)"],
                capture_output=True,
            )  # fmt: skip
            if probe.returncode == 0:
                return True
            time.sleep(0.3)
        return False

    def wait_for_nodes(self, n: int, timeout_s: float = 90.0) -> None:
        code = (
            "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))"
        )
        deadline = time.monotonic() + timeout_s
        alive = 0
        while time.monotonic() < deadline:
            got = self.run_in(0, [sys.executable, "-c", code, self.address], timeout_s=60)
            if got.returncode == 0 and got.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            alive = got.stdout.strip()[-10:]
            time.sleep(1.0)
        raise RuntimeError(f"{n} Ray nodes not alive (saw {alive!r}): {self.logs(1)[-2000:]}")

    def logs(self, node: int) -> str:
        path = self.log_dir / f"node{node}.log"
        return path.read_text() if path.exists() else ""

    def run_in(
        self, node: int, command: list[str], timeout_s: float = 300, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._netns(node), *command],
            capture_output=True, text=True, timeout=timeout_s, env=kw.pop("env", self.env), **kw,
        )  # fmt: skip

    def popen_in(self, node: int, command: list[str], **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self._netns(node), *command], text=True, env=kw.pop("env", self.env), **kw
        )

    def pids(self, node: int) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.names[node]], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, node: int) -> None:
        """Every process of the node, at once (a machine that died)."""
        for pid in self.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for i in reversed(range(self.nodes)):
            self.kill_node(i)
        for p in self._ray:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
