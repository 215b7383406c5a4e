"""Schedule generation speed and memory: FineServe Dense_lt10B parametric (Gamma windows +
NB micro-bursts), streamed, at time-scale 10.

Prints requests generated per second of wall time and the peak memory held by the
generator (tracemalloc, which sees numpy's buffers) for 1 h, 6 h and 24 h of trace time,
so one can see that memory does not grow with duration; and, as the baseline in the same
run, the per-request loop FineServe's Generator uses (one ``np.random.gamma`` call per
request), timed on one window.

    python benches/bench_generate.py [--shared ../shared/data] [--json out.json]
Target: >= 5 M scheduled requests/s; peak memory independent of duration.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from fineserve.workloads import RandomLengths
from fineserve.workloads.parametric import load_gamma_windows, load_nb_json, parametric_chunks


def run(windows, nb, hours: float) -> dict:  # type: ignore[no-untyped-def]
    lengths = RandomLengths(1024, 128, 0.5)
    tracemalloc.start()
    started = time.perf_counter()
    n = 0
    for chunk in parametric_chunks(
        windows, lengths, np.random.default_rng(0), nb=nb, time_scale=10, duration_s=hours * 3600
    ):
        n += len(chunk)
    wall = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "hours": hours,
        "requests": n,
        "wall_s": wall,
        "req_per_s": n / wall,
        "peak_mib": peak / 2**20,
    }


def baseline(windows) -> dict:  # type: ignore[no-untyped-def]
    """FineServe's Generator: one gamma draw per request, in a Python loop (one window)."""
    shape, scale_s = float(windows.shape[0]), float(windows.scale_ms[0]) / 1e3
    started = time.perf_counter()
    t, n = 0.0, 0
    while t < 300.0:
        t += np.random.gamma(shape, scale_s)
        n += 1
    wall = time.perf_counter() - started
    return {"requests": n, "wall_s": wall, "req_per_s": n / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base = args.shared / "fineserve" / "Parametric"
    windows = load_gamma_windows(base / "gamma" / "Dense_lt10B_gamma_5min.csv")
    nb = load_nb_json(base / "nb" / "Dense_lt10B_nb.json")
    rows = [run(windows, nb, h) for h in (1, 6, 24)]
    ref = baseline(windows)
    print(f"{'trace hours':>11} {'requests':>11} {'wall s':>8} {'M req/s':>8} {'peak MiB':>9}")
    for r in rows:
        print(
            f"{r['hours']:>11g} {r['requests']:>11d} {r['wall_s']:>8.2f} "
            f"{r['req_per_s'] / 1e6:>8.2f} {r['peak_mib']:>9.1f}"
        )
    full = rows[-1]
    print(
        f"baseline (per-request loop, FineServe style): {ref['req_per_s'] / 1e6:.3f} M req/s "
        f"(Gamma only, no NB, no lengths)"
    )
    print(
        f"ratio fineserve/baseline: {full['req_per_s'] / ref['req_per_s']:.1f}x; "
        f"target >= 5 M req/s: {'met' if full['req_per_s'] >= 5e6 else 'MISSED'}; "
        f"peak 24 h / 1 h: {full['peak_mib'] / rows[0]['peak_mib']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "baseline": ref}, indent=2))


if __name__ == "__main__":
    main()
