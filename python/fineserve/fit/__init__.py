"""``fineserve fit``: workload parameters from a trace, in the files the generator reads.

Output layout (the layout ``--model-class`` resolves, FineServe's):

- ``Parametric/gamma/<name>_gamma_5min.csv`` (``_gamma_<W>s.csv`` for other windows):
  FineServe's ``gamma_shape,gamma_scale`` (scale in ms) plus window bounds, counts, CV,
  the per-window best model and the Weibull/Exponential alternatives;
- ``Parametric/nb/<name>_nb.json``: the micro-burst model (only when bursts are modelled);
- ``Parametric/lengths/<name>_lengths.json``: the joint length histogram and fitted laws;
- ``Parametric/prefix/<name>_prefix.json``: prefix sharing (``fit.prefix``), for traces
  with ``hash_ids``;
- ``Parametric/arrivals/<name>_arrivals.json``: the slot-process model (``fit.process``:
  per-window gap laws kept to each window's rate and CV, memory, per-window burst sizes,
  placement inside slots, the timestamps' resolution), which the generator prefers;
- ``<name>_fit.json``: everything above plus the fit quality, for scripts.

The timestamps' resolution is detected first (``fit.resolution``): a trace quantised to,
or on a lattice of, a period at least the slot is modelled in slots of that period with
the trace's placement inside them, so its ties are ticks, never micro-bursts.

Consistency with the generator: with micro-bursts modelled, the Gamma windows are fitted
on the *occupied slots* (the generator's events), not on requests, and each window's
scale is then corrected for events that the generator merges into one slot (two Gamma
events less than a slot apart land in the same slot and get one draw), so the generated
rate of occupied slots matches the trace's; the NB layer then restores the requests.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

from ..errors import FineserveError
from ..traces.base import Trace
from .arrivals import MIN_GAPS, WindowFit, fit_windows
from .bursts import (
    MIN_SLOTS,
    BurstFit,
    best_slot_phase_ns,
    fit_bursts,
    slot_counts,
)
from .lengths import LengthFit, fit_lengths
from .prefix import PrefixModel, fit_prefix
from .process import ArrivalModel, fit_arrival_model
from .resolution import Resolution, detect_resolution, lattice_phase_ns

BURST_MODES = ("auto", "on", "off")


@dataclass
class FitResult:
    name: str
    source: str
    n_requests: int
    span_s: float
    window_s: float
    slot_ms: float
    windows: WindowFit
    bursts: BurstFit | None
    lengths: LengthFit
    #: Why micro-bursts are (not) modelled, in words.
    burst_decision: str
    resolution: Resolution
    #: The slot-process model (what the generator uses by default).
    model: ArrivalModel
    #: Prefix sharing, for traces with ``hash_ids``.
    prefix: PrefixModel | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def _correct_for_slot_merging(windows: WindowFit, slot_ms: float, notes: list[str]) -> None:
    """Every family's scale, so whichever the generator uses keeps the slot rate."""
    fitted = np.isin(windows.model, ("gamma", "weibull", "exponential"))
    if not fitted.any():
        return
    target = windows.exponential_scale_ms[fitted]  # the mean event gap
    before = windows.gamma_scale_ms[fitted].copy()
    windows.gamma_scale_ms[fitted] = slot_merge_scale(
        windows.gamma_shape[fitted], before, target, slot_ms
    )
    windows.weibull_scale_ms[fitted] = slot_merge_scale(
        windows.weibull_shape[fitted], windows.weibull_scale_ms[fitted], target, slot_ms, "weibull"
    )
    windows.exponential_scale_ms[fitted] = slot_merge_scale(
        np.ones(int(fitted.sum())), target, target, slot_ms
    )
    change = float(np.median(windows.gamma_scale_ms[fitted] / before))
    notes.append(
        "scales corrected for events the generator merges into one slot "
        f"(median Gamma factor {change:.3f})"
    )


def gamma_file_name(name: str, window_s: float) -> str:
    suffix = "5min" if window_s == 300 else f"{window_s:g}s"
    return f"{name}_gamma_{suffix}.csv"


