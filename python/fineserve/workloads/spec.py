"""From command-line options to a workload: a chunk iterator plus what describes it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..config import LengthConfig, ParametricConfig, WorkloadConfig
from ..errors import FineserveError
from ..metrics.windows import add_counts
from ..ragged import take_ragged
from ..schedule import Schedule, ScheduleSlice, open_schedule
from ..traces import load_trace
from ..traces.base import LATENCY_COLUMN, Trace
from .burstgpt import burstgpt_chunks, fit_burstgpt, load_burstgpt_params
from .lengths import EmpiricalLengths, HistogramLengths, LengthSampler, RandomLengths
from .mix import label, merge_streams
from .parametric import (
    ClassFiles,
    NegBinom,
    load_arrival_model,
    load_gamma_windows,
    load_nb_json,
    load_prefix_model,
    parametric_chunks,
    resolve_class_files,
)
from .poisson import poisson_chunks
from .replay import replay_chunks, replay_slice
from .servegen import load_client_pool, servegen_chunks
from .think import ThinkTime

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


def plan_workload(cfg: WorkloadConfig, workload: Workload) -> WorkloadPlan:
    """The workload's plan: its own, or counted over a second, identical generation (same
    options and seed give the same schedule), so the run itself is unchanged."""
    if workload.plan is not None:
        return workload.plan
    again = build_workload(cfg)
    return plan_from_send_times(c.t_ns for c in again.chunks)


def build_workload(cfg: WorkloadConfig) -> Workload:
    """The workload ``cfg`` describes: its chunks (generated lazily) and what it is."""
    if cfg.schedule is not None:
        return _schedule_file(cfg)
    builders = {
        "poisson": _poisson,
        "replay": _replay,
        "parametric": _parametric,
        "servegen": _servegen,
        "burstgpt": _burstgpt,
    }
    if cfg.mode not in builders:
        raise FineserveError(f"unknown --mode {cfg.mode!r}; choose from {', '.join(MODES)}")
    info: dict[str, Any] = {"mode": cfg.mode, "seed": cfg.seed}
    workload = builders[cfg.mode](cfg, np.random.default_rng(cfg.seed), info, [])
    if cfg.media.active:
        if info.get("multimodal"):
            raise FineserveError(
                "--mm-*-per-request: the ServeGen pool already gives each request its media"
            )
        from ..media.mix import MediaSampler, with_media

        sampler = MediaSampler(cfg.media)
        # A stream of its own: arrivals and lengths stay those of the text-only workload.
        rng = np.random.default_rng([cfg.seed, 0x6D6D])
        workload.chunks = with_media(workload.chunks, sampler, rng)
        info["multimodal"] = True
        info["media"] = {
            m: {"per_request": count, "tokens": tokens}
            for m in ("image", "audio", "video")
            for count, tokens in [cfg.media.spec(m)]
            if count is not None
        }
    return workload


def _poisson(
    cfg: WorkloadConfig, rng: np.random.Generator, info: dict[str, Any], notes: list[str]
) -> Workload:
    n = cfg.num_prompts if cfg.num_prompts is not None else 100
    ramp = None
    if cfg.ramp is not None:
        ramp = (cfg.ramp.kind, cfg.ramp.start_rate, cfg.ramp.end_rate, cfg.ramp.steps)
    info.update(
        request_rate=cfg.request_rate,
        burstiness=cfg.burstiness,
        ramp=cfg.ramp.kind if cfg.ramp else None,
    )
    chunks = poisson_chunks(
        n, cfg.request_rate, _lengths(cfg, notes), rng, burstiness=cfg.burstiness, ramp=ramp
    )
    return Workload(chunks, n, info, notes)


def _replay(
    cfg: WorkloadConfig, rng: np.random.Generator, info: dict[str, Any], notes: list[str]
) -> Workload:
    if cfg.trace is None:
        raise FineserveError("--mode replay needs --request-trace-csv or --trace")
    trace = load_trace(cfg.trace, cfg.trace_read)
    notes.append(trace.skip_summary())
    notes.extend(trace.notes)
    info.update(
        trace=str(cfg.trace),
        trace_format=trace.format,
        time_scale=cfg.time_scale,
        skipped=dict(trace.skipped),
    )
    _think_times(cfg, trace, info, notes)
    lo, hi = replay_slice(trace, cfg.start_s, cfg.duration_s, cfg.num_prompts)
    chunks = replay_chunks(
        trace,
        time_scale=cfg.time_scale,
        start_s=cfg.start_s,
        duration_s=cfg.duration_s,
        max_requests=cfg.num_prompts,
    )
    sent_at = np.rint((trace.t_ns[lo:hi] - round(cfg.start_s * 1e9)) / cfg.time_scale)
    plan = plan_from_send_times(iter([sent_at.astype(np.int64)]))
    return Workload(chunks, hi - lo, info, notes, plan)


def _think_times(cfg: WorkloadConfig, trace: Trace, info: dict[str, Any], notes: list[str]) -> None:
    """Later turns' think times by ``--think-time`` (``workloads.think``), in place."""
    think = ThinkTime.parse(cfg.think_time)
    # Only think times use it; a schedule has no such column.
    latency = trace.extra.pop(LATENCY_COLUMN, None)
    if "parent" not in trace.extra:
        if think.kind != "gap":
            notes.append("--think-time has no effect: the trace has no conversations")
        if cfg.tool_latency != "think":
            notes.append("--tool-latency has no effect: the trace has no conversations")
        return
    think_ns, note = think.think_ns(
        trace.extra["parent"],
        trace.extra["think_ns"],
        latency,
        # Its own stream: arrivals and lengths stay those of the default think time.
        np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(2)[1]),
    )
    trace.extra["think_ns"] = think_ns
    info["think_time"] = think.describe()
    notes.append(note)
    if cfg.tool_latency != "think":
        tool = ThinkTime.parse(cfg.tool_latency, option="--tool-latency")
        if tool.kind not in ("fixed", "lognormal"):
            raise FineserveError(
                f"--tool-latency {cfg.tool_latency!r}: use think, fixed:SECONDS or "
                "lognormal:MU,SIGMA"
            )
        tool_ns, _ = tool.think_ns(
            trace.extra["parent"],
            think_ns,
            None,
            np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(3)[2]),
        )
        trace.extra["tool_ns"] = tool_ns
        info["tool_latency"] = tool.describe()
        notes.append(f"tool latency (after a reply that is a tool call): {tool.describe()}")
    order_by_earliest_release(trace)


