"""Token timing accuracy: how far a client's inter-token latencies are from the server's.

The embedded mock (in its own process, ``mock_proc.MockProcess``, so that client and server
each have the whole open-files limit) streams tokens at a fixed cadence and records when
each token left (``record_token_times``), keyed by the request's ``user``
field. For every gap between two tokens of a stream, the error is the gap the client
measured minus the gap at which the server sent them; this needs no shared epoch, only the
one monotonic clock of the machine. Compared in the same run: fineserve's engine and a
Python asyncio + aiohttp client (one coroutine per stream, ``perf_counter`` stamp per SSE
event, as FineServe's and vLLM's benchmark clients measure ITL).

Streams start within 200 ms and overlap for their whole length. The cadence grows with the
stream count so that the mock emits about the same number of tokens per second at every
level (``--events-per-s``): on a 2-vCPU machine holding the client and the server, 10k
streams at 2 ms would be 5 M events/s, which measures the CPU, not the client's timing.

Usage: python benches/bench_itl.py [--streams 100,1000,10000] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fineserve import EngineOptions, run_engine
from fineserve.api import BodyTemplate
from mock_proc import MockProcess

TOKENS = 64


def bodies(n: int) -> list[bytes]:
    t = BodyTemplate("vllm", "fineserve-mock", stream=True, ignore_eos=True)
    out = []
    for i in range(n):
        b = json.loads(t.render(f"r{i} word word word", TOKENS))
        b["user"] = f"s{i}"
        out.append(json.dumps(b).encode())
    return out


def gap_errors_us(client: dict[str, np.ndarray], server: dict[str, Any]) -> np.ndarray:
    """Client gap minus server gap, per consecutive token pair, over all full streams."""
    errs = []
    for user, c in client.items():
        s = np.asarray(server.get(user, ()), np.int64)
        if len(c) != TOKENS or len(s) != TOKENS:
            continue
        errs.append((np.diff(c) - np.diff(s)) / 1e3)
    return np.concatenate(errs) if errs else np.zeros(0)


def stats(errs_us: np.ndarray, streams: int, complete: int) -> dict[str, Any]:
    a = np.abs(errs_us)
    return {
        "streams": streams,
        "complete_streams": complete,
        "gaps": len(a),
        "abs_err_p50_us": float(np.percentile(a, 50)) if len(a) else None,
        "abs_err_p99_us": float(np.percentile(a, 99)) if len(a) else None,
        "abs_err_max_us": float(a.max()) if len(a) else None,
        "mean_err_us": float(errs_us.mean()) if len(a) else None,
    }


def run_fineserve(mock: MockProcess, n: int) -> dict[str, Any]:
    url = mock.base_url + "/v1/completions"
    t_ns = np.linspace(0, 200e6, n).astype(np.int64)
    rec = run_engine(
        [url],
        t_ns,
        bodies(n),
        np.arange(n, dtype=np.uint32),
        np.zeros(n, np.uint32),
        np.full(n, TOKENS),
        EngineOptions(warm_connections=n, connect_timeout_s=30.0),
        show_progress=False,
    )
    _, server = mock.take()
    chunk, offsets = rec.col("chunk_ns"), rec.col("chunk_offsets")
    client = {
        f"s{i}": chunk[offsets[i] : offsets[i + 1]]
        for i in range(n)
        if rec.col("error_kind")[i] == 0
    }
    complete = sum(len(v) == TOKENS for v in client.values())
    return stats(gap_errors_us(client, server), n, complete)


async def _aiohttp_streams(url: str, payloads: list[bytes]) -> dict[str, np.ndarray]:
    import aiohttp

    n = len(payloads)
    out: dict[str, np.ndarray] = {}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        start = time.perf_counter()

        async def one(i: int) -> None:
            delay = start + 0.2 * i / max(n - 1, 1) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stamps = []
            async with session.post(
                url, data=payloads[i], headers={"content-type": "application/json"}
            ) as resp:
                async for line in resp.content:  # one SSE line at a time, as vLLM's client
                    if line.startswith(b"data: {") and b'"choices":[]' not in line:
                        stamps.append(time.perf_counter_ns())
            out[f"s{i}"] = np.array(stamps, np.int64)

        await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    return out


def run_baseline(mock: MockProcess, n: int) -> dict[str, Any]:
    client = asyncio.run(_aiohttp_streams(mock.base_url + "/v1/completions", bodies(n)))
    _, server = mock.take()
    complete = sum(len(v) == TOKENS for v in client.values())
    return stats(gap_errors_us(client, server), n, complete)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="100,1000,10000")
    ap.add_argument("--events-per-s", type=float, default=50_000.0)
    ap.add_argument("--min-itl-ms", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        import aiohttp  # noqa: F401

        have_baseline = True
    except ImportError:
        have_baseline = False
        print("aiohttp not installed (pip install aiohttp): baseline skipped")
    results = []
    for n in (int(x) for x in args.streams.split(",")):
        itl_ms = max(args.min_itl_ms, n / args.events_per_s * 1e3)
        row: dict[str, Any] = {"streams": n, "itl_ms": itl_ms}
        with MockProcess(ttft_ms=5, itl_ms=itl_ms, record_token_times=True) as mock:
            row["fineserve"] = run_fineserve(mock, n)
            if have_baseline:
                row["baseline"] = run_baseline(mock, n)
        results.append(row)
        f, b = row["fineserve"], row.get("baseline")
        print(
            f"{n:>6} streams, ITL {itl_ms:g} ms: fineserve |err| p50 {f['abs_err_p50_us']:.1f} "
            f"p99 {f['abs_err_p99_us']:.1f} µs ({f['complete_streams']} full streams)"
            + (
                f"; baseline p50 {b['abs_err_p50_us']:.1f} p99 {b['abs_err_p99_us']:.1f} µs "
                f"({b['complete_streams']} full streams)"
                if b and b["gaps"]
                else ""
            )
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
