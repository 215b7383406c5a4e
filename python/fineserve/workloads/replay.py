"""Trace replay: the trace's own arrivals and lengths, optionally a slice, time-scaled."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..errors import FineserveError
from ..schedule import Schedule
from ..traces.base import Trace
from .poisson import CHUNK_ROWS


def replay_slice(
    trace: Trace,
    start_s: float = 0.0,
    duration_s: float | None = None,
    max_requests: int | None = None,
) -> tuple[int, int]:
    """Rows [lo, hi) of the requests with ``start_s <= t < start_s + duration_s`` (trace
    seconds from the first request), at most ``max_requests``; an empty slice is an error."""
    if start_s < 0:
        raise FineserveError("--start must be >= 0")
    if duration_s is not None and not duration_s > 0:
        raise FineserveError("--duration must be > 0")
    start_ns = round(start_s * 1e9)
    lo = int(np.searchsorted(trace.t_ns, start_ns, side="left"))
    hi = len(trace)
    if duration_s is not None:
        hi = int(np.searchsorted(trace.t_ns, start_ns + round(duration_s * 1e9), "left"))
    if max_requests is not None:
        hi = min(hi, lo + max_requests)
    if hi <= lo:
        raise FineserveError(
            f"no request of {trace.path.name} in the slice --start {start_s:g}s"
            + (f" --duration {duration_s:g}s" if duration_s is not None else "")
            + f" (the trace spans {trace.span_s:.1f}s)"
        )
    return lo, hi


def replay_chunks(
    trace: Trace,
    *,
    time_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    max_requests: int | None = None,
) -> Iterator[Schedule]:
    """The requests of :func:`replay_slice`, sent at ``(t - start_s) / time_scale``: gaps
    are the trace's, compressed by ``time_scale`` (> 1 is faster), rounded to the
    nanosecond once (no drift)."""
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise FineserveError(f"--time-scale must be a positive number, got {time_scale}")
    lo, hi = replay_slice(trace, start_s, duration_s, max_requests)
    start_ns = round(start_s * 1e9)
    full = Schedule(
        trace.t_ns,
        trace.input_len,
        trace.output_len,
        dict(trace.extra),
        trace.hash_ids,
        trace.hash_offsets,
    )
    if "parent" in full.extra:
        full.extra = {**full.extra, **_slice_turns(full.extra, lo, hi, time_scale)}
    for a in range(lo, hi, CHUNK_ROWS):
        b = min(hi, a + CHUNK_ROWS)
        part = full.take(np.arange(a, b))
        part.t_ns = np.rint((part.t_ns - start_ns) / time_scale).astype(np.int64)
        yield part


def _slice_turns(
    extra: dict[str, np.ndarray], lo: int, hi: int, time_scale: float
) -> dict[str, np.ndarray]:
    """Conversation links for the slice [lo, hi): parents become slice positions (a turn
    whose parent is before the slice starts a conversation), followers are recounted, and
    think times compress with the time scale."""
    parent = extra["parent"].copy()
    inside = parent >= lo
    parent = np.where(inside, parent - lo, -1)
    rows = np.arange(len(parent))
    in_slice = (rows >= lo) & (rows < hi)
    followers = np.zeros(len(parent), dtype=np.int64)
    kids = parent[lo:hi]
    followers[lo:hi] = np.bincount(kids[kids >= 0], minlength=hi - lo)[: hi - lo]
    out = {"parent": parent, "followers": followers}
    for delay in ("think_ns", "tool_ns"):
        if delay in extra:
            scaled = np.where(inside & in_slice, np.rint(extra[delay] / time_scale), 0)
            out[delay] = scaled.astype(np.int64)
    return out
