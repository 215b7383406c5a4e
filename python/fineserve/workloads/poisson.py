"""Poisson (and Gamma-burstiness) arrivals, with an optional linear or step rate ramp."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError
from ..schedule import Schedule
from .lengths import LengthSampler

CHUNK_ROWS = 65_536


def poisson_arrivals_ns(
    n: int,
    request_rate: float,
    rng: np.random.Generator,
    burstiness: float = 1.0,
    rates: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.int64]:
    """Absolute send offsets (ns) for ``n`` requests at ``request_rate`` req/s.

    Inter-arrival times are Gamma(shape=burstiness, scale=1/(rate·burstiness)): mean
    1/rate, CV 1/sqrt(burstiness); burstiness 1 is Poisson (vLLM's ``--burstiness``).
    ``rates`` (per request) overrides the constant rate (ramps). ``inf`` sends everything
    at t=0. The first request leaves at t=0.
    """
    if n < 0:
        raise FineserveError("--num-prompts must be >= 0")
    if rates is None and math.isinf(request_rate):
        return np.zeros(n, dtype=np.int64)
    if rates is None and not request_rate > 0:
        raise FineserveError(f"--request-rate must be > 0 or inf, got {request_rate}")
    if not burstiness > 0 or not math.isfinite(burstiness):
        raise FineserveError(f"--burstiness must be a positive number, got {burstiness}")
    r = np.full(n, request_rate) if rates is None else rates
    gaps_s = rng.gamma(burstiness, 1.0, size=n) / (r * burstiness)
    if n:
        gaps_s[0] = 0.0
    return np.round(np.cumsum(gaps_s) * 1e9).astype(np.int64)


def ramp_rates(
    n: int, strategy: str, start_rate: float, end_rate: float, steps: int
) -> npt.NDArray[np.float64]:
    """Per-request rates from ``start_rate`` to ``end_rate`` over the ``n`` requests
    (vLLM's ramp-up convention: the rate is a function of the request's index)."""
    for name, v in (("--ramp-start-rate", start_rate), ("--ramp-end-rate", end_rate)):
        if not (v > 0 and math.isfinite(v)):
            raise FineserveError(f"{name} must be a positive number, got {v}")
    frac = np.arange(n) / max(n - 1, 1)
    if strategy == "linear":
        return start_rate + (end_rate - start_rate) * frac
    if strategy == "step":
        if steps < 2:
            raise FineserveError("--ramp-steps must be >= 2")
        level = np.minimum(np.floor(frac * steps), steps - 1) / (steps - 1)
        return start_rate + (end_rate - start_rate) * level
    raise FineserveError(f"unknown ramp {strategy!r} (linear or step)")


def poisson_chunks(
    n: int,
    request_rate: float,
    lengths: LengthSampler,
    rng: np.random.Generator,
    *,
    burstiness: float = 1.0,
    ramp: tuple[str, float, float, int] | None = None,
) -> Iterator[Schedule]:
    """``n`` requests in chunks; the same seed gives the same schedule whatever is read."""
    rates = ramp_rates(n, *ramp) if ramp else None
    t_ns = poisson_arrivals_ns(n, request_rate, rng, burstiness, rates)
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(n, lo + CHUNK_ROWS)
        inp, out = lengths.sample(hi - lo, rng)
        yield Schedule(t_ns[lo:hi], inp, out)
