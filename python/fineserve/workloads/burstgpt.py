"""BurstGPT's modeled workload: Gamma(α, β) inter-arrivals per 20-minute window and Zipf
request/response lengths, fitted from a BurstGPT CSV or read from a parameter file, and
scaled to a target rate by shrinking β (which keeps each window's burstiness, CV = 1/√α).

Parameter file (JSON): ``{"window_s": 1200, "windows": [{"start_s", "alpha", "beta_s",
"n_requests"}, ...], "input_zipf_a", "output_zipf_a", "max_input_len", "max_output_len"}``.
Windows with fewer than ``MIN_WINDOW_REQUESTS`` requests are idle (no arrivals): a Gamma
fit on a handful of gaps is noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError
from ..schedule import Schedule
from ..traces.base import Trace

MIN_WINDOW_REQUESTS = 10


def fit_zipf(x: npt.NDArray[np.int64], max_value: int) -> float:
    """MLE exponent of a Zipf law on 1..max_value (truncated, so any a > 0 is valid)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[x >= 1]
    if not len(x):
        raise FineserveError("no lengths to fit a Zipf law to")
    return fit_zipf_mean_log(float(np.mean(np.log(x))), max_value)


def fit_zipf_mean_log(mean_log: float, max_value: int) -> float:
    """The same MLE from its sufficient statistic, the mean of log x."""
    from scipy.optimize import minimize_scalar

    log_s = np.log(np.arange(1, max_value + 1, dtype=np.float64))

    def nll(a: float) -> float:
        # per-sample negative log-likelihood: a·E[log x] + log Σ k^-a
        m = -a * log_s
        top = float(m.max())
        return a * mean_log + top + math.log(float(np.sum(np.exp(m - top))))

    res = minimize_scalar(nll, bounds=(0.01, 10.0), method="bounded")
    return float(res.x)


def zipf_sample(a: float, max_value: int, n: int, rng: np.random.Generator) -> Any:
    """Draws from the Zipf law on 1..max_value by inverse CDF."""
    k = np.arange(1, max_value + 1, dtype=np.float64)
    w = k**-a
    cdf = np.cumsum(w)
    return np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").astype(np.int64) + 1


def fit_burstgpt(trace: Trace, window_s: float = 1200.0) -> dict[str, Any]:
    """Per-window Gamma MLE of inter-arrival times and Zipf exponents of the lengths."""
    from scipy.stats import gamma

    t_s = trace.t_ns / 1e9
    win = np.floor(t_s / window_s).astype(np.int64)
    windows = []
    for w in range(int(win[-1]) + 1):
        ts = t_s[win == w]
        gaps = np.diff(ts)
        gaps = gaps[gaps > 0]
        entry: dict[str, Any] = {"start_s": w * window_s, "n_requests": len(ts)}
        if len(gaps) >= MIN_WINDOW_REQUESTS:
            alpha, _, beta = gamma.fit(gaps, floc=0)
            entry.update(alpha=float(alpha), beta_s=float(beta))
        else:
            entry.update(alpha=0.0, beta_s=0.0)
        windows.append(entry)
    max_in = int(trace.input_len.max())
    max_out = int(trace.output_len.max())
    return {
        "source": str(trace.path),
        "window_s": window_s,
        "windows": windows,
        "input_zipf_a": fit_zipf(trace.input_len, max_in),
        "output_zipf_a": fit_zipf(trace.output_len, max_out),
        "max_input_len": max_in,
        "max_output_len": max_out,
    }


def load_burstgpt_params(path: Path) -> dict[str, Any]:
    from .parametric import read_json

    p = read_json(path, "--burstgpt-params")
    if not isinstance(p, dict):
        raise FineserveError(f"{path}: not a JSON object")
    for key in ("window_s", "windows", "input_zipf_a", "output_zipf_a"):
        if key not in p:
            raise FineserveError(f"{path}: missing {key!r}")
    for i, w in enumerate(p["windows"]):
        a, b = w.get("alpha", 0), w.get("beta_s", 0)
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or a < 0 or b < 0:
            raise FineserveError(f"{path}: window {i}: alpha and beta_s must be numbers >= 0")
    return p


def burstgpt_chunks(
    params: dict[str, Any],
    rng: np.random.Generator,
    *,
    rate_scale: float = 1.0,
    request_rate: float | None = None,
    time_scale: float = 1.0,
    duration_s: float | None = None,
) -> Iterator[Schedule]:
    """One chunk per window (windows repeat cyclically past the file's span)."""
    windows = params["windows"]
    window_s = float(params["window_s"])
    active = [w for w in windows if w["alpha"] > 0 and w["beta_s"] > 0]
    if not active:
        raise FineserveError("the BurstGPT parameters have no active window")
    if request_rate is not None:
        base = sum(1.0 / (w["alpha"] * w["beta_s"]) for w in active) / len(windows)
        rate_scale = request_rate / base
    if not (rate_scale > 0 and math.isfinite(rate_scale)):
        raise FineserveError("the rate scale must be > 0")
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise FineserveError("--time-scale must be > 0")
    span_s = len(windows) * window_s if duration_s is None else duration_s
    max_in = int(params.get("max_input_len", 32_768))
    max_out = int(params.get("max_output_len", 4_096))
    k = 0
    while k * window_s < span_s:
        w = windows[k % len(windows)]
        a = k * window_s
        b = min(a + window_s, span_s)
        k += 1
        if not (w["alpha"] > 0 and w["beta_s"] > 0):
            continue
        alpha, beta = float(w["alpha"]), float(w["beta_s"]) / rate_scale
        mean = alpha * beta
        parts, t = [], a
        while t < b:
            gaps = rng.gamma(alpha, beta, size=int((b - t) / mean * 1.2 + 16))
            ts = t + np.cumsum(gaps)
            parts.append(ts[ts < b])
            t = float(ts[-1])
        arr = np.concatenate(parts)
        if not len(arr):
            continue
        n = len(arr)
        yield Schedule(
            np.rint(arr * 1e9 / time_scale).astype(np.int64),
            zipf_sample(params["input_zipf_a"], max_in, n, rng),
            zipf_sample(params["output_zipf_a"], max_out, n, rng),
        )
