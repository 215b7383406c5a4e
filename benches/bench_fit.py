"""Fit speed: a 5 M-request synthetic trace (per-window Gamma arrivals with NB micro-bursts,
log-normal/exponential lengths) is fitted — windows + bursts + lengths — and timed.

Baseline, measured in the same run on the same windows: the straightforward per-window
loop with scipy's fitters (``gamma.fit`` as FineServe-style scripts do, plus
``weibull_min.fit`` and ``kstest``), for the arrival part only. Also times reading the
same trace from a CSV with the trace reader and fitting it (the ``fineserve fit`` path).

    python benches/bench_fit.py [--requests 5000000] [--json out.json]
Target: windows + NB + lengths of 5 M requests in <= 10 s on the 2-vCPU dev machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from fineserve.fit import fit_trace
from fineserve.fit.arrivals import fit_windows
from fineserve.schedule import concat
from fineserve.traces import TraceOptions, load_trace
from fineserve.traces.base import Trace
from fineserve.workloads.lengths import LengthSampler
from fineserve.workloads.parametric import GammaWindows, NegBinom, parametric_chunks


class _Lengths(LengthSampler):
    def sample(self, n, rng):  # type: ignore[no-untyped-def]
        inp = np.maximum(1, rng.lognormal(6.5, 1.1, n)).astype(np.int64)
        return inp, np.maximum(1, rng.exponential(250, n)).astype(np.int64)


def synthetic(n_target: int) -> Trace:
    k = 24  # two hours of 5-minute windows
    rng = np.random.default_rng(0)
    shapes = rng.uniform(0.4, 2.5, k)
    # ~ n_target / 2.9 occupied slots over 7200 s (ZT-NB(2.6, 1.5) mean ≈ 3.9, less merging)
    mean_gap_ms = 7200e3 / (n_target / 3.3)
    scales = mean_gap_ms / shapes * rng.uniform(0.8, 1.25, k)
    start = np.arange(k) * 300e3
    w = GammaWindows(start, start + 300e3, shapes, scales)
    s = concat(list(parametric_chunks(w, _Lengths(), rng, nb=NegBinom(2.6, 1.5))))
    return Trace(Path("synthetic"), "fineserve", s.t_ns - s.t_ns[0], s.input_len, s.output_len)


def baseline_windows(trace: Trace, window_s: float = 300.0, budget_s: float = 30.0) -> float:
    """The same per-window work with scipy's own fitters, one window at a time: Gamma and
    Weibull MLE and a KS test. Stops after ``budget_s`` and extrapolates by gaps done
    (the windows are of similar size)."""
    from scipy import stats

    started = time.perf_counter()
    t_ms = trace.t_ns / 1e6
    win = (t_ms // (window_s * 1e3)).astype(np.int64)
    total = len(t_ms)
    done = 0
    for w in np.unique(win):
        sel = t_ms[win == w]
        gaps = np.diff(sel)
        gaps = gaps[gaps > 0]
        if len(gaps) > 10:
            k, _, theta = stats.gamma.fit(gaps, floc=0)
            stats.weibull_min.fit(gaps, floc=0)
            stats.kstest(gaps, "gamma", args=(k, 0, theta))
        done += len(sel)
        if time.perf_counter() - started > budget_s:
            break
    return (time.perf_counter() - started) * total / done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5_000_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    trace = synthetic(args.requests)
    n = len(trace)
    print(f"synthetic trace: {n} requests over {trace.span_s:.0f} s")

    started = time.perf_counter()
    w = fit_windows(trace.t_ns, trace.t_ns)
    windows_only = time.perf_counter() - started
    started = time.perf_counter()
    result = fit_trace(trace, name="bench")
    full = time.perf_counter() - started
    assert result.bursts is not None
    base = baseline_windows(trace)
    print(f"windows only (all requests, {len(w)} windows):  {windows_only:6.2f} s")
    print(
        f"baseline scipy fitters per window (same):     {base:6.2f} s  "
        f"(fineserve {base / windows_only:.1f}x faster)"
    )
    print(
        f"fit_trace (phase + windows + NB + lengths):   {full:6.2f} s  "
        f"({n / full / 1e6:.2f} M requests/s; target <= 10 s for 5 M)"
    )
    print(f"  chosen burst model {result.bursts.chosen}, KS {result.bursts.best.ks:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.csv"
        table = pa.table(
            {
                "timestamp": pa.array(trace.t_ns / 1e3),  # µs, FineServe's unit
                "input_length": pa.array(trace.input_len),
                "output_length": pa.array(trace.output_len),
            }
        )
        pacsv.write_csv(table, path)
        csv_bytes = path.stat().st_size
        started = time.perf_counter()
        loaded = load_trace(path, TraceOptions(trace_format="fineserve"))
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        fit_trace(loaded, name="bench")
        e2e_fit = time.perf_counter() - started
    print(
        f"read CSV ({csv_bytes / 2**20:.0f} MiB) with the trace reader: "
        f"{read_s:6.2f} s; fit after reading: {e2e_fit:6.2f} s"
    )
    out = {
        "requests": n,
        "windows_only_s": windows_only,
        "baseline_scipy_windows_s": base,
        "speedup_windows": base / windows_only,
        "fit_trace_s": full,
        "read_csv_s": read_s,
        "fit_after_read_s": e2e_fit,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
