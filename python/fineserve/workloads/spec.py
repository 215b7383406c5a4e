"""From command-line options to a workload: a chunk iterator plus what describes it."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError
from ..metrics.windows import add_counts
from ..schedule import Schedule, ScheduleSlice, read_schedule
from ..traces import TraceOptions, load_trace
from .burstgpt import burstgpt_chunks, fit_burstgpt, load_burstgpt_params
from .lengths import EmpiricalLengths, HistogramLengths, LengthSampler, RandomLengths
from .mix import label, merge_streams
from .parametric import (
    ClassFiles,
    NegBinom,
    load_gamma_windows,
    load_nb_json,
    parametric_chunks,
    resolve_class_files,
)
from .poisson import poisson_chunks
from .replay import replay_chunks, replay_slice
from .servegen import load_client_pool, servegen_chunks

MODES = ("poisson", "replay", "parametric", "servegen", "burstgpt")


@dataclass
class WorkloadPlan:
    """What a run will send, known before it starts: the plan line and the progress bar."""

    requests: int
    #: Send offset of the last request, in wall seconds (after time scaling).
    span_s: float
    #: Most requests scheduled in any one second of the run.
    peak_per_s: int
    #: False when counting stopped at its time budget: the figures are lower bounds.
    complete: bool = True

    @property
    def mean_rps(self) -> float:
        return self.requests / self.span_s if self.span_s > 0 else float("inf")

    def describe(self) -> str:
        more = "" if self.complete else "at least "
        if self.span_s <= 0:
            return f"{self.requests:,} requests, all at once"
        return (
            f"{more}{self.requests:,} requests over {more}{format_duration(self.span_s)} "
            f"(mean {self.mean_rps:.1f} req/s, peak {self.peak_per_s:,} in one second)"
        )


def plan_from_send_times(
    times: Iterator[npt.NDArray[np.int64]], budget_s: float = 10.0
) -> WorkloadPlan:
    """Counts a schedule's requests, span and busiest second from its send times, chunk by
    chunk (bounded memory); stops after ``budget_s`` of counting (then a lower bound)."""
    started = time.monotonic()
    count, last = 0, 0
    per_s = np.zeros(0, np.int64)
    complete = True
    for t in times:
        if not len(t):
            continue
        count += len(t)
        last = max(last, int(t[-1]))
        per_s = add_counts(per_s, np.asarray(t, np.int64) // 1_000_000_000)
        if time.monotonic() - started > budget_s:
            complete = False
            break
    return WorkloadPlan(count, last / 1e9, int(per_s.max(initial=0)), complete)


def format_duration(seconds: float) -> str:
    """``75`` → "1 min 15 s", ``8640`` → "2 h 24 min"."""
    s = max(seconds, 0.0)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    if s < 86_400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{int(s // 86_400)} d {int(s % 86_400 // 3600)} h"


@dataclass
class Workload:
    chunks: Iterator[Schedule]
    #: Number of requests when known before generating (poisson, replay, a schedule file).
    total: int | None
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: What the run will send, where it is known without generating (replay, a schedule
    #: file); otherwise counted by :func:`plan_workload`.
    plan: WorkloadPlan | None = None


def plan_workload(o: dict[str, Any], seed: int, workload: Workload) -> WorkloadPlan:
    """The workload's plan: its own, or counted over a second, identical generation (same
    options and seed give the same schedule), so the run itself is unchanged."""
    if workload.plan is not None:
        return workload.plan
    again = build_workload(o, seed)
    return plan_from_send_times(c.t_ns for c in again.chunks)


def build_workload(o: dict[str, Any], seed: int) -> Workload:
    """``o`` holds the workload options of ``generate``/``blast`` (click's names)."""
    if o.get("schedule"):
        return _schedule_file(o)
    mode = o["mode"]
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {"mode": mode, "seed": seed}
    notes: list[str] = []
    time_scale = o.get("time_scale") or 1.0
    duration = o.get("duration")
    cap = o.get("num_prompts")

    if mode == "poisson":
        n = cap if cap is not None else 100
        ramp = None
        if o.get("ramp"):
            ramp = (o["ramp"], o["ramp_start_rate"], o["ramp_end_rate"], o["ramp_steps"])
        info.update(request_rate=o["request_rate"], burstiness=o["burstiness"], ramp=o.get("ramp"))
        chunks = poisson_chunks(
            n, o["request_rate"], _lengths(o, notes), rng, burstiness=o["burstiness"], ramp=ramp
        )
        return Workload(chunks, n, info, notes)

    if mode == "replay":
        path = o.get("trace") or o.get("request_trace_csv")
        if not path:
            raise FineserveError("--mode replay needs --request-trace-csv or --trace")
        trace = load_trace(Path(path), trace_options_from(o))
        notes.append(trace.skip_summary())
        notes.extend(trace.notes)
        info.update(
            trace=str(path),
            trace_format=trace.format,
            time_scale=time_scale,
            skipped=dict(trace.skipped),
        )
        start_s = o.get("start") or 0.0
        lo, hi = replay_slice(trace, start_s, duration, cap)
        chunks = replay_chunks(
            trace, time_scale=time_scale, start_s=start_s, duration_s=duration, max_requests=cap
        )
        sent_at = np.rint((trace.t_ns[lo:hi] - round(start_s * 1e9)) / time_scale)
        plan = plan_from_send_times(iter([sent_at.astype(np.int64)]))
        return Workload(chunks, hi - lo, info, notes, plan)

    if mode == "parametric":
        return _parametric(o, rng, info, notes, time_scale, duration, cap)

    if mode == "servegen":
        if not o.get("servegen_pool"):
            raise FineserveError("--mode servegen needs --servegen-pool DIR")
        clients = None
        if o.get("servegen_clients"):
            try:
                clients = [int(x) for x in o["servegen_clients"].split(",") if x.strip()]
            except ValueError:
                raise FineserveError("--servegen-clients takes ids like 0,1,5") from None
        pool = load_client_pool(Path(o["servegen_pool"]), clients)
        rate = o["request_rate"] if math.isfinite(o["request_rate"]) else None
        start_s = o.get("start") or 0.0
        start_given = "start" in o.get("_workload_given", ())
        end_s = pool.span_s if duration is None else start_s + duration
        # Without --start, idle time before the first request is skipped, so --duration
        # counts from where traffic starts.
        first_active = pool.first_active_s(start_s, end_s if start_given else pool.span_s)
        if first_active is None:
            raise FineserveError(
                f"{pool.path}: no client sends between {start_s:g} s and {end_s:g} s"
            )
        if first_active > start_s:
            if start_given:
                notes.append(
                    f"ServeGen pool: idle from --start {start_s:g} s until {first_active:g} s "
                    f"(the first request leaves {(first_active - start_s) / time_scale:.0f} s "
                    "into the run)"
                )
            else:
                notes.append(
                    f"ServeGen pool: no client sends before {first_active:g} s; the run "
                    "starts there (--start to choose another point)"
                )
                start_s = first_active
                end_s = pool.span_s if duration is None else start_s + duration
        active = pool.active_s(start_s, end_s)
        if active < end_s - start_s:
            notes.append(
                f"ServeGen pool: clients send during {active:g} of the span's "
                f"{end_s - start_s:g} s; --request-rate is the mean while traffic flows"
            )
        no_input = pool.clients_without("input_tokens", "text_tokens")
        no_output = pool.clients_without("output_tokens")
        if no_input or no_output:
            notes.append(
                f"ServeGen pool: clients without length PDFs use --random-input-len "
                f"{o['random_input_len']} (clients {no_input or 'none'}) and "
                f"--random-output-len {o['random_output_len']} (clients {no_output or 'none'})"
            )
        info.update(
            servegen_pool=str(pool.path),
            clients=[c.client_id for c in pool.clients],
            request_rate=rate,
            request_rate_over="active windows",
            rate_scale=o.get("rate_scale"),
            start_s=start_s,
        )
        chunks = servegen_chunks(
            pool,
            rng,
            request_rate=rate,
            rate_scale=o.get("rate_scale") or 1.0,
            start_s=start_s,
            duration_s=end_s - start_s,
            time_scale=time_scale,
            default_input_len=o["random_input_len"],
            default_output_len=o["random_output_len"],
        )
        return Workload(_capped(chunks, cap), None, info, notes)

    if mode == "burstgpt":
        if o.get("burstgpt_params"):
            params = load_burstgpt_params(Path(o["burstgpt_params"]))
        elif o.get("trace") or o.get("request_trace_csv"):
            opts = trace_options_from(o)
            opts.trace_format = opts.trace_format or "burstgpt"
            trace = load_trace(Path(o.get("trace") or o["request_trace_csv"]), opts)
            notes.append(trace.skip_summary())
            params = fit_burstgpt(trace)
            notes.append(
                f"fitted BurstGPT model: {sum(w['alpha'] > 0 for w in params['windows'])} "
                f"active 20-min windows, Zipf a = {params['input_zipf_a']:.3f} (input), "
                f"{params['output_zipf_a']:.3f} (output)"
            )
        else:
            raise FineserveError("--mode burstgpt needs --burstgpt-params or --trace BurstGPT.csv")
        rate = o["request_rate"] if math.isfinite(o["request_rate"]) else None
        info.update(request_rate=rate, rate_scale=o.get("rate_scale"), time_scale=time_scale)
        chunks = burstgpt_chunks(
            params,
            rng,
            rate_scale=o.get("rate_scale") or 1.0,
            request_rate=rate,
            time_scale=time_scale,
            duration_s=duration,
        )
        return Workload(_capped(chunks, cap), None, info, notes)

    raise FineserveError(f"unknown --mode {mode!r}; choose from {', '.join(MODES)}")


#: What ``--schedule`` applies to a written schedule; every other workload option given
#: with it is refused (the schedule already decided it).
SCHEDULE_FILE_OPTIONS = ("time_scale", "start", "duration", "num_prompts", "seed")


def _schedule_file(o: dict[str, Any]) -> Workload:
    given = set(o.get("_workload_given", ()))
    refused = sorted(given - set(SCHEDULE_FILE_OPTIONS) - {"schedule"})
    if refused:
        names = ", ".join("--" + n.replace("_", "-") for n in refused)
        raise FineserveError(
            f"--schedule replays a written schedule: {names} cannot change it (use "
            "--time-scale, --start, --duration, --num-prompts, or regenerate it)"
        )
    part = ScheduleSlice(
        start_s=o.get("start") or 0.0,
        duration_s=o.get("duration"),
        max_requests=o.get("num_prompts"),
        time_scale=o.get("time_scale") or 1.0,
    )
    chunks, rows, meta = read_schedule(Path(o["schedule"]), part=part)
    info: dict[str, Any] = {"mode": "schedule", "schedule": str(o["schedule"])}
    if not part.whole:
        info["slice"] = dataclasses.asdict(part)
    info["generated_by"] = meta
    # The plan from the send times alone (8 bytes a row), cut as read_schedule cuts.
    import pyarrow.parquet as pq

    t_ns = pq.read_table(str(o["schedule"]), columns=["t_ns"])["t_ns"].to_numpy()
    start_ns = round(part.start_s * 1e9)
    lo = int(np.searchsorted(t_ns, start_ns, side="left"))
    sent_at = np.rint((t_ns[lo : lo + rows] - start_ns) / part.time_scale).astype(np.int64)
    return Workload(chunks, rows, info, plan=plan_from_send_times(iter([sent_at])))


def _parametric(
    o: dict[str, Any],
    rng: np.random.Generator,
    info: dict[str, Any],
    notes: list[str],
    time_scale: float,
    duration: float | None,
    cap: int | None,
) -> Workload:
    classes: list[tuple[str, ClassFiles]] = []
    datasets_dir = Path(o["datasets_dir"]) if o.get("datasets_dir") else None
    for cls in o.get("model_class") or ():
        classes.append((cls, resolve_class_files(cls, datasets_dir)))
    if o.get("gamma_params_csv"):
        p = Path(o["gamma_params_csv"])
        classes.append((p.stem.replace("_gamma_5min", ""), ClassFiles(p, None, None)))
    if not classes:
        raise FineserveError("--mode parametric needs --model-class or --gamma-params-csv")
    explicit_nb = (
        load_nb_json(Path(o["parametric_nb_json"])) if o.get("parametric_nb_json") else None
    )
    default_lengths = _lengths(o, notes)
    streams = []
    seeds = np.random.SeedSequence(int(rng.integers(2**63))).spawn(len(classes))
    info["classes"] = []
    for (cls, files), ss in zip(classes, seeds):
        windows = load_gamma_windows(
            files.gamma,
            window_seconds=o.get("parametric_window_seconds") or 300.0,
            window_start_column=o.get("window_start_column") or "window_start_ms",
            window_end_column=o.get("window_end_column") or "window_end_ms",
            gamma_shape_column=o.get("gamma_shape_column") or "gamma_shape",
            gamma_scale_column=o.get("gamma_scale_column") or "gamma_scale",
            arrivals=o.get("parametric_arrivals") or "auto",
        )
        nb: NegBinom | None = explicit_nb
        if nb is None and files.nb is not None:
            class_nb = load_nb_json(files.nb)
            # FineServe enables its NB layer for the lt10B class; a class fitted by
            # ``fineserve fit`` on occupied slots needs it whatever its name.
            wanted = "lt10B" in cls or class_nb.fitted_on_slots
            if wanted and not o.get("disable_parametric_nb_lt10b"):
                nb = class_nb
        elif nb is None and "lt10B" in cls:
            notes.append(f"{cls}: no NB file next to the gamma parameters: no micro-bursts")
        lengths = default_lengths
        lengths_source = "options"
        if (
            files.lengths is not None
            and not o.get("request_lengths_csv")
            and o.get("class_lengths", True)
        ):
            lengths = HistogramLengths.from_json(files.lengths)
            lengths_source = str(files.lengths)
            notes.append(f"{cls}: lengths from the fitted histogram {files.lengths}")
        elif not o.get("request_lengths_csv"):
            why = (
                "--no-class-lengths"
                if files.lengths is not None
                else f"no Parametric/lengths/{cls}_lengths.json beside its gamma parameters"
            )
            notes.append(
                f"{cls}: lengths from --random-input-len {o['random_input_len']} / "
                f"--random-output-len {o['random_output_len']}"
                + (
                    f" (range ratio {o['random_range_ratio']:g})"
                    if o.get("random_range_ratio")
                    else " (constant)"
                )
                + f" ({why})"
            )
        info["classes"].append(
            {
                "class": cls,
                "gamma_params": str(files.gamma),
                "weibull_windows": int(np.count_nonzero(windows.weibull)),
                "nb": None if nb is None else nb.describe(),
                "lengths": lengths_source,
            }
        )
        streams.append(
            label(
                parametric_chunks(
                    windows,
                    lengths,
                    np.random.default_rng(ss),
                    nb=nb,
                    nb_zero=o.get("parametric_nb_zero") or "truncate",
                    time_scale=time_scale,
                    duration_s=duration,
                    extension_mode=o.get("parametric_extension_mode") or "repeat_jitter",
                    jitter_ratio=o.get("parametric_jitter_ratio", 0.05),
                ),
                cls,
            )
        )
    info.update(time_scale=time_scale, duration_s=duration)
    return Workload(_capped(merge_streams(streams), cap), None, info, notes)


def _capped(chunks: Iterator[Schedule], cap: int | None) -> Iterator[Schedule]:
    if cap is None:
        yield from chunks
        return
    left = cap
    for c in chunks:
        if left <= 0:
            return
        if len(c) > left:
            c = c.take(np.arange(left))
        left -= len(c)
        yield c


def _lengths(o: dict[str, Any], notes: list[str]) -> LengthSampler:
    if o.get("request_lengths_csv"):
        sampler, summary = EmpiricalLengths.from_csv(
            Path(o["request_lengths_csv"]),
            o.get("input_length_column") or "input_length",
            o.get("output_length_column") or "output_length",
        )
        notes.append(summary)
        return sampler
    return RandomLengths(o["random_input_len"], o["random_output_len"], o["random_range_ratio"])


def trace_options_from(o: dict[str, Any]) -> TraceOptions:
    """Trace-reading options from click's option names."""
    return TraceOptions(
        trace_format=o.get("trace_format"),
        timestamp_column=o.get("timestamp_column"),
        input_length_column=o.get("input_length_column"),
        output_length_column=o.get("output_length_column"),
        timestamp_unit=o.get("timestamp_unit"),
        burstgpt_model=o.get("burstgpt_model"),
        burstgpt_log_type=o.get("burstgpt_log_type"),
    )
