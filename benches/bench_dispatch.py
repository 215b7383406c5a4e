"""Dispatch figures of the engine against the embedded mock (issue: foundation bench).

Prints, on this machine:
1. the highest sustained open-loop rate (16-token streams) with p99 dispatch lag <= 1 ms and
   achieved rate >= 99% of target, for fineserve and for a baseline measured in the same run:
   a plain Python asyncio client paced with ``asyncio.sleep`` (one coroutine per request,
   ``perf_counter`` timing; FineServe's Generator dispatches this way);
2. dispatch lag p50/p99/max at 1k and 5k req/s for both;
3. 1,000 bursts of 8 requests scheduled in the same ms: share of members sent in their ms.

The mock runs in a separate process (``fineserve mock``), as a real server would.
Usage: python benches/bench_dispatch.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fineserve import EngineOptions, run_engine
from fineserve.api import BodyTemplate
from fineserve.server import fetch_models

TOKENS = 16


def start_mock(port: int, itl_ms: float, ttft_ms: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fineserve.cli",
            "mock",
            "--port",
            str(port),
            "--itl-ms",
            str(itl_ms),
            "--ttft-ms",
            str(ttft_ms),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            fetch_models(f"http://127.0.0.1:{port}", timeout_s=0.5)
            return proc
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("mock did not start")


def body(tokens: int) -> bytes:
    t = BodyTemplate("vllm", "fineserve-mock", stream=True, ignore_eos=True)
    return t.render("r0 " + "word " * 31, tokens)


REALTIME = False


def fineserve_run(url: str, t_ns: np.ndarray, warm: int) -> dict[str, Any]:
    n = len(t_ns)
    opts = EngineOptions(warm_connections=warm, realtime_priority=REALTIME)
    rec = run_engine(
        [url],
        t_ns,
        [body(TOKENS)],
        np.zeros(n, np.uint32),
        np.zeros(n, np.uint32),
        np.full(n, TOKENS),
        opts,
        show_progress=False,
    )
    sent, sched, kind = rec.col("sent_ns"), rec.col("scheduled_ns"), rec.col("error_kind")
    return summarize(sched, sent, kind == 0)


SHARED_FINESERVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fineserve"


def dense_lt10b_schedule(time_scale: float, seconds: float) -> np.ndarray:
    """Send offsets of FineServe's Dense_lt10B parametric workload (Gamma windows + NB
    micro-bursts) at ``time_scale``, the first ``seconds`` of wall time."""
    from fineserve.schedule import concat
    from fineserve.workloads import RandomLengths
    from fineserve.workloads.parametric import (
        load_gamma_windows,
        load_nb_json,
        parametric_chunks,
    )

    par = SHARED_FINESERVE / "Parametric"
    windows = load_gamma_windows(par / "gamma" / "Dense_lt10B_gamma_5min.csv")
    nb = load_nb_json(par / "nb" / "Dense_lt10B_nb.json")
    chunks = parametric_chunks(
        windows,
        RandomLengths(32, 16, 0.0),
        np.random.default_rng(0),
        nb=nb,
        time_scale=time_scale,
        duration_s=seconds * time_scale,
    )
    return concat(list(chunks)).t_ns


def slot_count_ks(sched: np.ndarray, sent: np.ndarray) -> float:
    """KS distance between the requests-per-occupied-1-ms-slot distributions of the
    schedule and of the actual send times."""
    from scipy.stats import ks_2samp

    was = sent >= 0
    counts = [np.unique(x // 1_000_000, return_counts=True)[1] for x in (sched, sent[was])]
    return float(ks_2samp(*counts).statistic)


def summarize(sched: np.ndarray, sent: np.ndarray, ok: np.ndarray) -> dict[str, Any]:
    was = sent >= 0
    lag_us = (sent[was] - sched[was]) / 1e3
    span_s = (sched.max() - sched.min()) / 1e9
    achieved = (len(sent[was]) - 1) / max((sent[was].max() - sent[was].min()) / 1e9, 1e-9)
    target = (len(sched) - 1) / span_s if span_s > 0 else float("inf")
    same_ms = (sent[was] // 1_000_000 == sched[was] // 1_000_000).mean()
    return {
        "n": len(sched),
        "ok": int(ok.sum()),
        "target_rps": target,
        "achieved_rps": achieved,
        "lag_p50_us": float(np.percentile(lag_us, 50)),
        "lag_p99_us": float(np.percentile(lag_us, 99)),
        "lag_max_us": float(lag_us.max()),
        "same_ms": float(same_ms),
        "sent_ns": sent,
    }


# --- baseline: asyncio, one coroutine per request, asyncio.sleep pacing -------------------


async def _baseline(port: int, t_s: np.ndarray, payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = len(t_s)
    sent = np.full(n, -1.0)
    ok = np.zeros(n, bool)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: "
        b"application/json\r\ncontent-length: %d\r\n\r\n" % len(payload)
    )

    async def one(i: int, start: float) -> None:
        delay = start + t_s[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[i] = time.perf_counter() - start
        try:
            if idle:
                reader, writer = idle.pop()
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + payload)
            while True:  # chunked SSE until the terminating chunk
                line = await reader.readline()
                if not line:
                    return
                if line == b"0\r\n":
                    await reader.readline()
                    break
            ok[i] = True
            idle.append((reader, writer))
        except OSError:
            pass

    start = time.perf_counter() + 0.2
    await asyncio.gather(*(one(i, start) for i in range(n)))
    for _, w in idle:
        w.close()
    return sent, ok


def baseline_run(port: int, t_ns: np.ndarray) -> dict[str, Any]:
    sent_s, ok = asyncio.run(_baseline(port, t_ns / 1e9, body(TOKENS)))
    sent = np.where(sent_s >= 0, (sent_s * 1e9).astype(np.int64), -1)
    return summarize(t_ns, sent, ok)


def uniform(rate: float, seconds: float) -> np.ndarray:
    n = int(rate * seconds)
    return (np.arange(n) * (1e9 / rate)).astype(np.int64)


def passes(r: dict[str, Any]) -> bool:
    return (
        r["lag_p99_us"] <= 1000
        and r["achieved_rps"] >= 0.99 * r["target_rps"]
        and r["ok"] == r["n"]
    )


def ceiling(run, rates: list[float]) -> tuple[float, list[dict[str, Any]]]:
    best, rows = 0.0, []
    for rate in rates:
        r = run(rate)
        r["pass"] = passes(r)
        rows.append(r)
        print(
            f"    {rate:>8.0f} req/s: achieved {r['achieved_rps']:>8.0f}, p99 lag "
            f"{r['lag_p99_us']:>8.1f} us, ok {r['ok']}/{r['n']} -> "
            f"{'pass' if r['pass'] else 'fail'}",
            flush=True,
        )
        if not r["pass"]:
            break
        best = rate
    return best, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument(
        "--mock-itl-ms",
        type=float,
        default=0.0,
        help="0 = the 16 tokens leave back to back (one write per stream), so the "
        "mock, on the same cores, costs little and the figures are the client's",
    )
    ap.add_argument(
        "--realtime-priority",
        action="store_true",
        help="run fineserve's lanes under SCHED_FIFO (needs root)",
    )
    args = ap.parse_args()
    global REALTIME
    REALTIME = args.realtime_priority
    seconds = 1.0 if args.quick else 3.0
    mock = start_mock(args.port, itl_ms=args.mock_itl_ms, ttft_ms=5.0)
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}"
    }
    try:
        print(
            f"machine: {out['machine']}; mock: TTFT 5 ms, ITL {args.mock_itl_ms:g} ms, "
            f"{TOKENS} tokens"
        )
        out["mock_itl_ms"] = args.mock_itl_ms
        out["realtime_priority"] = REALTIME
        print(f"fineserve lanes: default count, realtime priority {REALTIME}")
        print("1. open-loop rate ceiling (p99 lag <= 1 ms, achieved >= 99%)")
        print("  fineserve:")
        fs_best, fs_rows = ceiling(
            lambda r: fineserve_run(url, uniform(r, seconds), warm=min(int(r * 0.1) + 64, 4096)),
            [5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000],
        )
        print("  asyncio baseline:")
        bl_best, bl_rows = ceiling(
            lambda r: baseline_run(args.port, uniform(r, seconds)),
            [25, 50, 100, 250, 500, 1_000, 2_000, 5_000],
        )
        ratio = fs_best / bl_best if bl_best else float("inf")
        print(
            f"  ceiling: fineserve {fs_best:.0f} req/s, baseline {bl_best:.0f} req/s, "
            f"ratio {ratio:.1f}x"
        )
        out["ceiling"] = {
            "fineserve_rps": fs_best,
            "baseline_rps": bl_best,
            "ratio": ratio,
            "fineserve_rows": fs_rows,
            "baseline_rows": bl_rows,
        }

        print("2. dispatch lag (us)             p50       p99       max")
        out["lag"] = {}
        for rate in (1_000, 5_000, 20_000):
            t = uniform(rate, seconds * 2)
            f = fineserve_run(url, t, warm=min(int(rate * 0.1) + 64, 4096))
            b = baseline_run(args.port, t)
            out["lag"][str(rate)] = {"fineserve": f, "baseline": b}
            for name, r in (("fineserve", f), ("baseline", b)):
                print(
                    f"  {rate:>5} req/s {name:<12} {r['lag_p50_us']:>9.1f} "
                    f"{r['lag_p99_us']:>9.1f} {r['lag_max_us']:>9.1f}"
                )
            print(
                f"  {'':>5}       p99 ratio baseline/fineserve: "
                f"{b['lag_p99_us'] / max(f['lag_p99_us'], 1e-3):.1f}x"
            )

        print("3. 1,000 bursts of 8 in the same ms (every 5 ms)")
        t = np.repeat(np.arange(1000) * 5_000_000 + 300_000, 8).astype(np.int64)
        f = fineserve_run(url, t, warm=256)
        b = baseline_run(args.port, t)
        out["bursts"] = {"fineserve": f, "baseline": b}
        print(
            f"  members sent in their ms: fineserve {100 * f['same_ms']:.2f}%, "
            f"baseline {100 * b['same_ms']:.2f}%"
        )
        if SHARED_FINESERVE.is_dir():
            print("4. FineServe Dense_lt10B parametric (NB micro-bursts), 20 s of each schedule")
            out["parametric_bursts"] = {}
            for scale in (1, 10, 50):
                t = dense_lt10b_schedule(scale, seconds=20.0)
                f = fineserve_run(url, t, warm=256)
                b = baseline_run(args.port, t)
                row = {"requests": len(t), "fineserve": f, "baseline": b}
                row["fineserve_slot_ks"] = slot_count_ks(t, f["sent_ns"])
                row["baseline_slot_ks"] = slot_count_ks(t, b["sent_ns"])
                out["parametric_bursts"][str(scale)] = row
                print(
                    f"  time-scale {scale:>2} ({len(t)} req): in their ms fineserve "
                    f"{100 * f['same_ms']:.2f}% (slot-count KS {row['fineserve_slot_ks']:.4f}), "
                    f"baseline {100 * b['same_ms']:.2f}% (KS {row['baseline_slot_ks']:.4f})"
                )
        else:
            print(f"4. skipped: {SHARED_FINESERVE} absent (FineServe parameter files)")
    finally:
        mock.terminate()
        mock.wait()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=_no_arrays)


def _no_arrays(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return None  # per-request send times stay out of the JSON
    raise TypeError(type(o))


if __name__ == "__main__":
    main()
