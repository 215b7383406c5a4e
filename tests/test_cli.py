"""The CLI end to end: the embedded-mock demo, result files and one-line errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from conftest import RawHttpServer, free_port, invoke
from fineserve.mock import MockServer


def test_blast_without_server_uses_embedded_mock(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = invoke(
        "blast",
        "--num-prompts",
        "50",
        "--request-rate",
        "200",
        "--random-input-len",
        "32",
        "--random-output-len",
        "8",
        "--disable-tqdm",
        "--output-file",
        str(out),
    )
    assert r.exit_code == 0, r.output
    assert "started the embedded mock server" in r.output
    assert "Successful requests:                     50" in r.output
    res = json.loads(out.read_text())
    for key in (
        "completed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "input_throughput",
        "output_throughput",
        "mean_e2e_latency_ms",
        "median_ttft_ms",
        "p99_tpot_ms",
        "p95_itl_ms",
        "concurrency",
        "duration",
    ):
        assert key in res
    assert res["completed"] == 50 and res["failed"] == 0
    assert res["total_input_tokens"] == 50 * 32  # mock counts words: synthetic prompts exact
    assert res["total_output_tokens"] == 50 * 8
    assert res["scheduled"] == res["sent"] + res["not_sent"]


@pytest.mark.slow
def test_progress_display_is_live_and_quiet_on_request() -> None:
    """Generations of ~1 s: before any request finishes the display already shows what
    was sent and is in flight; later the rolling TTFT; nothing with --disable-tqdm."""
    import re

    args = ["blast", "--num-prompts", "40", "--request-rate", "40", "--random-output-len", "200"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    frames = re.split(r"[\r\n]", r.stderr)
    early = [f for f in frames if " 0/40 " in f and "in_flight=" in f]
    assert any(int(re.search(r"in_flight=(\d+)", f).group(1)) > 0 for f in early), early
    last = [f for f in frames if "40/40" in f and "sent=40/40" in f]
    assert last and "failed=0" in last[-1] and re.search(r"ttft_p99=\d+ms", last[-1])
    quiet = invoke(*args[:-1], "4", "--disable-tqdm")
    assert quiet.exit_code == 0 and "in_flight=" not in quiet.output
    assert "req/s]" not in quiet.output


def test_jsonl_output_appends(tmp_path: Path) -> None:
    out = tmp_path / "runs.jsonl"
    for _ in range(2):
        r = invoke(
            "blast",
            "--num-prompts",
            "5",
            "--random-input-len",
            "8",
            "--random-output-len",
            "2",
            "--disable-tqdm",
            "--output-file",
            str(out),
        )
        assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["completed"] == 5 for x in lines)


def test_blast_against_explicit_server_and_chat_backend() -> None:
    with MockServer(ttft_ms=5, itl_ms=1, model="my-model") as m:
        r = invoke(
            "blast",
            "--base-url",
            m.base_url,
            "--backend",
            "openai-chat",
            "--num-prompts",
            "20",
            "--random-input-len",
            "10",
            "--random-output-len",
            "3",
            "--disable-tqdm",
        )
        stats = m.stats()
    assert r.exit_code == 0, r.output
    assert "embedded mock" not in r.output
    assert "model my-model" in r.output
    assert "Successful requests:                     20" in r.output
    assert stats["completions"] == 21  # 20 + 1 warm-up


def test_unreachable_server_is_one_line_error() -> None:
    r = invoke("blast", "--port", str(free_port()), "--num-prompts", "3", "--disable-tqdm")
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert "connection refused" in r.output
    assert len([x for x in r.output.splitlines() if x.startswith("Error")]) == 1


def test_non_openai_server_is_one_line_error() -> None:
    def html(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 6\r\n\r\n<html>"
        )

    server = RawHttpServer(html)
    try:
        r = invoke("blast", "--port", str(server.port), "--num-prompts", "3", "--disable-tqdm")
    finally:
        server.close()
    assert r.exit_code == 1
    assert "not an OpenAI-compatible server" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--extra-request-body", "{oops"], "--extra-request-body is not valid JSON"),
        (["--extra-request-body", "[1]"], "must be a JSON object"),
        (["--request-rate", "-3"], "'--request-rate': -3.0 is not in the range x>0"),
        (["--request-rate", "nan"], "'--request-rate': 'nan' is not a finite number"),
        (["--random-range-ratio", "1.5"], "'--random-range-ratio': 1.5 is not in the range"),
        (["--burstiness", "0"], "'--burstiness': 0.0 is not in the range x>0"),
        (["--time-scale", "0"], "'--time-scale': 0.0 is not in the range x>0"),
        (["--time-scale", "inf"], "'--time-scale': 'inf' is not a finite number"),
        (["--random-input-len", "100000000"], "100000000 is not in the range 1<=x<=10000000"),
        (["--request-timeout", "-1"], "'--request-timeout': -1.0 is not in the range x>0"),
        (
            ["--output-file", "/proc/nonexistent-dir/r.json"],
            "cannot create directory '/proc/nonexistent-dir'",
        ),
        (["--save-requests", "/proc/1/r.parquet"], "directory '/proc/1' is not writable"),
        (["--base-url", "http://127.0.0.1:9", "--port", "9"], "either --base-url or --host"),
        (["--source-ip", "1.2.3"], "source address '1.2.3' is not an IP address"),
        (["--mode", "parametric"], "--mode parametric needs --model-class"),
        (["--save-detailed"], "--save-detailed needs --output-file"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    r = invoke("blast", "--num-prompts", "2", "--disable-tqdm", *args)
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in r.output
    # Refused before anything starts: no embedded mock for a run that cannot happen.
    assert "started the embedded mock" not in r.output


@pytest.mark.slow
def test_api_key_is_sent_but_never_echoed(tmp_path: Path) -> None:
    """The key goes to the server, and appears nowhere of ours: not the output, results,
    journal, report, or error messages, even when the server echoes the request back."""
    seen: list[bytes] = []
    secret = "sk-test-SECRET-123"

    def echo_headers(conn: socket.socket) -> None:
        # A 401 whose body quotes the request's headers, as some proxies' error pages do.
        body = b"unauthorized; you sent: " + seen[-1].split(b"\r\n\r\n")[0].replace(b'"', b"'")
        conn.sendall(
            b"HTTP/1.1 401 Unauthorized\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )

    class Capturing(RawHttpServer):
        def _handle(self, conn: socket.socket) -> None:
            data = conn.recv(65536, socket.MSG_PEEK)
            seen.append(data)
            super()._handle(conn)

    req, res, html = tmp_path / "r.parquet", tmp_path / "r.json", tmp_path / "r.html"
    server = Capturing(echo_headers)
    try:
        r = invoke(
            "blast", "--port", str(server.port), "--model", "m", "--num-prompts", "2",
            "--warmup-requests", "0", "--disable-tqdm", "--save-requests", str(req),
            "--output-file", str(res),
            env={"OPENAI_API_KEY": secret},
        )  # fmt: skip
    finally:
        server.close()
    assert any(f"Bearer {secret}".encode() in s for s in seen)
    assert "http_status" in r.output and "Bearer [redacted]" in r.output
    r2 = invoke("report", str(req), "-o", str(html))
    assert r2.exit_code == 0, r2.output
    written = [p for p in tmp_path.iterdir() if p.is_file()]
    assert {req, res, html} <= set(written)
    for text in [r.output, r2.output, *(p.read_bytes().decode("latin-1") for p in written)]:
        assert secret not in text