def order_by_earliest_release(trace: Trace) -> None:
    """A later turn leaves its think time (or tool latency) after its previous turn ends,
    not at its traced arrival: its send offset becomes the earliest that release can be
    (its previous turn's offset plus the delay; that turn ends later still), and the rows
    are re-sorted by it (parents stay ahead of their turns), so the engine reaches each
    turn before its release however short its think time."""
    parent = trace.extra["parent"]
    delay = trace.extra["think_ns"]
    if "tool_ns" in trace.extra:
        delay = np.minimum(delay, trace.extra["tool_ns"])
    later = np.flatnonzero(parent >= 0)
    if not len(later):
        return
    t = trace.t_ns.copy()
    for _ in range(len(t)):  # one pass per turn depth
        moved = t[parent[later]] + delay[later]
        if np.array_equal(moved, t[later]):
            break
        t[later] = moved
    if np.array_equal(t, trace.t_ns):
        return
    order = np.argsort(t, kind="stable")
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    trace.t_ns = t[order]
    trace.input_len = trace.input_len[order]
    trace.output_len = trace.output_len[order]
    for name, col in trace.extra.items():
        trace.extra[name] = col[order]
    p = trace.extra["parent"]
    trace.extra["parent"] = np.where(p >= 0, where[np.maximum(p, 0)], -1).astype(np.int64)
    if trace.hash_ids is not None and trace.hash_offsets is not None:
        trace.hash_ids, trace.hash_offsets = take_ragged(trace.hash_ids, trace.hash_offsets, order)


