"""End-to-end behaviour of the Rust engine against the embedded mock and raw servers."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from conftest import RawHttpServer, completion_bodies, free_port, kinds, run_schedule
from fineserve import ERROR_KINDS, EngineOptions, MockServer, _engine
from fineserve.metrics import compute_metrics
from fineserve.metrics.serving import itl_ns


def test_counts_add_up_and_tokens_match(mock: MockServer) -> None:
    n = 200
    t = np.linspace(0, 0.4e9, n).astype(np.int64)
    rec = run_schedule(mock.base_url + "/v1/completions", t, max_tokens=8)
    assert set(kinds(rec)) == {"ok"}
    p = rec.progress
    assert p["scheduled"] == n == p["sent"] + p["not_sent"]
    assert p["sent"] == p["succeeded"] + p["failed"]
    assert p["succeeded"] == n
    assert np.all(rec.col("n_chunks") == 8)
    assert np.all(rec.col("completion_tokens") == 8)  # from the usage chunk
    assert np.all(rec.col("prompt_tokens") == 16)
    assert np.all(rec.col("http_status") == 200)
    offsets = rec.col("chunk_offsets")
    assert offsets[0] == 0 and offsets[-1] == len(rec.col("chunk_ns")) == 8 * n
    sent, first, done = rec.col("sent_ns"), rec.col("first_token_ns"), rec.col("done_ns")
    assert np.all((sent <= first) & (first <= done))
    assert mock.stats()["completions"] == n


def test_ttft_and_itl_match_mock_configuration() -> None:
    # Tolerance: the mock's tokio timers round deadlines up to the next millisecond, so each
    # event may be up to ~1 ms late (plus scheduling noise); the cadence itself is absolute.
    with MockServer(ttft_ms=40, itl_ms=10) as m:
        t = (np.arange(40) * 25e6).astype(np.int64)
        rec = run_schedule(m.base_url + "/v1/completions", t, max_tokens=12)
    assert set(kinds(rec)) == {"ok"}
    ttft_ms = (rec.col("first_token_ns") - rec.col("sent_ns")) / 1e6
    assert 40 <= np.median(ttft_ms) <= 43
    gaps = itl_ns(rec.col("chunk_ns"), rec.col("chunk_offsets"), np.ones(40, bool)) / 1e6
    assert len(gaps) == 40 * 11
    assert 9.5 <= np.mean(gaps) <= 10.5
    assert 9.0 <= np.median(gaps) <= 11.5


def test_mock_logs_arrivals_and_token_instants_for_benches() -> None:
    # The benches measure peers that record no send instants at the server; the logs
    # must hold one arrival per completion request and each stream's token instants.
    n, tokens = 30, 6
    bodies = [
        b.replace(b'"stream"', b'"user": "u%d", "stream"' % i)
        for i, b in enumerate(completion_bodies(n, tokens))
    ]
    with MockServer(ttft_ms=5, itl_ms=4, record_arrivals=True, record_token_times=True) as m:
        t = (np.arange(n) * 10e6).astype(np.int64)
        rec = run_schedule(m.base_url + "/v1/completions", t, tokens, bodies=bodies)
        arrivals, streams = m.take_arrival_times(), m.take_token_times()
        assert len(m.take_arrival_times()) == 0  # taken, not copied
    assert set(kinds(rec)) == {"ok"}
    assert len(arrivals) == n and np.all(np.diff(arrivals) > 0)
    # Arrivals keep the 10 ms schedule (generous bound: shared CI cores).
    assert np.median(np.abs(np.diff(arrivals) / 1e6 - 10)) < 1.0
    assert sorted(streams) == sorted(f"u{i}" for i in range(n))
    gaps_ms = np.concatenate([np.diff(v) for v in streams.values()]) / 1e6
    assert all(len(v) == tokens for v in streams.values())
    assert 3.5 <= np.median(gaps_ms) <= 5.5


def test_open_loop_keeps_schedule_when_server_is_slow() -> None:
    # Every response takes ~0.6 s, so ~120 requests are in flight at 200 req/s; an
    # open-loop client must still send each one on time.
    with MockServer(ttft_ms=500, itl_ms=10) as m:
        n = 300
        t = (np.arange(n) * 5e6).astype(np.int64)
        rec = run_schedule(
            m.base_url + "/v1/completions",
            t,
            max_tokens=10,
            options=EngineOptions(warm_connections=200),
        )
    assert set(kinds(rec)) == {"ok"}
    lag_ms = (rec.col("sent_ns") - rec.col("scheduled_ns")) / 1e6
    assert np.percentile(lag_ms, 99) < 5
    metrics = compute_metrics(rec.columns, np.full(n, 16))
    assert metrics["concurrency"] > 80


def test_max_concurrency_is_respected_and_queueing_recorded() -> None:
    with MockServer(ttft_ms=30, itl_ms=5) as m:
        n = 40
        rec = run_schedule(
            m.base_url + "/v1/completions",
            np.zeros(n, dtype=np.int64),
            max_tokens=4,
            options=EngineOptions(max_concurrency=4, warm_connections=4),
        )
    assert set(kinds(rec)) == {"ok"}
    sent, done = rec.col("sent_ns"), rec.col("done_ns")
    events = sorted([(s, 1) for s in sent] + [(d, -1) for d in done], key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 4
    # Queued requests show their wait as dispatch lag: ten waves of ~50 ms.
    assert (sent - rec.col("scheduled_ns")).max() / 1e6 > 300


def test_bursts_leave_within_their_millisecond(mock: MockServer) -> None:
    bursts, size = 100, 8
    t = np.repeat(np.arange(bursts) * 10_000_000 + 500_000, size).astype(np.int64)
    rec = run_schedule(
        mock.base_url + "/v1/completions",
        t,
        max_tokens=2,
        options=EngineOptions(warm_connections=64),
    )
    assert set(kinds(rec)) == {"ok"}
    same_ms = rec.col("sent_ns") // 1_000_000 == rec.col("scheduled_ns") // 1_000_000
    # Generous functional bound; precise figures are in benches/.
    assert same_ms.mean() >= 0.9


def test_server_down_every_request_fails_with_reason() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/completions"
    n = 20
    rec = run_schedule(url, np.zeros(n, dtype=np.int64), options=EngineOptions())
    assert kinds(rec) == ["connect"] * n
    assert len(rec.columns["error_message"]) == n
    assert all("refused" in m.lower() for m in rec.columns["error_message"])
    p = rec.progress
    assert p["sent"] == p["failed"] == n and p["not_sent"] == 0


def _chunked(conn: socket.socket, pieces: list[bytes], ctype: bytes = b"text/event-stream") -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    for p in pieces:
        conn.sendall(b"%x\r\n%s\r\n" % (len(p), p))
        time.sleep(0.003)
    conn.sendall(b"0\r\n\r\n")


def test_sse_events_split_across_reads_are_timed_and_counted() -> None:
    stream = (
        b"".join(
            b'data: {"choices":[{"text":"t%d","finish_reason":null}]}\r\n\r\n' % i for i in range(5)
        )
        + b'data: {"choices":[],"usage":{"completion_tokens":5}}\n\ndata: [DONE]\n\n'
    )
    # Cut into 7-byte pieces, each sent separately (so events straddle reads).
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    server = RawHttpServer(lambda c: _chunked(c, pieces))
    try:
        rec = run_schedule(server.url, np.zeros(3, dtype=np.int64), options=EngineOptions())
    finally:
        server.close()
    assert kinds(rec) == ["ok"] * 3
    assert list(rec.col("n_chunks")) == [5, 5, 5]
    assert list(rec.col("completion_tokens")) == [5, 5, 5]
    chunks = rec.col("chunk_ns")[:5]
    assert np.all(np.diff(chunks) > 0)  # each event stamped when its last byte arrived


def test_non_openai_responses_are_failures_with_reasons() -> None:
    def html(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 5\r\n\r\nhello"
        )

    def garbage_sse(conn: socket.socket) -> None:
        _chunked(conn, [b"data: {this is not json\n\n"])

    def truncated(conn: socket.socket) -> None:
        _chunked(conn, [b'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n'])

    def server_error(conn: socket.socket) -> None:
        body = b'{"error":{"message":"overloaded"}}'
        conn.sendall(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )

    cases = [
        (html, "invalid_response", "content-type"),
        (garbage_sse, "invalid_response", "malformed JSON"),
        (truncated, "incomplete", "without [DONE]"),
        (server_error, "http_status", 'HTTP 503: {"error"'),
    ]
    for respond, kind, text in cases:
        server = RawHttpServer(respond)
        try:
            rec = run_schedule(server.url, np.zeros(2, dtype=np.int64), options=EngineOptions())
        finally:
            server.close()
        assert kinds(rec) == [kind, kind], respond.__name__
        assert all(text in m for m in rec.columns["error_message"]), rec.columns["error_message"]


def test_stop_marks_unsent_and_cancel_marks_in_flight() -> None:
    with MockServer(ttft_ms=2000, itl_ms=5) as m:
        n = 100
        t = (np.arange(n) * 20e6).astype(np.int64)  # 2 s of schedule
        bodies = completion_bodies(n, 4)
        run = _engine.start_run(
            [m.base_url + "/v1/completions"], EngineOptions(warm_connections=16, lanes=2)
        )
        run.feed(
            t,
            np.arange(n, dtype=np.uint32),
            bodies,
            np.zeros(n, dtype=np.uint32),
            np.full(n, 4, dtype=np.uint32),
        )
        run.close_input()
        assert not run.wait(0.5)
        run.stop()
        assert not run.wait(0.3)  # in-flight requests are still waiting for their TTFT
        run.cancel()
        assert run.wait(5)
        res = run.results()
    k = [ERROR_KINDS[x] for x in res["error_kind"]]
    assert res["stopped"] is True
    assert 10 <= k.count("cancelled") <= 50
    assert k.count("not_sent") == n - k.count("cancelled")
    assert "ok" not in k
    msgs = dict(zip(res["error_index"].tolist(), res["error_message"]))
    assert all("stopped" in msgs[i] for i, kind in enumerate(k) if kind == "not_sent")
    assert np.all(res["sent_ns"][np.array(k) == "not_sent"] == -1)


def test_invalid_schedule_is_rejected_with_one_line() -> None:
    with pytest.raises(_engine.EngineError, match="not sorted at index 1"):
        _engine.start_run(["http://127.0.0.1:9/v1/completions"], EngineOptions()).feed(
            np.array([5, 1], dtype=np.int64),
            np.zeros(2, dtype=np.uint32),
            [b"{}"],
            np.zeros(2, dtype=np.uint32),
            np.zeros(2, dtype=np.uint32),
        )
    with pytest.raises(_engine.EngineError, match="must start with http:// or https://"):
        _engine.start_run(["ftp://x/v1/completions"], EngineOptions())
    with pytest.raises(_engine.EngineError, match=r"--cacert /nonexistent\.pem"):
        _engine.start_run(
            ["https://127.0.0.1:9/v1/completions"], EngineOptions(ca_file="/nonexistent.pem")
        )
    with pytest.raises(_engine.EngineError, match="header name"):
        _engine.start_run(
            ["http://127.0.0.1:9/v1/completions"], EngineOptions(request_headers=["bad name"])
        )


def test_engine_options_cross_into_rust_and_bad_ones_are_one_line() -> None:
    """``start_run`` reads the ``EngineOptions`` dataclass field by field; each bad value
    is refused in one line, and the API key never shows in the options' repr."""
    url = ["http://127.0.0.1:9/v1/completions"]
    cases = [
        (EngineOptions(lanes=0), "lanes must be >= 1"),
        (EngineOptions(max_concurrency=0), "max_concurrency must be >= 1"),
        (EngineOptions(connect_timeout_s=0), "connect_timeout_s must be a positive number"),
        (EngineOptions(idle_timeout_s=-1.0), "idle_timeout_s must be a positive number"),
        (EngineOptions(route_groups=[[0, 1]]), "route group 0 must list endpoints 0..1"),
        (EngineOptions(source_ips=["nope"]), 'source address "nope" is not an IP address'),
    ]
    for options, message in cases:
        with pytest.raises(_engine.EngineError, match=message) as e:
            _engine.start_run(url, options)
        assert "\n" not in str(e.value)
    assert "secret" not in repr(EngineOptions(api_key="secret"))
    run = _engine.start_run(url, EngineOptions(lanes=1, api_key="secret"), start_at_unix_ns=0)
    run.close_input()
    assert run.wait(5) and len(run.results()["index"]) == 0


