"""Server faults (injected by the mock, or sent byte-exact by a raw server): each request
gets the right error kind and a reason, nothing hangs, the rest of the schedule keeps its
timing, and the accounting adds up."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter

import numpy as np
import pytest

from conftest import RawHttpServer, invoke, kinds, run_schedule
from fineserve import EngineOptions, MockServer, _engine
from fineserve.metrics import compute_metrics
from fineserve.mock import FAULT_HELP

MS = 1_000_000
# Short timeouts so a stalled or slow fault trips them within the test.
SHORT = EngineOptions(
    warm_connections=4,
    first_byte_timeout_s=0.4,
    idle_timeout_s=0.4,
    total_timeout_s=10.0,
    max_body_bytes=1 << 20,
)


def test_every_mock_fault_is_documented() -> None:
    assert list(FAULT_HELP) == _engine.MOCK_FAULTS


@pytest.mark.parametrize(
    ("fault", "kind", "message"),
    [
        ("http_500", "http_status", "HTTP 500: "),
        ("http_429", "http_status", "HTTP 429 (Retry-After: 3): "),
        ("reset", "transport", "reset"),
        ("malformed_sse", "invalid_response", "not an SSE stream"),
        ("malformed_json", "invalid_response", "malformed JSON"),
        ("stall", "idle_timeout", "no bytes from the server for 400ms"),
        ("no_done", "incomplete", "without [DONE]"),
        ("slow_first_byte", "first_byte_timeout", "no response headers within 400ms"),
        ("endless", "too_large", "exceeded 1048576 bytes"),
        ("close_keepalive", "ok", None),
    ],
)
def test_each_fault_gets_its_error_kind_and_reason(fault: str, kind: str, message: str) -> None:
    n = 12
    with MockServer(
        ttft_ms=2,
        itl_ms=1,
        faults=[(fault, 1.0)],
        stall_ms=3000,
        first_byte_delay_ms=3000,
        retry_after_s=3,
    ) as m:
        started = time.monotonic()
        rec = run_schedule(m.base_url + "/v1/completions", np.arange(n) * 5 * MS, 8, SHORT)
        elapsed = time.monotonic() - started
        stats = m.stats()
    assert kinds(rec) == [kind] * n
    assert stats[f"fault_{fault}"] == n
    # Timeouts bound the run: nothing waits for the 3 s stall or delay.
    assert elapsed < 2.5
    if message is None:
        assert rec.columns["error_message"] == []
        assert stats["connections"] >= n  # the server closed each one after its response
    else:
        assert len(rec.columns["error_message"]) == n
        assert all(message in msg for msg in rec.columns["error_message"])
    p = rec.progress
    assert p["sent"] == n and p["not_sent"] == 0 and p["failed"] == (0 if kind == "ok" else n)


def test_slow_server_without_timeouts_is_slow_not_failed() -> None:
    """A stall or a slow first byte inside the timeouts is latency the user feels."""
    options = EngineOptions(warm_connections=2)
    for fault, column in (("stall", "itl"), ("slow_first_byte", "ttft")):
        with MockServer(
            ttft_ms=2, itl_ms=1, faults=[(fault, 1.0)], stall_ms=300, first_byte_delay_ms=300
        ) as m:
            rec = run_schedule(m.base_url + "/v1/completions", np.zeros(3, np.int64), 8, options)
        assert kinds(rec) == ["ok"] * 3, fault
        if column == "ttft":
            ttft = rec.col("first_token_ns") - rec.col("sent_ns")
            assert np.all(ttft >= 300 * MS)
        else:
            chunks = rec.col("chunk_ns").reshape(3, 8)
            assert np.all(np.diff(chunks, axis=1).max(axis=1) >= 290 * MS)


def test_total_timeout_ends_a_request_that_keeps_trickling() -> None:
    options = EngineOptions(warm_connections=2, idle_timeout_s=5, total_timeout_s=0.3)
    with MockServer(ttft_ms=2, itl_ms=1, faults=[("stall", 1.0)], stall_ms=3000) as m:
        started = time.monotonic()
        rec = run_schedule(m.base_url + "/v1/completions", np.zeros(4, np.int64), 8, options)
    assert time.monotonic() - started < 2.0
    assert kinds(rec) == ["total_timeout"] * 4
    # What arrived before the timeout is kept (the first half of the tokens).
    assert np.all(rec.col("n_chunks") == 4)


def test_mixed_faults_keep_the_schedule_and_the_accounting() -> None:
    """Faults on a third of the requests: the others succeed, every failure is one of the
    injected faults, and dispatch keeps time for all of them."""
    mix = [
        ("http_500", 0.04),
        ("http_429", 0.04),
        ("reset", 0.04),
        ("malformed_json", 0.04),
        ("no_done", 0.04),
        ("stall", 0.04),
        ("slow_first_byte", 0.04),
        ("close_keepalive", 0.04),
    ]
    n, rate = 800, 400
    t_ns = (np.arange(n) * (1e9 / rate)).astype(np.int64)
    with MockServer(ttft_ms=5, itl_ms=2, faults=mix, stall_ms=2000, first_byte_delay_ms=2000) as m:
        rec = run_schedule(m.base_url + "/v1/completions", t_ns, 8, SHORT)
        stats = m.stats()
    got = Counter(kinds(rec))
    expect = {
        "http_status": stats["fault_http_500"] + stats["fault_http_429"],
        "transport": stats["fault_reset"],
        "invalid_response": stats["fault_malformed_json"],
        "incomplete": stats["fault_no_done"],
        "idle_timeout": stats["fault_stall"],
        "first_byte_timeout": stats["fault_slow_first_byte"],
    }
    assert {k: got[k] for k in expect} == expect
    assert sum(expect.values()) + got["ok"] == n
    # Low-discrepancy draws: each fault within about one request of its share.
    for name, ratio in mix:
        assert abs(stats[f"fault_{name}"] - ratio * n) <= 2, name
    lag_us = (rec.col("sent_ns") - rec.col("scheduled_ns")) / 1e3
    assert np.percentile(lag_us, 99) < 5_000  # generous; precise figures are in benches/
    m_ = compute_metrics(rec.columns, np.full(n, 16))
    assert m_["completed"] == got["ok"] and m_["failed"] == n - got["ok"]
    assert m_["scheduled"] == m_["sent"] + m_["not_sent"]
    assert m_["sent"] == m_["completed"] + m_["failed"]
    # Only successes enter latency figures: no failed request's TTFT is in the mean.
    ok = np.array(kinds(rec)) == "ok"
    ttft_ms = (rec.col("first_token_ns") - rec.col("sent_ns"))[ok] / 1e6
    assert m_["mean_ttft_ms"] == pytest.approx(ttft_ms.mean(), rel=1e-9)


def test_stale_keepalive_connection_is_retried_on_a_new_one() -> None:
    """A server that answers one request per connection and then drops the next one
    unanswered (a keep-alive timeout racing the client): the unanswered request goes
    again, once, on a new connection, and succeeds."""
    body = b'{"choices":[{"text":"a b","finish_reason":"length"}],"usage":{"completion_tokens":2}}'

    def one_per_connection(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        conn.settimeout(2)
        try:
            conn.recv(65536)  # the next request on this connection: never answered
        except OSError:
            pass

    server = RawHttpServer(one_per_connection)
    try:
        rec = run_schedule(
            server.url,
            np.arange(6) * 50 * MS,
            options=EngineOptions(stream=False, warm_connections=1),
            bodies=[b'{"prompt":"x","max_tokens":2}'],
        )
    finally:
        server.close()
    assert kinds(rec) == ["ok"] * 6
    assert len(server.peers) >= 6


def test_blast_with_mock_faults_reports_failures_by_kind(tmp_path) -> None:
    res = tmp_path / "res.json"
    r = invoke(
        "blast", "--num-prompts", "200", "--request-rate", "400", "--random-output-len", "8",
        "--mock-itl-ms", "1", "--mock-fault", "http_500=0.1,reset=0.1", "--mock-fault",
        "no_done=0.1", "--disable-tqdm", "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "faults: http_500 10.0%, reset 10.0%, no_done 10.0%" in r.output
    m = json.loads(res.read_text())
    by_kind = m["errors_by_kind"]
    assert set(by_kind) == {"http_status", "transport", "incomplete"}
    assert all(abs(count - 20) <= 2 for count in by_kind.values()), by_kind
    assert m["failed"] == sum(by_kind.values()) and m["completed"] + m["failed"] == 200
    assert "    http_status:" in r.output and "first transport error:" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mock-fault", "meltdown=0.1"], "--mock-fault 'meltdown=0.1': unknown fault; known:"),
        (["--mock-fault", "reset=1.5"], "RATIO in [0, 1]"),
        (["--mock-fault", "reset"], "expected reset=RATIO"),
        (["--mock-fault", "reset=0.6,stall=0.6"], "add up to 1.2, more than 1"),
    ],
)
def test_bad_fault_options_are_one_line_errors(args: list[str], message: str) -> None:
    r = invoke("blast", "--num-prompts", "5", *args)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