def _servegen(
    cfg: WorkloadConfig, rng: np.random.Generator, info: dict[str, Any], notes: list[str]
) -> Workload:
    if cfg.servegen_pool is None:
        raise FineserveError("--mode servegen needs --servegen-pool DIR")
    pool = load_client_pool(
        cfg.servegen_pool, list(cfg.servegen_clients) if cfg.servegen_clients else None
    )
    start_s, duration = cfg.start_s, cfg.duration_s
    start_given = "start" in cfg.given
    end_s = pool.span_s if duration is None else start_s + duration
    # Without --start, idle time before the first request is skipped, so --duration
    # counts from where traffic starts.
    first_active = pool.first_active_s(start_s, end_s if start_given else pool.span_s)
    if first_active is None:
        raise FineserveError(f"{pool.path}: no client sends between {start_s:g} s and {end_s:g} s")
    if first_active > start_s:
        if start_given:
            notes.append(
                f"ServeGen pool: idle from --start {start_s:g} s until {first_active:g} s "
                f"(the first request leaves {(first_active - start_s) / cfg.time_scale:.0f} s "
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
    lengths = cfg.lengths
    no_input = pool.clients_without("input_tokens", "text_tokens")
    no_output = pool.clients_without("output_tokens")
    if no_input or no_output:
        notes.append(
            f"ServeGen pool: clients without length PDFs use --random-input-len "
            f"{lengths.random_input_len} (clients {no_input or 'none'}) and "
            f"--random-output-len {lengths.random_output_len} (clients {no_output or 'none'})"
        )
    if pool.multimodal:
        info["multimodal"] = True
    info.update(
        servegen_pool=str(pool.path),
        clients=[c.client_id for c in pool.clients],
        request_rate=cfg.finite_rate,
        request_rate_over="active windows",
        rate_scale=cfg.rate_scale,
        start_s=start_s,
    )
    chunks = servegen_chunks(
        pool,
        rng,
        request_rate=cfg.finite_rate,
        rate_scale=cfg.rate_scale or 1.0,
        start_s=start_s,
        duration_s=end_s - start_s,
        time_scale=cfg.time_scale,
        default_input_len=lengths.random_input_len,
        default_output_len=lengths.random_output_len,
    )
    return Workload(_capped(chunks, cfg.num_prompts), None, info, notes)


def _burstgpt(
    cfg: WorkloadConfig, rng: np.random.Generator, info: dict[str, Any], notes: list[str]
) -> Workload:
    if cfg.burstgpt_params is not None:
        params = load_burstgpt_params(cfg.burstgpt_params)
    elif cfg.trace is not None:
        read = cfg.trace_read
        if read.trace_format is None:
            read = dataclasses.replace(read, trace_format="burstgpt")
        trace = load_trace(cfg.trace, read)
        notes.append(trace.skip_summary())
        params = fit_burstgpt(trace)
        notes.append(
            f"fitted BurstGPT model: {sum(w['alpha'] > 0 for w in params['windows'])} "
            f"active 20-min windows, Zipf a = {params['input_zipf_a']:.3f} (input), "
            f"{params['output_zipf_a']:.3f} (output)"
        )
    else:
        raise FineserveError("--mode burstgpt needs --burstgpt-params or --trace BurstGPT.csv")
    info.update(request_rate=cfg.finite_rate, rate_scale=cfg.rate_scale, time_scale=cfg.time_scale)
    chunks = burstgpt_chunks(
        params,
        rng,
        rate_scale=cfg.rate_scale or 1.0,
        request_rate=cfg.finite_rate,
        time_scale=cfg.time_scale,
        duration_s=cfg.duration_s,
    )
    return Workload(_capped(chunks, cfg.num_prompts), None, info, notes)


#: What ``--schedule`` applies to a written schedule; every other workload option given
#: with it is refused (the schedule already decided it).
SCHEDULE_FILE_OPTIONS = ("time_scale", "start", "duration", "num_prompts", "seed")


def _schedule_file(cfg: WorkloadConfig) -> Workload:
    assert cfg.schedule is not None
    refused = sorted(cfg.given - set(SCHEDULE_FILE_OPTIONS) - {"schedule"})
    if refused:
        names = ", ".join("--" + n.replace("_", "-") for n in refused)
        raise FineserveError(
            f"--schedule replays a written schedule: {names} cannot change it (use "
            "--time-scale, --start, --duration, --num-prompts, or regenerate it)"
        )
    part = ScheduleSlice(
        start_s=cfg.start_s,
        duration_s=cfg.duration_s,
        max_requests=cfg.num_prompts,
        time_scale=cfg.time_scale,
    )
    f = open_schedule(cfg.schedule, part)
    info: dict[str, Any] = {"mode": "schedule", "schedule": str(cfg.schedule)}
    if f.meta.get("multimodal") or f.meta.get("workload", {}).get("multimodal"):
        info["multimodal"] = True
    if not part.whole:
        info["slice"] = dataclasses.asdict(part)
    info["generated_by"] = f.meta
    plan = plan_from_send_times(iter([f.send_ns]))
    return Workload(f.chunks, len(f.send_ns), info, plan=plan)


def _parametric(
    cfg: WorkloadConfig, rng: np.random.Generator, info: dict[str, Any], notes: list[str]
) -> Workload:
    pc = cfg.parametric
    classes: list[tuple[str, ClassFiles]] = [
        (cls, resolve_class_files(cls, pc.datasets_dir)) for cls in pc.model_classes
    ]
    if pc.gamma_params_csv is not None:
        p = pc.gamma_params_csv
        classes.append((p.stem.replace("_gamma_5min", ""), ClassFiles(p, None, None)))
    if not classes:
        raise FineserveError("--mode parametric needs --model-class or --gamma-params-csv")
    explicit_nb = load_nb_json(pc.nb_json) if pc.nb_json is not None else None
    default_lengths = _lengths(cfg, notes)
    streams = []
    seeds = np.random.SeedSequence(int(rng.integers(2**63))).spawn(len(classes))
    info["classes"] = []
    for (cls, files), ss in zip(classes, seeds):
        lengths, lengths_source = _class_lengths(
            cls, files, default_lengths, cfg.lengths, pc, notes
        )
        if files.arrivals is not None and pc.arrivals == "auto" and pc.nb_json is None:
            # Imported here: the fitting package (scipy's optimisers and stats) would add
            # ~0.6 s to every blast's start-up.
            from .fitted import fitted_chunks

            model = load_arrival_model(files.arrivals)
            info["classes"].append(
                {
                    "class": cls,
                    "arrival_model": str(files.arrivals),
                    "resolution": model.resolution.to_json(),
                    "dequantize": pc.dequantize,
                    "lengths": lengths_source,
                }
            )
            if pc.dequantize and model.resolution.kind == "continuous":
                notes.append(f"{cls}: --dequantize has no effect: the trace had no clock grid")
            clock = ""
            if (
                model.resolution.kind != "continuous"
                and model.resolution.period_ms >= model.slot_ms
            ):
                clock = (
                    f"; its trace's {model.resolution.describe()}: spread inside each tick "
                    "(--dequantize)"
                    if pc.dequantize
                    else f"; {model.resolution.describe()}, generated on that clock"
                )
            notes.append(
                f"{cls}: arrivals from the slot-process model {files.arrivals.name} "
                f"({model.slot_ms:g} ms slots{clock})"
            )
            streams.append(
                label(
                    fitted_chunks(
                        model,
                        lengths,
                        np.random.default_rng(ss),
                        time_scale=cfg.time_scale,
                        duration_s=cfg.duration_s,
                        extension_mode=pc.extension_mode,
                        jitter_ratio=pc.jitter_ratio,
                        dequantize=pc.dequantize,
                    ),
                    cls,
                )
            )
            continue
        windows = load_gamma_windows(
            files.gamma,
            window_seconds=pc.window_s,
            window_start_column=pc.window_start_column,
            window_end_column=pc.window_end_column,
            gamma_shape_column=pc.gamma_shape_column,
            gamma_scale_column=pc.gamma_scale_column,
            arrivals=pc.arrivals,
        )
        nb = _class_nb(cls, files, explicit_nb, pc, notes)
        info["classes"].append(
            {
                "class": cls,
                "gamma_params": str(files.gamma),
                "weibull_windows": int(np.count_nonzero(windows.weibull))
                if windows.weibull is not None
                else 0,
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
                    nb_zero=pc.nb_zero,
                    time_scale=cfg.time_scale,
                    duration_s=cfg.duration_s,
                    extension_mode=pc.extension_mode,
                    jitter_ratio=pc.jitter_ratio,
                ),
                cls,
            )
        )
    streams = _with_prefix_blocks(classes, streams, seeds, info, notes)
    info.update(time_scale=cfg.time_scale, duration_s=cfg.duration_s)
    return Workload(_capped(merge_streams(streams), cfg.num_prompts), None, info, notes)


