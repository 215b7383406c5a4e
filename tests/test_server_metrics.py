"""The server beside the client (``--server-metrics``): scraped values against the mock's
and an independent server's true ones, the join to each request, the file, and scrapes
that fail (refused, 404, a page that is not Prometheus text) without failing the run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import free_port, invoke
from fineserve.metrics.scrape import histogram_quantile
from fineserve.report import load_run
from fineserve.results import server_metrics_path
from stdlib_server import OpenAIServer


def _blast(*args: str) -> Any:
    return invoke("blast", "--disable-tqdm", "--random-input-len", "8", *args)


def test_against_an_independent_server_the_gauge_and_the_counter_agree(
    servers: list[OpenAIServer], tmp_path: Path
) -> None:
    """The issue's acceptance run: ≥ 10 samples, the running gauge's peak where Little's
    law puts it (40 req/s × ~0.2 s per stream ≈ 8 in flight), and the counter's increase
    equal to the tokens fineserve received."""
    srv = OpenAIServer(metrics="vllm", token_gap_s=0.02)
    servers.append(srv)
    req, res = tmp_path / "run.parquet", tmp_path / "run.json"
    r = _blast(
        "--base-url", srv.base_url(), "--server-metrics", "--server-metrics-interval", "0.1",
        "--num-prompts", "120", "--request-rate", "40", "--random-output-len", "10",
        "--save-requests", str(req), "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    samples = pq.read_table(server_metrics_path(req))
    assert server_metrics_path(req).name == "run.server-metrics.parquet"
    running = samples.filter(np.asarray(samples["name"].to_pylist()) == "vllm:num_requests_running")
    assert running.num_rows >= 10
    data = json.loads(res.read_text())
    page = data["server_metrics"][srv.base_url()]
    assert page["failed"] == 0 and page["scrapes"] >= 10
    peak = page["metrics"]["vllm:num_requests_running"]["max"]
    assert 3 <= peak <= 30, peak
    tokens = page["metrics"]["vllm:generation_tokens_total"]["increase"]
    assert data["total_output_tokens"] == 1200
    assert math.isclose(tokens, data["total_output_tokens"], rel_tol=0.02), tokens
    # Each request carries the server's state at its send; the summary shows the block.
    table = pq.read_table(req)
    joined = np.asarray(table["srv_running"].to_pylist(), dtype=float)
    assert np.isfinite(joined).mean() > 0.9
    assert np.nanmax(joined) <= peak
    assert "Server metrics" in r.output and "running (peak / mean)" in r.output


def test_the_mocks_metrics_are_its_true_values(tmp_path: Path) -> None:
    """The embedded mock under capacity (4 generations at once, 30 ms TTFT, 8 tokens at
    5 ms): running never above 4, a queue forms, every generated token is counted, and
    the server's TTFT histogram is there beside the client's."""
    req, res = tmp_path / "m.parquet", tmp_path / "m.json"
    r = _blast(
        "--server-metrics", "--server-metrics-interval", "0.05", "--mock-max-concurrency", "4",
        "--mock-ttft-ms", "30", "--num-prompts", "150", "--request-rate", "150",
        "--random-output-len", "8", "--save-requests", str(req), "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(res.read_text())
    (page,) = data["server_metrics"].values()
    m = page["metrics"]
    assert m["vllm:num_requests_running"]["max"] <= 4
    assert m["vllm:num_requests_running"]["max"] >= 3
    assert m["vllm:num_requests_waiting"]["max"] > 0
    assert m["vllm:generation_tokens_total"]["increase"] == data["total_output_tokens"] == 1200
    assert m["vllm:request_success_total"]["increase"] == 150
    ttft = m["vllm:time_to_first_token_seconds"]
    assert ttft["count"] == 150 and ttft["p50"] >= 0.03
    assert "Server TTFT (p50 / p99 ms)" in r.output
    table = pq.read_table(req)
    waiting = np.asarray(table["srv_waiting"].to_pylist(), dtype=float)
    assert np.nanmax(waiting) > 0
    # The report reads the scraped file beside the requests.
    run = load_run(req)
    assert (
        run.server is not None
        and run.server.num_rows == pq.read_table(server_metrics_path(req)).num_rows
    )


@pytest.mark.parametrize("kind", ["refused", "404", "garbage"])
def test_failed_scrapes_are_counted_and_never_fail_the_run(
    servers: list[OpenAIServer], tmp_path: Path, kind: str
) -> None:
    srv = OpenAIServer(metrics="garbage" if kind == "garbage" else None)
    servers.append(srv)
    res = tmp_path / "r.json"
    extra = (
        ["--server-metrics-url", f"http://127.0.0.1:{free_port()}/metrics"]
        if kind == "refused"
        else ["--server-metrics"]
    )
    r = _blast(
        "--base-url", srv.base_url(), *extra, "--server-metrics-interval", "0.1",
        "--num-prompts", "20", "--request-rate", "40", "--random-output-len", "3",
        "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(res.read_text())
    assert data["completed"] == 20
    (page,) = data["server_metrics"].values()
    assert page["scrapes"] >= 2 and page["failed"] == page["scrapes"]
    want = {"refused": "refused", "404": "HTTP 404", "garbage": "Error"}[kind]
    assert want in page["first_error"], page
    assert "Traceback" not in r.output


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    b = {0.1: 10.0, 0.2: 30.0, 0.5: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.25, b) == pytest.approx(0.1)
    assert histogram_quantile(0.5, b) == pytest.approx(0.15)
    assert histogram_quantile(0.99, b) == pytest.approx(0.2 + 0.3 * (39.6 - 30) / 10)
    assert histogram_quantile(0.5, {math.inf: 0.0}) is None


def test_server_metrics_options_are_checked(tmp_path: Path) -> None:
    r = _blast("--server-metrics-url", "ftp://x/metrics", "--num-prompts", "2")
    assert r.exit_code != 0 and "expected an http(s):// URL" in r.output
    r = _blast("--server-metrics", "--server-metrics-interval", "0.01", "--num-prompts", "2")
    assert r.exit_code != 0 and "0.05" in r.output


PAGE = """# TYPE q gauge
q{engine="0"} %(q0)s
q{engine="1"} %(q1)s
# TYPE tok_total counter
tok_total %(tok)s
# TYPE lat histogram
lat_bucket{le="0.1"} %(b1)s
lat_bucket{le="1.0"} %(b2)s
lat_bucket{le="+Inf"} %(b2)s
lat_sum %(ls)s
lat_count %(b2)s
# TYPE rpc summary
rpc{quantile="0.5"} 0.2
rpc_sum %(rs)s
rpc_count %(rc)s
# TYPE odd untyped
odd 7
"""


def test_every_metric_type_is_summarised_over_the_run() -> None:
    """Gauges summed over label sets per scrape; a counter's increase across a reset; a
    histogram's and a summary's in-run increase (not their totals since start)."""
    from fineserve.metrics.scrape import Scraper, ScrapeTarget, _parse, _target_summary

    scraper = Scraper([ScrapeTarget("p", "http://x/metrics", 0)], 0.1)
    st = scraper.stats[0]
    pages = [
        dict(q0=1, q1=2, tok=100, b1=10, b2=10, ls=0.5, rs=1.0, rc=10),
        dict(q0=4, q1=0, tok=150, b1=10, b2=30, ls=8.5, rs=3.0, rc=20),
        dict(q0=2, q1=1, tok=20, b1=10, b2=30, ls=8.5, rs=4.0, rc=30),  # tok was reset
    ]
    for i, values in enumerate(pages):
        scraper._record(st, i * 100_000_000, _parse(PAGE % values))
    m = _target_summary(st)["metrics"]
    assert m["q"]["max"] == 4 and m["q"]["min"] == 3 and m["q"]["mean"] == pytest.approx(10 / 3)
    assert m["odd"]["mean"] == 7
    assert m["tok_total"]["increase"] == 50 + 20
    assert m["tok_total"]["rate"] == pytest.approx(70 / 0.2)
    lat = m["lat"]
    assert lat["count"] == 20 and lat["mean"] == pytest.approx(8.0 / 20)
    assert 0.1 < lat["p50"] <= 1.0  # the 20 new observations all fell in (0.1, 1]
    assert m["rpc"]["count"] == 20 and m["rpc"]["mean"] == pytest.approx(3.0 / 20)
