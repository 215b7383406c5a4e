"""The server beside the client: every endpoint's Prometheus ``/metrics`` scraped on its own
thread during the run, stored in long format, summarised, and joined to each request.

Each target has its own thread (never a lane: the engine's threads are Rust's and do not
wait on Python), scraping at absolute ticks of ``interval_s``. A sample is stamped at the
midpoint of its request and response on the system clock, the clock the engine's start
instant is also read on (``t0_unix_ns``), so ``t_ns`` = midpoint − t0 is on the run's
clock. A failed or slow scrape is counted (with the first error) and never stops the run.

The page is parsed with ``prometheus_client``'s parser (every type: gauge, counter,
histogram, summary, untyped)."""

from __future__ import annotations

import json
import math
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from ..transport import Header, TlsConfig, server_request

#: Gauges of server state, under the names vLLM, SGLang and TGI give them; the first name
#: a page has is used (summed over its label sets: engines, models).
STATE_GAUGES: dict[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs", "tgi_batch_current_size"),
    "waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "tgi_queue_size"),
    "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"),
}
#: Counters and histograms the summary block reads.
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
PREEMPTIONS = ("vllm:num_preemptions_total",)
GENERATION_TOKENS = ("vllm:generation_tokens_total", "sglang:generation_tokens_total")
TTFT_HISTOGRAMS = ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds")

#: The long format of ``RUN.server-metrics.parquet``.
SAMPLE_SCHEMA = pa.schema(
    [
        ("t_ns", pa.int64()),
        ("endpoint", pa.dictionary(pa.int32(), pa.string())),
        ("name", pa.dictionary(pa.int32(), pa.string())),
        ("labels", pa.dictionary(pa.int32(), pa.string())),
        ("type", pa.dictionary(pa.int32(), pa.string())),
        ("value", pa.float64()),
        # Counters: the increase since the series' previous sample (a reset counts from 0).
        ("increase", pa.float64()),
    ]
)


@dataclass(frozen=True)
class ScrapeTarget:
    """One page to scrape; ``endpoint`` (its index among the run's endpoints) when the
    page describes a server the requests go to, so its state joins to them."""

    label: str
    url: str
    endpoint: int | None = None


@dataclass
class _Series:
    """Per (name, labels) of one target: the last value, and the first and last in the run."""

    first: float
    last: float
    increase: float = 0.0