def _with_prefix_blocks(
    classes: list[tuple[str, ClassFiles]],
    streams: list[Iterator[Schedule]],
    seeds: list[np.random.SeedSequence],
    info: dict[str, Any],
    notes: list[str],
) -> list[Iterator[Schedule]]:
    """Classes fitted from a trace with hash_ids share prefix blocks the way it did
    (``fit.prefix``); in a run that has one, the other classes get unshared blocks (a
    schedule carries blocks for all its requests or none). Ids of class k start at
    k·2⁴⁰, so classes never share by accident."""
    models = [
        load_prefix_model(files.prefix) if files.prefix is not None else None
        for _, files in classes
    ]
    if not any(m is not None for m in models):
        return streams
    from ..fit.prefix import PrefixSharer, with_blocks  # as fitted_chunks: start-up time

    block_size = next(m.block_size for m in models if m is not None)
    out = []
    for k, ((cls, _), stream, model, ss) in enumerate(zip(classes, streams, models, seeds)):
        base = k << 40
        # Its own stream of randomness: the class's arrivals and lengths stay as without.
        rng = np.random.default_rng(ss.spawn(1)[0])
        sharer = PrefixSharer(model, rng, id_base=base) if model is not None else None
        out.append(with_blocks(stream, sharer, block_size, base))
        info["classes"][k]["prefix"] = (
            None
            if model is None
            else {
                "block_size": model.block_size,
                "trace_hit_rate_theoretical": model.trace_hit_rate,
            }
        )
        if model is None:
            notes.append(f"{cls}: no prefix model: its prompts share no blocks")
        elif model.block_size != block_size:
            raise FineserveError(
                f"{cls}: prefix blocks of {model.block_size} tokens, but another class has "
                f"{block_size}; fit them with one --prefix-block-size"
            )
        else:
            notes.append(
                f"{cls}: prefix blocks shared as in its trace (theoretical hit rate there "
                f"{100 * model.trace_hit_rate:.1f} %)"
            )
    return out


