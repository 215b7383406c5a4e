"""Connection limits are stated, and a plan past them is warned about with the remedy."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import completion_bodies, invoke
from fineserve import EngineOptions, MockServer, _engine, limits
from fineserve.limits import connection_budget, connection_limits
from fineserve.records import RECORD_INT_COLUMNS, empty_records, records_to_batch
from fineserve.results import read_requests


def test_open_files_limit_is_raised_to_the_hard_limit_and_stated() -> None:
    lines = connection_limits(10, 0, mock=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY
    assert lines[0].startswith(f"open files: limit {soft}")
    assert len(lines) == 1  # 10 connections fit


def test_plans_past_the_limits_are_warned_about() -> None:
    _, files = _engine.raise_open_files_limit()
    ports = _engine.ephemeral_port_range()
    assert ports is not None and ports[0] <= ports[1]
    per_source = (ports[1] - ports[0] + 1) // 2
    many = max(files, per_source) + 1
    lines = connection_limits(many, 0, mock=False)
    assert any("more than the open-files limit" in x and "ulimit -n" in x for x in lines)
    assert any("ephemeral ports × 1 source" in x and "--source-ip" in x for x in lines)
    # Enough source addresses lift the port warning (not the descriptor one).
    lines = connection_limits(per_source + 1, 2, mock=False)
    assert not any("ephemeral ports" in x and "warning" in x for x in lines)


def test_the_cap_keeps_within_the_ephemeral_ports_all_processes_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, files = _engine.raise_open_files_limit()
    monkeypatch.setattr(limits._engine, "ephemeral_port_range", lambda: (40_000, 41_999))
    # 2,000 ports per source address and server, the 1,000 connect() takes first, a tenth
    # of those kept free: 900 per pair.
    assert connection_budget(50_000, 0, mock=False).max_in_flight == min(900, files - 256)
    four = connection_budget(50_000, 0, mock=False, engine_processes=4)
    assert four.max_in_flight == min(900, 4 * (files - 256))  # ports are per host
    assert connection_budget(50_000, 2, False, 4, n_endpoints=3).max_in_flight == min(
        5_400, 4 * (files - 256)
    )
    monkeypatch.setattr(limits._engine, "ephemeral_port_range", lambda: (1, 200_000))
    # Processes multiply the descriptors: four limits, not one.
    assert connection_budget(10**6, 0, False, 4).max_in_flight == 4 * (files - 256)
    assert connection_budget(10**6, 0, True, 4).max_in_flight == files - 256  # mock here


def _blast_with_nofile(limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`fineserve blast` in its own process with the open-files limit (soft and hard) at
    ``limit``, as `ulimit -n` would set it."""

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "fineserve.cli", "blast", "--disable-tqdm", *args],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lower,
    )