def slot_merge_scale(
    shape: npt.NDArray[np.float64],
    scale_ms: npt.NDArray[np.float64],
    target_gap_ms: npt.NDArray[np.float64],
    slot_ms: float,
    family: str = "gamma",
) -> npt.NDArray[np.float64]:
    """Scales for which the generator's mean gap between *occupied slots* equals
    ``target_gap_ms`` (the trace's), keeping each window's shape.

    An event at a uniform position inside its slot, followed by a gap g, opens a new slot
    with probability min(g/s, 1); so the mean gap between occupied slots is
    s·E[g] / E[min(g, s)]. For Gamma(k, θ): E[min(g, s)] = kθ·P(k+1, s/θ) + s·Q(k, s/θ);
    for Weibull(k, λ): E[min(g, s)] / E[g] = P(1/k, (s/λ)^k) (P, Q: regularised incomplete
    gamma). That gap grows monotonically with the scale, so each window is solved by
    bisection on log scale.
    """

    def slot_gap(theta: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        # scipy.special is untyped: its ufuncs give Any, hence the annotated results
        if family == "weibull":
            ratio: npt.NDArray[np.float64] = special.gammainc(1 / shape, (slot_ms / theta) ** shape)
            return slot_ms / np.maximum(ratio, 1e-300)
        x = slot_ms / theta
        e_min: npt.NDArray[np.float64] = shape * theta * special.gammainc(
            shape + 1, x
        ) + slot_ms * special.gammaincc(shape, x)
        return slot_ms * shape * theta / np.maximum(e_min, 1e-300)

    lo = np.log(scale_ms) - 30.0
    hi = np.log(scale_ms) + 5.0
    for _ in range(80):
        mid = (lo + hi) / 2
        too_sparse = slot_gap(np.exp(mid)) > target_gap_ms
        hi = np.where(too_sparse, mid, hi)
        lo = np.where(too_sparse, lo, mid)
    # A mean gap below one slot cannot be reached by merging slots: leave those as fitted.
    return np.where(target_gap_ms > slot_ms, np.exp(hi), scale_ms)


def fit_trace(
    trace: Trace,
    *,
    name: str,
    window_s: float = 300.0,
    slot_ms: float = 1.0,
    bursts: str = "auto",
    min_gaps: int = MIN_GAPS,
    prefix_block_size: int = 512,
) -> FitResult:
    if bursts not in BURST_MODES:
        raise FineserveError(f"--bursts must be one of {', '.join(BURST_MODES)}")
    if not (window_s > 0 and math.isfinite(window_s)):
        raise FineserveError("--window-seconds must be > 0")
    if not (slot_ms > 0 and math.isfinite(slot_ms)):
        raise FineserveError("--slot-ms must be > 0")
    if len(trace) < 2:
        raise FineserveError(f"{trace.path}: {len(trace)} usable requests; a fit needs at least 2")
    if trace.t_ns[-1] == trace.t_ns[0]:
        raise FineserveError(
            f"{trace.path}: all {len(trace)} requests have the same timestamp; there are no "
            "inter-arrival times to fit (check --timestamp-column / --timestamp-unit)"
        )
    resolution = detect_resolution(trace.t_ns + trace.origin_ns)
    coarse = resolution.kind != "continuous" and resolution.period_ms >= slot_ms
    # Shift by the grid phase that splits the fewest clusters (best_slot_phase_ns), so the
    # slots seen by the fit are the generator's slots.
    phase_ns = best_slot_phase_ns(trace.t_ns, slot_ms)
    t_ns = trace.t_ns + phase_ns
    _, counts = slot_counts(t_ns, slot_ms)
    multi = float((counts > 1).mean())
    burst_fit: BurstFit | None = None
    if bursts == "on" or (
        bursts == "auto" and multi > 0 and len(counts) >= MIN_SLOTS and not coarse
    ):
        if multi == 0:
            raise FineserveError(
                f"--bursts on: no {slot_ms:g} ms slot holds more than one request; nothing to fit"
            )
        burst_fit = fit_bursts(counts, slot_ms)
        decision = (
            f"modelled: {multi:.2%} of {len(counts)} occupied {slot_ms:g} ms slots hold more "
            "than one request"
        )
    elif bursts == "off":
        decision = "off (--bursts off)"
    elif coarse and multi > 0:
        decision = (
            f"not modelled: {resolution.describe()}; the {multi:.2%} of slots holding several "
            "requests are ties of that clock, which the arrival model keeps as ticks"
        )
    else:
        decision = (
            f"not modelled: {multi:.2%} of {len(counts)} occupied {slot_ms:g} ms slots hold more "
            f"than one request (auto needs one such slot among >= {MIN_SLOTS})"
        )
    model = _fit_model(trace, resolution, window_s, slot_ms, burst_fit, phase_ns, counts)
    notes: list[str] = [] if burst_fit is None else list(burst_fit.notes)
    if burst_fit is not None:
        # Events are the occupied slots, timed by their first request.
        event_ns = t_ns[np.concatenate([[0], np.cumsum(counts)[:-1]])]
        windows = fit_windows(event_ns, t_ns, window_s, min_gaps=min_gaps)
        _correct_for_slot_merging(windows, slot_ms, notes)
    else:
        windows = fit_windows(t_ns, t_ns, window_s, min_gaps=min_gaps)
    if windows.tied_gaps:
        notes.append(
            f"{windows.tied_gaps} gaps of 0 (tied timestamps) treated as {windows.tie_ms:g} ms, "
            "half the smallest positive gap"
        )
    lengths = fit_lengths(trace.input_len, trace.output_len)
    prefix = None
    if trace.hash_ids is not None and trace.hash_offsets is not None:
        prefix = fit_prefix(trace.input_len, trace.hash_ids, trace.hash_offsets, prefix_block_size)
    return FitResult(
        name=name,
        source=str(trace.path),
        n_requests=len(trace),
        span_s=trace.span_s,
        window_s=window_s,
        slot_ms=slot_ms,
        windows=windows,
        bursts=burst_fit,
        lengths=lengths,
        burst_decision=decision,
        resolution=resolution,
        model=model,
        prefix=prefix,
        notes=notes,
    )


def _fit_model(
    trace: Trace,
    resolution: Resolution,
    window_s: float,
    slot_ms: float,
    burst_fit: BurstFit | None,
    phase_ns: int,
    counts: npt.NDArray[np.int64],
) -> ArrivalModel:
    """The slot-process model, in slots of the trace's clock when that is coarser than
    ``slot_ms`` (with the grid on its ticks), else of ``slot_ms`` — the grid of
    ``fit_trace``'s own ``counts`` and ``burst_fit``, which it reuses."""
    abs_t = trace.t_ns + trace.origin_ns
    count_fit: BurstFit | None = None
    if resolution.kind == "continuous" or resolution.period_ms < slot_ms:
        model_slot_ms = slot_ms
        t_ns = trace.t_ns + phase_ns
        count_fit = burst_fit
    else:
        model_slot_ms = resolution.period_ms
        p = resolution.period_ns
        if resolution.kind == "lattice":
            t_ns = trace.t_ns + lattice_phase_ns(abs_t, trace.t_ns, p)
        else:
            # Relative times + the origin's phase are on the ticks.
            t_ns = trace.t_ns + int(trace.origin_ns % p)
        _, counts = slot_counts(t_ns, model_slot_ms)
    if count_fit is None and int(counts.max()) > 1:
        count_fit = fit_bursts(counts, model_slot_ms)
    return fit_arrival_model(
        t_ns, window_s=window_s, slot_ms=model_slot_ms, resolution=resolution, bursts=count_fit
    )


WINDOW_COLUMNS = (
    "window_start_ms",
    "window_end_ms",
    "gamma_shape",
    "gamma_scale",
    "n_requests",
    "n_events",
    "cv",
    "model",
    "ks_gamma",
    "ks_model",
    "weibull_shape",
    "weibull_scale",
    "exponential_scale",
    "loglik_gamma",
    "loglik_weibull",
    "loglik_exponential",
)


def write_fit(result: FitResult, out_dir: Path, *, command: str = "") -> dict[str, Path]:
    """Writes the parameter files; returns their paths by kind."""
    out_dir = Path(out_dir)
    gamma_path = out_dir / "Parametric" / "gamma" / gamma_file_name(result.name, result.window_s)
    nb_path = out_dir / "Parametric" / "nb" / f"{result.name}_nb.json"
    len_path = out_dir / "Parametric" / "lengths" / f"{result.name}_lengths.json"
    arrivals_path = out_dir / "Parametric" / "arrivals" / f"{result.name}_arrivals.json"
    prefix_path = out_dir / "Parametric" / "prefix" / f"{result.name}_prefix.json"
    summary_path = out_dir / f"{result.name}_fit.json"
    try:
        for p in (gamma_path, nb_path, len_path, arrivals_path, prefix_path):
            p.parent.mkdir(parents=True, exist_ok=True)
        w = result.windows
        with gamma_path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(WINDOW_COLUMNS)
            for i in range(len(w)):
                out.writerow(
                    [
                        _num(w.start_ms[i]),
                        _num(w.end_ms[i]),
                        _num(w.gamma_shape[i]),
                        _num(w.gamma_scale_ms[i]),
                        int(w.n_requests[i]),
                        int(w.n_events[i]),
                        _num(w.cv[i]),
                        w.model[i],
                        _num(w.ks_gamma[i]),
                        _num(w.ks_model[i]),
                        _num(w.weibull_shape[i]),
                        _num(w.weibull_scale_ms[i]),
                        _num(w.exponential_scale_ms[i]),
                        _num(w.loglik["gamma"][i]),
                        _num(w.loglik["weibull"][i]),
                        _num(w.loglik["exponential"][i]),
                    ]
                )
        files = {
            "gamma": gamma_path,
            "lengths": len_path,
            "arrivals": arrivals_path,
            "summary": summary_path,
        }
        meta = {"source": result.source, "fitted_by": "fineserve fit", "command": command}
        arrivals_path.write_text(json.dumps({**result.model.to_json(), **meta}) + "\n")
        if result.prefix is not None:
            prefix_path.write_text(json.dumps({**result.prefix.to_json(), **meta}) + "\n")
            files["prefix"] = prefix_path
        elif prefix_path.exists():
            # A stale prefix file would give this class another trace's sharing.
            prefix_path.unlink()
        if result.bursts is not None:
            nb_path.write_text(json.dumps({**result.bursts.to_json(), **meta}, indent=1) + "\n")
            files["nb"] = nb_path
        elif nb_path.exists():
            # A stale burst file from an earlier fit would silently re-enable bursts.
            nb_path.unlink()
        len_path.write_text(json.dumps({**result.lengths.to_json(), **meta}) + "\n")
        summary_path.write_text(json.dumps({**fit_summary(result), **meta}, indent=1) + "\n")
    except OSError as e:
        raise FineserveError(f"cannot write fit results under {out_dir}: {e.strerror}") from None
    result.files = files
    return files


def _num(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.10g}"


def fit_summary(r: FitResult) -> dict[str, Any]:
    w = r.windows
    fitted = np.isin(w.model, ("gamma", "weibull", "exponential"))
    models, model_counts = np.unique(w.model, return_counts=True)
    out: dict[str, Any] = {
        "name": r.name,
        "n_requests": r.n_requests,
        "span_s": r.span_s,
        "window_s": r.window_s,
        "windows": {
            "count": len(w),
            "models": {str(m): int(c) for m, c in zip(models, model_counts)},
            "ks_gamma_median": _finite_or_none(
                np.nanmedian(w.ks_gamma) if fitted.any() else math.nan
            ),
            "ks_gamma_p90": _finite_or_none(
                np.nanpercentile(w.ks_gamma, 90) if fitted.any() else math.nan
            ),
            "ks_all_gaps": _finite_or_none(w.ks_all),
            "ks_all_gaps_chosen_model": _finite_or_none(w.ks_all_model),
            "min_gaps_rule": (
                f"windows with < {MIN_GAPS} gaps: Exponential at the window's rate ('sparse'); "
                "with no event: shape 1, scale 1000 x window ('idle')"
            ),
        },
        "bursts": None if r.bursts is None else r.bursts.to_json(),
        "burst_decision": r.burst_decision,
        "resolution": r.resolution.to_json(),
        "arrival_model": model_summary(r.model),
        "prefix": None
        if r.prefix is None
        else {
            "block_size": r.prefix.block_size,
            "trace_hit_rate_theoretical": r.prefix.trace_hit_rate,
        },
        "lengths": {
            "fitted": r.lengths.params,
            "ks_stat": r.lengths.ks,
            "correlation": r.lengths.correlation,
        },
        "notes": r.notes,
    }
    return out


def model_summary(m: ArrivalModel) -> dict[str, Any]:
    w = m.windows
    return {
        "slot_ms": m.slot_ms,
        "windows": len(w),
        "busy_windows": int(np.count_nonzero(w.n_events)),
        "events": int(w.n_events.sum()),
        "requests": int(w.n_requests.sum()),
        "gap_laws": {
            "gamma": int(sum(1 for g, n in zip(w.gamma, w.n_events) if g is not None and n)),
            **{
                f"{k}-lognormal": int(
                    sum(
                        1
                        for c, g, n in zip(w.mixtures, w.gamma, w.n_events)
                        if len(c) == k and g is None and n
                    )
                )
                for k in (1, 2, 3)
            },
        },
        "memory": {
            "chosen": m.memory_choice
            or "none (neither the gaps' classes nor their ranks are significantly dependent)",
            "trial_acf_errors": m.memory_trial_errors,
            "weight": m.memory_weight,
            "rho": m.memory_rho,
            "class_chain": m.class_transition is not None,
        },
        "count_components": len(m.count_components),
        "placement": "on the ticks"
        if float(m.first_offset_q.max()) == 0 and float(m.member_fraction_q.max()) == 0
        else "learned offsets",
    }


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


__all__ = [
    "BURST_MODES",
    "FitResult",
    "fit_trace",
    "gamma_file_name",
    "model_summary",
    "write_fit",
]