def _class_nb(
    cls: str,
    files: ClassFiles,
    explicit_nb: NegBinom | None,
    pc: ParametricConfig,
    notes: list[str],
) -> NegBinom | None:
    """The class's micro-burst law: ``--parametric-nb-json``, else its NB file when wanted."""
    if explicit_nb is not None:
        return explicit_nb
    if files.nb is not None:
        class_nb = load_nb_json(files.nb)
        # FineServe enables its NB layer for the lt10B class; a class fitted by
        # ``fineserve fit`` on occupied slots needs it whatever its name.
        wanted = "lt10B" in cls or class_nb.fitted_on_slots
        return class_nb if wanted and not pc.disable_nb_lt10b else None
    if "lt10B" in cls:
        notes.append(f"{cls}: no NB file next to the gamma parameters: no micro-bursts")
    return None


def _class_lengths(
    cls: str,
    files: ClassFiles,
    default_lengths: LengthSampler,
    lc: LengthConfig,
    pc: ParametricConfig,
    notes: list[str],
) -> tuple[LengthSampler, str]:
    """The class's fitted length histogram when there is one (and it is wanted), else
    the options' lengths, said in a note either way."""
    if files.lengths is not None and lc.request_lengths_csv is None and pc.class_lengths:
        notes.append(f"{cls}: lengths from the fitted histogram {files.lengths}")
        return HistogramLengths.from_json(files.lengths), str(files.lengths)
    if lc.request_lengths_csv is None:
        why = (
            "--no-class-lengths"
            if files.lengths is not None
            else f"no Parametric/lengths/{cls}_lengths.json beside its gamma parameters"
        )
        spread = (
            f" (range ratio {lc.random_range_ratio:g})" if lc.random_range_ratio else " (constant)"
        )
        notes.append(
            f"{cls}: lengths from --random-input-len {lc.random_input_len} / "
            f"--random-output-len {lc.random_output_len}{spread} ({why})"
        )
    return default_lengths, "options"


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


def _lengths(cfg: WorkloadConfig, notes: list[str]) -> LengthSampler:
    lc = cfg.lengths
    if lc.request_lengths_csv is not None:
        sampler, summary = EmpiricalLengths.from_csv(
            lc.request_lengths_csv,
            cfg.trace_read.input_length_column or "input_length",
            cfg.trace_read.output_length_column or "output_length",
        )
        notes.append(summary)
        return sampler
    return RandomLengths(lc.random_input_len, lc.random_output_len, lc.random_range_ratio)
