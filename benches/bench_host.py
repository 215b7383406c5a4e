"""At and past the limit on one many-core host (issue 21): the rate ceiling against oha,
2x past fineserve's ceiling, bursts at 67k req/s, and concurrent streams per host.

Every figure is measured at the server too: the mock (``mock_proc.MockProcess``, its own
process, ``--mock-workers`` threads) logs each completion request's arrival at the
kernel's receive stamp of its bytes; the k-th arrival is matched with the k-th scheduled
offset (``peers.server_pacing``). fineserve runs as users run it, the ``fineserve blast``
command in its own process (``--processes``/``--lanes`` as given); oha as its users drive
it (``-q RATE -c CONNECTIONS``), with the same body, on the same host, in the same run.

Parts (``--parts``, comma-separated):
- ``engine``: the engine alone (Python API, one body, 2,000 warm connections): Poisson
  arrivals at each rate for 2 s, for each ``--configs`` (processes x lanes per process).
- ``ceiling``: fineserve at each ``--rates`` (3 s each) and oha at the same rates with each
  ``--oha-connections``, for each ``--configs``. A rate passes for fineserve if every
  request succeeds, p99 send lag (client and server) <= 1 ms and the send rate >= 99% of
  the target; for oha, if every request succeeds and its rate >= 99% of the target.
- ``double``: fineserve at 2x its highest passing rate (or ``--double-rate``) for 2 s: the
  requests it fails itself (connect errors, descriptors) must be 0; the result must say
  ``client_saturated``.
- ``bursts``: bursts of 1-8 requests due at one instant, Poisson bursts, 67.6k req/s for
  3 s, with and without ``--realtime-priority``: the share that reached the server within
  1 ms of schedule.
- ``streams``: ``--streams`` requests that all overlap (starts within 2 s, each lasting
  >= 6 s) over one mock process per 16k streams and ``--processes`` client processes.
- ``itl``: ``bench_itl.py --streams 1000,10000`` (token timing error against the mock's
  emission instants).

Usage: python benches/bench_host.py --parts engine,ceiling,double,bursts,streams,itl --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from fineserve import ERROR_KINDS, EngineOptions
from fineserve.api import BodyTemplate
from fineserve.processes import run_stream_processes
from fineserve.runner import EngineChunk, _CollectingSink
from mock_proc import MockProcess

TOKENS = 16
#: Connections over all client processes, for the mock (one process, 20,000 descriptors).
MAX_CONNECTIONS = 16_000
#: Error kinds a client inflicts on itself (its own descriptors, ports, pool).
SELF_INFLICTED = {"connect", "not_sent", "tls", "cancelled"}


def log(msg: str) -> None:
    print(msg, flush=True)


def body(tokens: int) -> bytes:
    t = BodyTemplate("vllm", "fineserve-mock", stream=True, ignore_eos=True)
    return t.render("r0 " + "word " * 31, tokens)


def fineserve_blast(
    mock: MockProcess,
    rate: float,
    seconds: float,
    extra: list[str],
    tmp: Path,
    max_connections: int | None = MAX_CONNECTIONS,
) -> dict[str, Any]:
    """``fineserve blast`` at ``rate`` for ``seconds``; client and server figures.
    ``max_connections`` None: blast's own cap (open files and ephemeral ports)."""
    req, res = tmp / "r.parquet", tmp / "r.json"
    n = int(rate * seconds)
    cap = [] if max_connections is None else ["--max-connections", str(max_connections)]
    cmd = [
        sys.executable, "-m", "fineserve.cli", "blast", "--base-url", mock.base_url,
        "--model", "fineserve-mock", "--num-prompts", str(n), "--request-rate", str(rate),
        "--random-input-len", "32", "--random-output-len", str(TOKENS), "--seed", "1",
        "--disable-tqdm", "--save-requests", str(req), "--output-file", str(res),
        *cap, *extra,
    ]  # fmt: skip
    mock.take()  # forget earlier arrivals
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - started
    if done.returncode != 0:
        return {"rate": rate, "error": done.stderr.strip().splitlines()[-3:]}
    result = json.loads(res.read_text())
    table = pq.read_table(req, columns=["scheduled_ns", "sent_ns", "error_kind", "error_message"])
    messages: dict[str, int] = {}
    for m in table["error_message"].to_pylist():
        if m:
            messages[m] = messages.get(m, 0) + 1
    sched = table["scheduled_ns"].to_numpy()
    sent = table["sent_ns"].to_numpy()
    kinds = [ERROR_KINDS[k] if isinstance(k, int) else k for k in table["error_kind"].to_pylist()]
    outcomes: dict[str, int] = {}
    for k in kinds:
        outcomes[k] = outcomes.get(k, 0) + 1
    was = sent >= 0
    lag_us = (sent[was] - sched[was]) / 1e3
    span_s = (sent[was].max() - sent[was].min()) / 1e9 if was.sum() > 1 else 0.0
    arrivals, _ = mock.take()
    # Warm-up requests arrive first: keep the run's own.
    arrivals = arrivals[max(len(arrivals) - n, 0) :]
    out = {
        "rate": rate,
        "requests": n,
        "outcomes": outcomes,
        "self_inflicted_failures": sum(v for k, v in outcomes.items() if k in SELF_INFLICTED),
        "send_rps": (was.sum() - 1) / span_s if span_s else 0.0,
        "lag_p50_us": float(np.percentile(lag_us, 50)) if len(lag_us) else None,
        "lag_p99_us": float(np.percentile(lag_us, 99)) if len(lag_us) else None,
        "lag_max_us": float(lag_us.max()) if len(lag_us) else None,
        "client_saturated": result.get("client_saturated"),
        "client_saturation_reasons": result.get("client_saturation_reasons"),
        "connections_peak": result.get("connections_peak"),
        "connections_opened": result.get("connections_opened"),
        "max_connections": result.get("max_connections"),
        "connection_waits": result.get("connection_waits"),
        "pool_wait_p99_us": result.get("pool_wait_p99_us"),
        "token_time_source": result.get("token_time_source"),
        "errors": sorted(messages.items(), key=lambda kv: -kv[1])[:4],
        "workers": [
            {k: w.get(k) for k in ("sent", "outcomes", "lag_p99_us", "achieved_rps")}
            for w in result.get("workers", [])
        ],
        "wall_s": wall,
        **peers.server_pacing(arrivals, sched),
    }
    out["passed"] = bool(
        outcomes.get("ok", 0) == n
        and out["lag_p99_us"] is not None
        and out["lag_p99_us"] <= 1000
        and out.get("server_lag_p99_us", 1e9) <= 1000
        and out["send_rps"] >= 0.99 * rate
    )
    return out


