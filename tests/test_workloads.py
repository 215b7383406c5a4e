"""Workload generators: statistics match their models, seeds reproduce, replay is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2

from conftest import SHARED_DATA, invoke
from fineserve.errors import FineserveError
from fineserve.schedule import Schedule, ScheduleStats, concat, read_schedule, write_schedule
from fineserve.traces import load_trace
from fineserve.workloads import RandomLengths, poisson_chunks
from fineserve.workloads.burstgpt import burstgpt_chunks, fit_burstgpt, zipf_sample
from fineserve.workloads.mix import label, merge_streams
from fineserve.workloads.parametric import (
    GammaWindows,
    NegBinom,
    load_gamma_windows,
    load_nb_json,
    parametric_chunks,
    window_params,
)
from fineserve.workloads.replay import replay_chunks
from fineserve.workloads.servegen import load_client_pool, servegen_chunks

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data absent")
FS = SHARED_DATA / "fineserve"
LENGTHS = RandomLengths(100, 10, 0.0)


def _windows(shape: float, scale_ms: float, n: int, window_s: float = 300.0) -> GammaWindows:
    start = np.arange(n) * window_s * 1e3
    return GammaWindows(start, start + window_s * 1e3, np.full(n, shape), np.full(n, scale_ms))


def test_parametric_window_rate_and_cv_match_gamma() -> None:
    shapes = np.array([0.3, 0.6, 1.0, 2.0])
    scales = np.array([50.0, 20.0, 10.0, 4.0])
    start = np.arange(4) * 300e3
    w = GammaWindows(start, start + 300e3, shapes, scales)
    s = concat(list(parametric_chunks(w, LENGTHS, np.random.default_rng(3))))
    for k in range(4):
        t = s.t_ns[(s.t_ns >= start[k] * 1e6) & (s.t_ns < (start[k] + 300e3) * 1e6)] / 1e6
        expected = 300e3 / (shapes[k] * scales[k])
        assert abs(len(t) / expected - 1) < 0.08, (k, len(t), expected)
        gaps = np.diff(t)
        cv = gaps.std() / gaps.mean()
        assert abs(cv - 1 / np.sqrt(shapes[k])) < 0.12 / np.sqrt(shapes[k]), (k, cv)


def _slot_counts(t_ns: np.ndarray, slot_ns: int = 1_000_000) -> np.ndarray:
    return np.unique(t_ns // slot_ns, return_counts=True)[1]


def _zt_nb_chi2(counts: np.ndarray, nb: NegBinom) -> float:
    """p-value of occupied-slot counts against the zero-truncated NB."""
    kmax = 12
    observed = np.array([np.sum(counts == k) for k in range(1, kmax)] + [np.sum(counts >= kmax)])
    pmf = nb.pmf(np.arange(0, kmax))
    p = np.append(pmf[1:], 1 - pmf.sum()) / (1 - pmf[0])
    expected = p * len(counts)
    keep = expected >= 5
    stat = float(np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep]))
    return float(chi2.sf(stat, keep.sum() - 1))


@needs_shared
def test_nb_layer_draws_once_per_occupied_slot() -> None:
    w = load_gamma_windows(FS / "Parametric/gamma/Dense_lt10B_gamma_5min.csv")
    nb = load_nb_json(FS / "Parametric/nb/Dense_lt10B_nb.json")
    s = concat(
        list(parametric_chunks(w, LENGTHS, np.random.default_rng(5), nb=nb, duration_s=1800))
    )
    counts = _slot_counts(s.t_ns)
    p0 = float(nb.pmf(np.array([0]))[0])
    # Zero-truncated NB mean (~2.86), not the stacked ~3.9.
    assert abs(counts.mean() - nb.mu / (1 - p0)) < 0.05
    assert _zt_nb_chi2(counts, nb) > 1e-3
    # Members of a slot stay inside it.
    assert np.all(s.t_ns // 1_000_000 == np.repeat(np.unique(s.t_ns // 1_000_000), counts))


def test_nb_zero_empty_keeps_the_count_law_and_loses_slots() -> None:
    w = _windows(0.5, 10.0, 2)
    nb = NegBinom(1.2, 0.3)
    runs = {}
    for mode in ("truncate", "empty"):
        s = concat(
            list(parametric_chunks(w, LENGTHS, np.random.default_rng(9), nb=nb, nb_zero=mode))
        )
        counts = _slot_counts(s.t_ns)
        assert _zt_nb_chi2(counts, nb) > 1e-3, mode
        runs[mode] = len(counts)
    p0 = float(nb.pmf(np.array([0]))[0])
    assert abs(runs["empty"] / runs["truncate"] - (1 - p0)) < 0.03


def test_time_scale_compresses_exactly() -> None:
    w = _windows(0.8, 5.0, 1)
    a = concat(list(parametric_chunks(w, LENGTHS, np.random.default_rng(1))))
    b = concat(list(parametric_chunks(w, LENGTHS, np.random.default_rng(1), time_scale=10)))
    assert len(a) == len(b)
    assert np.max(np.abs(b.t_ns - np.rint(a.t_ns / 10))) <= 1


def test_repeat_jitter_and_model_sample_extend_windows() -> None:
    rng = np.random.default_rng(0)
    base = GammaWindows(
        np.arange(50) * 300e3,
        np.arange(1, 51) * 300e3,
        rng.uniform(0.2, 1.0, 50),
        rng.uniform(5, 50, 50),
    )
    start, shape, scale, weibull = window_params(base, 500, "repeat_jitter", 0.05, rng)
    assert not weibull.any()
    assert np.array_equal(shape[:50], base.shape) and np.array_equal(scale[:50], base.scale_ms)
    ratio = shape[50:] / np.tile(base.shape, 9)
    assert abs(ratio.mean() - 1) < 0.01 and abs(ratio.std() - 0.05) < 0.01
    assert np.all(np.diff(start) > 0)
    _, shape2, scale2, _ = window_params(base, 5000, "model_sample", 0.05, rng)
    logs = np.log(np.stack([shape2[50:], scale2[50:]]))
    want = np.log(np.stack([base.shape, base.scale_ms]))
    assert np.allclose(logs.mean(axis=1), want.mean(axis=1), atol=0.05)
    assert np.allclose(np.cov(logs), np.cov(want), atol=0.03)
    with pytest.raises(FineserveError):
        window_params(base, 10, "nope", 0.05, rng)
    # Mixed families: extended windows keep the family they repeat, and model_sample
    # draws each family from its own windows.
    base.weibull = np.arange(50) % 2 == 1
    base.shape[base.weibull] *= 10
    _, shape3, _, weibull3 = window_params(base, 5000, "model_sample", 0.05, rng)
    assert np.array_equal(weibull3, np.arange(5000) % 2 == 1)
    ext = np.arange(5000) >= 50
    assert np.median(shape3[ext & weibull3]) > 5 * np.median(shape3[ext & ~weibull3])


def test_same_seed_same_schedule_and_chunking_does_not_matter() -> None:
    w = _windows(0.4, 5.0, 3)
    nb = NegBinom(2.0, 0.1)

    def make(seed: int) -> Schedule:
        return concat(list(parametric_chunks(w, LENGTHS, np.random.default_rng(seed), nb=nb)))

    a, b, c = make(7), make(7), make(8)
    assert np.array_equal(a.t_ns, b.t_ns) and np.array_equal(a.input_len, b.input_len)
    assert len(a) != len(c) or not np.array_equal(a.t_ns, c.t_ns)
    p1 = concat(list(poisson_chunks(200_000, 1000.0, LENGTHS, np.random.default_rng(1))))
    p2 = concat(list(poisson_chunks(200_000, 1000.0, LENGTHS, np.random.default_rng(1))))
    assert np.array_equal(p1.t_ns, p2.t_ns)


def test_poisson_ramp_raises_the_rate() -> None:
    s = concat(
        list(
            poisson_chunks(
                4000, 1.0, LENGTHS, np.random.default_rng(2), ramp=("linear", 100.0, 1000.0, 0)
            )
        )
    )
    gaps = np.diff(s.t_ns) / 1e9
    assert 1 / gaps[:400].mean() < 200 and 1 / gaps[-400:].mean() > 700


@needs_shared
def test_replay_reproduces_trace_gaps_after_scaling() -> None:
    trace = load_trace(FS / "replay/Dense_30to100B.csv")
    s = concat(list(replay_chunks(trace, time_scale=10)))
    assert len(s) == len(trace)
    assert np.max(np.abs(s.t_ns - np.rint(trace.t_ns / 10))) <= 1
    # A slice: from 1 h, for 10 minutes, starts at 0.
    part = concat(list(replay_chunks(trace, start_s=3600, duration_s=600)))
    inside = (trace.t_ns >= 3600e9) & (trace.t_ns < 4200e9)
    assert len(part) == inside.sum() and part.t_ns[0] == trace.t_ns[inside][0] - 3600e9
    with pytest.raises(FineserveError, match="no request"):
        list(replay_chunks(trace, start_s=10**6))


@needs_shared
def test_mooncake_replay_keeps_prefix_blocks() -> None:
    trace = load_trace(SHARED_DATA / "mooncake/synthetic_trace.jsonl")
    s = concat(list(replay_chunks(trace)))
    assert s.hash_offsets is not None and s.hash_ids is not None
    assert np.array_equal(s.hash_ids, trace.hash_ids)


@needs_shared
def test_servegen_reproduces_client_rate_shares() -> None:
    pool = load_client_pool(SHARED_DATA / "servegen/language/m-large")
    span = 4 * 86_400.0
    s = concat(list(servegen_chunks(pool, np.random.default_rng(0), duration_s=span)))
    got = np.bincount(s.extra["client_id"], minlength=2)
    want = np.array([np.sum(c.rate[c.start_s < span]) * pool.window_s for c in pool.clients])
    assert np.allclose(got / got.sum(), want / want.sum(), atol=0.03), (got, want)
    assert abs(got.sum() / want.sum() - 1) < 0.1
    # A target rate rescales every client alike.
    s2 = concat(
        list(servegen_chunks(pool, np.random.default_rng(0), duration_s=span, request_rate=1.0))
    )
    # ... to the target as the mean rate while some client sends (idle time excluded).
    active = pool.active_s(0, span)
    assert active < 0.9 * span  # the pool idles part of the time: the check means something
    assert abs(len(s2) / active - 1.0) < 0.1


def test_servegen_idle_start_is_skipped_and_rate_is_over_active_time(tmp_path: Path) -> None:
    """A pool idle for its first 1,200 s: blast starts where traffic starts (and says so),
    and --request-rate is the rate while clients send, not one diluted by idle windows."""
    (tmp_path / "chunk-0-trace.csv").write_text(
        "0,0,0,,0,0\n600,0,0,,0,0\n1200,2,1,Gamma,1,0.5\n1800,0,0,,0,0\n2400,1,1,Gamma,1,1\n"
    )
    pool = load_client_pool(tmp_path)
    assert pool.first_active_s(0, pool.span_s) == 1200
    assert pool.active_s(0, pool.span_s) == 1200
    assert pool.mean_rate(0, pool.span_s) == pytest.approx(1.5)
    out = tmp_path / "s.parquet"
    r = invoke(
        "generate", "--mode", "servegen", "--servegen-pool", str(tmp_path),
        "--request-rate", "5", "--summary-json", str(tmp_path / "s.json"), "-o", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "no client sends before 1200 s; the run starts there" in r.output
    assert "the mean while traffic flows" in r.output
    s = concat(list(read_schedule(out)[0]))
    assert s.t_ns[0] < 5e9  # no 20 idle minutes at the start
    busy = s.t_ns < 600e9
    assert busy.sum() / 600 == pytest.approx(5 * 2 / 1.5, rel=0.1)  # rate x 5/1.5 while on
    assert len(s) / 1200 == pytest.approx(5, rel=0.06)  # 5 req/s over the active time
    # An explicit --start inside idle time is kept, and announced.
    r = invoke(
        "generate", "--mode", "servegen", "--servegen-pool", str(tmp_path), "--start", "600",
        "-o", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "idle from --start 600 s until 1200 s" in r.output


def test_servegen_multimodal_pool_reads_text_tokens(tmp_path: Path) -> None:
    """Multimodal pools hold text_tokens, not input_tokens: the text length is sampled
    from it (not the 1024-token default); a pool without lengths says what it uses."""
    (tmp_path / "chunk-0-trace.csv").write_text("0,5,1,Gamma,1,0.2\n")
    (tmp_path / "chunk-0-dataset.json").write_text(
        json.dumps({"0": {"text_tokens": "{37: 0.5, 41: 0.5}", "output_tokens": "{9: 1.0}"}})
    )
    pool = load_client_pool(tmp_path)
    s = concat(list(servegen_chunks(pool, np.random.default_rng(0))))
    assert set(np.unique(s.input_len)) == {37, 41} and set(np.unique(s.output_len)) == {9}
    (tmp_path / "chunk-0-dataset.json").unlink()
    r = invoke(
        "generate", "--mode", "servegen", "--servegen-pool", str(tmp_path),
        "--random-input-len", "77", "-o", str(tmp_path / "s.parquet"),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "clients without length PDFs use --random-input-len 77 (clients [0])" in r.output


def test_servegen_rate_weights_windows_by_their_time_in_the_span(tmp_path: Path) -> None:
    """Client 0 sends in [0, 600) only, client 1 in [600, 1200). A span from 300 to 1200
    holds half of client 0's window and all of client 1's: the target rate is the mean
    over that span, and neither window runs past its end or before the span."""
    (tmp_path / "chunk-0-trace.csv").write_text("0,2,1,Gamma,1,0.5\n600,0,0,,0,0\n")
    (tmp_path / "chunk-1-trace.csv").write_text("0,0,0,,0,0\n600,1,1,Gamma,1,1\n")
    pool = load_client_pool(tmp_path)
    assert pool.mean_rate(300, 1200) == pytest.approx((2 * 300 + 1 * 600) / 900)
    assert pool.mean_rate(0, 1200) == pytest.approx(1.5)
    s = concat(
        list(
            servegen_chunks(
                pool, np.random.default_rng(1), request_rate=10, start_s=300, duration_s=900
            )
        )
    )
    assert len(s) / 900 == pytest.approx(10, rel=0.05)
    t_s, client = s.t_ns / 1e9, s.extra["client_id"]
    assert t_s.min() >= 0 and t_s.max() < 900
    # Client 0's rate x 7.5 for 300 s; client 1's x 7.5 for 600 s: 4,500 requests each.
    assert np.all(t_s[client == 0] < 300) and np.all(t_s[client == 1] >= 300)
    assert (client == 0).sum() == pytest.approx(4500, rel=0.06)
    assert (client == 1).sum() == pytest.approx(4500, rel=0.06)


@needs_shared
def test_servegen_reasoning_pool_carries_reason_ratio() -> None:
    pool = load_client_pool(SHARED_DATA / "servegen/reason/deepseek-r1")
    s = concat(list(servegen_chunks(pool, np.random.default_rng(0))))
    assert "reason_ratio" in s.extra and len(s) > 1000
    assert np.all((s.extra["reason_ratio"] >= 0) & (s.extra["reason_ratio"] <= 1))


def test_burstgpt_fit_recovers_gamma_and_zipf(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    gaps = rng.gamma(0.5, 0.2, size=30_000)
    t = np.cumsum(gaps)
    req = zipf_sample(1.2, 4000, len(t), rng)
    resp = zipf_sample(0.9, 1000, len(t), rng)
    p = tmp_path / "burst.csv"
    rows = "".join(
        f"{a:.6f},ChatGPT,{b},{c},{b + c},Conversation log\n" for a, b, c in zip(t, req, resp)
    )
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n" + rows)
    params = fit_burstgpt(load_trace(p))
    alphas = [w["alpha"] for w in params["windows"] if w["alpha"] > 0]
    assert abs(np.median(alphas) - 0.5) < 0.08
    assert abs(params["input_zipf_a"] - 1.2) < 0.05
    assert abs(params["output_zipf_a"] - 0.9) < 0.05
    s = concat(list(burstgpt_chunks(params, np.random.default_rng(0), request_rate=20.0)))
    assert abs(len(s) / (len(params["windows"]) * 1200) / 20.0 - 1) < 0.1


def test_class_mix_merges_by_time_with_a_class_column() -> None:
    a = list(poisson_chunks(3000, 500.0, LENGTHS, np.random.default_rng(1)))
    b = list(poisson_chunks(2000, 300.0, LENGTHS, np.random.default_rng(2)))
    merged = concat(list(merge_streams([label(iter(a), "A"), label(iter(b), "B")])))
    assert len(merged) == 5000
    assert np.all(np.diff(merged.t_ns) >= 0)
    assert (merged.extra["class"] == "A").sum() == 3000


def test_schedule_parquet_round_trip_and_stats(tmp_path: Path) -> None:
    w = _windows(0.5, 5.0, 2)
    chunks = list(parametric_chunks(w, LENGTHS, np.random.default_rng(1), nb=NegBinom(2, 0.1)))
    path = tmp_path / "s.parquet"
    summary = write_schedule(path, iter(chunks), {"mode": "parametric"})
    it, rows, meta = read_schedule(path)
    back = concat(list(it))
    whole = concat(chunks)
    assert rows == len(whole) == summary["requests"] and meta["mode"] == "parametric"
    assert np.array_equal(back.t_ns, whole.t_ns)
    stats = ScheduleStats()
    stats.add(whole)
    assert stats.finish()["digest"] == summary["digest"]
    assert summary["mean_per_occupied_slot"] > 1.5
