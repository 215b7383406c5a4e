"""TLS against plain HTTP on the mock, in the same run (issue 19, item 6).

Prints, on this machine:
1. the open-loop rate ceiling (16-token streams; p99 dispatch lag <= 1 ms at the client
   and at the server, achieved >= 99% of the target, every request ok) over http:// and
   https://, rate by rate, the two interleaved so both meet the same machine state;
2. p50/p99 dispatch lag at one moderate rate, plain vs TLS;
3. the per-request cost of TLS: the client's CPU time per request (this process's user +
   system time over the run), https minus http, at that rate.

Handshakes are excluded: every run opens its connections before its start instant
(``warm_connections``), as blast does. The mock runs in its own process, once over HTTP
and once over TLS (a CA made at start), with the same settings.
Usage: python benches/bench_tls.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dispatch import TOKENS, passes, run_against_mock, uniform, with_server_view
from fineserve import EngineOptions
from mock_proc import MockProcess

RATES = [5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(mock: MockProcess, rate: float, seconds: float, http2: bool = False) -> dict[str, Any]:
    t_ns = uniform(rate, seconds)
    n = len(t_ns)
    mock.take()
    options = EngineOptions(
        warm_connections=0 if http2 else min(int(rate * 0.1) + 64, 4096),
        ca_file=str(mock.ca_file) if mock.ca_file else None,
        http2=http2,
    )
    cpu0, wall0 = cpu_s(), time.perf_counter()
    r = run_against_mock(mock, t_ns, options)
    cpu = cpu_s() - cpu0
    wall = time.perf_counter() - wall0
    r.pop("sent_ns")
    r = with_server_view(r, mock, t_ns)
    r["cpu_us_per_request"] = cpu / n * 1e6
    r["wall_s"] = wall
    r["rate"] = rate
    r["pass"] = passes(r)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--cost-rate", type=float, default=5_000)
    args = ap.parse_args()
    seconds = 1.5 if args.quick else args.seconds
    rates = RATES[:3] if args.quick else RATES
    options = dict(ttft_ms=5.0, itl_ms=0.0, default_max_tokens=TOKENS, workers=1)
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "seconds": seconds,
    }
    with MockProcess(**options) as plain, MockProcess(**options, tls=True) as tls:
        mocks = {"http": plain, "https": tls}
        print(f"1. rate ceiling, http vs https ({seconds:g} s per rate, interleaved)")
        rows: dict[str, list[dict[str, Any]]] = {"http": [], "https": []}
        best = {"http": 0.0, "https": 0.0}
        alive = {"http": True, "https": True}
        for rate in rates:
            for name, mock in mocks.items():
                if not alive[name]:
                    continue
                r = run(mock, rate, seconds)
                rows[name].append(r)
                srv = r["server"]
                print(
                    f"   {name:>5} {rate:>7.0f} req/s: achieved {srv['achieved_rps']:>7.0f}, "
                    f"p99 lag us client/server {r['lag_p99_us']:.0f}/"
                    f"{srv['server_lag_p99_us']:.0f}, ok {r['ok']}/{r['n']}, "
                    f"client CPU {r['cpu_us_per_request']:.1f} us/req -> "
                    + ("pass" if r["pass"] else "fail"),
                    flush=True,
                )
                # The ceiling: the highest rate below which every rate tried passed.
                if r["pass"]:
                    best[name] = rate
                else:
                    alive[name] = False
        out["ceiling_rps"] = best
        out["ceiling_runs"] = rows
        print(f"   ceiling: http {best['http']:.0f} req/s, https {best['https']:.0f} req/s")

        print(f"2-3. at {args.cost_rate:.0f} req/s: lag and client CPU per request (3 runs each)")
        cost: dict[str, list[dict[str, Any]]] = {"http": [], "https": []}
        for _ in range(3):
            for name, mock in mocks.items():
                cost[name].append(run(mock, args.cost_rate, seconds))
        summary = {}
        for name, runs in cost.items():
            summary[name] = {
                "lag_p50_us": float(np.median([r["lag_p50_us"] for r in runs])),
                "lag_p99_us": float(np.median([r["lag_p99_us"] for r in runs])),
                "cpu_us_per_request": float(np.median([r["cpu_us_per_request"] for r in runs])),
                "ok": sum(r["ok"] for r in runs),
                "n": sum(r["n"] for r in runs),
            }
            s = summary[name]
            print(
                f"   {name:>5}: lag p50/p99 {s['lag_p50_us']:.1f}/{s['lag_p99_us']:.1f} us, "
                f"client CPU {s['cpu_us_per_request']:.1f} us/request, ok {s['ok']}/{s['n']}"
            )
        extra = summary["https"]["cpu_us_per_request"] - summary["http"]["cpu_us_per_request"]
        print(f"   TLS costs the client {extra:.1f} us of CPU per request (median of 3)")
        out["at_rate"] = summary | {"rate": args.cost_rate, "tls_cpu_us_per_request": extra}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
