"""`--processes N`: one run split over engine processes of this host, merged like Ray's."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import fleet_losing_worker_1, interrupted_blast, invoke
from fineserve import EngineOptions, MockServer
from fineserve.distributed import share
from fineserve.processes import run_stream_processes
from fineserve.results import read_requests
from fineserve.runner import EngineChunk, _CollectingSink


def _blast(tmp: Path, name: str, *extra: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    req, res = tmp / f"{name}.parquet", tmp / f"{name}.json"
    r = invoke(
        "blast", "--num-prompts", "300", "--request-rate", "150", "--seed", "7",
        "--random-input-len", "8", "--random-output-len", "6", "--mock-itl-ms", "1",
        "--save-requests", str(req), "--output-file", str(res), "--disable-tqdm", *extra,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    table, _ = read_requests(req)
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    return json.loads(res.read_text()), cols


def test_caps_are_shared_out_exactly() -> None:
    for total, n in ((10, 3), (2, 4), (19_744, 6), (0, 2)):
        parts = [share(total, n, w) for w in range(n)]
        assert sum(parts) == total and max(parts) - min(parts) <= 1


def test_processes_and_ray_together_are_refused() -> None:
    r = invoke("blast", "--processes", "2", "--ray", "local", "--num-prompts", "4")
    assert r.exit_code != 0 and "choose one" in r.output
    r = invoke("blast", "--processes", "3", "--max-concurrency", "2", "--num-prompts", "4")
    assert r.exit_code != 0 and "at least one request per process" in r.output


@pytest.mark.slow
def test_two_processes_account_like_one(tmp_path: Path) -> None:
    one, one_rows = _blast(tmp_path, "single")
    two, two_rows = _blast(tmp_path, "proc2", "--processes", "2")
    for k in ("scheduled", "completed", "failed", "not_sent"):
        assert two[k] == one[k], k
    assert two["completed"] == 300
    assert np.array_equal(two_rows["index"], np.arange(300))
    assert np.array_equal(two_rows["scheduled_ns"], one_rows["scheduled_ns"])
    assert np.array_equal(two_rows["input_len"], one_rows["input_len"])
    assert np.array_equal(two_rows["worker"], np.arange(300) % 2)
    workers = two["workers"]
    assert [w["requests"] for w in workers] == [150, 150]
    assert [(w["outcomes"], w["died"]) for w in workers] == [({"ok": 150}, None)] * 2
    assert {w["kind"] for w in workers} == {"Processes"}
    # Each worker says where it ran: one host, two processes.
    assert len({w["hostname"] for w in workers}) == 1 and len({w["node_ip"] for w in workers}) == 1
    assert len({w["pid"] for w in workers}) == 2 and os.getpid() not in {w["pid"] for w in workers}
    # One host, one clock: the offsets are within their bound and none is applied.
    assert all(w["clock_offset_applied_us"] == 0 for w in workers)
    assert all(abs(w["start_error_us"]) < 1000 for w in workers)
    assert two["engine_processes"] == 2


@pytest.mark.slow
def test_a_process_that_is_killed_is_reported_and_its_requests_accounted() -> None:
    def start(url: str, chunk: EngineChunk, sink: _CollectingSink, on_started: Any) -> Any:
        return run_stream_processes(
            [url], iter([chunk]), EngineOptions(lanes=1), sink, processes=2,
            show_progress=False, on_started=on_started,
        )  # fmt: skip

    outcome, messages = fleet_losing_worker_1(
        start, lambda worker: os.kill(worker.pid(), signal.SIGKILL)
    )
    assert any("worker 1 died (process killed by SIGKILL)" in m for m in messages)
    assert outcome.workers[1]["died"] == "process killed by SIGKILL"


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_keeps_their_results(tmp_path: Path) -> None:
    out = tmp_path / "partial.json"
    done = interrupted_blast(
        signal.SIGINT, "--processes", "2", "--num-prompts", "4000",
        "--output-file", str(out), after_s=6.0,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert "stopping 2 processes" in done.stderr
    res = json.loads(out.read_text())
    assert res["partial"] is True
    assert res["scheduled"] + res["not_reached"] == 4000
    assert res["scheduled"] == res["sent"] + res["not_sent"]
    assert res["sent"] == res["completed"] + res["failed"]
    assert 100 < res["sent"] < 3900 and res["not_reached"] > 0
    assert [w["requests"] for w in res["workers"]] == [2000, 2000]
    assert all(w["died"] is None for w in res["workers"])


def _blast_with_nofile(limit: int, url: str, out: Path, *extra: str) -> dict[str, Any]:
    """`fineserve blast` in a child whose open-files limit is ``limit`` (soft and hard):
    1,000 requests in 1 s against a server that answers after 1 s, so ~1,000 are in
    flight at once."""

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    command = [
        sys.executable, "-m", "fineserve.cli", "blast", "--base-url", url,
        "--model", "fineserve-mock", "--num-prompts", "1000", "--request-rate", "1000",
        "--random-input-len", "8", "--random-output-len", "2", "--warmup-requests", "0",
        "--disable-tqdm", "--output-file", str(out), *extra,
    ]  # fmt: skip
    done = subprocess.run(
        command,
        preexec_fn=lower,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.slow
def test_processes_pass_one_process_open_files_limit(tmp_path: Path) -> None:
    limit = 640  # 384 connections per process once 256 are kept for everything else
    with MockServer(ttft_ms=1000, itl_ms=1) as m:
        one = _blast_with_nofile(limit, m.base_url, tmp_path / "one.json")
        four = _blast_with_nofile(limit, m.base_url, tmp_path / "four.json", "--processes", "4")
    # One process: held to its descriptors; the rest waited for a connection (not failed).
    assert one["completed"] == 1000 and one["failed"] == 0
    assert one["max_connections"] == limit - 256
    assert one["connections_peak"] <= limit - 256
    assert one["connection_waits"] > 0 and one["client_saturated"] is True
    # Four processes: four limits, so the ~1,000 in flight never wait.
    assert four["completed"] == 1000 and four["failed"] == 0
    assert four["max_connections"] == 4 * (limit - 256)
    assert four["connections_peak"] > limit
    assert four["connection_waits"] == 0
