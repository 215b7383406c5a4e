"""``fineserve compare``: how close a generated workload is to a real one.

Both sides are reduced to the same statistics — per-window request rate and CV of the
inter-arrival gaps (and their median relative errors, window by window), requests per
occupied slot, inter-arrival gaps, the autocorrelation of requests per second at 1, 10 and
60 s, input and output lengths — and compared with the two-sample KS statistic and the
Wasserstein-1 distance (scaled by the real side's mean where the raw value has units, so
it reads as a fraction).

Resolution: the real side's clock is detected (``fit.resolution``); when its timestamps
are quantised (e.g. whole milliseconds), the generated times are floored to the same clock
before anything is compared — a continuous generator is otherwise judged on ties it cannot
have (a trace reproduced to KS 0.004 read as 0.90).
A trace's times start at its first request, a schedule's at its run start; a schedule made at a time
scale other than 1 should be compared with ``--time-scale`` to undo it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from . import plotting
from .errors import FineserveError
from .fit.bursts import best_slot_phase_ns, slot_counts
from .fit.resolution import CONTINUOUS, Resolution, detect_resolution, quantise_ns

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass
class Arrivals:
    """What compare needs of a trace or schedule."""

    name: str
    t_ns: IntArray
    input_len: IntArray
    output_len: IntArray
    notes: list[str] = field(default_factory=list)
    #: Absolute time of the first request (a trace's clock), for its resolution.
    origin_ns: int = 0


#: Lags (s) of the per-second autocorrelation rows.
ACF_LAGS_S = (1, 10, 60)


def load_arrivals(path: Path, trace_options: Any = None, time_scale: float = 1.0) -> Arrivals:
    """A trace (any supported format) or a schedule Parquet written by ``generate``."""
    from .schedule import concat, read_schedule
    from .traces import TraceOptions, load_trace

    path = Path(path)
    if not path.is_file():
        raise FineserveError(f"file not found: {path}")
    with path.open("rb") as f:
        is_parquet = f.read(4) == b"PAR1"
    origin = 0
    if is_parquet:
        chunks, _, _ = read_schedule(path)
        s = concat(list(chunks))
        t, inp, out, notes = s.t_ns, s.input_len, s.output_len, []
    else:
        trace = load_trace(path, trace_options or TraceOptions())
        t, inp, out, notes = trace.t_ns, trace.input_len, trace.output_len, [trace.skip_summary()]
        origin = trace.origin_ns
    if len(t) < 2:
        raise FineserveError(f"{path}: {len(t)} requests; comparing needs at least 2")
    # A trace's times start at its first request; a schedule's at the run start, which is
    # the generator's slot grid (shifting would split its bursts across slots).
    if time_scale != 1.0:
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise FineserveError("--time-scale must be a positive number")
        t = np.rint(t * time_scale).astype(np.int64)
    return Arrivals(path.name, t, inp, out, notes, origin)


@dataclass
class Row:
    metric: str
    real: float
    generated: float
    #: Two-sample KS statistic (NaN where not meaningful).
    ks: float = math.nan
    #: Wasserstein-1 distance, divided by the real mean for quantities with units.
    wasserstein: float = math.nan
    #: What is judged against ``threshold``: "KS", "W", "error" (|gen − real| / real),
    #: "diff" (|gen − real|) or "score" (``score``, a distance computed elsewhere).
    check: str = ""
    threshold: float = math.nan
    score: float = math.nan

    @property
    def value(self) -> float:
        if self.check == "error":
            return abs(self.generated - self.real) / self.real if self.real else math.nan
        if self.check == "diff":
            return abs(self.generated - self.real)
        return {"KS": self.ks, "W": self.wasserstein, "score": self.score}.get(self.check, math.nan)

    @property
    def ok(self) -> bool | None:
        if not self.check or math.isnan(self.threshold):
            return None
        return bool(self.value <= self.threshold)


@dataclass
class Comparison:
    real: Arrivals
    generated: Arrivals
    window_s: float
    slot_ms: float
    rows: list[Row]
    series: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    #: The real side's clock (generated times were floored to it when quantised).
    resolution: Resolution = CONTINUOUS
    #: Seconds each per-second series spans (for the ACF rows' noise).
    seconds: int = 0

    @property
    def passed(self) -> bool:
        return all(r.ok is not False for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "real": self.real.name,
            "generated": self.generated.name,
            "window_s": self.window_s,
            "slot_ms": self.slot_ms,
            "resolution": self.resolution.to_json(),
            "passed": self.passed,
            "metrics": [
                {
                    "metric": r.metric,
                    "real": num(r.real),
                    "generated": num(r.generated),
                    "ks": num(r.ks),
                    "wasserstein": num(r.wasserstein),
                    "check": r.check or None,
                    "check_value": num(r.value),
                    "threshold": num(r.threshold),
                    "ok": r.ok,
                }
                for r in self.rows
            ],
        }


def window_stats(t_ns: IntArray, window_s: float, n_windows: int) -> tuple[FloatArray, FloatArray]:
    """Requests/s and CV of request gaps per window (NaN CV with < 3 requests)."""
    w_ns = window_s * 1e9
    win = np.minimum((t_ns / w_ns).astype(np.int64), n_windows - 1)
    counts = np.bincount(win, minlength=n_windows)
    rate = counts / window_s
    gaps = np.diff(t_ns).astype(np.float64)
    gw = win[:-1]
    same = win[1:] == gw  # gaps inside one window only
    n = np.bincount(gw[same], minlength=n_windows).astype(np.float64)
    s1 = np.bincount(gw[same], weights=gaps[same], minlength=n_windows)
    s2 = np.bincount(gw[same], weights=gaps[same] ** 2, minlength=n_windows)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        cv = np.sqrt(np.maximum(s2 / n - mean**2, 0)) / mean
    cv[n < 2] = math.nan
    return rate, cv


def _pair(metric: str, a: FloatArray, b: FloatArray, *, relative: bool = True) -> Row:
    a = a[np.isfinite(a)]
    b = b[np.isfinite(b)]
    if not len(a) or not len(b):
        return Row(metric, math.nan, math.nan)
    with warnings.catch_warnings():
        # scipy falls back from the exact p-value to the asymptotic one with a warning; only
        # the statistic is used here, which is the same either way.
        warnings.simplefilter("ignore", RuntimeWarning)
        ks = float(stats.ks_2samp(a, b).statistic)
    w = float(stats.wasserstein_distance(a, b))
    mean = float(np.mean(a))
    if relative:
        w = w / mean if mean else math.nan
    return Row(metric, mean, float(np.mean(b)), ks, w)


def per_second_acf(t_ns: IntArray, lag_s: int) -> float:
    """Autocorrelation of requests per second at ``lag_s`` (NaN when too short)."""
    return float(per_second_acfs(t_ns, (lag_s,))[0])


def per_second_acfs(t_ns: IntArray, lags_s: tuple[int, ...]) -> FloatArray:
    """:func:`per_second_acf` at each of ``lags_s``, the per-second series built once."""
    out = np.full(len(lags_s), math.nan)
    if len(t_ns) == 0:
        return out
    sec = np.bincount(t_ns // 1_000_000_000).astype(np.float64)
    x = sec - sec.mean()
    den = float(np.dot(x, x))
    for k, lag in enumerate(lags_s):
        if len(sec) > lag + 2 and den > 0:
            out[k] = float(np.dot(x[:-lag], x[lag:]) / den)
    return out


def _median_error(real: FloatArray, gen: FloatArray) -> float:
    ok = np.isfinite(real) & np.isfinite(gen) & (real > 0)
    return float(np.median(np.abs(gen[ok] - real[ok]) / real[ok])) if ok.any() else math.nan


def compare_arrivals(
    real: Arrivals,
    gen: Arrivals,
    *,
    window_s: float = 300.0,
    slot_ms: float = 1.0,
    thresholds: dict[str, float] | None = None,
) -> Comparison:
    notes = []
    resolution = detect_resolution(real.t_ns + real.origin_ns)
    if resolution.kind == "quantised" and resolution.period_ns > 1:
        p = resolution.period_ns
        # The real side's relative times plus its origin's phase are on the clock.
        phase = int(real.origin_ns % p)
        quantised = quantise_ns(gen.t_ns + phase, p) - phase
        if not np.array_equal(quantised, gen.t_ns):
            notes.append(
                f"generated times floored to the real side's clock ({resolution.describe()})"
            )
            gen = Arrivals(gen.name, quantised, gen.input_len, gen.output_len, gen.notes)
    span_s = max(real.t_ns[-1], gen.t_ns[-1]) / 1e9
    n_win = max(1, math.ceil(span_s / window_s))
    rate_r, cv_r = window_stats(real.t_ns, window_s, n_win)
    rate_g, cv_g = window_stats(gen.t_ns, window_s, n_win)
    # Each side at its own best grid phase (see fit.bursts.best_slot_phase_ns).
    _, slots_r = slot_counts(real.t_ns + best_slot_phase_ns(real.t_ns, slot_ms), slot_ms)
    _, slots_g = slot_counts(gen.t_ns + best_slot_phase_ns(gen.t_ns, slot_ms), slot_ms)
    gaps_r = np.diff(real.t_ns) / 1e6
    gaps_g = np.diff(gen.t_ns) / 1e6

    rows: list[Row] = []
    rows.append(Row("requests", float(len(real.t_ns)), float(len(gen.t_ns)), check="error"))
    rows.append(_pair("window rate (req/s)", rate_r, rate_g))
    # Window by window: Σ|gen − real| / Σ real, shown in the W column.
    aligned = float(np.abs(rate_g - rate_r).sum() / max(rate_r.sum(), 1e-12))
    rows.append(Row("window rate, aligned", math.nan, math.nan, wasserstein=aligned))
    rows.append(
        Row(
            "window rate error, median",
            math.nan,
            math.nan,
            check="score",
            score=_median_error(rate_r, rate_g),
        )
    )
    rows.append(_pair("window CV of gaps", cv_r, cv_g, relative=False))
    rows.append(
        Row(
            "window CV error, median",
            math.nan,
            math.nan,
            check="score",
            score=_median_error(cv_r, cv_g),
        )
    )
    r = _pair("requests per occupied slot", slots_r.astype(float), slots_g.astype(float))
    r.ks = _discrete_ks(slots_r, slots_g)
    r.check = "KS"
    rows.append(r)
    rows.append(
        Row("slots with > 1 request", float((slots_r > 1).mean()), float((slots_g > 1).mean()))
    )
    r = _pair("inter-arrival gap (ms)", gaps_r, gaps_g)
    r.check = "KS"
    rows.append(r)
    sub_r, sub_g = gaps_r[gaps_r < 1.0], gaps_g[gaps_g < 1.0]
    if len(sub_r) >= 10 and len(sub_g) >= 10:
        rows.append(_pair("gaps under 1 ms (ms)", sub_r, sub_g))
    acf_r = per_second_acfs(real.t_ns, ACF_LAGS_S)
    acf_g = per_second_acfs(gen.t_ns, ACF_LAGS_S)
    for k, lag in enumerate(ACF_LAGS_S):
        rows.append(
            Row(f"requests/s ACF at {lag} s", float(acf_r[k]), float(acf_g[k]), check="diff")
        )
    for metric, a, b in (
        ("input length", real.input_len, gen.input_len),
        ("output length", real.output_len, gen.output_len),
    ):
        r = _pair(metric, a.astype(float), b.astype(float))
        r.check = "KS"
        rows.append(r)
    rows.append(
        Row(
            "input/output Spearman",
            _spearman(real.input_len, real.output_len),
            _spearman(gen.input_len, gen.output_len),
        )
    )
    for row in rows:
        if thresholds and row.metric in thresholds:
            row.threshold = thresholds[row.metric]
    series = {
        "window_start_s": np.arange(n_win) * window_s,
        "rate_real": rate_r,
        "rate_gen": rate_g,
        "cv_real": cv_r,
        "cv_gen": cv_g,
        "slots_real": slots_r,
        "slots_gen": slots_g,
        "gaps_real": gaps_r,
        "gaps_gen": gaps_g,
    }
    span_r, span_g = real.t_ns[-1] / 1e9, gen.t_ns[-1] / 1e9
    if abs(span_g - span_r) > 0.1 * max(span_r, span_g):
        notes.append(
            f"the spans differ ({span_r:.0f} s real, {span_g:.0f} s generated): rates are per "
            "window over the longer span, so compare workloads of the same duration"
        )
    seconds = int(min(span_r, span_g)) + 1
    return Comparison(real, gen, window_s, slot_ms, rows, series, notes, resolution, seconds)


def _discrete_ks(a: IntArray, b: IntArray) -> float:
    top = int(max(a.max(initial=0), b.max(initial=0))) + 1
    ca = np.cumsum(np.bincount(a, minlength=top)) / max(len(a), 1)
    cb = np.cumsum(np.bincount(b, minlength=top)) / max(len(b), 1)
    return float(np.max(np.abs(ca - cb)))


def _spearman(x: IntArray, y: IntArray) -> float:
    if len(x) < 3:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def plot_comparison(c: Comparison, path: Path) -> Path:
    """Side-by-side panels as one PNG."""
    s = c.series
    fig, ax = plotting.figure(2, 3, (15, 8))
    real_style = {"color": "tab:blue", "label": f"real ({c.real.name})"}
    gen_style = {"color": "tab:orange", "label": f"generated ({c.generated.name})"}
    x = s["window_start_s"] / 60
    ax[0, 0].step(x, s["rate_real"], where="post", **real_style)
    ax[0, 0].step(x, s["rate_gen"], where="post", **gen_style)
    ax[0, 0].set(
        title=f"request rate per {c.window_s:g} s window", xlabel="minutes", ylabel="req/s"
    )
    ax[0, 1].plot(x, s["cv_real"], "o-", ms=3, **real_style)
    ax[0, 1].plot(x, s["cv_gen"], "o-", ms=3, **gen_style)
    ax[0, 1].set(title="CV of inter-arrival gaps per window", xlabel="minutes", ylabel="CV")
    top = int(max(s["slots_real"].max(), s["slots_gen"].max()))
    k = np.arange(1, top + 1)
    for key, style, off in (("slots_real", real_style, -0.2), ("slots_gen", gen_style, 0.2)):
        pmf = np.bincount(s[key], minlength=top + 1)[1:] / len(s[key])
        ax[0, 2].bar(k + off, pmf, width=0.4, **style)
    ax[0, 2].set(
        title=f"requests per occupied {c.slot_ms:g} ms slot", xlabel="requests", yscale="log"
    )
    for a, key, title in (
        (ax[1, 0], "gaps", "inter-arrival gap CDF (ms)"),
        (ax[1, 1], "input_len", "input length CDF (tokens)"),
        (ax[1, 2], "output_len", "output length CDF (tokens)"),
    ):
        if key == "gaps":
            ra, ga = s["gaps_real"], s["gaps_gen"]
        else:
            ra, ga = getattr(c.real, key), getattr(c.generated, key)
        for v, style in ((ra, real_style), (ga, gen_style)):
            plotting.cdf(a, v, **style)
        a.set(title=title, xscale="log", ylim=(0, 1))
    plotting.legend(ax[0, 0], fontsize=8)
    fig.tight_layout()
    return plotting.save(fig, path)
