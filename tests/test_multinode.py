"""Ray across machines, on one host: each Ray node in its own network namespace with its
own IP address (``netns_cluster.NetnsCluster``), the mock on the head's address, the run
driven from the head as the README's multi-node steps say. Needs root and Ray; skipped
with the reason elsewhere. Marker ``multinode`` (``python -m pytest -m multinode``)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netns_cluster import NetnsCluster, netns_unavailable

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

WHY_NOT = netns_unavailable()
if WHY_NOT:
    pytestmark.append(pytest.mark.skip(reason=WHY_NOT))

MOCK_PORT = 18900


@contextlib.contextmanager
def mock_on_head(c: NetnsCluster) -> Iterator[None]:
    """`fineserve mock` on the head's address, in its namespace, until the block ends."""
    mock = c.popen_in(
        0,
        [sys.executable, "-m", "fineserve.cli", "mock", "--host", c.ip(0), "--port",
         str(MOCK_PORT), "--ttft-ms", "5", "--itl-ms", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert c.wait_port(0, MOCK_PORT, lambda: mock.poll() is None), "mock did not start"
        yield
    finally:
        mock.kill()
        mock.wait()


@pytest.fixture(scope="module")
def cluster() -> Iterator[NetnsCluster]:
    with NetnsCluster(nodes=2) as c, mock_on_head(c):
        yield c


def _blast(c: NetnsCluster, tmp: Path, name: str, *extra: str) -> tuple[int, str, dict[str, Any]]:
    res = tmp / f"{name}.json"
    done = c.run_in(
        0,
        [sys.executable, "-m", "fineserve.cli", "blast",
         "--base-url", f"http://{c.ip(0)}:{MOCK_PORT}", "--model", "fineserve-mock",
         "--num-prompts", "400", "--request-rate", "200", "--seed", "3",
         "--random-input-len", "8", "--random-output-len", "4", "--disable-tqdm",
         "--output-file", str(res), *extra],
    )  # fmt: skip
    result = json.loads(res.read_text()) if res.exists() else {}
    return done.returncode, done.stdout + done.stderr, result


def test_two_nodes_run_one_worker_each_and_account_like_one_machine(
    cluster: NetnsCluster, tmp_path: Path
) -> None:
    rc, out, one = _blast(cluster, tmp_path, "single")
    assert rc == 0, out
    rc, out, two = _blast(cluster, tmp_path, "ray", "--ray", cluster.address, "--workers", "2")
    assert rc == 0, out
    for k in ("scheduled", "completed", "failed", "not_sent"):
        assert two[k] == one[k], k
    assert two["completed"] == 400
    workers = two["workers"]
    assert [w["requests"] for w in workers] == [200, 200]
    # Spread over the two nodes, and the table and JSON say which.
    assert {w["node_ip"] for w in workers} == {cluster.ip(0), cluster.ip(1)}
    assert cluster.ip(1) in out and cluster.ip(0) in out
    # Same host, same clock: the true offset is 0, and the estimate keeps within its bound,
    # measured by UDP probes between the namespaces (kernel-stamped on both sides): within
    # ±50 µs, where Ray's calls gave ±400 µs.
    for w in workers:
        assert w["clock_offset_method"] == "udp", w
        assert abs(w["clock_offset_us"]) <= w["clock_offset_uncertainty_us"] + 1, w
        assert w["clock_offset_uncertainty_us"] <= 50, w
        assert "clock_offset_end_us" in w, w  # measured again at the end


def test_a_node_killed_mid_run_is_reported_and_its_requests_accounted(
    tmp_path: Path,
) -> None:
    # A cluster of its own: this test kills a node.
    with NetnsCluster(nodes=2) as c, mock_on_head(c):
        res = tmp_path / "r.json"
        run = c.popen_in(
            0,
            [sys.executable, "-m", "fineserve.cli", "blast",
             "--base-url", f"http://{c.ip(0)}:{MOCK_PORT}", "--model", "fineserve-mock",
             "--num-prompts", "1600", "--request-rate", "200", "--random-input-len", "8",
             "--random-output-len", "4", "--disable-tqdm", "--output-file", str(res),
             "--ray", c.address, "--workers", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # Wait until the run is under way (its workers started), then kill node 1.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            if any("EngineWorker" in _cmdline(p) for p in c.pids(1)):
                break
            time.sleep(0.2)
        time.sleep(3.0)
        c.kill_node(1)
        assert run.wait(timeout=240) == 0
    r = json.loads(res.read_text())
    assert r["scheduled"] + r.get("not_reached", 0) == 1600
    assert r["scheduled"] == r["sent"] + r["not_sent"]
    w = {x["node_ip"]: x for x in r["workers"]}
    assert w[c.ip(0)]["died"] is None and w[c.ip(0)]["outcomes"] == {"ok": 800}
    dead = w[c.ip(1)]
    assert dead["died"]
    assert sum(dead["outcomes"].values()) == 800  # every request of the dead node accounted
    assert dead["outcomes"].get("not_sent", 0) > 0


def test_pack_puts_the_workers_on_one_node(cluster: NetnsCluster, tmp_path: Path) -> None:
    rc, out, r = _blast(
        cluster, tmp_path, "pack", "--ray", cluster.address, "--workers", "2",
        "--ray-placement", "pack",
    )  # fmt: skip
    assert rc == 0, out
    assert r["completed"] == 400
    assert len({w["node_ip"] for w in r["workers"]}) == 1


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_wrong_cluster_token_is_one_line(cluster: NetnsCluster, tmp_path: Path) -> None:
    env = dict(cluster.env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-cluster-token")
    done = cluster.run_in(
        0,
        [sys.executable, "-m", "fineserve.cli", "blast", "--ray", cluster.address,
         "--base-url", f"http://{cluster.ip(0)}:{MOCK_PORT}", "--model", "fineserve-mock",
         "--num-prompts", "4", "--disable-tqdm"],
        env=env, timeout_s=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    # One line naming the cause, and none of Ray's own retry logs.
    error = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert error and "refused this driver's token" in error[0], done.stderr[-2000:]
    assert "RAY_AUTH_TOKEN" in error[0]
    assert "gcs_client" not in done.stderr
