"""Capacity search (ServeGen's and BurstGPT's provisioning use case): the highest load at
which a workload still meets its SLOs.

A load is a request rate (``poisson``) or a time scale (any other mode); each probe runs
the workload at that load and checks the SLO percentiles plus a failure-rate ceiling.
A probe also fails when the server did not sustain the offered rate (completions per
second during the schedule, see :class:`~fineserve.metrics.fidelity.SustainedRate`, below
``min_sustained`` of the offered rate): a probe too short for the queue to push latency
past an SLO still shows an overloaded server that way.
The search brackets first (doubling up from the starting load while it passes, halving
down while it fails), then bisects the bracket until it is narrower than the tolerance.
It assumes latency grows with load, as it does for a server past its capacity; a noisy
probe near the knee can mislead bisection by one step, which the table makes visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FineserveError

SLO_METRICS = ("ttft", "tpot", "itl", "e2el")
#: The sweep's unit when the load is a Poisson request rate.
RATE_UNIT = "req/s"


@dataclass(frozen=True)
class Slo:
    metric: str
    percentile: float
    limit_ms: float

    @property
    def key(self) -> str:
        return f"p{self.percentile:g}_{self.metric}_ms"

    def __str__(self) -> str:
        return f"P{self.percentile:g} {self.metric.upper()} <= {self.limit_ms:g} ms"


def parse_slo(text: str) -> Slo:
    """``ttft:p99:2250`` (metric, percentile, ms)."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in SLO_METRICS or not parts[1].lower().startswith("p"):
        raise FineserveError(
            f"--slo {text!r}: expected METRIC:pPERCENTILE:MS, e.g. ttft:p99:2250 "
            f"(metrics: {', '.join(SLO_METRICS)})"
        )
    try:
        q, ms = float(parts[1][1:]), float(parts[2])
    except ValueError:
        raise FineserveError(f"--slo {text!r}: percentile and limit must be numbers") from None
    if not (0 < q < 100 and ms > 0):
        raise FineserveError(f"--slo {text!r}: need 0 < percentile < 100 and a limit > 0 ms")
    return Slo(parts[0], q, ms)


@dataclass
class Probe:
    load: float
    metrics: dict[str, Any]
    passed: bool
    why: str
    #: Each run's verdict when the probe was repeated (``--sweep-repeats``).
    trials: list[bool] = field(default_factory=list)

    def sustained_load(self, unit: str) -> float:
        """What one instance is shown to carry: for a request rate, the rate the server
        sustained (the measured one: a seeded Poisson draw offers somewhat more or less
        than its nominal rate); for a time scale, the scale times the share of the
        offered rate that was sustained (at most the scale)."""
        m = self.metrics
        if unit == RATE_UNIT and m.get("sustained_request_rate"):
            return float(min(m["sustained_request_rate"], m["offered_request_rate"]))
        fraction = m.get("sustained_fraction")
        return self.load * min(1.0, fraction) if fraction else self.load


@dataclass
class SweepResult:
    unit: str
    slos: list[Slo]
    max_failure_rate: float
    min_sustained: float = 0.0
    probes: list[Probe] = field(default_factory=list)

    @property
    def best(self) -> Probe | None:
        ok = [p for p in self.probes if p.passed]
        return max(ok, key=lambda p: p.load) if ok else None

    def instances_for(self, target_load: float) -> int | None:
        best = self.best
        if best is None or best.sustained_load(self.unit) <= 0:
            return None
        return math.ceil(target_load / best.sustained_load(self.unit))


def judge(
    metrics: dict[str, Any], slos: list[Slo], max_failure_rate: float, min_sustained: float = 0.0
) -> tuple[bool, str]:
    sent = metrics["completed"] + metrics["failed"]
    if not metrics["completed"]:
        return False, "no request succeeded"
    fail_rate = metrics["failed"] / sent if sent else 1.0
    misses = []
    if fail_rate > max_failure_rate:
        misses.append(f"failures {100 * fail_rate:.1f}% > {100 * max_failure_rate:g}%")
    sustained = metrics.get("sustained_fraction")
    if min_sustained > 0 and sustained is not None and sustained < min_sustained:
        misses.append(
            f"sustained {metrics['sustained_request_rate']:.1f} of "
            f"{metrics['offered_request_rate']:.1f} req/s offered"
        )
    for s in slos:
        v = metrics.get(s.key)
        if v is None or not v <= s.limit_ms:
            misses.append(f"{s.key} {v:.1f} > {s.limit_ms:g}" if v is not None else s.key)
    return not misses, "; ".join(misses) or "meets every SLO"


