"""The Ray path (``blast --ray``) on this machine: 2 workers vs 1 at the rate ceiling, and
what the Ray path costs at a low rate compared with the engine run directly.

The mock runs in its own process (``mock_proc``); the Ray cluster is local
(``ray.init(num_cpus=2)``). Ceiling rule as in bench_dispatch: p99 dispatch lag <= 1 ms,
achieved >= 99% of the target, every request ok (client-side send instants; the workers
share one clock here). On a 2-vCPU machine the workers, their lanes and the mock share two
cores, so this measures the overhead of spreading, not the gain: the gain needs machines.

Usage: python benches/bench_ray.py [--json OUT]   (needs pip install 'fineserve[ray]')
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dispatch import TOKENS, body, uniform
from fineserve import EngineOptions, run_engine
from fineserve.distributed import run_engine_ray
from mock_proc import MockProcess


def one_run(url: str, t_ns: np.ndarray, workers: int | None, warm: int) -> dict[str, Any]:
    n = len(t_ns)
    args = (
        [url], t_ns, [body(TOKENS)], np.zeros(n, np.uint32), np.zeros(n, np.uint32),
        np.full(n, TOKENS),
    )  # fmt: skip
    started = time.monotonic()
    if workers is None:
        rec = run_engine(*args, EngineOptions(warm_connections=warm), show_progress=False)
    else:
        # The Ray path splits the warm connections over the workers itself.
        opts = EngineOptions(warm_connections=warm, lanes=1)
        rec = run_engine_ray(*args, opts, workers=workers, show_progress=False)
    wall = time.monotonic() - started
    cols = rec.columns
    sent, sched = np.asarray(cols["sent_ns"]), np.asarray(cols["scheduled_ns"])
    was = sent >= 0
    lag_us = (sent[was] - sched[was]) / 1e3
    span = (sent[was].max() - sent[was].min()) / 1e9
    return {
        "n": n,
        "ok": int((np.asarray(cols["error_kind"]) == 0).sum()),
        "target_rps": (n - 1) / ((t_ns[-1] - t_ns[0]) / 1e9),
        "achieved_rps": (was.sum() - 1) / span if span > 0 else 0.0,
        "lag_p50_us": float(np.percentile(lag_us, 50)),
        "lag_p99_us": float(np.percentile(lag_us, 99)),
        "lag_max_us": float(lag_us.max()),
        "wall_s": wall,
    }


def passes(r: dict[str, Any]) -> bool:
    return (
        r["lag_p99_us"] <= 1000
        and r["achieved_rps"] >= 0.99 * r["target_rps"]
        and r["ok"] == r["n"]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    import ray

    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.monotonic() - started
    print(f"ray.init (local, 2 CPUs): {init_s:.1f} s")
    out: dict[str, Any] = {"ray_init_s": init_s, "ceiling": {}, "low_rate": {}}
    with MockProcess(ttft_ms=5.0, itl_ms=0.0) as mock:
        url = mock.base_url + "/v1/completions"
        print("low rate (100 req/s, 5 s): lag p50/p99 us, wall s")
        t = uniform(100, 5.0)
        for name, w in (("direct", None), ("ray 1 worker", 1), ("ray 2 workers", 2)):
            r = one_run(url, t, w, warm=64)
            out["low_rate"][name] = r
            print(
                f"  {name:<14} {r['lag_p50_us']:>8.1f} {r['lag_p99_us']:>8.1f}  "
                f"wall {r['wall_s']:.2f} s (ok {r['ok']}/{r['n']})"
            )
        print("rate ceiling (p99 lag <= 1 ms, achieved >= 99%, all ok)")
        for w in (1, 2):
            best = 0
            rows = []
            for rate in (5_000, 10_000, 15_000, 20_000, 25_000, 30_000):
                r = one_run(url, uniform(rate, args.seconds), w, warm=min(rate // 10 + 64, 4096))
                r["rate"], r["pass"] = rate, passes(r)
                rows.append(r)
                print(
                    f"  {w} worker(s) {rate:>6} req/s: achieved {r['achieved_rps']:>7.0f}, "
                    f"p99 lag {r['lag_p99_us']:>9.1f} us, ok {r['ok']}/{r['n']} -> "
                    f"{'pass' if r['pass'] else 'fail'}",
                    flush=True,
                )
                if not r["pass"]:
                    break
                best = rate
            out["ceiling"][str(w)] = {"best_rps": best, "rows": rows}
    one, two = out["ceiling"]["1"]["best_rps"], out["ceiling"]["2"]["best_rps"]
    out["ratio_2_vs_1"] = two / one if one else None
    print(
        f"ceiling: 1 worker {one} req/s, 2 workers {two} req/s"
        + (f", ratio {two / one:.2f}" if one else "")
    )
    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
