"""Where drained records go during a run: the metrics, and the results file."""

from __future__ import annotations

import collections
import time

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from ..records import records_from_table, with_extra
from ..results import RequestsWriter
from ..runner import RecordSink
from .scrape import Scraper
from .serving import BREAKDOWNS, MetricsAccumulator


class MetricsSink(RecordSink):
    """Folds drained records into the metrics as they arrive (bounded memory), and into the
    per-request results file when one is asked for."""

    def __init__(
        self,
        acc: MetricsAccumulator | None = None,
        writer: RequestsWriter | None = None,
        endpoints: list[str] | None = None,
        scraper: Scraper | None = None,
    ) -> None:
        self.acc = acc or MetricsAccumulator()
        self.writer = writer
        #: The servers' metrics: their state at each request's send joins its record.
        self.scraper = scraper
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
        ok = (np.asarray(columns["error_kind"]) == 0) & (np.asarray(columns["first_token_ns"]) >= 0)
        if ok.any():
            ttft = np.asarray(columns["first_token_ns"])[ok] - np.asarray(columns["sent_ns"])[ok]
            self.recent_ttft.append((time.monotonic_ns(), ttft.astype(np.int64)))
        if self.writer is not None:
            if self.scraper is not None:
                state = self.scraper.state_at(columns["endpoint_idx"], columns["sent_ns"])
                batch = with_extra(batch, dict(state))
            self.writer.write(batch)

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
