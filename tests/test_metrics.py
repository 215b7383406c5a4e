"""Bucketed percentiles agree with numpy's linear percentiles within the bucket error,
also on small samples with a sparse tail (where nearest-rank would round up a sample)."""

from __future__ import annotations

import numpy as np
import pytest

from fineserve.metrics.histogram import LogHistogram
from fineserve.metrics.windows import _Windowed


@pytest.mark.parametrize("seed", range(5))
def test_log_histogram_percentiles_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    v = rng.lognormal(np.log(20e6), 0.8, int(rng.integers(20, 300)))
    h = LogHistogram()
    h.add(v)
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert h.percentile(q) == pytest.approx(np.percentile(v, q), rel=1e-3)
    assert h.mean == pytest.approx(v.mean(), rel=1e-12)
    assert h.std == pytest.approx(v.std(), rel=1e-9)


def test_window_percentiles_match_numpy_on_sparse_tails() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(20, 400))
        v = rng.lognormal(np.log(20e6), 0.5, n)
        w = _Windowed()
        w.add(np.zeros(n, np.int64), v)
        for q in (50, 90, 99):
            assert w.percentile_ms(0, q) == pytest.approx(np.percentile(v, q) / 1e6, rel=0.023)
