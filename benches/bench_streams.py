"""How many concurrent streams the embedded mock and the engine hold on this machine.

Sends N requests at once to an in-process mock whose streams last several seconds (long
TTFT, slow ITL) and samples the mock's count of open streams; reports the peak, the share of
requests that succeeded, and the process RSS per stream. A baseline from the same run: the
process RSS before the run.

Usage: python benches/bench_streams.py [--streams 20000]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from fineserve import EngineOptions, MockServer, _engine
from fineserve.api import BodyTemplate


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=20_000)
    args = ap.parse_args()
    n = args.streams
    body = BodyTemplate("vllm", "fineserve-mock", stream=True, ignore_eos=True).render(
        "r0 word word word", 20
    )
    base_rss = rss_mib()
    with MockServer(ttft_ms=3000, itl_ms=100, workers=1) as mock:
        opts = EngineOptions(warm_connections=n, connect_timeout_s=30)
        started = time.monotonic()
        run = _engine.start_run(
            [mock.base_url + "/v1/completions"], np.zeros(n, np.int64),
            np.zeros(n, np.uint32), [body], np.zeros(n, np.uint32),
            np.full(n, 20, np.uint32), lanes=opts.lanes, warm_connections=n,
            connect_timeout_s=30.0, start_delay_ms=50.0,
        )
        peak = peak_rss = 0.0
        while not run.wait(0.05):
            peak = max(peak, mock.stats()["active_streams"])
            peak_rss = max(peak_rss, rss_mib())
        res = run.results()
        wall = time.monotonic() - started
    ok = int((res["error_kind"] == 0).sum())
    kinds = {_engine.ERROR_KINDS[k]: int(c) for k, c in
             zip(*np.unique(res["error_kind"], return_counts=True))}
    print(f"streams requested {n}, peak open at the mock {peak:.0f}, ok {ok} "
          f"({100 * ok / n:.2f}%), outcomes {kinds}, wall {wall:.1f}s")
    print(f"RSS: before {base_rss:.0f} MiB, peak {peak_rss:.0f} MiB, "
          f"{1024 * (peak_rss - base_rss) / max(peak, 1):.1f} KiB per open stream "
          "(client and mock together, one process)")


if __name__ == "__main__":
    main()