def search(
    probe: Callable[[float], dict[str, Any]],
    start: float,
    slos: list[Slo],
    *,
    unit: str,
    max_failure_rate: float = 0.01,
    min_sustained: float = 0.0,
    rel_tolerance: float = 0.05,
    max_probes: int = 14,
    log: Callable[[Probe], None] | None = None,
    repeats: int = 1,
) -> SweepResult:
    """Brackets the boundary (doubling or halving one run at a time), then bisects it,
    each bisection probe run ``repeats`` times: a load passes when most of its runs do."""
    if not (start > 0 and math.isfinite(start)):
        raise FineserveError("the sweep's starting load must be a positive number")
    result = SweepResult(unit, slos, max_failure_rate, min_sustained)

    def run(load: float, times: int = 1) -> bool:
        trials: list[bool] = []
        for _ in range(times):
            m = probe(load)
            ok, why = judge(m, slos, max_failure_rate, min_sustained)
            trials.append(ok)
        ok = 2 * sum(trials) > len(trials)
        if times > 1:
            why = f"{sum(trials)} of {times} runs passed; the last: {why}"
        p = Probe(load, m, ok, why, trials if times > 1 else [])
        result.probes.append(p)
        if log:
            log(p)
        return ok

    lo: float | None = None  # highest passing load
    hi: float | None = None  # lowest failing load
    load = start
    while len(result.probes) < max_probes:
        if run(load):
            lo = load
            if hi is not None:
                break
            load *= 2
        else:
            hi = load
            if lo is not None:
                break
            load /= 2
    while lo is not None and hi is not None and len(result.probes) < max_probes:
        if (hi - lo) / lo <= rel_tolerance:
            break
        mid = (lo + hi) / 2
        if run(mid, repeats):
            lo = mid
        else:
            hi = mid
    return result


def sweep_json(r: SweepResult, target_load: float | None) -> dict[str, Any]:
    best = r.best
    return {
        "unit": r.unit,
        "slos": [
            {"metric": s.metric, "percentile": s.percentile, "limit_ms": s.limit_ms} for s in r.slos
        ],
        "max_failure_rate": r.max_failure_rate,
        "min_sustained_fraction": r.min_sustained,
        "best_load": best.load if best else None,
        "best_sustained_load": best.sustained_load(r.unit) if best else None,
        "best_offered_rps": best.metrics.get("offered_request_rate") if best else None,
        "best_sustained_rps": best.metrics.get("sustained_request_rate") if best else None,
        "best_achieved_rps": best.metrics["request_throughput"] if best else None,
        "target_load": target_load,
        "instances": r.instances_for(target_load) if target_load else None,
        "probes": [
            {
                "load": p.load,
                "passed": p.passed,
                "why": p.why,
                **({"trials": p.trials} if p.trials else {}),
                "metrics": {k: v for k, v in p.metrics.items() if not isinstance(v, (list, dict))},
            }
            for p in sorted(r.probes, key=lambda p: p.load)
        ],
    }


def plot_sweep(r: SweepResult, path: Path) -> Path:
    from . import plotting

    probes = sorted(r.probes, key=lambda p: p.load)
    fig, ax = plotting.figure(1, len(r.slos) + 1, (5 * (len(r.slos) + 1), 3.8))
    for a, s in zip(ax[0], r.slos):
        x = [p.load for p in probes]
        a.plot(x, [p.metrics.get(s.key, math.nan) for p in probes], "o-", label=s.key)
        a.axhline(s.limit_ms, color="tab:red", ls="--", label=f"SLO {s.limit_ms:g} ms")
        if r.best:
            a.axvline(r.best.load, color="tab:green", ls=":", label=f"best {r.best.load:.3g}")
        a.set(xlabel=r.unit, ylabel="ms", yscale="log", title=str(s))
        a.grid(alpha=0.3)
        plotting.legend(a)
    # What the server kept up with, against what was offered.
    a = ax[0, -1]
    x = [p.load for p in probes]
    offered = [p.metrics.get("offered_request_rate") or math.nan for p in probes]
    a.plot(x, offered, "o-", label="offered")
    a.plot(x, [p.metrics.get("sustained_request_rate") or math.nan for p in probes], "x-",
           label="sustained")  # fmt: skip
    if r.min_sustained:
        a.plot(x, [r.min_sustained * o for o in offered], ":", color="tab:red",
               label=f"{100 * r.min_sustained:g} % of offered")  # fmt: skip
    if r.best:
        a.axvline(r.best.load, color="tab:green", ls=":", label=f"best {r.best.load:.3g}")
    a.set(xlabel=r.unit, ylabel="req/s", title="offered vs sustained rate")
    a.grid(alpha=0.3)
    plotting.legend(a)
    fig.tight_layout()
    return plotting.save(fig, path)