def test_connections_come_from_the_given_source_addresses() -> None:
    """--source-ip: every connection is bound to one of the listed local addresses, in
    turn, so more than one address's ephemeral ports can reach one server."""
    done = b'data: {"choices":[{"text":"x","finish_reason":"length"}]}\n\ndata: [DONE]\n\n'
    server = RawHttpServer(lambda c: _chunked(c, [done]))
    try:
        rec = run_schedule(
            server.url,
            np.zeros(12, dtype=np.int64),
            options=EngineOptions(
                warm_connections=0, lanes=2, source_ips=["127.0.0.2", "127.0.0.3"]
            ),
        )
    finally:
        server.close()
    assert kinds(rec) == ["ok"] * 12
    assert set(server.peers) == {"127.0.0.2", "127.0.0.3"}
    # The raw server closes each connection after one response: 12 connections, spread.
    assert len(server.peers) == 12 and server.peers.count("127.0.0.2") >= 4


def test_bad_source_address_is_one_line() -> None:
    import pytest

    from fineserve.errors import FineserveError

    with pytest.raises(FineserveError, match="not an IP address"):
        run_schedule(
            "http://127.0.0.1:9/v1/completions",
            np.zeros(1, dtype=np.int64),
            options=EngineOptions(source_ips=["nope"]),
        )


def test_unusable_source_address_is_reported_as_such() -> None:
    server = RawHttpServer(lambda c: None)
    try:
        rec = run_schedule(
            server.url,
            np.zeros(2, dtype=np.int64),
            options=EngineOptions(warm_connections=0, source_ips=["192.0.2.1"]),
        )
    finally:
        server.close()
    assert kinds(rec) == ["connect"] * 2
    assert "cannot use source address 192.0.2.1" in rec.columns["error_message"][0]
