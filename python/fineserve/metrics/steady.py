"""Numbers you can defend: the steady-state window of a run, its figures over that window,
and means with confidence intervals across repeated runs.

**Steady state.** The window starts where the warm-up transient of the requests-in-flight
series ends, found by MSER-5 (White, 1997: the truncation point that minimises the
standard error of the mean of what is left, on batch means of 5 points; a standard rule
for warm-up deletion in simulation output analysis), searched over the first half of the
sending period; it ends at the last send, so the drain after it is excluded. The series is
the number of requests in flight sampled every ``bin_s`` (span/200, between 10 ms and
1 s) from the first to the last send.

**Across runs.** Each headline figure's mean over runs, its 95% confidence interval from
Student's t with n-1 degrees of freedom (runs are independent repetitions of one
schedule), and its coefficient of variation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: Figures that get ``ci95_`` and ``cv_`` keys across runs, and ``steady_`` keys.
HEADLINE = (
    "request_throughput",
    "output_throughput",
    "request_goodput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "p99_itl_ms",
    "mean_e2e_latency_ms",
    "median_e2e_latency_ms",
    "p99_e2e_latency_ms",
)
METHOD = "MSER-5 on requests in flight (start); last send (end)"


@dataclass
class RequestTimes:
    """The few per-request figures steady state needs, kept for the whole run (29 bytes a
    request: sent, first token, done, scheduled, tokens, ok)."""

    parts: list[tuple[Any, ...]] = field(default_factory=list)

    def add(self, columns: Any) -> None:
        tokens = np.where(
            np.asarray(columns["completion_tokens"]) >= 0,
            np.asarray(columns["completion_tokens"]),
            np.asarray(columns["n_chunks"]),
        )
        self.parts.append(
            (
                np.asarray(columns["sent_ns"], np.int64),
                np.asarray(columns["first_token_ns"], np.int64),
                np.asarray(columns["done_ns"], np.int64),
                np.asarray(tokens, np.int32),
                np.asarray(columns["error_kind"]) == 0,
            )
        )

    def arrays(self) -> tuple[npt.NDArray[Any], ...]:
        """(sent, first token, done, tokens, ok), joined once and kept joined."""
        if not self.parts:
            z = np.zeros(0, np.int64)
            return z, z, z, z, np.zeros(0, bool)
        if len(self.parts) > 1:
            self.parts = [tuple(np.concatenate(c) for c in zip(*self.parts))]
        return tuple(self.parts[0])


def mser5(series: npt.NDArray[np.float64]) -> int:
    """The MSER-5 truncation point, in points of ``series`` (0: keep everything)."""
    m = len(series) // 5
    if m < 4:
        return 0
    y = series[: m * 5].reshape(m, 5).mean(axis=1)
    best, best_d = math.inf, 0
    for d in range(m // 2 + 1):
        rest = y[d:]
        k = len(rest)
        value = float(((rest - rest.mean()) ** 2).sum()) / (k * k)
        if value < best - 1e-12:
            best, best_d = value, d
    return best_d * 5


def steady_window(times: RequestTimes) -> dict[str, Any] | None:
    """``{start_s, end_s, method, bin_s}`` on the run's clock, or None when the run is too
    short to tell (fewer than 20 samples of the sending period)."""
    sent, _, done, _, _ = times.arrays()
    was = sent >= 0
    if was.sum() < 20:
        return None
    s, d = sent[was], done[was]
    d = np.where(d >= s, d, s)
    first, last = int(s.min()), int(s.max())
    span = last - first
    bin_ns = int(min(max(span / 200, 10e6), 1e9))
    if span < 20 * bin_ns:
        return None
    grid = np.arange(first, last + 1, bin_ns)
    in_flight = np.searchsorted(np.sort(s), grid, side="right") - np.searchsorted(
        np.sort(d), grid, side="right"
    )
    cut = mser5(in_flight.astype(np.float64))
    return {
        "start_s": float(grid[cut] / 1e9),
        "end_s": float(last / 1e9),
        "method": METHOD,
        "bin_s": bin_ns / 1e9,
    }


def steady_metrics(times: RequestTimes, window: dict[str, Any]) -> dict[str, Any]:
    """The headline figures over the requests sent inside ``window`` (``steady_`` keys):
    throughputs over the window's length, latencies of its successful requests."""
    sent, _, _, tokens, ok = times.arrays()
    lo, hi = int(window["start_s"] * 1e9), int(window["end_s"] * 1e9)
    inside = (sent >= lo) & (sent <= hi)
    good = inside & ok
    length_s = max((hi - lo) / 1e9, 1e-9)
    out: dict[str, Any] = {
        "steady_requests": int(inside.sum()),
        "steady_completed": int(good.sum()),
        "steady_request_throughput": float(good.sum() / length_s),
        "steady_output_throughput": float(tokens[good].clip(min=0).sum() / length_s),
    }
    latencies = per_request(times, (lo, hi))
    for series, name in (("ttft", "ttft_ms"), ("tpot", "tpot_ms"), ("e2e", "e2e_latency_ms")):
        v = latencies[series]
        if len(v):
            out[f"steady_mean_{name}"] = float(v.mean())
            out[f"steady_median_{name}"] = float(np.median(v))
            out[f"steady_p99_{name}"] = float(np.percentile(v, 99))
    return out


