"""A new user's first hour: the plan is stated before sending, long runs are called out,
`--help` is grouped and complete, vLLM's option names work, a base URL ending in /v1 and an
HTML error page are handled in one line, and the report draws readable panels."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import click
import numpy as np
import pytest

from conftest import SHARED_DATA, RawHttpServer, invoke
from fineserve.cli import cli
from fineserve.cli.params import HELP_GROUPS, help_group
from fineserve.report import latency_axis_scale
from fineserve.workloads.spec import format_duration, plan_from_send_times


def test_plan_counts_requests_span_and_busiest_second() -> None:
    t = [np.array([0, 1, 2], np.int64) * 10**8, np.array([5_000_000_000, 5_000_000_001])]
    plan = plan_from_send_times(iter(t))
    assert (plan.requests, plan.span_s, plan.peak_per_s, plan.complete) == (5, 5.000000001, 3, True)
    assert "5 requests over 5.0 s (mean 1.0 req/s, peak 3 in one second)" in plan.describe()
    assert format_duration(8640) == "2 h 24 min" and format_duration(75) == "1 min 15 s"


@pytest.mark.skipif(
    not (SHARED_DATA / "fineserve/Parametric/gamma").is_dir(), reason="shared data absent"
)
def test_a_streamed_mode_states_its_plan_and_a_long_run_is_called_out(tmp_path: Path) -> None:
    """The README's parametric example: the plan line gives the request count and the wall
    duration before anything is sent (here cut to 3 s of trace at 20x), and the class
    without a lengths file says where its lengths come from."""
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--mode", "parametric", "--model-class", "Dense_lt10B", "--datasets-dir",
        str(SHARED_DATA / "fineserve"), "--duration", "3", "--time-scale", "20",
        "--disable-tqdm", "--output-file", str(res), "--random-output-len", "2",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    plan = next(line for line in r.output.splitlines() if "plan:" in line)
    out = json.loads(res.read_text())
    assert f"{out['scheduled']:,} requests over " in plan
    assert "lengths from --random-input-len 1024 / --random-output-len 2 (constant)" in r.output
    # The same workload over an hour of trace at 1x sends for an hour: said before it starts.
    r = invoke(
        "generate", "--mode", "parametric", "--model-class", "Dense_lt10B", "--datasets-dir",
        str(SHARED_DATA / "fineserve"), "--duration", "900", "-o", str(tmp_path / "g.parquet"),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = invoke(
        "blast", "--schedule", str(tmp_path / "g.parquet"), "--base-url", "http://127.0.0.1:9"
    )
    assert r.exit_code != 0  # nobody listens there; the plan comes before the run only
    r = invoke("blast", "--schedule", str(tmp_path / "g.parquet"), "--num-prompts", "5",
               "--disable-tqdm")  # fmt: skip
    assert r.exit_code == 0 and "this run sends for" not in r.output
    r = invoke(
        "blast", "--schedule", str(tmp_path / "g.parquet"), "--mock-ttft-ms", "0",
        "--time-scale", "1.4", "--disable-tqdm", "--random-output-len", "1",
        "--duration", "900",
    )  # fmt: skip
    assert r.exit_code != 0 and "--random-output-len cannot change it" in r.output


def test_long_runs_are_called_out_before_they_start(tmp_path: Path) -> None:
    """Three requests at 0.004 req/s, slowed 10x, send for well over 10 minutes: the
    warning comes before anything is sent (here the warm-up fails at once, so the run never
    starts); 10x faster, there is none."""
    path = tmp_path / "slow.parquet"
    r = invoke("generate", "--num-prompts", "3", "--request-rate", "0.004", "-o", str(path))
    assert r.exit_code == 0, r.output
    args = ("blast", "--schedule", str(path), "--mock-fault", "http_500=1")
    r = invoke(*args, "--time-scale", "0.1")
    assert r.exit_code != 0 and "warm-up failed" in r.output
    assert r.output.index("this run sends for") < r.output.index("warm-up failed")
    assert "plan: 3 requests over" in r.output
    r = invoke(*args, "--time-scale", "10")
    assert "this run sends for" not in r.output and "plan: 3 requests over" in r.output


def test_help_is_grouped_and_every_option_documented() -> None:
    for name in ("blast", "sweep", "generate", "mock", "fit", "compare", "report"):
        cmd = cli.commands[name]
        ctx = click.Context(cmd)
        for p in cmd.get_params(ctx):
            if getattr(p, "hidden", False) or (p.name or "_").startswith(("_", "help")):
                continue
            if isinstance(p, click.Option):
                assert p.help, f"{name} --{p.name} has no help"
            if name == "blast" and isinstance(p, click.Option):
                assert help_group(p.name or "") is not None, f"--{p.name} is in no section"
    text = invoke("blast", "--help").output
    titles = [t for t, _ in HELP_GROUPS]
    positions = [text.index(f"\n{t}:\n") for t in titles]
    assert positions == sorted(positions)
    assert text.index("--base-url") < text.index("--mode") < text.index("--lanes")
    assert "%%" not in text and "60% of the time" in text


def test_vllm_option_names(tmp_path: Path) -> None:
    r = invoke(
        "blast", "--num-prompts", "5", "--num-warmups", "0", "--dataset-name", "random",
        "--save-result", "--result-dir", str(tmp_path), "--disable-tqdm",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    (saved,) = tmp_path.glob("vllm-infqps-fineserve-mock-*.json")
    assert json.loads(saved.read_text())["completed"] == 5
    r = invoke(
        "blast", "--num-prompts", "5", "--save-result", "--result-dir", str(tmp_path),
        "--result-filename", "x.json", "--disable-tqdm",
    )  # fmt: skip
    assert r.exit_code == 0 and (tmp_path / "x.json").is_file()
    r = invoke("blast", "--dataset-name", "sharegpt")
    assert r.exit_code != 0 and "--dataset-name sharegpt needs --dataset-path" in r.output
    r = invoke("blast", "--save-result", "--output-file", str(tmp_path / "y.json"))
    assert r.exit_code != 0 and "not both" in r.output


def test_base_url_ending_in_v1_is_trimmed_with_a_notice() -> None:
    from fineserve.mock import MockServer

    with MockServer(ttft_ms=1, itl_ms=1) as m:
        r = invoke(
            "blast", "--base-url", m.base_url + "/v1/", "--num-prompts", "3", "--disable-tqdm"
        )
    assert r.exit_code == 0, r.output
    assert f"using {m.base_url} (paths such as /v1/completions" in r.output


def test_an_html_error_page_is_one_line() -> None:
    page = (
        b"<!DOCTYPE html>\n<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n"
        b"<center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx</center>\n</body>\n"
        b"</html>\n"
    )

    def respond(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: "
            + str(len(page)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + page
        )

    server = RawHttpServer(respond)
    try:
        r = invoke("blast", "--base-url", f"http://127.0.0.1:{server.port}", "--num-prompts", "2")
    finally:
        server.close()
    assert r.exit_code != 0
    error = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "502 Bad Gateway" in error[0] and "<" not in error[0]
    assert not any(line.strip().startswith("<") for line in r.output.splitlines())


def test_ray_missing_is_refused_before_the_mock_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    r = invoke("blast", "--ray", "local", "--num-prompts", "2")
    assert r.exit_code != 0 and "pip install 'fineserve[ray]'" in r.output
    assert "embedded mock" not in r.output


def test_class_models_are_shown_and_recorded(tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    trace = tmp_path / "t.csv"
    trace.write_text(
        "timestamp,input_length,output_length\n" + "".join(f"{i * 1000},8,2\n" for i in range(6))
    )
    r = invoke(
        "blast", "--mode", "replay", "--request-trace-csv", str(trace), "--disable-tqdm",
        "--num-prompts", "4", "--output-file", str(res), "--class-model", "x=other-model",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "by class x=other-model" in r.output
    assert json.loads(res.read_text())["class_models"] == {"x": "other-model"}


def test_report_axes_fit_narrow_ranges_and_single_groups_are_not_drawn() -> None:
    narrow = [np.linspace(5.0, 5.3, 100)]
    wide = [np.geomspace(1, 5000, 100)]
    assert latency_axis_scale(narrow) == "linear"
    assert latency_axis_scale(wide) == "log"
    from fineserve.report import compared_groups

    class _Run:
        def __init__(self, breakdown: dict) -> None:
            self.metrics = {"breakdown": breakdown}

    one = {"endpoint": {"a": {"p99_ttft_ms": 1.0}}}
    assert compared_groups(_Run(one)) == {}  # type: ignore[arg-type]
    two = {**one, "class": {"x": {"p99_ttft_ms": 2.0}, "y": {"p99_ttft_ms": 3.0}}}
    assert compared_groups(_Run(two)) == {"class=x": 2.0, "class=y": 3.0}  # type: ignore[arg-type]
