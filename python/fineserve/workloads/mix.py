"""Several workloads (classes) merged by send time into one schedule with a ``class`` column."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..schedule import Schedule, concat, merge_sorted


def label(chunks: Iterator[Schedule], name: str) -> Iterator[Schedule]:
    for c in chunks:
        c.extra["class"] = np.full(len(c), name, dtype=object)
        yield c


def merge_streams(streams: list[Iterator[Schedule]]) -> Iterator[Schedule]:
    """K-way merge of chunk streams by time: emits everything up to the earliest point that
    every unfinished stream has reached, so memory holds about one chunk per stream."""
    if len(streams) == 1:
        yield from streams[0]
        return
    buffers: list[list[Schedule]] = [[] for _ in streams]
    reached = [-1] * len(streams)
    done = [False] * len(streams)
    while True:
        for i, s in enumerate(streams):
            # Pull until this stream has something past every emitted point.
            while not done[i] and (not buffers[i] or reached[i] < 0):
                nxt = next(s, None)
                if nxt is None:
                    done[i] = True
                elif len(nxt):
                    buffers[i].append(nxt)
                    reached[i] = int(nxt.t_ns[-1])
        live = [reached[i] for i in range(len(streams)) if not done[i]]
        horizon = min(live) if live else None
        out = []
        for i in range(len(streams)):
            if not buffers[i]:
                continue
            joined = concat(buffers[i])
            cut = (
                len(joined)
                if horizon is None
                else int(np.searchsorted(joined.t_ns, horizon, side="right"))
            )
            if cut:
                out.append(joined.take(np.arange(cut)))
            rest = joined.take(np.arange(cut, len(joined)))
            buffers[i] = [rest] if len(rest) else []
            if not buffers[i] and not done[i]:
                reached[i] = -1
        merged = merge_sorted(out)
        if len(merged):
            yield merged
        if all(done) and not any(buffers):
            return