def across_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """For each headline figure every run has: the mean, ``ci95_<figure>`` = [low, high]
    (Student's t, n-1 degrees of freedom) and ``cv_<figure>`` (sd / mean)."""
    from scipy.stats import t as student_t

    n = len(runs)
    out: dict[str, Any] = {"num_runs": n}
    if n < 2:
        return out
    q = float(student_t.ppf(0.975, n - 1))
    for key in HEADLINE:
        values = [r.get(key) for r in runs]
        if any(v is None or not isinstance(v, (int, float)) for v in values):
            continue
        v = np.asarray(values, np.float64)
        if not np.all(np.isfinite(v)):
            continue
        mean, sd = float(v.mean()), float(v.std(ddof=1))
        half = q * sd / math.sqrt(n)
        out[key] = mean
        out[f"ci95_{key}"] = [mean - half, mean + half]
        out[f"cv_{key}"] = sd / mean if mean else None
    return out


#: Per-request figures the A/B verdicts compare: (key, label, statistic).
VERDICT_FIGURES = (
    ("mean_ttft_ms", "mean TTFT (ms)", "ttft", "mean"),
    ("median_ttft_ms", "median TTFT (ms)", "ttft", 50.0),
    ("p99_ttft_ms", "p99 TTFT (ms)", "ttft", 99.0),
    ("mean_tpot_ms", "mean TPOT (ms)", "tpot", "mean"),
    ("p99_tpot_ms", "p99 TPOT (ms)", "tpot", 99.0),
    ("mean_e2e_latency_ms", "mean E2E (ms)", "e2e", "mean"),
    ("p99_e2e_latency_ms", "p99 E2E (ms)", "e2e", 99.0),
)
#: Bootstrap resamples, and the most requests a side resamples (a random subset beyond:
#: the interval of a mean or a percentile of 20,000 values is already narrow).
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_MAX_N = 20_000


def per_request(
    times: RequestTimes, sent_within: tuple[int, int] | None = None
) -> dict[str, npt.NDArray[np.float64]]:
    """TTFT, TPOT and E2E (ms) of every successful request (sent within ``sent_within``,
    ns on the run's clock, inclusive, when given)."""
    sent, first, done, tokens, ok = times.arrays()
    good = ok & (sent >= 0)
    if sent_within is not None:
        good &= (sent >= sent_within[0]) & (sent <= sent_within[1])
    multi = good & (first >= 0) & (tokens > 1)
    return {
        "ttft": ((first - sent)[good & (first >= 0)] / 1e6).astype(np.float64),
        "tpot": ((done - first)[multi] / (tokens[multi] - 1) / 1e6).astype(np.float64),
        "e2e": ((done - sent)[good] / 1e6).astype(np.float64),
    }


def _stat(x: npt.NDArray[np.float64], how: str | float, axis: int | None = None) -> Any:
    """The mean, or the ``how``-th percentile."""
    if isinstance(how, str):
        return x.mean(axis=axis)
    return np.percentile(x, how, axis=axis)


def _resampled(
    x: npt.NDArray[np.float64], how: str | float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    if len(x) > BOOTSTRAP_MAX_N:
        x = rng.choice(x, BOOTSTRAP_MAX_N, replace=False)
    out = np.empty(BOOTSTRAP_RESAMPLES)
    for lo in range(0, BOOTSTRAP_RESAMPLES, 100):
        idx = rng.integers(0, len(x), (min(100, BOOTSTRAP_RESAMPLES - lo), len(x)))
        out[lo : lo + len(idx)] = _stat(x[idx], how, axis=1)
    return out


def _pooled(parts: Sequence[RequestTimes]) -> RequestTimes:
    return RequestTimes([p for t in parts for p in t.parts])


def ab_verdicts(
    a: RequestTimes | Sequence[RequestTimes],
    b: RequestTimes | Sequence[RequestTimes],
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per figure: B − A, its 95% bootstrap interval over requests (each side's requests
    pooled over its runs and resampled with replacement; percentile interval), and
    whether the interval excludes zero. When both sides have several runs, also over
    runs: the difference of the per-run figures' means with Welch's t interval
    (``runs_ci95``, ``runs_significant``)."""
    a_runs = [a] if isinstance(a, RequestTimes) else list(a)
    b_runs = [b] if isinstance(b, RequestTimes) else list(b)
    rng = np.random.default_rng(seed)
    va, vb = per_request(_pooled(a_runs)), per_request(_pooled(b_runs))
    by_run = len(a_runs) >= 2 and len(b_runs) >= 2
    ra = [per_request(t) for t in a_runs] if by_run else []
    rb = [per_request(t) for t in b_runs] if by_run else []
    out = []
    for key, label, series, how in VERDICT_FIGURES:
        xa, xb = va[series], vb[series]
        if len(xa) < 2 or len(xb) < 2:
            continue
        diff = float(_stat(xb, how) - _stat(xa, how))
        boot = _resampled(xb, how, rng) - _resampled(xa, how, rng)
        low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
        row: dict[str, Any] = {
            "figure": key,
            "label": label,
            "a": float(_stat(xa, how)),
            "b": float(_stat(xb, how)),
            "diff": diff,
            "ci95": [low, high],
            "significant": bool(low > 0 or high < 0),
        }
        if by_run:
            pa_ = [float(_stat(r[series], how)) for r in ra if len(r[series])]
            pb_ = [float(_stat(r[series], how)) for r in rb if len(r[series])]
            if len(pa_) >= 2 and len(pb_) >= 2:
                lo, hi = welch_interval(np.asarray(pa_), np.asarray(pb_))
                row["runs_ci95"] = [lo, hi]
                row["runs_significant"] = bool(lo > 0 or hi < 0)
        out.append(row)
    return out


def welch_interval(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> tuple[float, float]:
    """95% interval of mean(b) − mean(a) by Welch's t (unequal variances)."""
    from scipy.stats import t as student_t

    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    diff = float(b.mean() - a.mean())
    if se == 0:
        return diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(student_t.ppf(0.975, dof)) * se
    return diff - half, diff + half
