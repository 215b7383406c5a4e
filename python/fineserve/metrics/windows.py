"""Instantaneous metrics over fixed windows of the run (BurstGPT-Perf style).

Per window (default 10 s, by the time an event happened): requests sent and completed,
failures, output tokens, TTFT and ITL mean / p99, and ITL jitter (standard deviation).

Per-window percentiles come from coarse log histograms (16 bins per octave, so a p99 is
within ±2.2 % of numpy's linear percentile), hand-written like :mod:`.histogram` because
each window needs only a few hundred counters: a day of 10 s windows stays under 40 MiB,
whatever the request rate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from .histogram import linear_rank_value

_BINS_PER_OCTAVE = 16
_MIN_LOG2 = 10  # 1 µs in ns (2^10 ≈ 1024 ns)
_MAX_LOG2 = 40  # ~18 min in ns
_N_BINS = (_MAX_LOG2 - _MIN_LOG2) * _BINS_PER_OCTAVE


def _bins(v_ns: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    b = (np.log2(np.maximum(v_ns, 1.0)) - _MIN_LOG2) * _BINS_PER_OCTAVE
    return np.clip(b.astype(np.int64), 0, _N_BINS - 1)


def _bin_value(b: int) -> float:
    """Geometric middle of bin b, in ns."""
    return float(2 ** (_MIN_LOG2 + (b + 0.5) / _BINS_PER_OCTAVE))


def add_counts(
    counts: npt.NDArray[np.int64],
    bins: npt.NDArray[np.int64],
    weights: npt.NDArray[Any] | None = None,
) -> npt.NDArray[np.int64]:
    """``counts`` grown to cover ``bins``, plus how many (or how much ``weights``) fell in
    each bin."""
    if not len(bins):
        return counts
    n = max(len(counts), int(bins.max()) + 1)
    out = np.zeros(n, np.int64)
    out[: len(counts)] = counts
    return out + np.rint(np.bincount(bins, weights=weights, minlength=n)).astype(np.int64)


class _Windowed:
    """Per-window count / sum / sum of squares / coarse histogram of one quantity."""

    def __init__(self) -> None:
        self.count = np.zeros(0, np.int64)
        self.total = np.zeros(0, np.float64)
        self.total_sq = np.zeros(0, np.float64)
        self.hist = np.zeros((0, _N_BINS), np.int32)

    def grow(self, n: int) -> None:
        if n > len(self.count):
            extra = n - len(self.count)
            self.count = np.concatenate([self.count, np.zeros(extra, np.int64)])
            self.total = np.concatenate([self.total, np.zeros(extra)])
            self.total_sq = np.concatenate([self.total_sq, np.zeros(extra)])
            self.hist = np.concatenate([self.hist, np.zeros((extra, _N_BINS), np.int32)])

    def add(self, window: npt.NDArray[np.int64], v_ns: npt.NDArray[np.float64]) -> None:
        if not len(window):
            return
        self.grow(int(window.max()) + 1)
        n = len(self.count)
        self.count += np.bincount(window, minlength=n)
        self.total += np.bincount(window, weights=v_ns, minlength=n)
        self.total_sq += np.bincount(window, weights=v_ns * v_ns, minlength=n)
        flat = window * _N_BINS + _bins(v_ns)  # bincount: far faster than np.add.at
        self.hist += np.bincount(flat, minlength=n * _N_BINS).reshape(n, _N_BINS).astype(np.int32)

    def mean_ms(self, w: int) -> float | None:
        return (
            self.total[w] / self.count[w] / 1e6 if w < len(self.count) and self.count[w] else None
        )

    def std_ms(self, w: int) -> float | None:
        if w >= len(self.count) or self.count[w] < 2:
            return None
        m = self.total[w] / self.count[w]
        return math.sqrt(max(self.total_sq[w] / self.count[w] - m * m, 0.0)) / 1e6

    def percentile_ms(self, w: int, q: float) -> float | None:
        if w >= len(self.count) or not self.count[w]:
            return None
        return linear_rank_value(self.hist[w], q, _bin_value) / 1e6


class WindowStats:
    """Accumulates per-window counts and latency sketches from record batches."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_ns = int(window_s * 1e9)
        self.window_s = window_s
        self.sent = np.zeros(0, np.int64)
        self.completed = np.zeros(0, np.int64)
        self.failed = np.zeros(0, np.int64)
        self.output_tokens = np.zeros(0, np.int64)
        self.ttft = _Windowed()
        self.itl = _Windowed()

    def _count(
        self,
        arr: npt.NDArray[np.int64],
        t_ns: npt.NDArray[np.int64],
        weights: npt.NDArray[Any] | None = None,
    ) -> npt.NDArray[np.int64]:
        return add_counts(arr, t_ns // self.window_ns, weights)

    def add(
        self,
        sent_ns: npt.NDArray[np.int64],
        done_ns: npt.NDArray[np.int64],
        ok: npt.NDArray[np.bool_],
        out_tokens: npt.NDArray[np.int64],
        ttft_ns: npt.NDArray[np.int64],
        first_ns: npt.NDArray[np.int64],
        itl_ns: npt.NDArray[np.int64],
        itl_at_ns: npt.NDArray[np.int64],
    ) -> None:
        self.sent = self._count(self.sent, sent_ns[sent_ns >= 0])
        finished = done_ns >= 0
        self.completed = self._count(self.completed, done_ns[ok & finished])
        failed = ~ok & (sent_ns >= 0)
        # A failure is placed when it ended (or when it was sent if it never ended).
        fail_at = np.where(done_ns[failed] >= 0, done_ns[failed], sent_ns[failed])
        self.failed = self._count(self.failed, fail_at)
        self.output_tokens = self._count(
            self.output_tokens, done_ns[ok & finished], out_tokens[ok & finished]
        )
        self.ttft.add(first_ns // self.window_ns, ttft_ns.astype(np.float64))
        self.itl.add(itl_at_ns // self.window_ns, itl_ns.astype(np.float64))

    def rows(self, end_ns: int | None = None) -> list[dict[str, Any]]:
        """One dict per window; rates divide by the window's length, the last one's cut at
        ``end_ns`` (the run's end) so that a run does not end with a false drop."""
        n = max(
            len(self.sent),
            len(self.completed),
            len(self.failed),
            len(self.ttft.count),
            len(self.itl.count),
        )

        def at(a: npt.NDArray[np.int64], w: int) -> int:
            return int(a[w]) if w < len(a) else 0

        out = []
        for w in range(n):
            sent, done, failed = at(self.sent, w), at(self.completed, w), at(self.failed, w)
            length_s = self.window_s
            if end_ns is not None and w == n - 1:
                # At least 1 ms: an event exactly at the end still has a window to be in.
                length_s = min(self.window_s, max(end_ns / 1e9 - w * self.window_s, 1e-3))
            out.append(
                {
                    "start_s": w * self.window_s,
                    "length_s": length_s,
                    "sent_rps": sent / length_s,
                    "completed_rps": done / length_s,
                    "failed_rps": failed / length_s,
                    "failure_rate": failed / (done + failed) if done + failed else 0.0,
                    "output_tokens_per_s": at(self.output_tokens, w) / length_s,
                    "mean_ttft_ms": self.ttft.mean_ms(w),
                    "p99_ttft_ms": self.ttft.percentile_ms(w, 99),
                    "mean_itl_ms": self.itl.mean_ms(w),
                    "p99_itl_ms": self.itl.percentile_ms(w, 99),
                    "itl_jitter_ms": self.itl.std_ms(w),
                }
            )
        return out
