"""How faithfully the load was delivered and absorbed: micro-burst slot fidelity (did the
members of a burst leave inside their scheduled 1 ms slot?) and the sustained completion
rate (did the server keep up with the offered rate, or only seem to, for a short run?)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .windows import add_counts

#: The micro-burst slot of FineServe's model.
SLOT_NS = 1_000_000


def slot_sizes(t_ns: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
    """For a sorted run of scheduled times (one schedule chunk): how many of them share
    each one's 1 ms slot, and whether that slot is the run's first or last (it may go on
    in the neighbouring chunk)."""
    if not len(t_ns):
        return np.zeros(0, np.int32), np.zeros(0, bool)
    slot = np.asarray(t_ns, dtype=np.int64) // SLOT_NS
    _, inverse, counts = np.unique(slot, return_inverse=True, return_counts=True)
    edge = (slot == slot[0]) | (slot == slot[-1])
    return counts[inverse].astype(np.int32), edge


class BurstFidelity:
    """Of the requests that share a scheduled slot with another (micro-burst members),
    how many were sent inside that slot.

    Membership belongs to the whole schedule, but records arrive in completion order,
    batch by batch. So each row brings its slot's size within its schedule chunk, and
    whether the slot is at the chunk's edge. Rows of edge slots are tallied by slot and
    settled at the end (at most two slots per chunk, so memory stays bounded); the rest
    are settled at once."""

    def __init__(self) -> None:
        self.members = 0
        self.members_sent = 0
        self.members_in_slot = 0
        # slot → [rows, rows sent, rows sent inside the slot]
        self._edges: dict[int, list[int]] = {}

    def add(
        self,
        sched_ns: npt.NDArray[np.int64],
        sent_ns: npt.NDArray[np.int64],
        size: npt.NDArray[Any] | None = None,
        edge: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """Without ``size``/``edge`` the batch is taken as the whole schedule."""
        if size is None or edge is None:
            order = np.argsort(sched_ns, kind="stable")
            size_sorted, _ = slot_sizes(sched_ns[order])
            size = np.empty_like(size_sorted)
            size[order] = size_sorted
            edge = np.zeros(len(sched_ns), bool)
        size = np.asarray(size)
        edge = np.asarray(edge, dtype=bool)
        was_sent = sent_ns >= 0
        in_slot = was_sent & (sent_ns // SLOT_NS == sched_ns // SLOT_NS)
        settled = ~edge & (size > 1)
        self.members += int(settled.sum())
        self.members_sent += int((settled & was_sent).sum())
        self.members_in_slot += int((settled & in_slot).sum())
        for slot, sent, inside in zip(
            (sched_ns[edge] // SLOT_NS).tolist(), was_sent[edge].tolist(), in_slot[edge].tolist()
        ):
            tally = self._edges.setdefault(slot, [0, 0, 0])
            tally[0] += 1
            tally[1] += sent
            tally[2] += inside

    def result(self) -> dict[str, Any]:
        members, sent, inside = self.members, self.members_sent, self.members_in_slot
        for rows, rows_sent, rows_inside in self._edges.values():
            if rows > 1:
                members += rows
                sent += rows_sent
                inside += rows_inside
        return {
            "burst_members": members,
            "burst_members_sent": sent,
            "burst_sent_in_slot_fraction": inside / sent if sent else None,
        }


class SustainedRate:
    """Offered vs sustained request rate.

    Offered: (scheduled − 1) / (last − first scheduled time). Sustained: completions
    inside the schedule's span shifted by the median latency from the scheduled time,
    per second of that span. A server that keeps up completes about every request inside
    the shifted span. One that has fallen behind completes at its capacity, whatever the
    offered rate, so the ratio shows overload even in a run too short for the queue to
    push latency past an SLO. Completion times are binned at 100 ms, and the span's two
    end bins are interpolated."""

    BIN_NS = 100_000_000

    def __init__(self) -> None:
        self.first_sched_ns: int | None = None
        self.last_sched_ns: int | None = None
        self.done_bins = np.zeros(0, np.int64)

    def add(self, sched_ns: npt.NDArray[np.int64], ok_done_ns: npt.NDArray[np.int64]) -> None:
        if len(sched_ns):
            lo, hi = int(sched_ns.min()), int(sched_ns.max())
            self.first_sched_ns = (
                lo if self.first_sched_ns is None else min(self.first_sched_ns, lo)
            )
            self.last_sched_ns = hi if self.last_sched_ns is None else max(self.last_sched_ns, hi)
        self.done_bins = add_counts(self.done_bins, ok_done_ns // self.BIN_NS)

    def _done_before(self, t_ns: float) -> float:
        """Completions before ``t_ns``, interpolated inside its bin."""
        b = int(t_ns // self.BIN_NS)
        if b < 0:
            return 0.0
        if b >= len(self.done_bins):
            return float(self.done_bins.sum())
        within = (t_ns - b * self.BIN_NS) / self.BIN_NS
        return float(self.done_bins[:b].sum() + within * self.done_bins[b])

    def result(self, scheduled: int, median_latency_ns: float) -> dict[str, Any]:
        if self.first_sched_ns is None or self.last_sched_ns is None or scheduled < 2:
            return {"offered_request_rate": None, "sustained_request_rate": None}
        span_ns = self.last_sched_ns - self.first_sched_ns
        if span_ns <= 0:
            return {"offered_request_rate": None, "sustained_request_rate": None}
        shift = median_latency_ns if median_latency_ns == median_latency_ns else 0.0
        start = self.first_sched_ns + shift
        end = self.last_sched_ns + shift
        inside = self._done_before(end) - self._done_before(start)
        return {
            "offered_request_rate": (scheduled - 1) / (span_ns / 1e9),
            "sustained_request_rate": inside / (span_ns / 1e9),
        }
