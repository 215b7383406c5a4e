"""Fit fidelity (issue 22): each shared trace is fitted, then generated from with several
seeds, and scored against the trace on the issue's targets — window-rate error median
(≤ 0.03), window-CV error median (≤ 0.05), requests-per-1-ms-slot KS (≤ 0.02), gap KS at
the trace's resolution (≤ 0.05), requests/s autocorrelation error at 1 s (≤ 0.05; 10 and
60 s shown) and, for traces with hash_ids, the theoretical prefix hit rate (±0.03).

Generators compared in the same run, from the same fit:
- ``model``: the slot-process model (``--parametric-arrivals auto``, the default);
- ``renewal``: the per-window renewal files (``--parametric-arrivals renewal``, the
  generator before this issue);
- ``poisson``: Poisson at each window's rate (baseline);
- ``gamma``: one Gamma law with the trace's global CV at each window's rate (baseline).

Speed: ``generate`` from the fit of a 5 M-request trace, against numpy drawing the same
number of Poisson arrivals (baseline, same run).

    python benches/bench_fidelity.py [--seeds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from fineserve.compare import per_second_acf, window_stats
from fineserve.config import ParametricConfig, WorkloadConfig
from fineserve.fit import fit_trace, write_fit
from fineserve.fit.bursts import best_slot_phase_ns, slot_counts
from fineserve.fit.resolution import quantise_ns
from fineserve.prompts.prefix import PrefixHitCounter
from fineserve.schedule import concat
from fineserve.traces import TraceOptions, load_trace
from fineserve.workloads.spec import build_workload

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TRACES = {
    "azure_code": SHARED / "azure" / "AzureLLMInferenceTrace_code.csv",
    "dense_30to100b": SHARED / "fineserve" / "replay" / "Dense_30to100B.csv",
    "mooncake_synthetic": SHARED / "mooncake" / "synthetic_trace.jsonl",
}
TARGETS = {
    "rate_err": 0.03,
    "cv_err": 0.05,
    "slot_ks": 0.02,
    "gap_ks": 0.05,
    "acf1_err": 0.05,
    "prefix_err": 0.03,
}


def score(
    real: Any, gen_t: np.ndarray, quantum_ns: int, window_s: float = 300.0
) -> dict[str, float]:
    t = real.t_ns
    g = np.sort(gen_t)
    if quantum_ns > 1:
        g = quantise_ns(g, quantum_ns)
    n_win = max(1, math.ceil(max(t[-1], g[-1]) / 1e9 / window_s))
    rr, cr = window_stats(t, window_s, n_win)
    rg, cg = window_stats(g, window_s, n_win)
    ok = rr > 0
    okc = np.isfinite(cr) & np.isfinite(cg) & (cr > 0)
    sr = slot_counts(t + best_slot_phase_ns(t))[1]
    sg = slot_counts(g + best_slot_phase_ns(g))[1]
    top = int(max(sr.max(), sg.max())) + 1
    cdf_r = np.cumsum(np.bincount(sr, minlength=top)) / len(sr)
    cdf_g = np.cumsum(np.bincount(sg, minlength=top)) / len(sg)
    out = {
        "rate_err": float(np.median(np.abs(rg[ok] - rr[ok]) / rr[ok])),
        "cv_err": float(np.median(np.abs(cg[okc] - cr[okc]) / cr[okc])),
        "slot_ks": float(np.max(np.abs(cdf_r - cdf_g))),
        "gap_ks": float(stats.ks_2samp(np.diff(t), np.diff(g)).statistic),
    }
    for lag in (1, 10, 60):
        out[f"acf{lag}_err"] = abs(per_second_acf(g, lag) - per_second_acf(t, lag))
    return out


def baselines(real: Any, seed: int, window_s: float = 300.0) -> dict[str, np.ndarray]:
    t = real.t_ns
    n_win = max(1, math.ceil(t[-1] / 1e9 / window_s))
    rate, _ = window_stats(t, window_s, n_win)
    gaps = np.diff(t).astype(np.float64)
    cv = float(gaps.std() / gaps.mean())
    rng = np.random.default_rng(seed)
    poisson, gamma = [], []
    for i, q in enumerate(rate):
        if q <= 0:
            continue
        start = i * window_s * 1e9
        # The last window ends with the trace: its requests, at their own rate.
        length_s = min(window_s, t[-1] / 1e9 - i * window_s)
        count = q * window_s
        poisson.append(start + np.sort(rng.random(rng.poisson(count))) * length_s * 1e9)
        k = 1 / cv**2
        per_s = count / length_s
        g = np.cumsum(rng.gamma(k, 1e9 / (per_s * k), int(count * 3) + 50))
        gamma.append(start + g[g < length_s * 1e9])
    return {
        "poisson": np.concatenate(poisson).astype(np.int64),
        "gamma": np.concatenate(gamma).astype(np.int64),
    }


def generate(out_dir: Path, name: str, span_s: float, seed: int, arrivals: str) -> Any:
    cfg = WorkloadConfig(
        mode="parametric",
        seed=seed,
        duration_s=span_s,
        parametric=ParametricConfig(model_classes=(name,), datasets_dir=out_dir, arrivals=arrivals),
    )
    return concat(list(build_workload(cfg).chunks))


def fidelity(seeds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, path in TRACES.items():
        if not path.is_file():
            print(f"{name}: {path} absent, skipped")
            continue
        trace = load_trace(path, TraceOptions())
        started = time.perf_counter()
        fit = fit_trace(trace, name=name)
        fit_s = time.perf_counter() - started
        res = fit.resolution
        quantum = res.period_ns if res.kind == "quantised" else 1
        per: dict[str, list[dict[str, float]]] = {
            k: [] for k in ("model", "renewal", "poisson", "gamma")
        }
        with tempfile.TemporaryDirectory() as tmp:
            write_fit(fit, Path(tmp))
            for seed in range(seeds):
                for arrivals in ("auto", "renewal"):
                    s = generate(Path(tmp), name, trace.span_s, seed, arrivals)
                    sc = score(trace, s.t_ns, quantum)
                    if fit.prefix is not None and s.hash_ids is not None:
                        c = PrefixHitCounter(fit.prefix.block_size)
                        c.add(s.input_len, s.hash_ids, s.hash_offsets)
                        sc["prefix_err"] = abs(c.rate - fit.prefix.trace_hit_rate)
                    per["model" if arrivals == "auto" else "renewal"].append(sc)
                for k, t in baselines(trace, seed).items():
                    per[k].append(score(trace, t, quantum))
        summary = {
            gen: {
                m: {
                    "median": float(np.median([r[m] for r in rows])),
                    "worst": float(np.max([r[m] for r in rows])),
                }
                for m in rows[0]
            }
            for gen, rows in per.items()
        }
        results[name] = {
            "requests": len(trace),
            "span_s": trace.span_s,
            "clock": res.describe(),
            "fit_s": fit_s,
            "memory": fit.model.memory_choice or "none (not significant)",
            "scores": summary,
        }
        print(
            f"\n{name}: {len(trace)} requests, {trace.span_s:.0f} s; {res.describe()}; "
            f"fit {fit_s:.2f} s; memory {results[name]['memory']}"
        )
        metrics = list(summary["model"])
        print(f"  {'generator':<9}" + "".join(f"{m:>19}" for m in metrics))
        for gen, by in summary.items():
            cells = []
            for m in metrics:
                if m not in by:
                    cells.append(f"{'-':>19}")
                    continue
                mark = ""
                if m in TARGETS:
                    mark = " ok" if by[m]["median"] <= TARGETS[m] else " --"
                cells.append(f"{by[m]['median']:>8.3f} ({by[m]['worst']:.3f}){mark:>3}")
            print(f"  {gen:<9}" + "".join(cells))
    return results


def speed(n: int) -> dict[str, Any]:
    """fit + generate of a 5 M-request trace; numpy Poisson draws as the baseline."""
    from fineserve.traces.base import Trace
    from fineserve.workloads.fitted import fitted_chunks

    rng = np.random.default_rng(0)
    gaps = rng.gamma(0.25, 4 * 17.0, n)  # ms: CV 2, ~58 req/s over a day
    t = (np.cumsum(gaps) * 1e6).astype(np.int64)
    t -= t[0]
    trace = Trace(Path("synthetic"), "x", t, np.ones(n, np.int64), np.ones(n, np.int64))
    started = time.perf_counter()
    fit = fit_trace(trace, name="big")
    fit_s = time.perf_counter() - started

    class Ones:
        def sample(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            return np.ones(k, np.int64), np.ones(k, np.int64)

    started = time.perf_counter()
    total = sum(len(c.t_ns) for c in fitted_chunks(fit.model, Ones(), np.random.default_rng(1)))  # type: ignore[arg-type]
    gen_s = time.perf_counter() - started
    started = time.perf_counter()
    base = np.cumsum(np.random.default_rng(2).exponential(17.0, total))
    base_s = time.perf_counter() - started
    del base
    out = {
        "requests": n,
        "fit_s": fit_s,
        "generated": total,
        "generate_req_per_s": total / gen_s,
        "numpy_poisson_req_per_s": total / base_s,
    }
    print(
        f"\nspeed: fit of {n} requests {fit_s:.2f} s (target <= 10 s); generate "
        f"{total / gen_s / 1e6:.2f} M req/s (target >= 1 M/s) vs numpy Poisson "
        f"{total / base_s / 1e6:.1f} M req/s"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--speed-requests", type=int, default=5_000_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {"fidelity": fidelity(args.seeds), "speed": speed(args.speed_requests)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
