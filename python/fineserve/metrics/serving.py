"""FineServe/vLLM serving metrics from per-request records.

Definitions (those of FineServe's Generator and vLLM's benchmark, so numbers compare):
- TTFT = first token-bearing event − send; E2E = end of response − send.
- ITL = gaps between successive token-bearing events of a request (per chunk, pooled over
  requests); TPOT = (E2E − TTFT) / (output tokens − 1) for requests with > 1 token.
- Output tokens: the server's ``usage.completion_tokens`` when reported, otherwise the number
  of token-bearing events (FineServe falls back to the *requested* length, which hides
  short answers).
- Only successful requests enter latency and token figures; duration runs from the start
  instant to the last response end; concurrency = Σ E2E / duration.
- Dispatch lag = actual send − scheduled send, for every request that was sent.
- Percentiles come from log-bucketed histograms (within 0.05 % of numpy's), so that runs of
  any length summarise in bounded memory; means, standard deviations and counts are exact.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from .._engine import ERROR_KINDS
from .histogram import LogHistogram

_NS_PER_MS = 1e6


def _stats(h: LogHistogram, prefix: str, extra: tuple[int, ...] = ()) -> dict[str, float]:
    out = {
        f"mean_{prefix}_ms": h.mean / _NS_PER_MS,
        f"median_{prefix}_ms": h.percentile(50) / _NS_PER_MS,
        f"std_{prefix}_ms": h.std / _NS_PER_MS,
        f"p99_{prefix}_ms": h.percentile(99) / _NS_PER_MS,
    }
    for p in extra:
        out[f"p{p}_{prefix}_ms"] = h.percentile(p) / _NS_PER_MS
    return out


def itl_ns(
    chunk_ns: npt.NDArray[np.int64],
    chunk_offsets: npt.NDArray[np.uint64],
    include: npt.NDArray[np.bool_],
) -> npt.NDArray[np.int64]:
    """Gaps between successive events of the same request, for requests in ``include``."""
    counts = np.diff(chunk_offsets.astype(np.int64))
    if len(chunk_ns) < 2:
        return np.zeros(0, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    same = owner[:-1] == owner[1:]
    keep = same & include[owner[:-1]]
    return np.diff(chunk_ns)[keep]


class MetricsAccumulator:
    """Serving metrics over record batches of any number and size, in bounded memory.

    Latency distributions are :class:`LogHistogram` s (percentiles within 0.05 %, mean and
    std exact), so a run of any duration can be summarised as its records drain.
    """

    def __init__(self) -> None:
        self.e2e = LogHistogram()
        self.ttft = LogHistogram()
        self.tpot = LogHistogram()
        self.itl = LogHistogram()
        self.lag = LogHistogram()
        self.scheduled = self.completed = self.failed = self.not_sent = 0
        self.total_input = self.total_output = self.server_reported = 0
        self.in_scheduled_ms = 0
        self.last_end_ns = 0
        self.errors_by_kind: Counter[str] = Counter()
        self.first_error_by_kind: dict[str, str] = {}

    def add(self, columns: dict[str, Any], input_len: npt.ArrayLike) -> None:
        """Adds one batch of records; ``input_len`` is aligned with the batch's rows."""
        kind = np.asarray(columns["error_kind"])
        sched = np.asarray(columns["scheduled_ns"])
        sent = np.asarray(columns["sent_ns"])
        first = np.asarray(columns["first_token_ns"])
        done = np.asarray(columns["done_ns"])
        n_chunks = np.asarray(columns["n_chunks"]).astype(np.int64)
        reported = np.asarray(columns["completion_tokens"])
        ok = kind == 0
        was_sent = sent >= 0

        out_tokens = np.where(reported >= 0, reported, n_chunks)
        ends = np.concatenate([done[done >= 0], sent[was_sent]])
        if len(ends):
            self.last_end_ns = max(self.last_end_ns, int(ends.max()))
        ok_first = ok & (first >= 0)
        self.ttft.add(first[ok_first] - sent[ok_first])
        self.e2e.add(done[ok] - sent[ok])
        multi = ok_first & (out_tokens > 1)
        self.tpot.add((done[multi] - first[multi]) / (out_tokens[multi] - 1))
        self.itl.add(
            itl_ns(np.asarray(columns["chunk_ns"]), np.asarray(columns["chunk_offsets"]), ok)
        )
        self.lag.add(sent[was_sent] - sched[was_sent])
        self.in_scheduled_ms += int(
            np.sum(sent[was_sent] // 1_000_000 == sched[was_sent] // 1_000_000)
        )

        self.scheduled += len(kind)
        self.completed += int(ok.sum())
        self.not_sent += int((~was_sent).sum())
        self.failed += int((was_sent & ~ok).sum())
        self.total_input += int(np.sum(np.asarray(input_len)[ok]))
        self.total_output += int(np.sum(out_tokens[ok]))
        self.server_reported += int(np.sum((reported >= 0) & ok))
        self.errors_by_kind.update(ERROR_KINDS[k] for k in kind[~ok])
        for row, msg in zip(columns["error_index"], columns["error_message"]):
            self.first_error_by_kind.setdefault(ERROR_KINDS[kind[int(row)]], msg)

    def add_not_sent(self, count: int, reason: str) -> None:
        """Requests that never reached the engine (e.g. generated after an interruption)."""
        if count:
            self.scheduled += count
            self.not_sent += count
            self.errors_by_kind["not_sent"] += count
            self.first_error_by_kind.setdefault("not_sent", reason)

    def result(self, lag_percentiles: tuple[float, ...] = (50, 99, 99.9)) -> dict[str, Any]:
        """The FineServe metric set plus accounting, failures and dispatch lag."""
        duration_s = self.last_end_ns / 1e9
        dur = duration_s if duration_s > 0 else float("nan")

        def per_s(x: float) -> float:
            return float(x / dur) if dur == dur else 0.0

        m: dict[str, Any] = {
            "duration": duration_s,
            "completed": self.completed,
            "failed": self.failed,
            "scheduled": self.scheduled,
            "sent": self.completed + self.failed,
            "not_sent": self.not_sent,
            "total_input_tokens": self.total_input,
            "total_output_tokens": self.total_output,
            "total_output_tokens_retokenized": None,
            "output_tokens_server_reported": self.server_reported,
            "request_throughput": per_s(self.completed),
            "input_throughput": per_s(self.total_input),
            "output_throughput": per_s(self.total_output),
            "total_token_throughput": per_s(self.total_input + self.total_output),
        }
        e2e = _stats(self.e2e, "e2e_latency")
        m.update(e2e)
        m.update({k.replace("e2e_latency", "e2el"): v for k, v in e2e.items()})  # vLLM's names
        m.update(_stats(self.ttft, "ttft"))
        m.update(_stats(self.tpot, "tpot"))
        m.update(_stats(self.itl, "itl", extra=(95,)))
        m["max_itl_ms"] = self.itl.max / _NS_PER_MS if self.itl.count else 0.0
        m["concurrency"] = per_s(self.e2e.mean * self.e2e.count / 1e9)
        for p in lag_percentiles:
            key = f"p{p:g}_dispatch_lag_us".replace(".", "_")
            m[key] = self.lag.percentile(p) / 1e3
        m["max_dispatch_lag_us"] = self.lag.max / 1e3 if self.lag.count else 0.0
        m["mean_dispatch_lag_us"] = self.lag.mean / 1e3
        m["sent_in_scheduled_ms_fraction"] = (
            self.in_scheduled_ms / self.lag.count if self.lag.count else 0.0
        )
        m["errors_by_kind"] = dict(sorted(self.errors_by_kind.items()))
        m["first_error_by_kind"] = dict(self.first_error_by_kind)
        return m


def compute_metrics(
    columns: dict[str, Any],
    input_len: npt.ArrayLike,
    *,
    lag_percentiles: tuple[float, ...] = (50, 99, 99.9),
) -> dict[str, Any]:
    """Metrics of one batch of records (e.g. a whole short run)."""
    acc = MetricsAccumulator()
    acc.add(columns, input_len)
    return acc.result(lag_percentiles)


def format_summary(m: dict[str, Any], header: dict[str, Any]) -> str:
    """FineServe's summary table (same labels and widths), then accounting and dispatch lag."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        text = format(value, fmt) if fmt else str(value)
        lines.append(f"{label:<40} {text:<10}")

    def section(title: str) -> None:
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))

    row("Backend:", header.get("backend"))
    row("Request generation mode:", header.get("mode"))
    row("Traffic request rate:", header.get("request_rate"))
    row("Max request concurrency:", header.get("max_concurrency") or "not set")
    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Benchmark duration (s):", m["duration"], ".2f")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"], ".2f")
    row("Input token throughput (tok/s):", m["input_throughput"], ".2f")
    row("Output token throughput (tok/s):", m["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", m["total_token_throughput"], ".2f")
    row("Concurrency:", m["concurrency"], ".2f")
    section("End-to-End Latency")
    row("Mean E2E Latency (ms):", m["mean_e2e_latency_ms"], ".2f")
    row("Median E2E Latency (ms):", m["median_e2e_latency_ms"], ".2f")
    row("P99 E2E Latency (ms):", m["p99_e2e_latency_ms"], ".2f")
    section("Time to First Token")
    row("Mean TTFT (ms):", m["mean_ttft_ms"], ".2f")
    row("Median TTFT (ms):", m["median_ttft_ms"], ".2f")
    row("P99 TTFT (ms):", m["p99_ttft_ms"], ".2f")
    section("Inter-Token Latency")
    row("Mean ITL (ms):", m["mean_itl_ms"], ".2f")
    row("Median ITL (ms):", m["median_itl_ms"], ".2f")
    row("P95 ITL (ms):", m["p95_itl_ms"], ".2f")
    row("P99 ITL (ms):", m["p99_itl_ms"], ".2f")
    row("Max ITL (ms):", m["max_itl_ms"], ".2f")
    row("Mean TPOT (ms):", m["mean_tpot_ms"], ".2f")
    row("Median TPOT (ms):", m["median_tpot_ms"], ".2f")
    row("P99 TPOT (ms):", m["p99_tpot_ms"], ".2f")
    section("Dispatch (sent - scheduled)")
    row("P50 dispatch lag (us):", m["p50_dispatch_lag_us"], ".1f")
    row("P99 dispatch lag (us):", m["p99_dispatch_lag_us"], ".1f")
    row("Max dispatch lag (us):", m["max_dispatch_lag_us"], ".1f")
    row("Sent in scheduled ms (%):", 100 * m["sent_in_scheduled_ms_fraction"], ".2f")
    section("Accounting")
    row("Scheduled:", m["scheduled"])
    row("Sent:", m["sent"])
    row("  succeeded:", m["completed"])
    row("  failed:", m["failed"])
    row("Not sent:", m["not_sent"])
    for name, count in m["errors_by_kind"].items():
        row(f"  {name}:", count)
    lines.append("=" * 50)
    for name, msg in m["first_error_by_kind"].items():
        shown = msg if len(msg) <= 200 else msg[:197] + "..."
        lines.append(f"first {name} error: {shown}")
    return "\n".join(lines)
