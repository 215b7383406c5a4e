"""Per-window inter-arrival fits: Gamma (FineServe's format), Weibull and Exponential,
with the best of the three chosen per window by AIC (ServeGen selects by likelihood).

Everything is vectorised over windows: gaps are sorted by window, so per-window sums are
``np.add.reduceat`` over contiguous segments and the MLE iterations (Newton for the Gamma
shape from two sufficient statistics; Newton for the Weibull shape, which needs a pass
over the gaps per step) update all windows at once.

A gap belongs to the window of the event that *starts* it, as in the generator (which
draws a gap with the parameters of the window the previous event lies in).

Rule for windows with few events (``min_gaps``, default 10):
- ``idle``: no event in the window — shape 1, scale 1000 × the window length, i.e.
  ~0.001 expected events, because FineServe's format cannot say "rate 0".
- ``sparse``: fewer than ``min_gaps`` gaps — Exponential (shape 1) with the window's own
  rate, scale = window length / events; a shape fitted to a handful of gaps is noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FAMILIES = ("gamma", "weibull", "exponential")
MIN_GAPS = 10


@dataclass
class WindowFit:
    """One row per window; times in ms relative to the first event."""

    start_ms: FloatArray
    end_ms: FloatArray
    n_requests: IntArray
    n_events: IntArray
    cv: FloatArray
    gamma_shape: FloatArray
    gamma_scale_ms: FloatArray
    weibull_shape: FloatArray
    weibull_scale_ms: FloatArray
    exponential_scale_ms: FloatArray
    loglik: dict[str, FloatArray]
    #: "gamma" / "weibull" / "exponential" (best by AIC), or "idle" / "sparse" (rule above).
    model: npt.NDArray[np.str_]
    #: KS distance of each window's gaps to its fitted Gamma (NaN for idle/sparse).
    ks_gamma: FloatArray
    #: KS distance of all gaps, each mapped through its window's Gamma CDF, to U(0, 1).
    ks_all: float
    #: The same two for the model chosen per window (``model``).
    ks_model: FloatArray
    ks_all_model: float
    tied_gaps: int
    tie_ms: float

    def __len__(self) -> int:
        return len(self.start_ms)


def _segments(seg: IntArray, n_seg: int) -> tuple[IntArray, npt.NDArray[np.bool_], IntArray]:
    """Counts per segment (``seg`` sorted), which segments are non-empty, and the start
    offset of each non-empty segment (for reduceat)."""
    counts = np.bincount(seg, minlength=n_seg).astype(np.int64)
    nonempty = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
    return counts, nonempty, starts


def _seg_sum(x: FloatArray, starts: IntArray) -> FloatArray:
    return np.add.reduceat(x, starts) if len(x) else np.zeros(0)


def gamma_mle(mean: FloatArray, mean_log: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Gamma MLE (shape, scale) from the sufficient statistics of each sample: Minka's
    closed-form start, then Newton on log k − ψ(k) = log mean − mean log."""
    s = np.maximum(np.log(mean) - mean_log, 1e-12)
    k = (3 - s + np.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
    for _ in range(8):
        f = np.log(k) - special.digamma(k) - s
        fp = 1 / k - special.polygamma(1, k)
        k = np.maximum(k - f / fp, k / 10)
    return k, mean / k


def weibull_mle(
    log_x: FloatArray, seg: IntArray, starts: IntArray, n: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Weibull MLE per segment; returns (shape, scale, Σ (x/scale)^shape). ``log_x`` is
    the log of gaps normalised by their segment's mean (keeps x^k in range)."""
    mean_log = _seg_sum(log_x, starts) / n
    sd = np.sqrt(np.maximum(_seg_sum(log_x**2, starts) / n - mean_log**2, 1e-12))
    k = np.clip(1.2825 / sd, 0.02, 50.0)  # std(log X) = π / (k √6)
    for _ in range(30):
        xk = np.exp(k[seg] * log_x)
        s0 = _seg_sum(xk, starts)
        s1 = _seg_sum(xk * log_x, starts)
        s2 = _seg_sum(xk * log_x**2, starts)
        f = s1 / s0 - 1 / k - mean_log
        fp = (s2 * s0 - s1**2) / s0**2 + 1 / k**2
        step = f / fp
        k = np.clip(k - step, k / 2, k * 2)
        if np.all(np.abs(step) < 1e-7 * k):
            break
    xk = np.exp(k[seg] * log_x)
    scale = (_seg_sum(xk, starts) / n) ** (1 / k)
    return k, scale, n  # Σ (x/λ)^k = n at the MLE


@dataclass
class _Grid:
    """The windows over a trace: bounds (ms), requests and events per window, and each
    event's window."""

    start: FloatArray
    end: FloatArray
    n_req: IntArray
    n_ev: IntArray
    ev_win: IntArray
    t_ms: FloatArray


def _window_grid(event_ns: IntArray, requests_ns: IntArray, window_s: float) -> _Grid:
    w_ms = window_s * 1e3
    t_ms = event_ns.astype(np.float64) / 1e6
    span_ms = max(float(requests_ns[-1]) / 1e6 if len(requests_ns) else 0.0, t_ms[-1])
    n_win = max(1, math.ceil(span_ms / w_ms + 1e-12))
    if n_win * w_ms <= span_ms:
        n_win += 1
    start = np.arange(n_win) * w_ms
    end = np.minimum(start + w_ms, max(span_ms, 1e-3))
    end[-1] = max(end[-1], start[-1] + 1e-3)
    if float(w_ms * 1e6).is_integer():
        req_win = requests_ns // int(w_ms * 1e6)
    else:
        req_win = (requests_ns / (w_ms * 1e6)).astype(np.int64)
    n_req = np.bincount(np.minimum(req_win, n_win - 1), minlength=n_win)
    ev_win = np.minimum((t_ms / w_ms).astype(np.int64), n_win - 1)
    n_ev = np.bincount(ev_win, minlength=n_win)
    return _Grid(start, end, n_req, n_ev, ev_win, t_ms)


def _untied_gaps(t_ms: FloatArray) -> tuple[FloatArray, int, float]:
    """Gaps between events. Ties (timestamps coarser than the events): a zero gap has no
    log; they are counted and taken as half the smallest positive gap, i.e. half the
    timestamp resolution."""
    gaps = np.diff(t_ms)
    tied = gaps <= 0
    n_tied = int(np.count_nonzero(tied))
    tie_ms = 0.5
    if n_tied:
        positive = gaps[~tied]
        tie_ms = float(positive.min()) / 2 if len(positive) else 0.5
        gaps = np.where(tied, tie_ms, gaps)
    return gaps, n_tied, tie_ms


def fit_windows(
    event_ns: IntArray,
    requests_ns: IntArray,
    window_s: float = 300.0,
    *,
    min_gaps: int = MIN_GAPS,
) -> WindowFit:
    """Fits every window of ``event_ns`` (sorted, relative to the first event).
    ``requests_ns`` only feeds the ``n_requests`` column (with micro-bursts modelled,
    events are occupied slots and requests are more)."""
    grid = _window_grid(event_ns, requests_ns, window_s)
    n_win = len(grid.start)
    gaps, n_tied, tie_ms = _untied_gaps(grid.t_ms)
    seg = grid.ev_win[:-1]

    counts, nonempty, starts = _segments(seg, n_win)
    n = counts[nonempty].astype(np.float64)
    sum_x = _seg_sum(gaps, starts)
    log_g = np.log(gaps)
    sum_log = _seg_sum(log_g, starts)
    mean = sum_x / n
    mean_log = sum_log / n
    var = np.maximum(_seg_sum(gaps**2, starts) / n - mean**2, 0.0)

    g_shape, g_scale = gamma_mle(mean, mean_log)
    seg_dense = np.cumsum(nonempty)[seg] - 1  # index among non-empty windows
    log_norm = log_g - np.log(mean)[seg_dense]
    w_shape, w_scale_norm, sum_pow = weibull_mle(log_norm, seg_dense, starts, n)
    w_scale = w_scale_norm * mean

    ll_gamma = (
        (g_shape - 1) * sum_log
        - sum_x / g_scale
        - n * special.gammaln(g_shape)
        - n * g_shape * np.log(g_scale)
    )
    ll_weibull = (
        n * np.log(w_shape) - n * w_shape * np.log(w_scale) + (w_shape - 1) * sum_log - sum_pow
    )
    ll_exp = -n * np.log(mean) - n
    aic = np.stack([4 - 2 * ll_gamma, 4 - 2 * ll_weibull, 2 - 2 * ll_exp])
    best = np.asarray(FAMILIES)[np.argmin(aic, axis=0)]

    def spread(v: FloatArray, fill: float) -> FloatArray:
        out = np.full(n_win, fill)
        out[nonempty] = v
        return out

    gamma_shape = spread(g_shape, 1.0)
    gamma_scale = spread(g_scale, math.nan)
    model = np.full(n_win, "idle", dtype=object)
    model[nonempty] = best
    sparse = counts < min_gaps
    _sparse_and_idle(grid, sparse, model, gamma_shape, gamma_scale)
    weibull_shape = spread(w_shape, math.nan)
    weibull_scale = spread(w_scale, math.nan)
    exp_scale = spread(mean, math.nan)
    # KS of each window's gaps to the Gamma written for it, and to the model chosen for it
    # (Gamma params for sparse/idle windows), per window and over all gaps after the
    # probability integral transform through their own window's CDF.
    u_gamma = special.gammainc(gamma_shape[seg], gaps / gamma_scale[seg])
    family = model[seg]
    u_model = u_gamma.copy()
    wb = family == "weibull"
    u_model[wb] = -np.expm1(-((gaps[wb] / weibull_scale[seg[wb]]) ** weibull_shape[seg[wb]]))
    ex = family == "exponential"
    u_model[ex] = -np.expm1(-gaps[ex] / exp_scale[seg[ex]])
    ks_gamma, ks_all = _pit_ks(u_gamma, seg, counts, nonempty, starts)
    ks_model, ks_all_model = _pit_ks(u_model, seg, counts, nonempty, starts)
    ks_gamma[sparse] = math.nan
    ks_model[sparse] = math.nan
    return WindowFit(
        start_ms=grid.start,
        end_ms=grid.end,
        n_requests=grid.n_req.astype(np.int64),
        n_events=grid.n_ev.astype(np.int64),
        cv=spread(np.sqrt(var) / mean, math.nan),
        gamma_shape=gamma_shape,
        gamma_scale_ms=gamma_scale,
        weibull_shape=weibull_shape,
        weibull_scale_ms=weibull_scale,
        exponential_scale_ms=exp_scale,
        loglik={
            "gamma": spread(ll_gamma, math.nan),
            "weibull": spread(ll_weibull, math.nan),
            "exponential": spread(ll_exp, math.nan),
        },
        model=model.astype(str),
        ks_gamma=ks_gamma,
        ks_all=ks_all,
        ks_model=ks_model,
        ks_all_model=ks_all_model,
        tied_gaps=n_tied,
        tie_ms=tie_ms,
    )


def _sparse_and_idle(
    grid: _Grid,
    sparse: npt.NDArray[np.bool_],
    model: npt.NDArray[np.object_],
    gamma_shape: FloatArray,
    gamma_scale: FloatArray,
) -> None:
    """Idle and sparse windows get an Exponential at their own rate (the documented rule
    in the module docstring); in place."""
    win_len = grid.end - grid.start
    few = sparse & (grid.n_ev > 0)
    model[few] = "sparse"
    gamma_shape[few] = 1.0
    gamma_scale[few] = win_len[few] / grid.n_ev[few]
    idle = grid.n_ev == 0
    model[idle] = "idle"
    gamma_shape[idle] = 1.0
    gamma_scale[idle] = 1000.0 * win_len[idle]


def _pit_ks(
    u: FloatArray,
    seg: IntArray,
    counts: IntArray,
    nonempty: npt.NDArray[np.bool_],
    starts: IntArray,
) -> tuple[FloatArray, float]:
    """KS distance to U(0, 1) of PIT values ``u``, per window (``seg`` sorted) and pooled."""
    n_win = len(counts)
    # Sorting seg + u (u in [0, 1]) sorts u within each window without a permutation;
    # float64 keeps u exact to ~1e-13 for any window count.
    u_sorted = np.sort(seg + u) - seg
    # ECDF just after each sorted value: (rank + 1) / n_w; just before: that − 1 / n_w.
    inv_n = 1.0 / np.maximum(counts, 1)
    seg_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    after = np.arange(1, len(u) + 1, dtype=np.float64)
    after -= seg_start[seg]
    after *= inv_n[seg]
    dev = np.maximum(after - u_sorted, u_sorted - (after - inv_n[seg]))
    per_window = np.full(n_win, math.nan)
    if len(dev):
        per_window[nonempty] = np.maximum.reduceat(dev, starts)
    pooled = np.sort(u)
    m = len(pooled)
    if not m:
        return per_window, math.nan
    after = np.arange(1, m + 1, dtype=np.float64) / m
    return per_window, float(max(np.max(after - pooled), np.max(pooled - (after - 1.0 / m))))
