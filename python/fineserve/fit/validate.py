"""``fineserve fit --validate``: generate from the files just written and compare with the
trace, so a fit is judged by what the generator actually makes of it (the class's default
generator: the slot-process model). Generated times are floored to the trace's clock when
its timestamps are quantised (``compare``).

Thresholds — the issue's targets plus sampling noise (two-sample KS statistics get the
99.9 % critical value 1.95·√((n+m)/(n·m)) of the two sample sizes; a difference of two
autocorrelations over N seconds gets 2.5·√(2/N)):

- requests: |generated − real| / real ≤ 0.05;
- window rate, window by window: median |gen − real| / real ≤ 0.03;
- window CV of gaps, window by window: median |gen − real| / real ≤ 0.05;
- requests per occupied slot: KS ≤ 0.02 + noise;
- inter-arrival gaps (at the trace's resolution): KS ≤ 0.05 + noise;
- requests/s autocorrelation at 1, 10 and 60 s: |gen − real| ≤ 0.05 + noise;
- input and output lengths: KS ≤ 0.02 + noise;
- for a trace with ``hash_ids``: the theoretical prefix-cache hit rate within ±0.03.

A renewal fit of a bursty trace fails them (e.g. the Azure code trace's per-window
Weibull: gap KS ~0.2, ACF at 1 s 0.3 against 0.76) and the slot-process model passes
them (benches/bench_fidelity.py measures both on the shared traces).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..compare import ACF_LAGS_S, Arrivals, Comparison, compare_arrivals
from ..errors import FineserveError
from ..schedule import concat
from ..traces.base import Trace
from . import FitResult

PREFIX_ROW = "prefix hit rate, theoretical"
KS_NOISE_C = 1.95  # c(α) of the two-sample KS test at α = 0.001


def ks_noise(n: int, m: int) -> float:
    return KS_NOISE_C * math.sqrt((n + m) / (n * m)) if n and m else math.inf


def validate_fit(result: FitResult, trace: Trace, out_dir: Path, seed: int) -> Comparison:
    from ..config import ParametricConfig, WorkloadConfig
    from ..workloads.spec import build_workload

    cfg = WorkloadConfig(
        mode="parametric",
        seed=seed,
        duration_s=max(result.span_s, 1e-3),
        parametric=ParametricConfig(
            model_classes=(result.name,), datasets_dir=out_dir, window_s=result.window_s
        ),
    )
    workload = build_workload(cfg)
    generated = concat(list(workload.chunks))
    if len(generated) < 2:
        raise FineserveError(
            f"--validate: the fitted parameters generated {len(generated)} requests over the "
            f"trace's {result.span_s:.3f} s; too few to compare"
        )
    name = f"generated from {result.name} (seed {seed})"
    # Generated times stay on the generator's own clock: its slot grid starts at 0, and
    # shifting them would split bursts across slot boundaries.
    gen = Arrivals(name, generated.t_ns, generated.input_len, generated.output_len)
    real = Arrivals(
        Path(result.source).name,
        trace.t_ns,
        trace.input_len,
        trace.output_len,
        origin_ns=trace.origin_ns,
    )

    comparison = compare_arrivals(real, gen, window_s=result.window_s, slot_ms=result.slot_ms)
    if result.prefix is not None and generated.hash_ids is not None:
        from ..compare import Row
        from ..prompts.prefix import PrefixHitCounter

        assert generated.hash_offsets is not None
        counter = PrefixHitCounter(result.prefix.block_size)
        counter.add(generated.input_len, generated.hash_ids, generated.hash_offsets)
        comparison.rows.append(
            Row(PREFIX_ROW, result.prefix.trace_hit_rate, counter.rate, check="diff")
        )
    return judge(comparison)


def judge(comparison: Comparison) -> Comparison:
    """Sets the thresholds of the module's docstring on a comparison's rows (in place)."""
    slots_r, slots_g = (len(comparison.series[k]) for k in ("slots_real", "slots_gen"))
    n, m = len(comparison.real.t_ns), len(comparison.generated.t_ns)
    acf_noise = 2.5 * math.sqrt(2 / max(comparison.seconds, 1))
    thresholds = {
        "requests": 0.05,
        "window rate error, median": 0.03,
        "window CV error, median": 0.05,
        "requests per occupied slot": 0.02 + ks_noise(slots_r, slots_g),
        "inter-arrival gap (ms)": 0.05 + ks_noise(n - 1, m - 1),
        "input length": 0.02 + ks_noise(n, m),
        "output length": 0.02 + ks_noise(n, m),
    }
    for lag in ACF_LAGS_S:
        thresholds[f"requests/s ACF at {lag} s"] = 0.05 + acf_noise
    thresholds[PREFIX_ROW] = 0.03
    for row in comparison.rows:
        if row.metric in thresholds:
            row.threshold = thresholds[row.metric]
    return comparison
