"""Does scraping the server's /metrics move dispatch lag? (issue 20, item 1)

At 5,000 req/s against the mock (in its own process), runs alternate without and with a
scraper of the mock's ``/metrics`` every 0.1 s (its own Python thread, as ``blast
--server-metrics`` runs it), three of each; prints dispatch lag p50/p99/p99.9 (client side)
per run and the medians, and how long a scrape took.
Usage: python benches/bench_server_metrics.py [--rate R] [--seconds S] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dispatch import TOKENS, run_against_mock, uniform
from fineserve import EngineOptions
from fineserve.metrics.scrape import Scraper, ScrapeTarget
from mock_proc import MockProcess


def one(mock: MockProcess, rate: float, seconds: float, scrape_s: float | None) -> dict[str, Any]:
    t_ns = uniform(rate, seconds)
    scraper = None
    if scrape_s is not None:
        page = ScrapeTarget(mock.base_url, mock.base_url + "/metrics", 0)
        scraper = Scraper([page], scrape_s)
        scraper.start()
    r = run_against_mock(
        mock, t_ns, EngineOptions(warm_connections=min(int(rate * 0.1) + 64, 4096))
    )
    r.pop("sent_ns")
    if scraper is not None:
        scraper.stop()
        st = scraper.stats[0]
        r["scrapes"] = st.scrapes
        r["scrape_failed"] = st.failed
        r["scrape_ms_p50"] = float(np.percentile(st.scrape_s, 50) * 1e3) if st.scrape_s else None
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=5_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict[str, Any] = {"rate": args.rate, "interval_s": args.interval, "runs": []}
    with MockProcess(ttft_ms=5.0, itl_ms=0.0, default_max_tokens=TOKENS) as mock:
        rows: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
        for _ in range(args.trials):
            for name, scrape in (("without", None), ("with", args.interval)):
                r = one(mock, args.rate, args.seconds, scrape)
                rows[name].append(r)
                print(
                    f"  {name:>7} scraping: lag p50/p99/p99.9 {r['lag_p50_us']:.1f}/"
                    f"{r['lag_p99_us']:.1f}/{r['lag_p999_us']:.0f} us, ok {r['ok']}/{r['n']}"
                    + (
                        f", {r['scrapes']} scrapes ({r['scrape_failed']} failed, "
                        f"p50 {r['scrape_ms_p50']:.1f} ms)"
                        if "scrapes" in r
                        else ""
                    ),
                    flush=True,
                )
        for name, runs in rows.items():
            med = {k: float(np.median([r[k] for r in runs])) for k in ("lag_p50_us", "lag_p99_us")}
            out[name] = med
            print(
                f"{name:>7} scraping, median of {len(runs)}: p50 {med['lag_p50_us']:.1f} us, "
                f"p99 {med['lag_p99_us']:.1f} us"
            )
        out["runs"] = rows
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
