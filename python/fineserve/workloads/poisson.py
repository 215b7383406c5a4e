"""Poisson (and Gamma-burstiness) arrivals and vLLM-style random lengths."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError


def poisson_arrivals_ns(
    n: int, request_rate: float, rng: np.random.Generator, burstiness: float = 1.0
) -> npt.NDArray[np.int64]:
    """Absolute send offsets (ns) for ``n`` requests at ``request_rate`` req/s.

    Inter-arrival times are Gamma(shape=burstiness, scale=1/(rate·burstiness)): mean
    1/rate, CV 1/sqrt(burstiness); burstiness 1 is Poisson (vLLM's ``--burstiness``).
    ``inf`` sends everything at t=0. The first request leaves at t=0.
    """
    if n < 0:
        raise FineserveError("--num-prompts must be >= 0")
    if math.isinf(request_rate):
        return np.zeros(n, dtype=np.int64)
    if not request_rate > 0:
        raise FineserveError(f"--request-rate must be > 0 or inf, got {request_rate}")
    if not burstiness > 0:
        raise FineserveError(f"--burstiness must be > 0, got {burstiness}")
    gaps_s = rng.gamma(burstiness, 1.0 / (request_rate * burstiness), size=n)
    gaps_s[0] = 0.0
    return np.round(np.cumsum(gaps_s) * 1e9).astype(np.int64)


def random_lengths(
    n: int, mean_len: int, range_ratio: float, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Uniform integer lengths in [mean·(1−r), mean·(1+r)], at least 1 (vLLM's
    ``--random-range-ratio`` convention)."""
    if mean_len < 1:
        raise FineserveError(f"random lengths must be >= 1, got {mean_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise FineserveError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean_len * (1 - range_ratio)))
    high = max(low, math.ceil(mean_len * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n, dtype=np.int64)
