"""``fineserve fit --validate``: generate from the files just written and compare with the
trace, so a fit is judged by what the generator actually makes of it.

Thresholds (two-sample KS statistics allow for sampling noise: the tolerance is a model
error plus the 99.9 % critical value 1.95·√((n+m)/(n·m)) of the two sample sizes):

- requests: |generated − real| / real ≤ 0.10;
- per-window rate, window by window: Σ|gen − real| / Σ real ≤ 0.25 (a Gamma window with
  shape < 1 has a count variance well above Poisson's, so short windows differ a lot);
- requests per occupied slot: KS ≤ 0.02 + noise;
- inter-arrival gaps: KS ≤ (the fit's own KS of all gaps through their window's chosen
  model's CDF) +
  0.08 + noise — the generator should be as good as the model, and no model is better
  than its fit (the margin covers the difference between that per-window measure and the
  pooled gap distribution compared here: up to 0.06 on the traces in ../shared/data);
- input and output lengths: KS ≤ 0.02 + noise.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..compare import Arrivals, Comparison, compare_arrivals
from ..errors import FineserveError
from ..schedule import concat
from ..traces.base import Trace
from . import FitResult

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
    real = Arrivals(Path(result.source).name, trace.t_ns, trace.input_len, trace.output_len)

    comparison = compare_arrivals(real, gen, window_s=result.window_s, slot_ms=result.slot_ms)
    slots_r, slots_g = (len(comparison.series[k]) for k in ("slots_real", "slots_gen"))
    n, m = len(real.t_ns), len(gen.t_ns)
    # The generator uses the family chosen per window, so its fit is the yardstick.
    ks_model = result.windows.ks_all_model
    fit_gap_ks = ks_model if math.isfinite(ks_model) else 0.0
    thresholds = {
        "requests": 0.10,
        "window rate, aligned": 0.25,
        "requests per occupied slot": 0.02 + ks_noise(slots_r, slots_g),
        "inter-arrival gap (ms)": fit_gap_ks + 0.08 + ks_noise(n - 1, m - 1),
        "input length": 0.02 + ks_noise(n, m),
        "output length": 0.02 + ks_noise(n, m),
    }
    for row in comparison.rows:
        if row.metric in thresholds:
            row.threshold = thresholds[row.metric]
    return comparison
