"""The whole bench suite in one command: one table, one JSON (issue 8).

Runs, each in its own process (so file-descriptor limits and memory do not carry over):
  1-3. bench_dispatch.py: rate ceiling vs the asyncio + aiohttp baseline, oha, GuideLLM;
       dispatch lag at 1k/5k/20k req/s; micro-burst fidelity (bursts of 8, Dense_lt10B);
  4.   bench_itl.py: token timing accuracy at 100, 1k and 10k concurrent streams;
  5.   bench_streams.py: concurrent streams held and RSS per stream;
  6.   bench_generate.py, bench_fit.py, bench_prompts.py: pipeline speed.
Each script prints its own figures as it goes; the summary table follows at the end and
``--json`` keeps every script's full output. Peers come from ``benches/setup_peers.sh``
(run it first; a peer that is missing is left out and the table says so).

    bash benches/setup_peers.sh && python benches/suite.py --json bench-results.json
    python benches/suite.py --quick          # 1 s per rate, 1 trial, fewer streams
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_script(name: str, args: list[str], tmp: Path) -> dict[str, Any] | list[Any] | None:
    out = tmp / f"{name}.json"
    print(f"\n=== {name} {' '.join(args)}", flush=True)
    started = time.monotonic()
    rc = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(out)])
    print(f"=== {name}: exit {rc}, {time.monotonic() - started:.0f} s", flush=True)
    if rc != 0 or not out.is_file():
        return None
    return json.loads(out.read_text())


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}{unit}"
    return f"{v:.2f}{unit}" if abs(v) < 10 else f"{v:.1f}{unit}"


class Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        part: str,
        figure: str,
        fineserve: str,
        other: str = "",
        ratio: float | None = None,
        target: str = "",
        met: bool | None = None,
    ) -> None:
        self.rows.append(
            {
                "part": part,
                "figure": figure,
                "fineserve": fineserve,
                "other": other,
                "ratio": ratio,
                "target": target,
                "met": met,
            }
        )

    def print(self) -> None:
        heads = ["part", "figure", "fineserve", "baseline / peer", "ratio", "target", "met"]
        cells = [
            [
                r["part"],
                r["figure"],
                r["fineserve"],
                r["other"],
                ""
                if r["ratio"] is None
                else ("inf" if r["ratio"] == float("inf") else f"{r['ratio']:.1f}x"),
                r["target"],
                {None: "", True: "yes", False: "NO"}[r["met"]],
            ]
            for r in self.rows
        ]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        line = "  ".join(h.ljust(w) for h, w in zip(heads, widths))
        print("\n" + line + "\n" + "-" * len(line))
        for c in cells:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths)))


def summarize_dispatch(d: dict[str, Any], t: Table) -> None:
    c = d.get("ceiling")
    if c:
        best, any_lag, ratios = c["best_rps"], c["best_rps_any_lag"], c["ratios"]
        fs = best["fineserve"]
        for peer, label in (
            ("baseline", "asyncio+aiohttp"),
            ("oha", "oha"),
            ("guidellm", "GuideLLM"),
        ):
            if peer not in best:
                t.add(
                    "1 ceiling",
                    f"vs {label}",
                    fmt(fs, " req/s"),
                    c.get(f"{peer}_skipped", "skipped"),
                )
                continue
            target, met = {"baseline": (">= 20x", None), "oha": (">= 1x", None)}.get(
                peer, ("", None)
            )
            r = ratios[peer]
            if target:
                met = r >= (20 if peer == "baseline" else 1)
            t.add(
                "1 ceiling",
                f"p99 lag <= 1 ms; vs {label}",
                fmt(fs, " req/s"),
                (fmt(best[peer], " req/s") if best[peer] else "none passes")
                + f" (rate alone: {fmt(any_lag[peer], ' req/s') if any_lag[peer] else 'none'})",
                r,
                target,
                met,
            )
        others = [(k, v) for k, v in any_lag.items() if k != "fineserve"]
        t.add(
            "1 ceiling",
            "rate kept, any lag",
            fmt(any_lag["fineserve"], " req/s"),
            ", ".join(f"{k} {fmt(v) if v else 'none'}" for k, v in others),
        )
    for rate, row in d.get("lag", {}).items():
        f, b = row["fineserve"], row.get("baseline")
        t.add(
            "2 lag",
            f"{int(rate) // 1000}k req/s p50/p99/p99.9/max us",
            "/".join(fmt(f[k]) for k in ("lag_p50_us", "lag_p99_us", "lag_p999_us", "lag_max_us")),
            "/".join(fmt(b[k]) for k in ("lag_p50_us", "lag_p99_us", "lag_p999_us", "lag_max_us"))
            if b
            else "",
            b["lag_p99_us"] / max(f["lag_p99_us"], 1e-3) if b else None,
            "p99 <= 200 us" if rate == "5000" else "",
            f["lag_p99_us"] <= 200 if rate == "5000" else None,
        )
    bursts = d.get("bursts", {})
    variants = (("fineserve", ""), ("fineserve_realtime", " --realtime-priority"))
    if "bursts_of_8" in bursts:
        row = bursts["bursts_of_8"]
        b = row.get("baseline")
        for key, label in variants:
            if key not in row:
                continue
            f = row[key]
            t.add(
                "3 bursts",
                f"1,000 bursts of 8: in their ms{label}",
                f"{100 * f['same_ms']:.2f}%",
                f"{100 * b['same_ms']:.2f}%" if b else "",
                None,
                ">= 99.9%",
                f["same_ms"] >= 0.999,
            )
    for scale, row in bursts.get("parametric", {}).items():
        b = row.get("baseline")
        for key, label in variants:
            if key not in row:
                continue
            f = row[key]
            t.add(
                "3 bursts",
                f"Dense_lt10B ts {scale}: in ms / <1 ms late (KS){label}",
                f"{100 * f['same_ms']:.2f}% / {100 * f.get('within_1ms', 0):.2f}% "
                f"({f['slot_ks']:.3f})",
                f"{100 * b['same_ms']:.2f}% / {100 * b.get('within_1ms', 0):.2f}% "
                f"({b['slot_ks']:.3f})"
                if b
                else "",
                None,
                ">= 99.9%" if scale == "10" else "",
                f["same_ms"] >= 0.999 if scale == "10" else None,
            )


def summarize_itl(rows: list[dict[str, Any]], t: Table) -> None:
    for row in rows:
        f, b = row["fineserve"], row.get("baseline")
        n = row["streams"]
        t.add(
            "4 ITL",
            f"{n:,} streams, ITL {row['itl_ms']:g} ms: |err| p50/p99 us",
            f"{fmt(f['abs_err_p50_us'])}/{fmt(f['abs_err_p99_us'])}",
            f"{fmt(b['abs_err_p50_us'])}/{fmt(b['abs_err_p99_us'])}" if b and b["gaps"] else "",
            b["abs_err_p99_us"] / f["abs_err_p99_us"]
            if b and b["gaps"] and f["abs_err_p99_us"]
            else None,
            "p99 <= 100 us" if n == 1000 else "",
            f["abs_err_p99_us"] <= 100 if n == 1000 and f["abs_err_p99_us"] is not None else None,
        )


def summarize_streams(d: dict[str, Any], t: Table) -> None:
    t.add(
        "5 streams",
        f"held at once (of {d['streams']:,}); KiB/stream",
        f"{d['peak_in_flight']:,}; {d['kib_per_stream']:.1f}",
        f"open-files limit {d['nofile_hard']:,}/process",
        None,
        ">= 50k",
        d["peak_in_flight"] >= 50_000,
    )


def summarize_pipeline(gen: Any, fit: Any, prompts: Any, t: Table) -> None:
    if gen:
        full = gen["runs"][-1]
        t.add(
            "6 pipeline",
            f"generate Dense_lt10B {full['hours']} h (M req/s)",
            fmt(full["req_per_s"] / 1e6),
            fmt(gen["baseline"]["req_per_s"] / 1e6),
            full["req_per_s"] / gen["baseline"]["req_per_s"],
            ">= 5",
            full["req_per_s"] >= 5e6,
        )
    if fit:
        t.add(
            "6 pipeline",
            f"fit {fit['requests'] / 1e6:.1f} M requests (s)",
            fmt(fit["fit_trace_s"]),
            f"windows: scipy {fmt(fit['baseline_scipy_windows_s'])} s",
            fit["speedup_windows"],
            "<= 10 s",
            fit["fit_trace_s"] <= 10,
        )
    if prompts:
        n = prompts["prompts"]
        warm = prompts["warm"]["build_s"]
        t.add(
            "6 pipeline",
            f"{n:,} exact-length prompts (s, warm pool)",
            f"{fmt(warm)} ({n / warm / 1e3:.0f}k/s)",
            f"{fmt(prompts['baseline_per_prompt_ms'])} ms/prompt",
            prompts["baseline_per_prompt_ms"] / prompts["fineserve_per_prompt_ms"],
            "a few s",
            warm <= 5,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="1,2,3,4,5,6")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    quick = ["--quick", "--trials", "1"] if args.quick else []
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
    }
    print(f"machine: {result['machine']}")
    t = Table()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        dispatch_parts = ",".join(str(p) for p in sorted(parts & {1, 2, 3}))
        if dispatch_parts:
            r = run_script("bench_dispatch", [*quick, "--parts", dispatch_parts], tmp)
            result["dispatch"] = r
            if r:
                summarize_dispatch(r, t)
        if 4 in parts:
            streams = "100,1000" if args.quick else "100,1000,10000"
            r = run_script("bench_itl", ["--streams", streams], tmp)
            result["itl"] = r
            if r:
                summarize_itl(r, t)
        if 5 in parts:
            r = run_script("bench_streams", ["--streams", "5000" if args.quick else "19000"], tmp)
            result["streams"] = r
            if r:
                summarize_streams(r, t)
        if 6 in parts:
            gen = run_script("bench_generate", [], tmp)
            fit = run_script("bench_fit", ["--requests", "1000000"] if args.quick else [], tmp)
            prompts = run_script("bench_prompts", ["--prompts", "20000"] if args.quick else [], tmp)
            result["pipeline"] = {"generate": gen, "fit": fit, "prompts": prompts}
            summarize_pipeline(gen, fit, prompts, t)
    t.print()
    result["table"] = t.rows
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
