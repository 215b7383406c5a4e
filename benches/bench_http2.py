"""HTTP/2 against HTTP/1.1 on the mock, in the same run (issue 19, item 1: ``--http2`` only
if it fits the lane model without hurting the ceiling).

Each lane multiplexes its requests over one HTTP/2 connection per endpoint (h2c prior
knowledge) instead of holding one HTTP/1.1 connection per request in flight. Prints, rate
by rate with the two interleaved: achieved rate, p99 dispatch lag (client and server),
failures and the client's CPU per request; then each protocol's ceiling (p99 lag ≤ 1 ms,
≥ 99% of the rate, every request ok). Usage: python benches/bench_http2.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tls import TOKENS, run
from mock_proc import MockProcess

RATES = [5_000, 10_000, 15_000, 20_000, 25_000, 30_000]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "seconds": args.seconds,
    }
    with MockProcess(ttft_ms=5.0, itl_ms=0.0, default_max_tokens=TOKENS) as mock:
        rows: dict[str, list[dict[str, Any]]] = {"http/1.1": [], "h2": []}
        best = {"http/1.1": 0.0, "h2": 0.0}
        alive = {"http/1.1": True, "h2": True}
        for rate in RATES:
            for name in rows:
                if not alive[name]:
                    continue
                r = run(mock, rate, args.seconds, http2=name == "h2")
                rows[name].append(r)
                srv = r["server"]
                print(
                    f"  {name:>8} {rate:>6} req/s: achieved {srv['achieved_rps']:>7.0f}, p99 lag "
                    f"us client/server {r['lag_p99_us']:.0f}/{srv['server_lag_p99_us']:.0f}, "
                    f"ok {r['ok']}/{r['n']}, client CPU {r['cpu_us_per_request']:.1f} us/req"
                    f" -> {'pass' if r['pass'] else 'fail'}",
                    flush=True,
                )
                if r["pass"]:
                    best[name] = rate
                else:
                    alive[name] = False
        print(f"ceiling: http/1.1 {best['http/1.1']:.0f} req/s, h2 {best['h2']:.0f} req/s")
        out["ceiling_rps"] = best
        out["runs"] = rows
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
