"""The resolution of a trace's timestamps: the clock a trace was written with is part of
what a faithful generator must reproduce, and must never be mistaken for micro-bursts.

Two kinds of coarse clock are found in public traces:

- **quantised**: every timestamp is an exact multiple of a period (Mooncake's traces are
  in whole milliseconds; a log may keep whole seconds). Requests in one tick are tied.
- **lattice**: timestamps cluster just after the ticks of a clock grid (FineServe's
  Dense_30to100B replay: arrivals fall in the first ~0.25 s of each second), i.e. events
  released on a periodic tick, with a spread.

Detection: the largest period of a candidate list that holds ≥ 99.9 % of timestamps
exactly (quantised), and the largest period whose phases are concentrated — mean
resultant length R = |mean(exp(2πi·t/P))| well above a uniform phase's ~1/√n (lattice).
Periods that divide the found one are implied by it (a 3 s grid is also a 1 s grid), hence
the largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]

#: Candidate periods, ns: 1 µs … 1 min.
CANDIDATE_PERIODS_NS = (
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    2_000_000_000,
    3_000_000_000,
    5_000_000_000,
    10_000_000_000,
    60_000_000_000,
)
#: Share of timestamps that must sit exactly on a period for "quantised".
QUANTISED_SHARE = 0.999
#: Phase concentration (mean resultant length) that makes a lattice, and its floor in
#: multiples of the uniform phase's expected R (1/√n) so short traces are not fooled.
LATTICE_R = 0.5
LATTICE_R_NOISE = 6.0
#: The fewest requests for which a resolution is claimed at all.
MIN_REQUESTS = 50
#: Timestamps examined at most.
SAMPLE = 200_000


@dataclass(frozen=True)
class Resolution:
    #: "continuous" (nothing coarser than 1 µs found), "quantised" or "lattice".
    kind: str
    #: The period of the clock, ns (1 µs … 1 min); 0 for "continuous".
    period_ns: int
    #: Phase concentration R at that period (1 for quantised).
    concentration: float

    @property
    def period_ms(self) -> float:
        return self.period_ns / 1e6

    def describe(self) -> str:
        if self.kind == "continuous":
            return "timestamps finer than 1 µs or irregular: no clock grid"
        p = _fmt_period(self.period_ns)
        if self.kind == "quantised":
            return f"timestamps quantised to {p} (ties are requests in one tick)"
        return (
            f"timestamps on a {p} clock lattice (phase concentration R = "
            f"{self.concentration:.2f}): arrivals cluster just after each tick"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "period_ms": self.period_ms,
            "concentration": self.concentration,
            "described": self.describe(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Resolution:
        return cls(str(d["kind"]), round(float(d["period_ms"]) * 1e6), float(d["concentration"]))


CONTINUOUS = Resolution("continuous", 0, 0.0)


def _fmt_period(ns: int) -> str:
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:g} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:g} ms"
    return f"{ns / 1e3:g} µs"


def detect_resolution(abs_t_ns: IntArray) -> Resolution:
    """The coarsest clock the timestamps (absolute, ns) are written on; see the module."""
    t = np.asarray(abs_t_ns, dtype=np.int64)
    span = int(t.max() - t.min()) if len(t) else 0
    if len(t) > SAMPLE:
        # A fixed random subset decides as well (shares and R are means) at a fraction
        # of the cost on a trace of millions.
        t = np.random.default_rng(0).choice(t, SAMPLE, replace=False)
    n = len(t)
    if n < MIN_REQUESTS:
        return CONTINUOUS
    quantised = 0
    for p in CANDIDATE_PERIODS_NS:
        # A period as long as the trace says nothing (every trace is "on" it).
        if p * 10 > span:
            break
        if np.count_nonzero(t % p == 0) >= QUANTISED_SHARE * n:
            quantised = p
    floor = max(LATTICE_R, LATTICE_R_NOISE / math.sqrt(n))
    lattice, lattice_r = 0, 0.0
    for p in CANDIDATE_PERIODS_NS:
        if p <= quantised or p * 10 > span:
            continue
        phase = (t % p).astype(np.float64) * (2 * math.pi / p)
        r = float(np.hypot(np.cos(phase).mean(), np.sin(phase).mean()))
        if r >= floor:
            lattice, lattice_r = p, r
    if lattice:
        return Resolution("lattice", lattice, lattice_r)
    if quantised:
        return Resolution("quantised", quantised, 1.0)
    return CONTINUOUS


def quantise_ns(t_ns: IntArray, period_ns: int) -> IntArray:
    """Times floored to a clock of ``period_ns`` (relative times: the grid starts at 0)."""
    if period_ns <= 1:
        return t_ns
    return (t_ns // period_ns) * period_ns


def lattice_phase_ns(abs_t_ns: IntArray, rel_t_ns: IntArray, period_ns: int) -> int:
    """The shift of relative times that puts a lattice's slot boundaries in the middle of
    the widest empty stretch of its phases, so each tick's cluster sits in one slot (a
    search over a few phases by occupied slots can straddle a cluster wider than a bin)."""
    bins = 200
    phase = (np.asarray(abs_t_ns, dtype=np.int64) % period_ns) / period_ns
    hist = np.bincount(np.minimum((phase * bins).astype(np.int64), bins - 1), minlength=bins)
    # The longest circular run of the emptiest bins (≤ 0.1 % of requests each).
    quiet = hist <= max(0, int(0.001 * len(phase)))
    if not quiet.any():
        quiet = hist == hist.min()
    doubled = np.concatenate([quiet, quiet])
    best_len, best_end, run = 0, 0, 0
    for i, q in enumerate(doubled):
        run = run + 1 if q else 0
        if run > best_len:
            best_len, best_end = min(run, bins), i
    middle = ((best_end - best_len / 2 + 0.5) % bins) / bins  # phase of the boundary
    # Relative time r has absolute phase (r + abs0) mod P; we want the boundary at 0.
    abs0 = int(abs_t_ns[0]) - int(rel_t_ns[0])
    return round((1.0 - middle) * period_ns - abs0 % period_ns) % period_ns
