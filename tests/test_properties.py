"""Property-based checks (hypothesis) of the schedule builders and the JSONL reader: for
any valid parameters a schedule is sorted, non-negative, of the asked size and within its
length bounds; any invalid parameter is a one-line error; every JSONL line is used or
counted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineserve.errors import FineserveError
from fineserve.schedule import concat
from fineserve.traces import TraceOptions, load_trace
from fineserve.workloads import RandomLengths, poisson_chunks
from fineserve.workloads.parametric import GammaWindows, NegBinom, parametric_chunks

LENGTHS = RandomLengths(100, 10, 0.5)
positive = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    rate=st.one_of(st.floats(0.01, 1e6), st.just(math.inf)),
    burstiness=st.floats(0.05, 20),
    input_len=st.integers(1, 5000),
    ratio=st.floats(0, 0.99),
    seed=st.integers(0, 2**32 - 1),
)
def test_poisson_schedule_is_sorted_sized_and_bounded(
    n: int, rate: float, burstiness: float, input_len: int, ratio: float, seed: int
) -> None:
    lengths = RandomLengths(input_len, 16, ratio)
    s = concat(
        list(poisson_chunks(n, rate, lengths, np.random.default_rng(seed), burstiness=burstiness))
    )
    assert len(s.t_ns) == n and s.t_ns[0] == 0
    assert np.all(np.diff(s.t_ns) >= 0)
    lo = max(1, math.floor(input_len * (1 - ratio)))
    hi = max(lo, math.ceil(input_len * (1 + ratio)))
    assert s.input_len.min() >= lo and s.input_len.max() <= hi
    assert s.output_len.min() >= 1


@settings(max_examples=40, deadline=None)
@given(
    windows=st.lists(st.tuples(st.floats(0.05, 20), st.floats(0.05, 2000)), min_size=1, max_size=4),
    window_s=st.floats(0.5, 20),
    nb=st.one_of(st.none(), st.tuples(st.floats(0.05, 20), st.floats(0.01, 10))),
    time_scale=st.floats(0.1, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_parametric_schedule_is_sorted_and_inside_its_windows(
    windows: list[tuple[float, float]],
    window_s: float,
    nb: tuple[float, float] | None,
    time_scale: float,
    seed: int,
) -> None:
    k = len(windows)
    start = np.arange(k) * window_s * 1e3
    w = GammaWindows(
        start,
        start + window_s * 1e3,
        np.array([x[0] for x in windows]),
        np.array([x[1] for x in windows]),
    )
    chunks = parametric_chunks(
        w,
        LENGTHS,
        np.random.default_rng(seed),
        nb=NegBinom(*nb) if nb else None,
        time_scale=time_scale,
        max_requests=20_000,
    )
    s = concat(list(chunks))
    if not len(s.t_ns):
        return
    assert np.all(np.diff(s.t_ns) >= 0) and s.t_ns[0] >= 0
    span_ns = k * window_s * 1e9 / time_scale
    assert s.t_ns[-1] <= span_ns + 1e6  # within the windows (1 ms slot rounding)
    assert len(s.t_ns) <= 20_000


@pytest.mark.parametrize(
    ("shape", "scale"), [(0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (1.0, 0.0), (1.0, math.inf)]
)
def test_invalid_gamma_windows_are_one_line_errors(shape: float, scale: float) -> None:
    with pytest.raises(FineserveError, match="gamma_s"):
        GammaWindows(np.array([0.0]), np.array([1e3]), np.array([shape]), np.array([scale]))


@pytest.mark.parametrize(("mu", "alpha"), [(0, 1), (-1, 1), (math.nan, 1), (1, 0), (1, math.inf)])
def test_invalid_nb_parameters_are_one_line_errors(mu: float, alpha: float) -> None:
    with pytest.raises(FineserveError, match="nb_"):
        NegBinom(mu, alpha)


json_value = st.one_of(
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 9), max_size=3),
)
json_line = st.one_of(
    st.fixed_dictionaries(
        {"timestamp": json_value, "input_length": json_value, "output_length": json_value},
        optional={"hash_ids": json_value},
    ),
    st.text(max_size=20),  # not JSON, or JSON that is not an object
)


@pytest.mark.slow
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(json_line, min_size=1, max_size=30))
def test_every_jsonl_line_is_used_or_counted(tmp_path: Path, lines: list) -> None:
    p = tmp_path / "t.jsonl"
    text = [json.dumps(x) if isinstance(x, dict) else x.replace("\n", " ") for x in lines]
    p.write_text("".join(t + "\n" for t in text))
    counted = sum(1 for t in text if t.strip())
    try:
        t = load_trace(p, TraceOptions(trace_format="mooncake"))
    except FineserveError as e:
        assert "\n" not in str(e)
        return
    assert len(t) + sum(t.skipped.values()) == counted
    assert np.all(np.diff(t.t_ns) >= 0) and np.all(t.input_len >= 1)
