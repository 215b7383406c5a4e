"""`fineserve sweep`: the bracketing/bisection search, and a sweep against the mock with a
known capacity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import invoke
from fineserve.sweep import parse_slo, search


def _fake_server(load: float) -> dict:
    """p99 TTFT 20 ms up to 50 req/s, then +10 ms per req/s: the SLO of 60 ms holds up to 54."""
    p99 = 20 + max(0.0, load - 50) * 10
    return {"completed": 100, "failed": 0, "p99_ttft_ms": p99, "request_throughput": load}


@pytest.mark.parametrize("start", [1.0, 10.0, 54.0, 500.0])
def test_search_brackets_then_bisects_to_the_knee(start: float) -> None:
    r = search(_fake_server, start, [parse_slo("ttft:p99:60")], unit="req/s")
    best = r.best
    assert best is not None and best.passed
    assert 54 / 1.05 <= best.load <= 54
    failing = [p.load for p in r.probes if not p.passed]
    assert min(failing) > 54 and min(failing) <= best.load * 1.05 + 1e-9
    assert r.instances_for(1000) == -(-1000 // best.load)


def test_failures_fail_a_probe() -> None:
    def flaky(load: float) -> dict:
        return {"completed": 90, "failed": 10, "p99_ttft_ms": 1.0, "request_throughput": load}

    r = search(flaky, 10, [parse_slo("ttft:p99:60")], unit="req/s", max_probes=4)
    assert r.best is None and "failures 10.0%" in r.probes[0].why


@pytest.mark.parametrize("bad", ["ttft:99:10", "foo:p99:10", "ttft:p100:10", "ttft:p99:-1", "x"])
def test_bad_slo_is_one_line(bad: str) -> None:
    r = invoke("sweep", "--slo", bad)
    assert r.exit_code != 0 and "--slo" in r.output and "Traceback" not in r.output


def test_sweep_finds_the_mock_capacity(tmp_path: Path) -> None:
    """8 generations at once, each holding its slot ~95 ms (TTFT 20 + 15 gaps of 5 ms):
    capacity ≈ 84 req/s. Below it p99 TTFT stays near 20 ms; past it requests queue."""
    out = tmp_path / "sweep.json"
    png = tmp_path / "sweep.png"
    r = invoke(
        "sweep",
        "--slo",
        "ttft:p99:60",
        "--mock-max-concurrency",
        "8",
        "--random-output-len",
        "16",
        "--request-rate",
        "20",
        "--step-seconds",
        "2",
        "--tolerance",
        "0.1",
        "--output-file",
        str(out),
        "--plot",
        str(png),
        "--target-load",
        "1000",
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert 30 <= res["best_load"] <= 84
    loads = [p["load"] for p in res["probes"]]
    passed = {p["load"]: p["passed"] for p in res["probes"]}
    assert any(not ok and load > res["best_load"] for load, ok in passed.items())
    assert res["instances"] == -(-1000 // res["best_load"])
    assert loads == sorted(loads) and len(loads) >= 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "highest load meeting the SLOs" in r.output
