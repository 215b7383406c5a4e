"""Where drained records go during a run: the metrics, and the results file."""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from ..config import StopConfig
from ..records import records_from_table, with_extra
from ..results import RequestsWriter
from ..runner import RecordSink
from .scrape import Scraper
from .serving import BREAKDOWNS, MetricsAccumulator
from .steady import RequestTimes

#: Requests whose times are kept for steady-state detection (29 bytes each).
MAX_TIMED_REQUESTS = 20_000_000


class MetricsSink(RecordSink):
    """Folds drained records into the metrics as they arrive (bounded memory), and into the
    per-request results file when one is asked for."""

    def __init__(
        self,
        acc: MetricsAccumulator | None = None,
        writer: RequestsWriter | None = None,
        endpoints: list[str] | None = None,
        scraper: Scraper | None = None,
        stop: StopConfig | None = None,
    ) -> None:
        self.acc = acc or MetricsAccumulator()
        self.writer = writer
        #: The servers' metrics: their state at each request's send joins its record.
        self.scraper = scraper
        self.stop = stop if stop is not None and stop.any else None
        #: Per drained batch: (monotonic ns, failed?, TTFT ms, lag ms) of its requests that
        #: were sent, for the --stop-on-* conditions.
        self.recent: collections.deque[tuple[int, Any, Any, Any]] = collections.deque()
        #: Seconds of the run in which a connect waited for connection budget, and the
        #: last counters seen (for the saturation verdict).
        self.pool_exhausted_s: set[int] = set()
        #: Requests sent, and the connection-budget waits of those that waited (ns).
        self.sent_count = 0
        self.conn_waits: list[npt.NDArray[np.int64]] = []
        self.last_progress: dict[str, Any] = {}
        #: What steady-state detection needs of every request (up to a cap).
        self.times: RequestTimes | None = RequestTimes()
        self._timed = 0
        self.endpoints = endpoints or [""]
        self._given_endpoints = endpoints
        self.recent_ttft: collections.deque[tuple[int, npt.NDArray[np.int64]]] = collections.deque()

    def add(self, batch: pa.RecordBatch) -> None:
        """Folds the batch's numpy view into the metrics; writes the batch itself."""
        columns, extra = records_from_table(batch, self._given_endpoints)
        labels = {k: v for k, v in extra.items() if k in BREAKDOWNS}
        if len(self.endpoints) > 1:
            names = np.asarray(self.endpoints, dtype=object)
            labels["endpoint"] = names[np.asarray(columns["endpoint_idx"]).astype(np.int64)]
        burst = None
        if "_slot_size" in extra and "_slot_edge" in extra:
            burst = (extra["_slot_size"], extra["_slot_edge"])
        self.acc.add(columns, extra["input_len"], labels, burst, extra.get("reason_ratio"))
        if "image_count" in extra:
            self.acc.add_media(columns, extra)
        if self.times is not None:
            self._timed += len(columns["sent_ns"])
            if self._timed > MAX_TIMED_REQUESTS:
                self.times = None  # a very long run: no steady-state figures (memory)
            else:
                self.times.add(columns)
        ok = (np.asarray(columns["error_kind"]) == 0) & (np.asarray(columns["first_token_ns"]) >= 0)
        if ok.any():
            ttft = np.asarray(columns["first_token_ns"])[ok] - np.asarray(columns["sent_ns"])[ok]
            self.recent_ttft.append((time.monotonic_ns(), ttft.astype(np.int64)))
        if self.stop is not None:
            self._remember(columns)
        sent = np.asarray(columns["sent_ns"]) >= 0
        self.sent_count += int(sent.sum())
        waits = np.asarray(columns["conn_wait_ns"])
        if len(waits) and (waited := waits[sent & (waits > 0)]).size:
            self.conn_waits.append(waited.astype(np.int64))
        if self.writer is not None:
            if self.scraper is not None:
                state = self.scraper.state_at(columns["endpoint_idx"], columns["sent_ns"])
                batch = with_extra(batch, dict(state))
            self.writer.write(batch)

    def _remember(self, columns: Any) -> None:
        sent = np.asarray(columns["sent_ns"]) >= 0
        if not sent.any():
            return
        failed = np.asarray(columns["error_kind"])[sent] != 0
        first = np.asarray(columns["first_token_ns"])[sent]
        ttft_ms = np.where(first >= 0, first - np.asarray(columns["sent_ns"])[sent], -1) / 1e6
        lag_ms = (
            np.asarray(columns["sent_ns"])[sent] - np.asarray(columns["scheduled_ns"])[sent]
        ) / 1e6
        self.recent.append((time.monotonic_ns(), failed, ttft_ms, lag_ms))

    def early_stop(self) -> str | None:
        """The first --stop-on-* condition the requests completed within the window meet."""
        cfg = self.stop
        if cfg is None:
            return None
        horizon = time.monotonic_ns() - int(cfg.window_s * 1e9)
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        if not self.recent:
            return None
        failed = np.concatenate([r[1] for r in self.recent])
        if len(failed) < cfg.min_requests:
            return None
        window = f"over the last {cfg.window_s:g} s ({len(failed)} requests)"
        rate = float(failed.mean())
        if cfg.failure_rate is not None and rate >= cfg.failure_rate:
            return f"failure rate {rate:.1%} >= {cfg.failure_rate:.1%} {window}"
        ttft = np.concatenate([r[2] for r in self.recent])
        ttft = ttft[ttft >= 0]
        if cfg.ttft_p99_ms is not None and len(ttft) >= cfg.min_requests:
            p99 = float(np.percentile(ttft, 99))
            if p99 > cfg.ttft_p99_ms:
                return f"p99 TTFT {p99:.1f} ms > {cfg.ttft_p99_ms:g} ms {window}"
        if cfg.lag_ms is not None:
            p99 = float(np.percentile(np.concatenate([r[3] for r in self.recent]), 99))
            if p99 > cfg.lag_ms:
                return f"p99 dispatch lag {p99:.2f} ms > {cfg.lag_ms:g} ms {window}"
        return None

    def conn_wait_quantile_ns(self, q: float) -> float:
        """The ``q`` quantile (0-1) of the connection-budget wait over every sent request
        (most waited nothing)."""
        if not self.conn_waits or not self.sent_count:
            return 0.0
        waited = np.sort(np.concatenate(self.conn_waits))
        zeros = self.sent_count - len(waited)
        pos = q * (self.sent_count - 1)
        if pos < zeros:
            return 0.0
        return float(waited[min(int(pos - zeros), len(waited) - 1)])

    def watch(self, progress: dict[str, Any]) -> None:
        self.last_progress = progress
        if progress.get("connection_waiting") and progress.get("started"):
            self.pool_exhausted_s.add(int(progress.get("elapsed_ns", 0)) // 1_000_000_000)

    def stopped(self, at_ns: int) -> None:
        self.acc.stopped(at_ns)

    def started(self, t0_unix_ns: int) -> None:
        if self.scraper is not None:
            self.scraper.started(t0_unix_ns)

    def live(self) -> dict[str, str]:
        """TTFT p50/p99 of the requests that completed in the last 10 s."""
        horizon = time.monotonic_ns() - 10_000_000_000
        while self.recent_ttft and self.recent_ttft[0][0] < horizon:
            self.recent_ttft.popleft()
        if not self.recent_ttft:
            return {}
        ttft = np.concatenate([v for _, v in self.recent_ttft]) / 1e6
        p50, p99 = np.percentile(ttft, [50, 99])
        return {"ttft_p50": f"{p50:.0f}ms", "ttft_p99": f"{p99:.0f}ms"}
