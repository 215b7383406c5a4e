"""How many concurrent streams the embedded mock and the engine hold on this machine.

Sends N requests at once to the mock (a separate `fineserve mock` process, since each
stream costs a descriptor on both sides and the hard open-files limit may be low) whose
streams last several seconds (long TTFT, slow ITL), and samples the engine's in-flight count;
reports the peak, the share that succeeded, and the client's RSS per stream (baseline: RSS
before the run, same process).

Usage: python benches/bench_streams.py [--streams 19000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from fineserve import EngineOptions, _engine
from fineserve.api import BodyTemplate
from fineserve.server import fetch_models


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=19_000)
    ap.add_argument("--port", type=int, default=18433)
    ap.add_argument("--json")
    args = ap.parse_args()
    n = args.streams
    body = BodyTemplate("vllm", "fineserve-mock", stream=True, ignore_eos=True).render(
        "r0 word word word", 20
    )
    mock = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fineserve.cli",
            "mock",
            "--port",
            str(args.port),
            "--ttft-ms",
            "3000",
            "--itl-ms",
            "100",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(100):
            try:
                fetch_models(base, timeout_s=0.5)
                break
            except Exception:
                time.sleep(0.1)
        base_rss = rss_mib()
        started = time.monotonic()
        options = EngineOptions(
            lanes=1, warm_connections=n, connect_timeout_s=30.0, start_delay_ms=50.0
        )
        run = _engine.start_run([base + "/v1/completions"], options)
        run.feed(
            np.zeros(n, np.int64),
            np.zeros(n, np.uint32),
            [body],
            np.zeros(n, np.uint32),
            np.full(n, 20, np.uint32),
        )
        run.close_input()
        peak = 0
        peak_rss = base_rss
        while not run.wait(0.05):
            peak = max(peak, int(run.progress()["in_flight"]))
            peak_rss = max(peak_rss, rss_mib())
        res = run.results()
        wall = time.monotonic() - started
    finally:
        mock.terminate()
        mock.wait()
    ok = int((res["error_kind"] == 0).sum())
    kinds = {
        _engine.ERROR_KINDS[k]: int(c)
        for k, c in zip(*np.unique(res["error_kind"], return_counts=True))
    }
    print(
        f"streams requested {n}, peak in flight {peak}, ok {ok} ({100 * ok / n:.2f}%), "
        f"outcomes {kinds}, wall {wall:.1f}s"
    )
    print(
        f"client RSS: before {base_rss:.0f} MiB, peak {peak_rss:.0f} MiB, "
        f"{1024 * (peak_rss - base_rss) / max(peak, 1):.1f} KiB per open stream"
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "streams": n,
                    "peak_in_flight": peak,
                    "ok": ok,
                    "outcomes": kinds,
                    "rss_before_mib": base_rss,
                    "rss_peak_mib": peak_rss,
                    "kib_per_stream": 1024 * (peak_rss - base_rss) / max(peak, 1),
                    "nofile_soft": soft,
                    "nofile_hard": hard,
                    "wall_s": wall,
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