def oha_blast(mock: MockProcess, rate: float, seconds: float, conns: int) -> dict[str, Any]:
    n = int(rate * seconds)
    mock.take()
    r = peers.oha_run(mock.base_url + "/v1/completions", rate, n, body(TOKENS), conns=conns)
    arrivals, _ = mock.take()
    out = {"rate": rate, "connections": conns, **r}
    if "error" not in r:
        sched = np.arange(n, dtype=np.int64) * int(1e9 / rate)
        out.update(peers.server_pacing(arrivals, sched))
        out["passed"] = bool(r["ok"] == n and (r["oha_rps"] or 0) >= 0.99 * rate)
    return out


def part_ceiling(mock: MockProcess, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {"fineserve": [], "oha": {}}
    for procs, lanes in args.configs:
        # A rate the client cannot keep ends early (the run says so) instead of
        # spending the bench's time draining a backlog.
        extra = ["--processes", str(procs), "--lanes", str(lanes), "--stop-on-lag-ms", "100"]
        for rate in args.rates:
            r = fineserve_blast(mock, rate, 3.0, extra, tmp)
            r["config"] = f"{procs}x{lanes}"
            log(f"ceiling fineserve {procs}x{lanes} {rate:,.0f}: {_brief(r)}")
            rows["fineserve"].append(r)
            if not r.get("passed"):
                break
    for conns in args.oha_connections:
        rows["oha"][str(conns)] = []
        for rate in args.rates:
            r = oha_blast(mock, rate, 3.0, conns)
            log(f"ceiling oha -c {conns} {rate:,.0f}: {_brief(r)}")
            rows["oha"][str(conns)].append(r)
    passing = [r for r in rows["fineserve"] if r.get("passed")]
    best = max(passing, key=lambda r: r["rate"], default=None)
    rows["fineserve_ceiling"] = best["rate"] if best else 0
    rows["fineserve_ceiling_config"] = best["config"] if best else None
    oha_best = max(
        (r.get("oha_rps") or 0 for rs in rows["oha"].values() for r in rs if "error" not in r),
        default=0,
    )
    fs_best = max((r.get("send_rps") or 0 for r in rows["fineserve"]), default=0)
    rows["oha_best_rps"] = oha_best
    rows["fineserve_best_rps"] = fs_best
    rows["ratio_best"] = fs_best / oha_best if oha_best else None
    log(
        f"ceiling: fineserve passes {rows['fineserve_ceiling']:,.0f}; best rates fineserve "
        f"{fs_best:,.0f}, oha {oha_best:,.0f}"
    )
    return rows


def part_past(mock: MockProcess, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Past the mock's ceiling: ``blast`` at ``--past-rate`` for 3 s with each connection
    cap (``auto``: blast's own), and oha at the same rate with each ``-c``, in one run."""
    rows: dict[str, Any] = {"rate": args.past_rate, "fineserve": [], "oha": []}
    procs, lanes = args.configs[0]
    extra = ["--processes", str(procs), "--lanes", str(lanes)]
    for cap in args.past_connections:
        conns = None if cap == "auto" else int(cap)
        r = fineserve_blast(mock, args.past_rate, 3.0, extra, tmp, max_connections=conns)
        r["cap"], r["config"] = cap, f"{procs}x{lanes}"
        log(f"past fineserve {cap}: {_brief(r)}; opened {r.get('connections_opened')}")
        rows["fineserve"].append(r)
    for conns in args.oha_connections:
        r = oha_blast(mock, args.past_rate, 3.0, conns)
        log(f"past oha -c {conns}: {_brief(r)}")
        rows["oha"].append(r)
    return rows


def part_double(mock: MockProcess, rate: float, args: argparse.Namespace, tmp: Path) -> Any:
    procs, lanes = args.configs[0]
    extra = ["--processes", str(procs), "--lanes", str(lanes)]
    r = fineserve_blast(mock, rate, 2.0, extra, tmp)
    log(f"double {rate:,.0f}: {_brief(r)}; reasons {r.get('client_saturation_reasons')}")
    return r


def part_engine(mock: MockProcess, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The engine alone (the Python API, one body, warm connections given): Poisson
    arrivals at each rate for 2 s, for each processes x lanes configuration."""
    rows = []
    for procs, lanes in args.configs:
        for rate in args.rates:
            n = int(rate * 2)
            t = np.cumsum(np.random.default_rng(1).exponential(1e9 / rate, n)).astype(np.int64)
            r = run_api(mock, t, procs, lanes, args.burst_warm, False, args.max_connections)
            r.update(rate=rate, config=f"{procs}x{lanes}")
            log(f"engine {procs}x{lanes} {rate:,.0f}: {r}")
            rows.append(r)
            if (r["client_lag_p99_us"] > 1000 or r["ok"] < n) and not args.keep_going:
                break
    return rows


def run_api(
    mock: MockProcess,
    t: np.ndarray,
    procs: int,
    lanes: int,
    warm: int,
    realtime: bool,
    max_connections: int = 0,
) -> dict[str, Any]:
    """``t`` (sorted offsets) through ``procs`` engine processes; client and server lag."""
    n = len(t)
    max_connections = max_connections or MAX_CONNECTIONS
    options = EngineOptions(
        lanes=lanes,
        warm_connections=warm,
        realtime_priority=realtime,
        # Under the mock's own open-files limit (20,000): past it connects would sit in its
        # accept queue, which measures the mock (oha's largest -c is the same 16,000).
        max_connections=max_connections,
    )
    chunk = EngineChunk(
        t, [body(TOKENS)], np.zeros(n, np.uint32), np.zeros(n, np.uint32), np.full(n, TOKENS)
    )
    mock.take()
    sink = _CollectingSink()
    started = time.monotonic()
    outcome = run_stream_processes(
        [mock.base_url + "/v1/completions"],
        iter([chunk]),
        options,
        sink,
        processes=procs,
        show_progress=False,
    )
    wall = time.monotonic() - started
    arrivals, _ = mock.take()
    cols = sink.columns()
    order = np.argsort(np.asarray(cols["index"]))
    sent = np.asarray(cols["sent_ns"])[order]
    kinds = np.asarray(cols["error_kind"])
    lag_us = (sent - t) / 1e3
    a = np.sort(arrivals)[-n:]
    d = a - np.sort(t)[: len(a)]
    server_lag_us = (d - d.min()) / 1e3
    span_s = (sent.max() - sent.min()) / 1e9
    return {
        "ok": int((kinds == 0).sum()),
        "outcomes": {ERROR_KINDS[k]: int(c) for k, c in zip(*np.unique(kinds, return_counts=True))},
        "send_rps": (n - 1) / span_s if span_s else 0.0,
        "client_within_1ms": float((lag_us <= 1000).mean()),
        "client_lag_p99_us": float(np.percentile(lag_us, 99)),
        "client_lag_p999_us": float(np.percentile(lag_us, 99.9)),
        "server_within_1ms": float((server_lag_us <= 1000).mean()),
        "server_lag_p99_us": float(np.percentile(server_lag_us, 99)),
        "server_lag_p999_us": float(np.percentile(server_lag_us, 99.9)),
        "connections_peak": int(outcome.progress.get("connections_peak", 0)),
        "wall_s": wall,
    }


def burst_schedule(rate: float, seconds: float, seed: int = 3) -> np.ndarray:
    """Bursts of 1-8 requests due at one instant; bursts arrive as a Poisson process."""
    rng = np.random.default_rng(seed)
    mean_size = 4.5
    n_bursts = int(rate * seconds / mean_size)
    starts = np.cumsum(rng.exponential(mean_size / rate * 1e9, n_bursts)).astype(np.int64)
    sizes = rng.integers(1, 9, n_bursts)
    return np.repeat(starts, sizes)


def part_bursts(mock: MockProcess, args: argparse.Namespace) -> dict[str, Any]:
    t = burst_schedule(args.burst_rate, 3.0)
    n = len(t)
    out: dict[str, Any] = {"requests": n, "rate": n / (t[-1] / 1e9)}
    procs, lanes = args.configs[-1]
    for realtime in (False, True):
        key = "realtime" if realtime else "default"
        out[key] = run_api(mock, t, procs, lanes, args.burst_warm, realtime)
        log(f"bursts {key}: {out[key]}")
    return out


def part_streams(args: argparse.Namespace) -> dict[str, Any]:
    """``--streams`` overlapping streams over ceil(streams / 16k) mock processes."""
    n = args.streams
    per_mock = 16_000
    n_mocks = -(-n // per_mock)
    with ExitStack() as stack:
        mocks = [
            stack.enter_context(MockProcess(ttft_ms=6000, itl_ms=200, record_arrivals=False))
            for _ in range(n_mocks)
        ]
        urls = [m.base_url + "/v1/completions" for m in mocks]
        t = np.sort(np.random.default_rng(5).uniform(0, 2e9, n)).astype(np.int64)
        procs = max(args.processes, n_mocks)
        # Request i runs in process i % procs; endpoint i % n_mocks keeps each process
        # on few mocks when procs is a multiple of n_mocks.
        endpoint = (np.arange(n) % n_mocks).astype(np.uint32)
        chunk = EngineChunk(t, [body(8)], np.zeros(n, np.uint32), endpoint, np.full(n, 8))
        options = EngineOptions(
            lanes=2,
            warm_connections=0,
            max_connections=19_000 * procs,
            connect_timeout_s=60.0,
        )
        sink = _CollectingSink()
        rss: list[float] = []
        started = time.monotonic()
        outcome = run_stream_processes(
            urls, iter([chunk]), options, sink, processes=procs, show_progress=False
        )
        wall = time.monotonic() - started
        stats = [m.stats() for m in mocks]
    cols = sink.columns()
    kinds = np.asarray(cols["error_kind"])
    ok = int((kinds == 0).sum())
    sent = np.asarray(cols["sent_ns"])
    done = np.asarray(cols["done_ns"])
    # In flight at each instant: sent and not yet done; the peak over the run.
    events = np.concatenate([sent[sent >= 0], done[done >= 0]])
    steps = np.concatenate([np.ones((sent >= 0).sum()), -np.ones((done >= 0).sum())])
    order = np.argsort(events, kind="stable")
    peak = int(np.cumsum(steps[order]).max())
    out = {
        "streams": n,
        "mock_processes": n_mocks,
        "client_processes": procs,
        "ok": ok,
        "outcomes": {ERROR_KINDS[k]: int(c) for k, c in zip(*np.unique(kinds, return_counts=True))},
        "peak_in_flight": peak,
        "connections_peak": int(outcome.progress.get("connections_peak", 0)),
        "wall_s": wall,
        "mock_stats": stats,
        "rss": rss,
    }
    log(f"streams: {n} requested, {ok} ok, peak in flight {peak}, wall {wall:.1f}s")
    return out


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    keys = (
        "passed", "outcomes", "ok", "send_rps", "oha_rps", "lag_p99_us", "server_lag_p99_us",
        "server_lag_max_us", "client_saturated", "connections_peak", "wall_s",
    )  # fmt: skip
    shown = [(k, v) for k in keys if (v := r.get(k)) is not None]
    return ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="ceiling,double,bursts,streams")
    ap.add_argument("--rates", default="100000,150000,200000,250000")
    ap.add_argument("--oha-connections", default="4000,16000")
    ap.add_argument(
        "--configs", default="1x8,2x4,4x2", help="PROCESSESxLANES to try (lanes per process)"
    )
    ap.add_argument("--processes", type=int, default=6, help="client processes for streams")
    ap.add_argument("--mock-workers", type=int, default=6)
    ap.add_argument("--double-rate", type=float, default=0.0)
    ap.add_argument("--past-rate", type=float, default=150_000.0)
    ap.add_argument("--past-connections", default="auto,4000", help="blast caps, past part")
    ap.add_argument("--burst-rate", type=float, default=67_600.0)
    ap.add_argument("--burst-warm", type=int, default=2000)
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="engine part")
    ap.add_argument("--streams", type=int, default=100_000)
    ap.add_argument("--itl-streams", default="1000,10000")
    ap.add_argument("--keep-going", action="store_true", help="engine part: every rate")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    args.oha_connections = [int(c) for c in args.oha_connections.split(",") if c]
    args.past_connections = [c for c in args.past_connections.split(",") if c]
    parts = set(args.parts.split(","))
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"kernel {platform.release()}",
        "configs": args.configs,
        "mock_workers": args.mock_workers,
    }
    log(f"machine: {out['machine']}; have oha: {peers.have_oha()}")

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=float))

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if parts & {"engine", "ceiling", "double", "bursts", "past"}:
            with MockProcess(ttft_ms=5.0, itl_ms=0.0, workers=args.mock_workers) as mock:
                if "engine" in parts:
                    out["engine"] = part_engine(mock, args)
                    save()
                if "ceiling" in parts:
                    out["ceiling"] = part_ceiling(mock, args, tmp)
                    save()
                if "past" in parts:
                    out["past"] = part_past(mock, args, tmp)
                    save()
                if "double" in parts:
                    base = args.double_rate or 2 * (
                        out.get("ceiling", {}).get("fineserve_ceiling") or 100_000
                    )
                    out["double"] = part_double(mock, base, args, tmp)
                    save()
                if "bursts" in parts:
                    out["bursts"] = part_bursts(mock, args)
                    save()
        if "streams" in parts:
            out["streams"] = part_streams(args)
            save()
        if "itl" in parts:
            itl_json = tmp / "itl.json"
            here = Path(__file__).resolve().parent
            subprocess.run(
                [sys.executable, str(here / "bench_itl.py"), "--streams", args.itl_streams,
                 "--json", str(itl_json)],
                timeout=400,
            )  # fmt: skip
            if itl_json.exists():
                out["itl"] = json.loads(itl_json.read_text())
            save()


if __name__ == "__main__":
    main()
