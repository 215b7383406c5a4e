"""Soak: a long run at a high rate against the embedded mock with faults on, checking what
only a long run shows.

Runs ``fineserve blast`` in this process (so its memory, descriptors and threads can be
watched) for ``--duration`` seconds at ``--rate`` req/s, with the mock injecting every
fault that ends in a failure (HTTP 500/429, reset, malformed SSE and JSON, stall, no
[DONE], slow first byte, keep-alive close, endless responses) on ``--fault-share`` of the
requests. Samples RSS, open descriptors and OS threads every ``--sample-s`` seconds,
then checks:

- accounting: scheduled = sent + not sent, sent = succeeded + failed, failures by kind add
  up to the failures, and every kind is one that an injected fault explains;
- memory flat: RSS growth from the end of the first fifth of the schedule to its end, per
  million requests (the results stream to a Parquet journal, nothing per request is
  held), and the peak, which includes turning the journal into the Parquet file;
- nothing leaked: after the run, descriptors and threads are back to their level before it.

Prints a table and writes JSON (``--json``). Usage:

    python benches/soak.py                          # 10 min at 2,000 req/s
    python benches/soak.py --duration 60 --rate 500 # a quick one
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from fineserve.cli import cli

FAULTS = {
    "http_500": "http_status",
    "http_429": "http_status",
    "reset": "transport",
    "malformed_sse": "invalid_response",
    "malformed_json": "invalid_response",
    "stall": "idle_timeout",
    "no_done": "incomplete",
    "slow_first_byte": "first_byte_timeout",
    "close_keepalive": None,  # retried on a new connection: not a failure
    "endless": "too_large",
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="Seconds of schedule.")
    ap.add_argument("--rate", type=float, default=2000.0, help="Requests per second.")
    ap.add_argument("--fault-share", type=float, default=0.05, help="Share of faulted requests.")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--json", type=Path, default=Path("soak.json"))
    args = ap.parse_args()

    n = int(args.duration * args.rate)
    share = args.fault_share / len(FAULTS)
    faults = ",".join(f"{name}={share:.6f}" for name in FAULTS)
    work = Path(tempfile.mkdtemp(prefix="fineserve-soak-"))
    result = work / "result.json"
    cmd = [
        "blast", "--request-rate", str(args.rate), "--num-prompts", str(n),
        "--random-input-len", "64", "--random-output-len", "16", "--mock-ttft-ms", "5",
        "--mock-itl-ms", "2", "--mock-fault", faults, "--mock-stall-s", "3",
        "--mock-first-byte-delay-s", "3", "--idle-timeout", "1", "--first-byte-timeout", "1",
        "--max-response-mb", "1", "--warmup-requests", "0", "--disable-tqdm",
        "--output-file", str(result), "--save-requests", str(work / "requests.parquet"),
    ]  # fmt: skip

    base = {"rss_mib": rss_mib(), "fds": open_fds(), "threads": os_threads()}
    samples: list[dict[str, float]] = []
    done = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not done.wait(args.sample_s):
            samples.append(
                {
                    "t_s": round(time.monotonic() - t0, 1),
                    "rss_mib": round(rss_mib(), 1),
                    "fds": open_fds(),
                    "threads": os_threads(),
                }
            )

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    r = CliRunner().invoke(cli, cmd, catch_exceptions=False)
    done.set()
    sampler.join()
    wall_s = time.monotonic() - t0
    time.sleep(1.0)  # let closed sockets and exited threads be reaped
    after = {"rss_mib": rss_mib(), "fds": open_fds(), "threads": os_threads()}
    if r.exit_code != 0:
        raise SystemExit(f"blast failed ({r.exit_code}):\n{r.output[-2000:]}")
    m = json.loads(result.read_text())

    by_kind = m["errors_by_kind"]
    failures = sum(v for k, v in by_kind.items() if k != "not_sent")
    explained = {k for k in FAULTS.values() if k}
    checks = {
        "scheduled = sent + not_sent": m["scheduled"] == m["sent"] + m["not_sent"] == n,
        "sent = succeeded + failed": m["sent"] == m["completed"] + m["failed"],
        "failures by kind add up": failures == m["failed"],
        "every failure kind is an injected fault's": set(by_kind) - {"not_sent"} <= explained,
        "descriptors back to baseline": after["fds"] <= base["fds"],
        "threads back to baseline": after["threads"] <= base["threads"],
    }
    # Steady state: from the end of the first fifth of the schedule to its end (what
    # follows is writing the Parquet file, reported on its own as the peak).
    steady = [s for s in samples if args.duration / 5 <= s["t_s"] <= args.duration] or samples
    growth_mib = steady[-1]["rss_mib"] - steady[0]["rss_mib"] if steady else 0.0
    span = (steady[-1]["t_s"] - steady[0]["t_s"]) if steady else 0.0
    per_m = growth_mib / max(span * args.rate / 1e6, 1e-9)
    report = {
        "requests": n,
        "rate": args.rate,
        "duration_s": args.duration,
        "wall_s": round(wall_s, 1),
        "fault_share": args.fault_share,
        "completed": m["completed"],
        "failed": m["failed"],
        "errors_by_kind": by_kind,
        "p99_dispatch_lag_us": m["p99_dispatch_lag_us"],
        "sent_in_scheduled_ms_fraction": m["sent_in_scheduled_ms_fraction"],
        "rss_mib_before": round(base["rss_mib"], 1),
        "rss_mib_peak": max((s["rss_mib"] for s in samples), default=0.0),
        "rss_growth_mib_steady": round(growth_mib, 1),
        "rss_growth_mib_per_million_requests": round(per_m, 2),
        "fds_before_during_max_after": [
            base["fds"],
            max((s["fds"] for s in samples), default=0),
            after["fds"],
        ],
        "threads_before_after": [base["threads"], after["threads"]],
        "checks": checks,
        "samples": samples,
    }
    args.json.write_text(json.dumps(report, indent=1))
    print(f"soak: {n} requests at {args.rate:g} req/s, {args.fault_share:.0%} faulted")
    for k in (
        "wall_s", "completed", "failed", "errors_by_kind", "p99_dispatch_lag_us",
        "sent_in_scheduled_ms_fraction", "rss_mib_before", "rss_mib_peak",
        "rss_growth_mib_steady", "rss_growth_mib_per_million_requests",
        "fds_before_during_max_after", "threads_before_after",
    ):  # fmt: skip
        print(f"  {k:38s} {report[k]}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(f"wrote {args.json}")
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
