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


def _saturating_server(load: float) -> dict:
    """Keeps latency low (a short probe) but completes at most 40 req/s."""
    return {
        "completed": 100,
        "failed": 0,
        "p99_ttft_ms": 1.0,
        "offered_request_rate": load,
        "sustained_request_rate": min(load, 40.0),
        "sustained_fraction": min(load, 40.0) / load,
    }


def test_a_rate_the_server_does_not_sustain_fails_the_probe() -> None:
    slo = [parse_slo("ttft:p99:60")]
    r = search(_saturating_server, 10, slo, unit="req/s", min_sustained=0.9)
    assert r.best is not None and 40 <= r.best.load <= 40 / 0.9
    assert any("sustained 40.0 of" in p.why for p in r.probes if not p.passed)
    # Instances are counted from the rate sustained, not the one offered.
    assert r.instances_for(1000) == 25
    # Without the check the latency SLO alone passes every load probed.
    r = search(_saturating_server, 10, slo, unit="req/s", max_probes=6)
    assert all(p.passed for p in r.probes) and r.best is not None and r.best.load == 320


@pytest.mark.parametrize("bad", ["ttft:99:10", "foo:p99:10", "ttft:p100:10", "ttft:p99:-1", "x"])
def test_bad_slo_is_one_line(bad: str) -> None:
    r = invoke("sweep", "--slo", bad)
    assert r.exit_code != 0 and "--slo" in r.output and "Traceback" not in r.output


@pytest.mark.slow
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
    # p99 TTFT <= 60 ms means at most ~40 ms queueing behind 8 slots of ~95 ms each:
    # reached well below the 84 req/s capacity, well above 8 / 0.095 / 3.
    assert 35 <= res["best_sustained_rps"] <= 84
    loads = [p["load"] for p in res["probes"]]
    passed = {p["load"]: p["passed"] for p in res["probes"]}
    assert any(not ok and load > res["best_load"] for load, ok in passed.items())
    assert any("p99_ttft_ms" in p["why"] for p in res["probes"] if not p["passed"])
    assert res["instances"] == -(-1000 // res["best_sustained_rps"])
    assert loads == sorted(loads) and len(loads) >= 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "highest load meeting the SLOs" in r.output


@pytest.mark.slow
def test_sweep_catches_overload_that_short_probes_hide(tmp_path: Path) -> None:
    """With an SLO too loose to fail in a 2 s probe, the sustained-rate check alone must
    stop the sweep at the mock's capacity (8 slots of ~95 ms: ~84 req/s)."""
    out = tmp_path / "sweep.json"
    r = invoke(
        "sweep", "--slo", "ttft:p99:100000", "--mock-max-concurrency", "8",
        "--random-output-len", "16", "--request-rate", "20", "--step-seconds", "2",
        "--tolerance", "0.1", "--output-file", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert 0.8 * 84 <= res["best_sustained_rps"] <= 1.05 * 84
    failed = [p for p in res["probes"] if not p["passed"]]
    assert failed and all("sustained" in p["why"] for p in failed)
    for p in failed:  # the server completed at its capacity, whatever was offered
        assert p["metrics"]["sustained_request_rate"] <= 1.05 * 84


DATASETS = Path(__file__).resolve().parents[1] / "datasets"


@pytest.mark.slow
@pytest.mark.skipif(not (DATASETS / "Parametric").is_dir(), reason="no datasets")
def test_sweep_scales_a_bursty_workload_by_time_scale(tmp_path: Path) -> None:
    """A parametric (bursty) workload swept by time scale: the same trace span every
    probe, compressed more and more, until the mock (2 generations at once) falls behind."""
    out = tmp_path / "sweep.json"
    r = invoke(
        "sweep", "--mode", "parametric", "--model-class", "azure_code",
        "--datasets-dir", str(DATASETS), "--duration", "120", "--time-scale", "20",
        "--slo", "ttft:p99:100000", "--mock-max-concurrency", "2", "--mock-ttft-ms", "2",
        "--mock-itl-ms", "1", "--random-output-len", "16", "--tolerance", "0.15",
        "--target-load", "1000", "--output-file", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["unit"] == "time scale"
    probes = res["probes"]
    # Every probe replays the same requests; only their pace changes.
    assert len({p["metrics"]["scheduled"] for p in probes}) == 1
    offered = [p["metrics"]["offered_request_rate"] for p in probes]
    loads = [p["load"] for p in probes]
    for (l0, o0), (l1, o1) in zip(zip(loads, offered), zip(loads[1:], offered[1:])):
        assert o1 / o0 == pytest.approx(l1 / l0, rel=1e-6)
    failed = [p for p in probes if not p["passed"]]
    assert failed and all("sustained" in p["why"] for p in failed)
    best = next(p for p in probes if p["load"] == res["best_load"])
    fraction = best["metrics"]["sustained_fraction"]
    assert fraction >= 0.9
    assert res["best_sustained_load"] == pytest.approx(best["load"] * min(1.0, fraction))
    assert res["instances"] == -(-1000 // res["best_sustained_load"])
    assert "(time scale)" in r.output


def test_repeats_near_the_boundary_take_the_majority() -> None:
    """A noisy server: near its knee (54 req/s) one run in three misjudges the load.
    With --sweep-repeats 3 every bisection probe runs three times and the majority
    decides; the bracketing probes run once."""
    calls: dict[float, int] = {}

    def noisy(load: float) -> dict:
        calls[load] = calls.get(load, 0) + 1
        wrong = calls[load] % 3 == 0  # the third run at a load lies
        p99 = 20 + max(0.0, load - 50) * 10
        if wrong:
            p99 = 200.0 if p99 <= 60 else 10.0
        return {"completed": 100, "failed": 0, "p99_ttft_ms": p99, "request_throughput": load}

    r = search(noisy, 10, [parse_slo("ttft:p99:60")], unit="req/s", repeats=3)
    bisected = [p for p in r.probes if p.trials]
    assert bisected and all(len(p.trials) == 3 for p in bisected)
    assert all(p.passed == (sum(p.trials) >= 2) for p in bisected)
    assert "of 3 runs passed" in bisected[0].why
    assert all(not p.trials for p in r.probes[:3])  # 10, 20, 40, ...: bracketing
    best = r.best
    assert best is not None and 54 / 1.05 <= best.load <= 54