@pytest.mark.slow
def test_descriptor_shortage_queues_requests_instead_of_failing_or_hanging(
    tmp_path: Path,
) -> None:
    """800 requests at 400 req/s, each streaming for ~1 s from the in-process mock: ~400 in
    flight need ~1,050 descriptors (both ends), the limit is 700. Every request succeeds
    (the excess waits for a connection: dispatch lag), none hangs until a timeout, the
    check says so before the run, and --save-requests still has every row."""
    res, req = tmp_path / "r.json", tmp_path / "r.parquet"
    started = time.monotonic()
    done = _blast_with_nofile(
        700, "--num-prompts", "800", "--request-rate", "400", "--random-input-len", "8",
        "--random-output-len", "40", "--mock-itl-ms", "25", "--mock-ttft-ms", "20",
        "--first-byte-timeout", "60", "--output-file", str(res), "--save-requests", str(req),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    assert "Traceback" not in done.stderr
    assert "more than the open-files limit 700: at most 222 are in flight" in done.stderr
    out = json.loads(res.read_text())
    assert out["completed"] == out["scheduled"] == 800, out["errors_by_kind"]
    assert out["p99_dispatch_lag_us"] > 100_000  # they waited: the cost is shown, not hidden
    table, _ = read_requests(req)
    assert table.num_rows == 800
    # Never more than the cap in flight at once (from each request's send and end).
    sent, done_ns = table["sent_ns"].to_numpy(), table["done_ns"].to_numpy()
    ends = np.sort(done_ns)
    in_flight = np.arange(1, 801) - np.searchsorted(ends, np.sort(sent), side="right")
    assert in_flight.max() <= 222


@pytest.mark.slow
def test_full_disk_keeps_the_run_summary_and_output_file(tmp_path: Path) -> None:
    """--save-requests on a full disk (/dev/full answers every write with ENOSPC): the
    journal moves to the temporary directory and says so, the run goes on, the summary
    prints and --output-file is written; when the Parquet cannot go where asked either,
    it goes to the temporary directory, named in the message."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    req = tmp_path / "full" / "r.parquet"
    req.parent.mkdir()
    os.symlink("/dev/full", str(req) + ".journal")
    os.symlink("/dev/full", req)
    res = tmp_path / "r.json"
    env = {**os.environ, "TMPDIR": str(scratch)}
    done = subprocess.run(
        [sys.executable, "-m", "fineserve.cli", "blast", "--disable-tqdm", "--num-prompts",
         "60", "--request-rate", "200", "--random-input-len", "8", "--random-output-len", "4",
         "--save-requests", str(req), "--output-file", str(res)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "Successful requests:" in done.stdout
    assert f"cannot write {req}.journal: No space left on device" in done.stderr
    moved = [p for p in scratch.iterdir() if p.name.endswith("r.parquet")]
    assert len(moved) == 1 and f"written to {moved[0]} instead of {req}" in done.stderr
    out = json.loads(res.read_text())
    assert out["completed"] == 60
    table, meta = read_requests(moved[0])
    assert table.num_rows == 60 and meta["complete"] is True
    assert not any(p.name.endswith(".journal") for p in scratch.iterdir())


def test_records_dropped_when_no_place_takes_them_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Neither the journal nor its fallback can be written: batches are counted as dropped
    (never an exception into the run), and closing still leaves a file that says so."""
    from fineserve import results

    journal_full = tmp_path / "r.parquet.journal"
    os.symlink("/dev/full", journal_full)
    os.symlink("/dev/full", tmp_path / "fallback.journal")
    monkeypatch.setattr(results, "_fallback_path", lambda p: tmp_path / "fallback.journal")
    writer = results.RequestsWriter(tmp_path / "r.parquet", {"seed": 1})
    batch = records_to_batch(
        {**empty_records(), "index": np.arange(3, dtype=np.uint64),
         **{c: np.zeros(3, np.int64) for c in RECORD_INT_COLUMNS if c != "index"},
         "error_kind": np.zeros(3, np.uint8), "endpoint_idx": np.zeros(3, np.uint32),
         "chunk_offsets": np.zeros(4, np.uint64)},
        {"input_len": np.full(3, 8), "output_len": np.full(3, 2)}, [""],
    )  # fmt: skip
    writer.write(batch)
    writer.write(batch)
    assert writer.dropped == 6 and writer.rows == 0
    err = capsys.readouterr().err
    assert "cannot write" in err and "request records are no longer written" in err
    path = writer.close({"partial": False})
    assert path == tmp_path / "r.parquet"
    table, meta = read_requests(path)
    assert table.num_rows == 0 and meta["dropped_rows"] == 6


def test_connections_are_bounded_over_every_lane_and_the_verdict_says_so(
    tmp_path: Path,
) -> None:
    """--max-connections 16 against ~40 requests in flight (400 req/s, ~100 ms streams), on
    3 lanes that each pool idle connections: no request fails, never more than 16
    connections open at once, and the result says the client was the bottleneck."""
    res, req = tmp_path / "r.json", tmp_path / "r.parquet"
    r = invoke(
        "blast", "--num-prompts", "400", "--request-rate", "400", "--random-input-len", "8",
        "--random-output-len", "16", "--mock-itl-ms", "6", "--lanes", "3",
        "--max-connections", "16", "--disable-tqdm", "--output-file", str(res),
        "--save-requests", str(req),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(res.read_text())
    assert out["completed"] == 400 and out["failed"] == 0
    assert out["max_connections"] == 16 and out["connections_peak"] <= 16
    assert out["connection_waits"] > 0 and out["client_saturated"] is True
    assert out["pool_wait_p99_us"] > 0  # the waits are per request, in the dispatch lag
    table = pq.read_table(req)
    waited = np.asarray(table["conn_wait_ns"].to_pylist())
    assert (waited > 0).sum() > 0
    lag = np.asarray(table["sent_ns"].to_pylist()) - np.asarray(table["scheduled_ns"].to_pylist())
    assert (lag >= waited).all()
    assert any("connects waited" in why for why in out["client_saturation_reasons"])
    assert "Client saturated:" in r.output and "the client, not the server" in r.output


def test_an_unsaturated_run_says_so(tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--num-prompts", "50", "--request-rate", "100", "--random-input-len", "8",
        "--random-output-len", "4", "--disable-tqdm", "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(res.read_text())
    assert out["client_saturated"] is False, out["client_saturation_reasons"]
    assert out["client_saturation_reasons"] == [] and out["connection_waits"] == 0


def test_warm_connections_follow_littles_law_from_the_warm_up(tmp_path: Path) -> None:
    """400 req/s of ~95 ms requests (mock TTFT 20 ms + 15 × 5 ms) keep ~40 in flight: the
    warm pool is sized from that (×1.5 headroom, plus the lanes), not from the 400 requests
    of the busiest second."""
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--num-prompts", "800", "--request-rate", "400", "--random-input-len", "8",
        "--random-output-len", "16", "--disable-tqdm", "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(res.read_text())
    assert out["completed"] == 800
    assert 40 <= out["warm_connections"] <= 120, out["warm_connections"]
    assert "the time per request expected from the warm-up" in r.output
    explicit = invoke(
        "blast", "--num-prompts", "50", "--request-rate", "400", "--random-input-len", "8",
        "--random-output-len", "4", "--warm-connections", "30", "--disable-tqdm",
        "--output-file", str(res),
    )  # fmt: skip
    assert json.loads(res.read_text())["warm_connections"] == 30, explicit.output


def test_past_the_budget_each_lane_reuses_its_connections_instead_of_reconnecting() -> None:
    """Every lane overloaded (600 requests at once, 16 connections over 4 lanes, streams
    of ~30 ms): each request waits for one of its lane's own connections, as a fixed pool
    would. Before, a connection was closed whenever any connect waited for budget, so
    nearly every request opened a new connection and the send rate fell to the connect
    rate."""
    from conftest import run_schedule
    from fineserve import MockServer

    n = 600
    with MockServer(ttft_ms=10, itl_ms=5) as m:
        rec = run_schedule(
            m.base_url + "/v1/completions",
            np.zeros(n, np.int64),
            max_tokens=4,
            options=EngineOptions(lanes=4, warm_connections=16, max_connections=16),
        )
        accepted = m.stats()["connections"]
    assert np.all(rec.col("error_kind") == 0)
    assert rec.progress["connections_peak"] <= 16
    assert rec.progress["connection_waits"] > n // 2  # nearly all waited their turn
    # 16 warm and no more: a lane closes a connection for another lane only after it sat
    # unused for a second (608 when every waiting connect closed what came back; up to
    # 16 + 60 when a lane whose queue had drained closed what came back at once).
    assert accepted <= 16 + 8, accepted


def test_the_verdict_names_lanes_whose_cores_were_saturated(tmp_path: Path) -> None:
    """One lane asked for far more than it can send (30,000 req/s, on a machine whose
    other core holds the mock): most of its windows are over 90% busy with work, and the
    verdict says so. A lane that only spins between requests (3,000 req/s) is not busy."""
    out = {}
    for rate in (30_000, 3_000):
        res = tmp_path / f"{rate}.json"
        # In a process of its own, as users run it: the test process's threads (servers,
        # Ray's driver from earlier tests) would share the lane's cores.
        done = subprocess.run(
            [sys.executable, "-m", "fineserve.cli", "blast", "--num-prompts", str(rate * 2),
             "--request-rate", str(rate), "--lanes", "1", "--mock-itl-ms", "0",
             "--random-output-len", "4", "--disable-tqdm", "--output-file", str(res)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        out[rate] = json.loads(res.read_text())
    busy = out[30_000]
    assert busy["lanes_cpu_saturated_share"] >= 0.25
    assert any("used over 90% of their cores" in why for why in busy["client_saturation_reasons"])
    assert out[3_000]["lanes_cpu_saturated_share"] < 0.25
    assert not any("cores" in why for why in out[3_000]["client_saturation_reasons"])


def test_past_the_budget_a_lane_holds_its_next_request_instead_of_spawning_it() -> None:
    """2,000 requests due at once, 8 connections, 2 lanes, streams of ~0.2 s: at most 128
    requests per lane wait for a connection (spawned, each a whole request task); the
    rest stay in the pacer until one leaves. Before, every due request was spawned at once
    and waited (2,000 tasks; past a server's ceiling the backlog grew by tens of thousands
    a second and its fresh pages took the lanes' cores). Each hold counts in the request's
    connection wait, so the lag is still accounted for."""
    n, lanes, cap = 2000, 2, 8
    with MockServer(ttft_ms=200, itl_ms=1) as m:
        run = _engine.start_run(
            [m.base_url + "/v1/completions"],
            EngineOptions(lanes=lanes, warm_connections=cap, max_connections=cap),
        )
        run.feed(
            np.zeros(n, np.int64),
            np.zeros(n, np.uint32),
            completion_bodies(1, 2),
            np.zeros(n, np.uint32),
            np.full(n, 2, np.uint32),
        )
        run.close_input()
        most_waiting = 0
        while not run.wait(0.05):
            p = run.progress()
            # Spawned and not yet sent: waiting for a connection.
            most_waiting = max(most_waiting, int(p["dispatched"]) - int(p["sent"]))
            if int(p["sent"]) >= 200:
                run.stop()
                run.cancel()
        assert run.wait(10)
        res = run.results()
    assert 0 < most_waiting <= 128 * lanes, most_waiting
    kinds = np.asarray(res["error_kind"])
    sent = np.asarray(res["sent_ns"]) >= 0
    assert (kinds[sent] == 0).sum() >= 150  # those sent before the stop came back
    waited = np.asarray(res["conn_wait_ns"])[sent]
    lag = np.asarray(res["sent_ns"])[sent] - np.asarray(res["scheduled_ns"])[sent]
    late = lag > 300e6  # sent after the first ~two rounds of 8: held a while
    assert late.sum() > 50 and np.all(waited[late] >= 0.9 * lag[late]), (waited, lag)


def test_a_connection_unused_for_a_second_goes_to_a_lane_that_waits_for_budget() -> None:
    """2 connections over 2 lanes. Lane 0's first request streams for ~3 s; lane 1's
    finishes at once and its connection then sits unused. Lane 0's second request, due
    at 1.5 s, finds the budget spent: lane 1 gives up its connection (unused for over a
    second) and the request leaves then, not when lane 0's first one ends."""
    from fineserve.runner import run_engine

    slow, fast = completion_bodies(1, 300)[0], completion_bodies(1, 1)[0]
    t = np.array([0, 0, 1_500_000_000, 1_600_000_000], np.int64)
    with MockServer(ttft_ms=1, itl_ms=10) as m:
        rec = run_engine(
            [m.base_url + "/v1/completions"],
            t,
            [slow, fast],
            np.array([0, 1, 0, 1], np.uint32),
            np.zeros(4, np.uint32),
            np.array([300, 1, 300, 1]),
            EngineOptions(lanes=2, warm_connections=2, max_connections=2),
            show_progress=False,
        )
    assert np.all(rec.col("error_kind") == 0)
    lag_s = (rec.col("sent_ns") - rec.col("scheduled_ns")) / 1e9
    assert lag_s[2] < 0.5, lag_s  # a connection freed for it, not lane 0's after ~3 s
    assert rec.progress["connections_peak"] <= 2


def test_a_connection_cap_past_the_limits_is_lowered_and_says_so(tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--num-prompts", "20", "--request-rate", "100", "--random-input-len", "8",
        "--random-output-len", "2", "--max-connections", "1000000", "--disable-tqdm",
        "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    cap = json.loads(res.read_text())["max_connections"]
    assert 0 < cap < 1_000_000
    assert "--max-connections 1000000 is more than" in r.output and f"at most {cap}" in r.output
