"""Ctrl-C and SIGTERM during `fineserve blast`: dispatch stops, in-flight requests drain,
partial results are printed and written, exit status 130."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import interrupted_blast
from fineserve.results import read_requests


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_dispatch_and_keeps_partial_results(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "partial.json"
    done = interrupted_blast(sig, "--output-file", str(out))
    stdout, stderr = done.stdout, done.stderr
    assert done.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted: dispatch stopped" in stderr
    assert "results are partial" in stderr
    assert "Successful requests:" in stdout
    res = json.loads(out.read_text())
    assert res["partial"] is True
    # The schedule's figures cover it up to the stop; what was never due counts apart.
    assert res["scheduled"] + res["not_reached"] == 600
    assert res["scheduled"] == res["sent"] + res["not_sent"]
    assert res["sent"] == res["completed"] + res["failed"]
    assert 50 < res["sent"] < 550 and res["not_reached"] > 0
    assert res["not_sent"] <= 5  # due but not sent: only those in the stop's instant
    assert res["errors_by_kind"].get("not_sent", 0) == res["not_sent"]
    assert "Not reached (stopped):" in stdout
    # Offered rate and arrival error of the part that ran: 100 req/s, not diluted.
    assert 80 < res["offered_request_rate"] < 120, res["offered_request_rate"]
    assert res["arrival_rate_error"] < 0.1


@pytest.mark.slow
def test_second_ctrl_c_cancels_in_flight_at_once_and_keeps_results(tmp_path: Path) -> None:
    """In-flight requests wait 20 s for their first token and the drain grace is 60 s: the
    second Ctrl-C ends the run at once, in-flight requests are recorded as cancelled, and
    the results file holds every scheduled request."""
    out = tmp_path / "partial.json"
    req = tmp_path / "req.parquet"
    started = time.monotonic()
    done = interrupted_blast(
        signal.SIGINT, "--output-file", str(out), "--save-requests", str(req),
        "--mock-ttft-ms", "20000", "--drain-grace", "60", "--warmup-requests", "0",
        again_after_s=1.0,
    )  # fmt: skip
    assert time.monotonic() - started < 15
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    res = json.loads(out.read_text())
    assert res["partial"] is True and res["completed"] == 0
    assert res["errors_by_kind"]["cancelled"] == res["sent"] > 50
    assert res["sent"] + res["not_sent"] + res["not_reached"] == 600
    table, meta = read_requests(req)
    assert table.num_rows == 600 and meta["partial"] is True
    assert meta["stopped_at_ns"] > 0