@dataclass
class TargetStats:
    """What one target's scrapes gave, kept small: one value per scrape for state gauges,
    first/last for counters and histogram buckets; the rows go to the file."""

    target: ScrapeTarget
    scrapes: int = 0
    failed: int = 0
    slow: int = 0
    first_error: str | None = None
    #: Unix ns of each successful scrape (midpoint).
    t_unix_ns: list[int] = field(default_factory=list)
    #: Per gauge name, its value (summed over label sets) at each successful scrape.
    gauges: dict[str, list[float]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    series: dict[tuple[str, str], _Series] = field(default_factory=dict)
    scrape_s: list[float] = field(default_factory=list)


class Scraper:
    """Scrapes ``targets`` every ``interval_s`` from :meth:`start` to :meth:`stop` (one
    last scrape then). Rows reach ``write`` (an Arrow batch at a time, on the run's clock)
    once the run's start instant is known (:meth:`started`)."""

    def __init__(
        self,
        targets: Sequence[ScrapeTarget],
        interval_s: float,
        *,
        headers: Sequence[Header] = (),
        tls: TlsConfig | None = None,
        write: Any = None,
        timeout_s: float | None = None,
    ) -> None:
        self.targets = list(targets)
        self.interval_s = interval_s
        # A scrape may take up to two intervals (at least 1 s) before it is abandoned.
        self.timeout_s = timeout_s or max(1.0, 2 * interval_s)
        self.headers = list(headers)
        self.tls = tls
        self.write = write
        self.stats = [TargetStats(t) for t in self.targets]
        self.t0_unix_ns: int | None = None
        self._rows: list[tuple[int, str, str, str, str, float, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle

    def start(self) -> None:
        """Starts a thread per page and returns once each has taken its first sample
        (or failed, or the timeout passed): the counters' baseline is then before the run,
        however long the first request to a busy server takes."""
        if any(t.url.startswith("https://") for t in self.targets):
            self._ssl = (self.tls or TlsConfig()).ssl_context()
        firsts = []  # each set by its page's thread after its first scrape
        for st in self.stats:
            first = threading.Event()
            th = threading.Thread(
                target=self._loop, args=(st, first), name="fineserve-scrape", daemon=True
            )
            th.start()
            self._threads.append(th)
            firsts.append(first)
        give_up = time.monotonic() + self.timeout_s
        for first in firsts:
            first.wait(max(give_up - time.monotonic(), 0.0))

    def started(self, t0_unix_ns: int) -> None:
        self.t0_unix_ns = t0_unix_ns

    def stop(self) -> None:
        """Stops the threads after one last scrape each, and flushes every row."""
        self._stop.set()
        for th in self._threads:
            th.join(timeout=self.timeout_s + 1.0)
        self.flush()

    def flush(self) -> None:
        """The rows so far to ``write`` (once the start instant is known)."""
        if self.write is None or self.t0_unix_ns is None:
            return
        with self._lock:
            rows, self._rows = self._rows, []
        if rows:
            self.write(self._batch(rows, self.t0_unix_ns))

    # -- scraping

    def _loop(self, st: TargetStats, first: threading.Event | None = None) -> None:
        next_at = time.monotonic()
        last_flush = next_at
        while True:
            self._scrape(st)
            if first is not None:
                first.set()
                first = None
            if self._stop.is_set():
                return
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:  # behind: skip the ticks that passed, as Prometheus does
                next_at = now + self.interval_s - (now - next_at) % self.interval_s
            if now - last_flush >= 2.0 and st is self.stats[0]:
                self.flush()
                last_flush = now
            if self._stop.wait(max(next_at - time.monotonic(), 0.0)):
                self._scrape(st)  # the run's end: one last sample
                return

    def _scrape(self, st: TargetStats) -> None:
        st.scrapes += 1
        sent = time.time_ns()
        try:
            text = self._fetch(st.target.url)
            received = time.time_ns()
            families = _parse(text)
        except Exception as e:
            st.failed += 1
            if st.first_error is None:
                st.first_error = _one_line(e)
            return
        took_s = (received - sent) / 1e9
        st.scrape_s.append(took_s)
        if took_s > self.interval_s:
            st.slow += 1
        self._record(st, (sent + received) // 2, families)

    def _fetch(self, url: str) -> str:
        req = server_request(url, self.headers, accept="text/plain;version=0.0.4")
        with urllib.request.urlopen(
            req, timeout=self.timeout_s, context=self._ssl if url.startswith("https") else None
        ) as resp:
            body: bytes = resp.read(64 << 20)
        return body.decode("utf-8", "replace")

    def _record(self, st: TargetStats, mid_ns: int, families: list[Any]) -> None:
        rows = []
        gauge_sums: dict[str, float] = {}
        label = st.target.label
        for fam in families:
            kind = fam.type
            for s in fam.samples:
                labels = json.dumps(s.labels, sort_keys=True) if s.labels else ""
                value = float(s.value)
                key = (s.name, labels)
                increase = math.nan
                prev = st.series.get(key)
                if prev is None:
                    st.series[key] = _Series(value, value)
                else:
                    delta = value - prev.last
                    # A counter (or histogram/summary count) that went down was reset: the
                    # increase since is its value.
                    inc = delta if delta >= 0 else value
                    prev.increase += inc
                    prev.last = value
                    if _cumulative(kind, s.name):
                        increase = inc
                st.types[s.name] = kind
                if kind in ("gauge", "untyped", "unknown") and not math.isnan(value):
                    gauge_sums[s.name] = gauge_sums.get(s.name, 0.0) + value
                rows.append((mid_ns, label, s.name, labels, kind, value, increase))
        with self._lock:
            self._rows.extend(rows)
            st.t_unix_ns.append(mid_ns)
            n = len(st.t_unix_ns)
            for name, v in gauge_sums.items():
                col = st.gauges.setdefault(name, [])
                col.extend([math.nan] * (n - 1 - len(col)))
                col.append(v)

    @staticmethod
    def _batch(rows: list[tuple[int, str, str, str, str, float, float]], t0: int) -> pa.RecordBatch:
        t, ep, name, labels, kind, value, inc = zip(*rows)
        arrays = [
            pa.array(np.asarray(t, np.int64) - t0),
            pa.array(ep).dictionary_encode(),
            pa.array(name).dictionary_encode(),
            pa.array(labels).dictionary_encode(),
            pa.array(kind).dictionary_encode(),
            pa.array(np.asarray(value, np.float64)),
            pa.array(np.asarray(inc, np.float64)),
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=SAMPLE_SCHEMA)

    # -- the join and the summary

    def state_at(
        self, endpoint_idx: npt.NDArray[Any], sent_ns: npt.NDArray[np.int64]
    ) -> dict[str, npt.NDArray[np.float64]]:
        """Per request, its endpoint's waiting, running and KV usage at the last sample at
        or before its send time (NaN: none yet, or the page does not have it)."""
        n = len(sent_ns)
        out = {f"srv_{k}": np.full(n, np.nan) for k in STATE_GAUGES}
        if self.t0_unix_ns is None:
            return out
        sent_unix = np.asarray(sent_ns, np.int64) + self.t0_unix_ns
        eps = np.asarray(endpoint_idx, np.int64)
        for st in self.stats:
            e = st.target.endpoint
            if e is None:
                continue
            with self._lock:
                times = np.asarray(st.t_unix_ns, np.int64)
                cols = {
                    k: _state_column(st, names, len(times)) for k, names in STATE_GAUGES.items()
                }
            mine = np.flatnonzero((eps == e) & (np.asarray(sent_ns) >= 0))
            if not len(mine) or not len(times):
                continue
            pos = np.searchsorted(times, sent_unix[mine], side="right") - 1
            has = pos >= 0
            for k, col in cols.items():
                if col is not None:
                    out[f"srv_{k}"][mine[has]] = col[pos[has]]
        return out

    def summary(self) -> dict[str, Any]:
        """Per target: scrape counts, and per metric: gauges min/mean/p50/p99/max; counters
        increase and rate; histograms count, mean, p50 and p99 of the in-run increase."""
        out: dict[str, Any] = {}
        for st in self.stats:
            out[st.target.label] = _target_summary(st)
        return out


def _cumulative(kind: str, sample: str) -> bool:
    """Whether a sample only grows (until a reset): counters, histogram buckets, sums and
    counts, summary sums and counts (not a summary's quantiles)."""
    if kind in ("counter", "histogram"):
        return True
    return kind == "summary" and sample.endswith(("_sum", "_count"))


def _state_column(
    st: TargetStats, names: tuple[str, ...], n: int
) -> npt.NDArray[np.float64] | None:
    for name in names:
        col = st.gauges.get(name)
        if col is not None:
            return np.asarray(col + [math.nan] * (n - len(col)), np.float64)
    return None


def _parse(text: str) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(text))
    if not families and text.strip():
        raise ValueError("no metric in the page")
    return families


def _one_line(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    msg = (str(e).splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {msg}" if isinstance(e, ValueError) else msg


def _target_summary(st: TargetStats) -> dict[str, Any]:
    ok = len(st.t_unix_ns)
    span_s = (st.t_unix_ns[-1] - st.t_unix_ns[0]) / 1e9 if ok > 1 else 0.0
    summary: dict[str, Any] = {
        "url": st.target.url,
        "scrapes": st.scrapes,
        "failed": st.failed,
        "slow": st.slow,
        "span_s": span_s,
    }
    if st.first_error:
        summary["first_error"] = st.first_error
    if st.scrape_s:
        summary["scrape_ms_p50"] = float(np.percentile(st.scrape_s, 50) * 1e3)
        summary["scrape_ms_max"] = float(max(st.scrape_s) * 1e3)
    summary["metrics"] = dict(sorted({**_gauges(st), **_cumulatives(st, span_s)}.items()))
    return summary


def _gauges(st: TargetStats) -> dict[str, Any]:
    """Each gauge's min/mean/p50/p99/max over the scrapes (summed over label sets)."""
    out: dict[str, Any] = {}
    for name, col in st.gauges.items():
        v = np.asarray(col, np.float64)
        v = v[~np.isnan(v)]
        if len(v):
            p50, p99 = np.percentile(v, [50, 99])
            out[name] = {
                "type": st.types.get(name, "gauge"),
                "min": float(v.min()),
                "mean": float(v.mean()),
                "p50": float(p50),
                "p99": float(p99),
                "max": float(v.max()),
            }
    return out


@dataclass
class _InRun:
    """In-run increases of one histogram or summary, summed over label sets."""

    kind: str
    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "count": self.count}
        if self.count > 0:
            out["mean"] = self.sum / self.count
            if self.kind == "histogram":
                out["p50"] = histogram_quantile(0.5, self.buckets)
                out["p99"] = histogram_quantile(0.99, self.buckets)
        return out


def _cumulatives(st: TargetStats, span_s: float) -> dict[str, Any]:
    """Counters' increase and rate; histograms' and summaries' count and mean (and
    histograms' p50/p99) of what was observed during the run."""
    counters: dict[str, float] = {}
    families: dict[str, _InRun] = {}
    for (name, labels), s in st.series.items():
        kind = st.types.get(name)
        if kind == "counter":
            counters[name] = counters.get(name, 0.0) + s.increase
            continue
        if kind not in ("histogram", "summary"):
            continue
        base, _, part = name.rpartition("_")
        if part not in ("bucket", "sum", "count") or (kind == "summary" and part == "bucket"):
            continue
        fam = families.setdefault(base, _InRun(kind))
        if part == "bucket":
            le = json.loads(labels).get("le", "+Inf") if labels else "+Inf"
            bound = math.inf if le == "+Inf" else float(le)
            fam.buckets[bound] = fam.buckets.get(bound, 0.0) + s.increase
        elif part == "sum":
            fam.sum += s.increase
        else:
            fam.count += s.increase
    out: dict[str, Any] = {
        name: {"type": "counter", "increase": inc, "rate": inc / span_s if span_s > 0 else None}
        for name, inc in counters.items()
    }
    out.update({base: fam.entry() for base, fam in families.items()})
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket the
    quantile falls in (cumulative counts by upper bound; the +Inf bucket gives the top
    finite bound)."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return prev_bound


def curated(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures the console shows, by what they mean (vLLM, SGLang or TGI names)."""
    m = summary.get("metrics", {})

    def first(names: Sequence[str]) -> dict[str, Any] | None:
        return next((m[n] for n in names if n in m), None)

    out: dict[str, Any] = {}
    for key, names in STATE_GAUGES.items():
        g = first(names)
        if g is not None:
            out[key] = g
    hits, queries = first(PREFIX_HITS), first(PREFIX_QUERIES)
    if hits and queries and queries.get("increase"):
        out["prefix_hit_rate"] = hits["increase"] / queries["increase"]
    elif "sglang:cache_hit_rate" in m:
        out["prefix_hit_rate"] = m["sglang:cache_hit_rate"]["mean"]
    for key, names in (("preemptions", PREEMPTIONS), ("generation_tokens", GENERATION_TOKENS)):
        c = first(names)
        if c is not None:
            out[key] = c["increase"]
    ttft = first(TTFT_HISTOGRAMS)
    if ttft is not None and ttft.get("count"):
        out["ttft_s"] = ttft
    return out
