"""Numbers you can defend: --num-runs with confidence intervals, the steady-state window,
early stop on a failing server, and A/B verdicts between two runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import invoke
from fineserve.metrics.steady import (
    RequestTimes,
    ab_verdicts,
    across_runs,
    mser5,
    steady_window,
)


def _times(sent_ns: Any, ttft_ns: Any, dur_ns: Any, tokens: int = 8) -> RequestTimes:
    sent = np.asarray(sent_ns, np.int64)
    t = RequestTimes()
    t.add(
        {
            "sent_ns": sent,
            "first_token_ns": sent + np.asarray(ttft_ns, np.int64),
            "done_ns": sent + np.asarray(dur_ns, np.int64),
            "completion_tokens": np.full(len(sent), tokens),
            "n_chunks": np.full(len(sent), tokens),
            "error_kind": np.zeros(len(sent), np.uint8),
        }
    )
    return t


def test_num_runs_reports_intervals_and_a_steady_window(tmp_path: Path) -> None:
    """The issue's acceptance run: three runs of one schedule on the embedded mock."""
    res, req = tmp_path / "r.json", tmp_path / "run.parquet"
    r = invoke(
        "blast", "--num-runs", "3", "--num-prompts", "300", "--request-rate", "100",
        "--random-input-len", "8", "--random-output-len", "8", "--disable-tqdm",
        "--output-file", str(res), "--save-requests", str(req), "--reset-prefix-cache",
        "--cooldown", "0.2",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    # The mock has no /reset_prefix_cache: said (once per reset), the runs go on.
    assert r.output.count("cannot reset its prefix cache (HTTP 404") == 2
    data = json.loads(res.read_text())
    assert data["num_runs"] == 3 and len(data["runs"]) == 3
    per_run = [run["mean_ttft_ms"] for run in data["runs"]]
    low, high = data["ci95_mean_ttft_ms"]
    assert low <= np.mean(per_run) <= high and low < high
    assert data["mean_ttft_ms"] == pytest.approx(np.mean(per_run))
    cv = np.std(per_run, ddof=1) / np.mean(per_run)
    assert data["cv_mean_ttft_ms"] == pytest.approx(cv)
    w = data["steady_state"]
    assert 0 <= w["start_s"] < w["end_s"] <= data["duration"]
    assert "MSER-5" in w["method"]
    assert data["steady_requests"] > 100
    assert "Across 3 runs (mean ± 95% CI)" in r.output and "Steady state" in r.output
    for k in (1, 2, 3):  # one file per run, the same schedule in each
        table = pq.read_table(tmp_path / f"run-run{k}.parquet")
        assert table.num_rows == 300
    assert not req.exists()


def test_confidence_intervals_cover_the_truth_at_their_rate() -> None:
    """Runs drawn from a known distribution: the 95% interval of 3 runs covers the true
    mean in about 95% of 2,000 repetitions (Student's t, not the normal's 1.96)."""
    rng = np.random.default_rng(7)
    hits = 0
    trials = 2000
    for _ in range(trials):
        runs = [{"mean_ttft_ms": v} for v in rng.normal(25.0, 3.0, 3)]
        lo, hi = across_runs(runs)["ci95_mean_ttft_ms"]
        hits += lo <= 25.0 <= hi
    assert 0.93 <= hits / trials <= 0.97, hits / trials


def test_steady_state_excludes_a_warm_up_ramp() -> None:
    """100 req/s for 20 s; requests take 0 s at the start growing to 1 s at 5 s, then 1 s:
    in flight ramps up over the first ~6 s, then holds. The window starts after the ramp
    and ends at the last send."""
    n = 2000
    sent = np.arange(n) * 10_000_000
    dur = np.minimum(sent / 5e9, 1.0) * 1e9 + 1e6
    w = steady_window(_times(sent, dur / 2, dur))
    assert w is not None
    assert 5.0 <= w["start_s"] <= 9.0, w
    assert w["end_s"] == pytest.approx(sent[-1] / 1e9)
    flat = steady_window(_times(sent, np.full(n, 5e8), np.full(n, 1e9)))
    assert flat is not None and flat["start_s"] <= 1.5  # nothing to cut but the fill-up
    assert mser5(np.ones(3)) == 0  # too short to judge: keep everything


def test_early_stop_on_a_failing_server(tmp_path: Path) -> None:
    res, req = tmp_path / "r.json", tmp_path / "r.parquet"
    r = invoke(
        "blast", "--num-prompts", "3000", "--request-rate", "300", "--random-input-len", "8",
        "--random-output-len", "4", "--mock-fault", "http_500=0.6", "--warmup-requests", "0",
        "--stop-on-failure-rate", "0.3", "--stop-window", "1", "--disable-tqdm",
        "--output-file", str(res), "--save-requests", str(req),
    )  # fmt: skip
    assert r.exit_code == 0, r.output  # a deliberate stop, not an interruption
    data = json.loads(res.read_text())
    stop = data["early_stop"]
    assert "failure rate" in stop["reason"] and stop["at_s"] < 5.0
    assert data["not_reached"] > 1000  # never due before the stop
    table = pq.read_table(req)
    kinds = table["error_kind"].to_pylist()
    msgs = table["error_message"].to_pylist()
    unsent = [m for k, m in zip(kinds, msgs) if k == "not_sent"]
    assert unsent and all("failure rate" in m for m in unsent)
    assert "Stopped early at (s)" in r.output


def test_early_stop_on_ttft(tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--num-prompts", "600", "--request-rate", "100", "--random-input-len", "8",
        "--random-output-len", "2", "--mock-ttft-ms", "120", "--stop-on-ttft-p99-ms", "50",
        "--stop-window", "1", "--disable-tqdm", "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(res.read_text())
    assert "p99 TTFT" in data["early_stop"]["reason"]
    assert data["not_reached"] > 200


def test_early_stop_on_dispatch_lag(tmp_path: Path) -> None:
    """Two requests in flight at most against 100 ms answers at 100 req/s: the queue
    behind the cap shows as dispatch lag, and the run stops on it."""
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--num-prompts", "1000", "--request-rate", "100", "--random-input-len", "8",
        "--random-output-len", "2", "--mock-ttft-ms", "100", "--max-concurrency", "2",
        "--stop-on-lag-ms", "200", "--stop-window", "1", "--disable-tqdm",
        "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(res.read_text())
    assert "p99 dispatch lag" in data["early_stop"]["reason"]
    assert data["not_reached"] > 500


def test_ab_verdicts_find_a_real_difference_and_not_a_null_one() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    sent = np.arange(n) * 1_000_000

    def run(shift_ms: float) -> RequestTimes:
        ttft = rng.gamma(4.0, 5.0, n) + shift_ms
        return _times(sent, ttft * 1e6, (ttft + 40) * 1e6)

    a, b, same = run(0.0), run(10.0), run(0.0)
    found = {v["figure"]: v for v in ab_verdicts(a, b)}
    mean = found["mean_ttft_ms"]
    assert mean["significant"] and mean["ci95"][0] < 10.0 < mean["ci95"][1]
    assert found["median_ttft_ms"]["significant"]
    null = {v["figure"]: v for v in ab_verdicts(a, same)}
    assert not null["mean_ttft_ms"]["significant"], null["mean_ttft_ms"]
    assert "runs_ci95" not in mean  # one run a side: no interval over runs
    # Three runs a side: the requests pooled, and Welch's t over the runs' figures.
    many = {
        v["figure"]: v
        for v in ab_verdicts([run(0.0) for _ in range(3)], [run(10.0) for _ in range(3)])
    }
    lo, hi = many["mean_ttft_ms"]["runs_ci95"]
    assert many["mean_ttft_ms"]["runs_significant"] and lo < 10.0 < hi


def test_report_states_ab_verdicts(tmp_path: Path) -> None:
    """Two series of two runs each (--num-runs 2): the report groups X-run1/X-run2, pools
    their requests, and adds the interval over runs."""
    paths = []
    for name, ttft in (("a", "20"), ("b", "45")):
        p = tmp_path / f"{name}.parquet"
        r = invoke(
            "blast", "--num-prompts", "150", "--request-rate", "200", "--random-input-len",
            "8", "--random-output-len", "4", "--mock-ttft-ms", ttft, "--disable-tqdm",
            "--num-runs", "2", "--save-requests", str(p),
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        paths += [str(tmp_path / f"{name}-run{k}.parquet") for k in (1, 2)]
    out = tmp_path / "rep.html"
    r = invoke("report", *paths, "-o", str(out))
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "mean TTFT" in x)
    assert "significant" in line.split(";")[0] and "not significant" not in line.split(";")[0]
    assert "over runs" in line
    assert "b vs a" in r.output
    assert "95% interval" in out.read_text()
