"""Live conversation history: what splicing each turn's actual replies into its followers
costs (issue 25, item 1), against synthetic history in the same run.

A Qwen-Bailian-shaped trace (CONVERSATIONS conversations of TURNS turns; conversations
start evenly over SPAN_S; turn k's input is 200·k tokens, its output 32; think time
fixed) is replayed against the mock in its own process, once with
``--conversation-history live`` and once ``synthetic``, on the chat API. Reported per mode:
the later turns' dispatch lag (sent − release: the engine builds a follower's body when it
is released, so any cost of the splice shows here), the first turns' lag, the client's CPU
per request and the mean history spliced per later turn.

Usage: python benches/bench_live_history.py [--conversations N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mock_proc import MockProcess

TURNS = 5
SPAN_S = 10.0
THINK_S = 0.05


def write_trace(path: Path, conversations: int) -> int:
    rows, cid = [], 1
    for c in range(conversations):
        parent = -1
        for t in range(TURNS):
            rows.append(
                {
                    "chat_id": cid,
                    "parent_chat_id": parent,
                    "turn": t + 1,
                    "timestamp": round(1000 * SPAN_S * c / conversations) + 400 * t,
                    "input_length": 200 * (t + 1),
                    "output_length": 32,
                }
            )
            parent, cid = cid, cid + 1
    rows.sort(key=lambda r: r["timestamp"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def run(base_url: str, trace: Path, history: str, out: Path) -> dict[str, Any]:
    req = out / f"{history}.parquet"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [
        sys.executable, "-m", "fineserve", "blast", "--base-url", base_url,
        "--backend", "openai-chat", "--mode", "replay", "--trace", str(trace),
        "--think-time", f"fixed:{THINK_S}", "--conversation-history", history,
        "--disable-tqdm", "--warmup-requests", "0", "--save-requests", str(req),
        "--output-file", str(out / f"{history}.json"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{history}: blast failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    import pyarrow.parquet as pq

    t = pq.read_table(req)
    col = {c: np.asarray(t[c].to_pylist()) for c in ("sent_ns", "scheduled_ns", "turn")}
    ok = np.asarray(t["error_kind"].to_pylist()) == "ok"
    lag_us = (col["sent_ns"] - col["scheduled_ns"]) / 1e3
    later = col["turn"] > 1
    hist = np.asarray(t["history_bytes"].to_pylist())
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "history": history,
        "requests": int(t.num_rows),
        "ok": int(ok.sum()),
        "later_lag_p50_us": float(np.percentile(lag_us[later], 50)),
        "later_lag_p99_us": float(np.percentile(lag_us[later], 99)),
        "first_lag_p99_us": float(np.percentile(lag_us[~later], 99)),
        "client_cpu_us_per_request": 1e6 * cpu_s / t.num_rows,
        "mean_history_bytes": float(hist[hist >= 0].mean()) if (hist >= 0).any() else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "conversations": args.conversations,
        "turns": TURNS,
        "span_s": SPAN_S,
        "think_s": THINK_S,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as d, MockProcess(ttft_ms=5.0, itl_ms=0.0) as mock:
        trace = Path(d) / "bailian.jsonl"
        n = write_trace(trace, args.conversations)
        print(f"{n} requests, {args.conversations} conversations over {SPAN_S:g} s", flush=True)
        for history in ("synthetic", "live", "synthetic", "live"):
            r = run(mock.base_url, trace, history, Path(d))
            out["runs"].append(r)
            print(
                f"  {history:>9}: ok {r['ok']}/{r['requests']}, later turns' lag p50/p99 "
                f"{r['later_lag_p50_us']:.0f}/{r['later_lag_p99_us']:.0f} us, first turns' "
                f"p99 {r['first_lag_p99_us']:.0f} us, client CPU "
                f"{r['client_cpu_us_per_request']:.0f} us/request, history "
                f"{r['mean_history_bytes']:.0f} B/turn",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