@dataclass(frozen=True)
class SweepConfig:
    """What a capacity sweep searches for, and how."""

    slos: tuple[Slo, ...]
    #: rate (a Poisson request rate) or time-scale (any other mode); auto picks by mode.
    scale: str = "auto"
    start_load: float | None = None
    step_seconds: float = 10.0
    max_failure_rate: float = 0.01
    min_sustained: float = 0.9
    tolerance: float = 0.05
    max_probes: int = 14
    target_load: float | None = None
    #: Runs of each bisection probe (near the boundary); the majority decides.
    repeats: int = 1

    def __post_init__(self) -> None:
        if not (self.step_seconds > 0 and 0 <= self.max_failure_rate < 1 and self.tolerance > 0):
            raise FineserveError(
                "--step-seconds and --tolerance must be > 0, --max-failure-rate in [0, 1)"
            )


def resolve_scale(wl: Any, scale: str) -> str:
    """``rate`` (a Poisson request rate) or ``time-scale`` (any other mode) for ``auto``."""
    mode = "schedule" if wl.schedule is not None else wl.mode
    if scale == "auto":
        scale = "rate" if mode == "poisson" else "time-scale"
    if scale == "rate" and mode != "poisson":
        raise FineserveError("--scale rate needs --mode poisson; use --scale time-scale")
    return scale


def run_sweep(
    blast_cfg: Any,
    cfg: SweepConfig,
    bases: list[str],
    log: Callable[[Probe], None],
) -> SweepResult:
    """Probes ``blast_cfg``'s workload at rising (then bisected) loads against ``bases``:
    each probe is one quiet blast run without result files, warm-up only before the
    first."""
    import dataclasses

    from .blast import run_blast

    wl = blast_cfg.workload
    scale = resolve_scale(wl, cfg.scale)
    if scale == "rate":
        start = cfg.start_load or (wl.finite_rate or 10.0)
    else:
        start = cfg.start_load or wl.time_scale or 1.0
    span = wl.duration_s or cfg.step_seconds * start
    base = dataclasses.replace(
        blast_cfg,
        output=dataclasses.replace(
            blast_cfg.output,
            output_file=None,
            save_result=False,
            save_requests=None,
            show_progress=False,
        ),
        metrics=blast_cfg.metrics.with_slo_percentiles(
            tuple(s.metric for s in cfg.slos), tuple(s.percentile for s in cfg.slos)
        ),
    )
    probes_done = 0

    def probe(load: float) -> dict[str, Any]:
        nonlocal probes_done
        if scale == "rate":
            workload = dataclasses.replace(
                wl, request_rate=load, num_prompts=max(20, round(load * cfg.step_seconds))
            )
        else:
            workload = dataclasses.replace(wl, time_scale=load, duration_s=span)
        engine = base.engine
        if probes_done:
            engine = dataclasses.replace(engine, warmup_requests=0)
        step = dataclasses.replace(base, workload=workload, engine=engine)
        probes_done += 1
        run = run_blast(step, bases, quiet=probes_done > 1)
        if run.interrupted:
            raise KeyboardInterrupt
        return run.metrics

    return search(
        probe,
        start,
        list(cfg.slos),
        unit=RATE_UNIT if scale == "rate" else "time scale",
        max_failure_rate=cfg.max_failure_rate,
        min_sustained=cfg.min_sustained,
        rel_tolerance=cfg.tolerance,
        max_probes=cfg.max_probes,
        log=log,
        repeats=cfg.repeats,
    )
