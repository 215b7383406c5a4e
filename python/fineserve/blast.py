"""One `blast` run: workload → prompts → targets → request bodies → engine → metrics and
files, each stage taking its slice of the :class:`~fineserve.config.BlastConfig`.

Kept apart from the command line so that ``sweep`` (and scripts) can run it many times.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .api import MEDIA_NEEDS_CHAT
from .config import BlastConfig, MediaConfig, TargetConfig, default_of
from .console import note, warn
from .errors import FineserveError
from .limits import connection_budget, mock_peak_in_flight
from .media.requests import MediaRequests, resolve_image_rule
from .metrics import BREAKDOWNS, MetricsAccumulator
from .metrics.scrape import Scraper, ScrapeTarget
from .metrics.sink import MetricsSink
from .metrics.steady import HEADLINE, across_runs, steady_metrics, steady_window
from .prompts import PrefixHitCounter, TokenizedPromptBuilder
from .prompts.builder import PromptBuilder, select_builder
from .requests import RequestShapes, engine_chunks
from .requests.pinning import Pinner
from .requests.turns import LiveTurns
from .results import RequestsWriter, run_meta, server_metrics_path, sibling_path
from .runner import REPLY_LIMIT_BYTES, EngineOptions, StreamOutcome, run_stream
from .schedule import Schedule, ScheduleDigest
from .targets import Targets, WarmUpTiming, first_body, resolve_targets, warm_up
from .workloads.spec import Workload, build_workload, format_duration, plan_workload

#: Cap on connections opened before the start instant when sized automatically.
AUTO_WARM_CAP = 16_384
#: Runs that send for longer than this are called out before they start.
LONG_RUN_S = 600.0


@dataclass
class BlastRun:
    """What one run of the engine produced (for printing, files, or a sweep step)."""

    metrics: dict[str, Any]
    header: dict[str, Any]
    interrupted: bool
    model: str
    url: str
    workload_info: dict[str, Any]
    writer: RequestsWriter | None
    digest: str


@dataclass
class EngineSizing:
    """The engine options of a run and the figures that explain them."""

    options: EngineOptions
    lanes: int
    warm: int
    burst_per_ms: int
    notes: list[str]


def size_engine(cfg: BlastConfig, first: Schedule, targets: Targets, is_mock: bool) -> EngineSizing:
    """Lanes (at least 2 for a schedule with bursts), warm connections, and the in-flight
    cap the open-files limit allows (both ends of each connection with the in-process
    mock)."""
    ec = cfg.engine
    processes = cfg.scale_out.processes
    burst_per_ms = first.peak_in_window(1_000_000)
    # Lanes are per engine; processes on one host share its cores, so by default they
    # share out the lanes one engine would have had (half the CPUs).
    lanes = ec.lanes or (
        max(1, (os.cpu_count() or 2) // 2 // processes)
        if processes > 1
        else default_of(EngineOptions, "lanes")
    )
    if not ec.lanes and burst_per_ms > 1:
        # Requests due in the same millisecond leave together only if lanes send them side
        # by side: one lane sends a burst one request after another.
        lanes = max(lanes, 2)
    per_second = first.peak_in_window(1_000_000_000)
    # Expected peak in flight: exact against the embedded mock (its TTFT and ITL are
    # known); for a real server, the busiest second's requests (each taking about 1 s).
    peak = mock_peak_in_flight(first, cfg.mock.ttft_ms, cfg.mock.itl_ms) if is_mock else per_second
    if ec.max_concurrency:
        peak = min(peak, ec.max_concurrency)
    if ec.max_concurrency and ec.max_concurrency < processes:
        raise FineserveError(
            f"--max-concurrency {ec.max_concurrency} is split over --processes {processes}: "
            "give at least one request per process"
        )
    servers = len({urlsplit(u).netloc for u in targets.urls})
    budget = connection_budget(peak, len(ec.source_ips), is_mock, processes, servers)
    # One cap on requests in flight: the user's, or what the descriptors allow; and one on
    # connections open at once over every lane (idle pooled ones hold descriptors too).
    in_flight_cap = min(ec.max_concurrency or budget.max_in_flight, budget.max_in_flight)
    max_connections = min(ec.max_connections or budget.max_in_flight, budget.max_in_flight)
    if ec.max_connections and ec.max_connections > max_connections:
        budget.lines.append(
            f"--max-connections {ec.max_connections} is more than the open files and the "
            f"cheap ephemeral ports allow here: at most {max_connections} are open at once"
        )
    n_urls = len(targets.urls)
    warm = ec.warm_connections
    if warm is None:
        warm = min(ec.max_concurrency or max(1, per_second // n_urls), AUTO_WARM_CAP)
    warm = min(warm, max(min(in_flight_cap, max_connections) // n_urls, 1))
    options = EngineOptions(
        stream=cfg.target.stream,
        max_concurrency=in_flight_cap,
        max_connections=max_connections,
        lanes=lanes,
        warm_connections=warm,
        connect_timeout_s=ec.connect_timeout_s,
        first_byte_timeout_s=ec.first_byte_timeout_s,
        idle_timeout_s=ec.idle_timeout_s,
        total_timeout_s=ec.request_timeout_s,
        max_body_bytes=int(ec.max_response_mb * (1 << 20)),
        realtime_priority=ec.realtime_priority,
        drain_grace_s=ec.drain_grace_s,
        route_groups=targets.deployment.route_groups,
        turn_affinity=cfg.target.turn_affinity,
        history_api=cfg.target.history_api if "parent" in first.extra else "off",
        source_ips=list(ec.source_ips),
        **transport_options(cfg.target),
    )
    return EngineSizing(options, lanes, warm, burst_per_ms, budget.lines)


#: Headroom over the expected concurrency when warming connections.
WARM_HEADROOM = 1.5


def resize_warm(
    sizing: EngineSizing, first: Schedule, timing: WarmUpTiming, n_urls: int, quiet: bool
) -> None:
    """Warm connections from the expected peak concurrency (Little's law over the busiest
    stretch: the most requests scheduled within any one expected request duration, from
    the warm-up's TTFT and TPOT at the schedule's mean output, with headroom), not the
    busiest second's request count; never more than planned."""
    e2e_s = timing.e2e_s(float(np.mean(first.output_len)) if len(first) else 1.0)
    window_ns = max(int(e2e_s * 1e9), 1_000_000)
    expected = first.peak_in_window(window_ns) / max(n_urls, 1)
    warm = min(sizing.warm, max(math.ceil(expected * WARM_HEADROOM) + sizing.lanes, 1))
    if warm < sizing.warm:
        if not quiet:
            note(
                f"warm connections: {warm} per endpoint (at most {math.ceil(expected)} "
                f"requests due within {e2e_s * 1e3:.0f} ms, the time per request expected "
                f"from the warm-up, ×{WARM_HEADROOM:g}; was {sizing.warm}); more open as needed"
            )
        sizing.warm = warm
        sizing.options.warm_connections = warm


def _live_history_notices(metrics: dict[str, Any], live: LiveTurns, quiet: bool) -> None:
    """After a run with live history: the turns whose history was already as long as the
    trace's input, and replies cut at the cap, in the results and a line each."""
    metrics["live_history_longer_than_trace"] = live.history_longer
    line = live.note()
    if line and not quiet:
        note(line)
    cut = metrics.get("live_history_turns", {}).get("after_truncated_reply", 0)
    if cut and not quiet:
        warn(
            f"live history: {cut} later turns followed a reply longer than "
            f"{REPLY_LIMIT_BYTES >> 20} MiB of text; they carried its start only"
        )


def history_notes(cfg: BlastConfig, first: Schedule, history_api: str) -> list[str]:
    """What later turns of conversations carry, in a line (and what has no effect)."""
    target = cfg.target
    extra = []
    if target.responses_history != "client" and target.backend != "openai-responses":
        extra.append("--responses-history has no effect: the backend is not openai-responses")
    return extra + _history_lines(cfg, first, history_api)


def _history_lines(cfg: BlastConfig, first: Schedule, history_api: str) -> list[str]:
    if "parent" not in first.extra:
        if cfg.target.conversation_history != "auto":
            return ["--conversation-history has no effect: the schedule has no conversations"]
        return []
    if history_api == "off":
        lines = [
            "conversation history: synthetic (later turns carry stand-in answers of the "
            "traced output length, made before the run; --conversation-history live sends "
            "the replies received)"
        ]
        if cfg.workload.tool_latency != "think":
            lines.append("--tool-latency has no effect without live conversation history")
        return lines
    how = {
        "completions": "each prompt continues with the previous reply's text",
        "chat": "the earlier turns' actual replies as assistant messages",
        "responses": "the earlier turns' actual replies in the input",
        "responses-server": "only the new message and previous_response_id: the server keeps it",
        "anthropic": "the earlier turns' actual replies as assistant messages",
    }[history_api]
    return [
        f"conversation history: live ({how}); a turn that follows a tool call carries its "
        "result, sent after the tool latency"
    ]


def transport_options(target: TargetConfig) -> dict[str, Any]:
    """The engine's headers and TLS settings (``EngineOptions`` fields)."""
    tls = target.tls

    def path(p: Path | None) -> str | None:
        return str(p) if p is not None else None

    return {
        "headers": [(h.name, h.value, h.secret) for h in target.headers],
        "request_headers": target.pins.request_headers,
        "ca_file": path(tls.ca_file),
        "client_cert_file": path(tls.cert_file),
        "client_key_file": path(tls.key_file),
        "insecure": tls.insecure,
        "http2": target.http2,
        "api_key": target.api_key,
    }


def _announce_plan(
    cfg: BlastConfig, workload: Workload, targets: Targets, sizing: EngineSizing, mode: str
) -> int | None:
    """The plan line (and a warning for a long run); returns the request count when it is
    known exactly (for the progress bar)."""
    plan = plan_workload(cfg.workload, workload)
    models = f"model {targets.model}" + (
        "; by class " + ", ".join(f"{k}={v}" for k, v in targets.class_models.items())
        if targets.class_models
        else ""
    )
    note(
        f"plan: {plan.describe()} to {targets.description} ({models}), mode {mode}, "
        f"seed {cfg.workload.seed}, {engines(cfg, sizing)}, {sizing.warm} warm connections "
        "per endpoint"
    )
    if plan.span_s > LONG_RUN_S:
        warn(
            f"this run sends for {format_duration(plan.span_s)}; --duration (trace "
            "seconds) or --num-prompts shorten it"
        )
    return plan.requests if plan.complete else workload.total


def engines(cfg: BlastConfig, sizing: EngineSizing) -> str:
    """What runs the schedule, for the plan line: "8 lanes", "4 processes × 2 lanes"."""
    n = cfg.scale_out.engines
    if n == 1:
        return f"{sizing.lanes} lanes"
    noun = "Ray workers" if cfg.scale_out.address else "processes"
    return f"{n} {noun} × {sizing.lanes} lanes"


def _stream_runner(cfg: BlastConfig, is_mock: bool, quiet: bool) -> Callable[..., StreamOutcome]:
    """The local engine, processes on this host (``--processes``), or the Ray fleet
    (``--ray``)."""
    if cfg.scale_out.processes > 1:
        from .processes import run_stream_processes

        return functools.partial(run_stream_processes, processes=cfg.scale_out.processes)
    if not cfg.scale_out.address:
        return run_stream
    from .distributed import run_stream_ray

    if is_mock and not quiet:
        note(
            "--ray with the embedded mock: it listens on this machine's loopback, so only "
            "workers on this node can reach it"
        )
    return functools.partial(
        run_stream_ray,
        address=cfg.scale_out.address,
        workers=cfg.scale_out.workers,
        placement=cfg.scale_out.ray_placement,
    )


@dataclass
class PreparedRun:
    """Everything decided before the first request leaves."""

    workload: Workload
    first: Schedule
    builder: PromptBuilder
    targets: Targets
    shapes: RequestShapes
    sizing: EngineSizing
    mode: str
    total: int | None


def run_blast(
    cfg: BlastConfig,
    servers: list[str] | Callable[[], list[str]],
    *,
    quiet: bool = False,
) -> BlastRun:
    """Builds the workload, runs it, and returns the metrics; the results file, if asked
    for, is closed with the run's final metadata. ``servers`` may be a function that starts
    the servers (the embedded mock): it is called once the workload and prompts are built,
    so that a bad option is reported before any server starts."""
    run = prepare_run(cfg, servers, quiet=quiet)
    writer = None
    if cfg.output.save_requests is not None:
        meta = run_meta(cfg, run.targets.urls, run.targets.model, run.workload.info)
        writer = RequestsWriter(cfg.output.save_requests, meta)
    accumulator = MetricsAccumulator(
        slos=dict(cfg.metrics.slos), window_s=cfg.metrics.window_s, groups=BREAKDOWNS
    )
    scrape = ServerScrape.start(cfg, run.targets, writer, quiet)
    sink = MetricsSink(
        accumulator,
        writer,
        run.targets.urls,
        scrape.scraper if scrape else None,
        cfg.stop,
    )
    prefix = PrefixHitCounter(run.builder.block_size)
    digest = ScheduleDigest()
    generated: dict[str, Any] = {}  # the schedule's digest, once it is known
    try:
        outcome = _send(cfg, run, sink, writer, prefix, digest, generated, quiet)
    except BaseException:
        if scrape is not None:
            scrape.abort({"partial": True, "aborted": True})
        if writer is not None:  # keep what finished, marked as cut short
            try:
                writer.close({"partial": True, "aborted": True, **generated})
            except Exception as e:  # never in place of the error that stopped the run
                warn(f"closing the request records failed too: {e}")
        raise
    metrics = _metrics(cfg, sink, prefix, run.builder, outcome, quiet)
    if run.shapes.media is not None:
        metrics["media"] = media = run.shapes.media.summary()
        if media["images_off_budget"] and not quiet:
            warn(
                f"{media['images_off_budget']} of {media['images_encoded']} images could not "
                f"meet their token budget under {media['image_family']} (nearest size sent; "
                f"up to {media['image_max_token_deviation']} tokens off): the records keep "
                "image_tokens (sent) and image_tokens_scheduled"
            )
    live = run.shapes.live_turns
    if live is not None:
        _live_history_notices(metrics, live, quiet)
    metrics.update(client_saturation(cfg, metrics, outcome.progress, sink, run.sizing))
    if metrics["client_saturated"] and not quiet:
        warn(
            "the client, not the server, limited this run: "
            + "; ".join(metrics["client_saturation_reasons"])
        )
    if scrape is not None:
        metrics["server_metrics"] = scrape.finish(outcome)
    header = _header(cfg, run.mode, metrics, run.sizing, run.targets)
    if writer is not None:
        writer.close(_final_meta(outcome, digest.hexdigest(), metrics, header))
    return BlastRun(
        metrics,
        header,
        outcome.interrupted,
        run.targets.model,
        run.targets.urls[0],
        run.workload.info,
        writer,
        digest.hexdigest(),
    )


def prepare_run(
    cfg: BlastConfig, servers: list[str] | Callable[[], list[str]], *, quiet: bool = False
) -> PreparedRun:
    """Workload, prompts, targets, request shapes, engine sizing, the plan and the
    warm-up: every check before the run, the servers started only once the workload and
    the prompts are known to be good."""
    is_mock = cfg.uses_mock
    workload = build_workload(cfg.workload)
    for line in workload.notes if not quiet else ():
        note(line)
    first = next(workload.chunks, None)
    if first is None or not len(first):
        raise FineserveError("the workload has no requests")
    builder, dataset_output_lens = select_builder(
        cfg.prompts, cfg.workload.seed, first, chat=cfg.target.chat, quiet=quiet, is_mock=is_mock
    )
    pinner = Pinner(cfg.target.pins, cfg.workload.seed)
    pinner.check(first)
    media = None
    if first.lists:
        if not cfg.target.chat or cfg.target.backend in ("openai-responses", "anthropic-messages"):
            raise FineserveError(MEDIA_NEEDS_CHAT)
        rule = resolve_image_rule(cfg.media, cfg.prompts.tokenizer, quiet=quiet)
        if is_mock and rule.name not in ("qwen2-vl", "qwen3-vl") and not quiet:
            note(f"the embedded mock counts image tokens as qwen2-vl does, not as {rule.name}")
        media = MediaRequests(cfg.media, rule, cfg.workload.seed)
    elif cfg.media != MediaConfig() and not quiet:
        note("the --mm-* media options have no effect: the schedule has no media")
    targets = resolve_targets(cfg.target, servers() if callable(servers) else servers, quiet=quiet)
    sizing = size_engine(cfg, first, targets, is_mock)
    history = sizing.options.history_api
    if not quiet:
        for line in history_notes(cfg, first, history):
            note(line)
    shapes = RequestShapes.for_targets(
        builder,
        targets,
        dataset_output_lens,
        mock_fields=is_mock,
        pinner=pinner,
        media=media,
        history_api=history,
    )
    mode = workload.info.get("mode", cfg.workload.mode)
    total = workload.total
    if not quiet:
        for line in sizing.notes:
            note(line)
        total = _announce_plan(cfg, workload, targets, sizing, mode)
    if cfg.engine.warmup_requests:
        body = first_body(targets, builder, first)
        timing = warm_up(targets, body, cfg.engine.warmup_requests, sizing.options)
        if timing is not None and cfg.engine.warm_connections is None:
            resize_warm(sizing, first, timing, len(targets.urls), quiet)
    return PreparedRun(workload, first, builder, targets, shapes, sizing, mode, total)


def _send(
    cfg: BlastConfig,
    run: PreparedRun,
    sink: MetricsSink,
    writer: RequestsWriter | None,
    prefix: PrefixHitCounter,
    digest: ScheduleDigest,
    generated: dict[str, Any],
    quiet: bool,
) -> StreamOutcome:
    """The run itself: the schedule's chunks become request bodies and go to the engine
    (local or Ray); records drain into ``sink`` as they complete."""

    def schedule_then_digest() -> Iterator[Schedule]:
        """The schedule's chunks; once the last is generated, its digest goes into the
        results' metadata at once, so that a run that then crashes still has it."""
        yield from (c for part in ([run.first], run.workload.chunks) for c in part)
        generated["schedule_digest"] = digest.hexdigest()
        if writer is not None:
            writer.add_meta(generated)

    return _stream_runner(cfg, cfg.uses_mock, quiet)(
        run.targets.urls,
        engine_chunks(schedule_then_digest(), run.shapes, digest, prefix),
        run.sizing.options,
        sink,
        total=run.total,
        show_progress=cfg.output.show_progress,
    )


def _final_meta(
    outcome: StreamOutcome, digest: str, metrics: dict[str, Any], header: dict[str, Any]
) -> dict[str, Any]:
    """What the results file's footer says once the run is over."""
    return {
        "partial": outcome.interrupted,
        "stopped_at_ns": outcome.stopped_at_ns,
        "schedule_digest": digest,
        # Wall clock of the run's start instant: record times + this = Unix ns.
        "t0_unix_ns": outcome.t0_unix_ns,
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))},
        "header": header,
    }


@dataclass
class ServerScrape:
    """The servers' /metrics scraped beside the run, and their file."""

    scraper: Scraper
    writer: RequestsWriter | None

    @classmethod
    def start(
        cls, cfg: BlastConfig, targets: Targets, requests: RequestsWriter | None, quiet: bool
    ) -> ServerScrape | None:
        """Starts scraping (after the warm-up: the counters' increase is the run's), with
        ``RUN.server-metrics.parquet`` beside the request records when they are saved."""
        sm = cfg.server_metrics
        if not sm.enabled:
            return None
        path = cfg.target.path
        pages = []
        if sm.endpoints:
            pages = [
                ScrapeTarget(u[: len(u) - len(path)], u[: len(u) - len(path)] + "/metrics", i)
                for i, u in enumerate(targets.urls)
            ]
        pages += [ScrapeTarget(u, u, None) for u in sm.urls]
        writer = None
        if requests is not None:
            writer = RequestsWriter(
                server_metrics_path(requests.path),
                {**requests.meta, "server_metrics_interval_s": sm.interval_s},
                what="server metrics",
                sort_column="t_ns",
            )
        scraper = Scraper(
            pages,
            sm.interval_s,
            headers=cfg.target.headers,
            tls=cfg.target.tls,
            write=writer.write if writer is not None else None,
        )
        scraper.start()
        if not quiet:
            note(f"scraping {len(pages)} metrics page(s) every {sm.interval_s:g} s")
        return cls(scraper, writer)

    def finish(self, outcome: StreamOutcome) -> dict[str, Any]:
        """Stops scraping; closes the file; the summary per page."""
        if self.scraper.t0_unix_ns is None and outcome.t0_unix_ns:
            self.scraper.started(outcome.t0_unix_ns)
        self.scraper.stop()
        summary = self.scraper.summary()
        if self.writer is not None:
            self.writer.close({"t0_unix_ns": outcome.t0_unix_ns, "partial": outcome.interrupted})
        return summary

    def abort(self, meta: dict[str, Any]) -> None:
        try:
            self.scraper.stop()
            if self.writer is not None:
                self.writer.close(meta)
        except Exception as e:  # never in place of the error that stopped the run
            warn(f"closing the server metrics failed too: {e}")


#: Dispatch lag (p99) past which the client did not keep the schedule.
SATURATION_LAG_US = 1000.0
#: Share of the lanes' 100 ms windows in which a lane used over 90% of its core for work,
#: past which the lanes' CPU limited the run.
SATURATION_LANE_SHARE = 0.25
#: Requests sent before a p99 dispatch lag can call the client saturated.
SATURATION_MIN_SENT = 100


def client_saturation(
    cfg: BlastConfig,
    metrics: dict[str, Any],
    progress: dict[str, Any],
    sink: MetricsSink,
    sizing: EngineSizing,
) -> dict[str, Any]:
    """Whether the client, not the server, was the bottleneck, and why: connects waited
    for the connection budget (the open-files limit, or --max-connections), the lanes'
    cores were saturated (a quarter of their windows over 90% busy), or dispatch lag went
    past 1 ms at p99 (lanes that cannot keep the schedule). Each reason names
    its remedy. A lag that --max-concurrency causes is the user's own cap, not counted."""
    reasons = []
    waits = int(progress.get("connection_waits") or 0)
    wait_ns = int(progress.get("connection_wait_ns") or 0)
    cap = sizing.options.max_connections
    if waits:
        reasons.append(
            f"{waits} connects waited for one of {cap} connections (mean "
            f"{wait_ns / waits / 1e3:.0f} us): raise the open-files limit (`ulimit -Hn`), "
            "--max-connections, or spread the load (--processes, --ray workers, more "
            "machines)"
        )
    windows = int(progress.get("lane_windows") or 0)
    busy_share = int(progress.get("lane_saturated_windows") or 0) / windows if windows else 0.0
    if busy_share >= SATURATION_LANE_SHARE:
        reasons.append(
            f"the lanes used over 90% of their cores for {busy_share:.0%} of the run (thread "
            f"CPU time less idle spinning): the {engines(cfg, sizing)} had no time to "
            "spare; more --lanes or --processes, or a less busy host"
        )
    lag = metrics.get("p99_dispatch_lag_us")
    # Under 100 requests the p99 is the single latest one: one late send (a core lost
    # for a moment) says nothing about whether the lanes kept the schedule.
    enough = int(metrics.get("sent") or 0) >= SATURATION_MIN_SENT
    if lag is not None and lag > SATURATION_LAG_US and enough and not cfg.engine.max_concurrency:
        reasons.append(
            f"p99 dispatch lag {lag / 1e3:.2f} ms > {SATURATION_LAG_US / 1e3:g} ms: the "
            f"{engines(cfg, sizing)} could not keep the schedule; more --lanes or "
            "--processes, a less busy host, or --ray workers"
        )
    return {
        "client_saturated": bool(reasons),
        "client_saturation_reasons": reasons,
        "connection_waits": waits,
        "connection_wait_mean_us": wait_ns / waits / 1e3 if waits else 0.0,
        "pool_wait_p99_us": sink.conn_wait_quantile_ns(0.99) / 1e3,
        "connections_peak": int(progress.get("connections_peak") or 0),
        "connections_opened": int(progress.get("connections_opened") or 0),
        "max_connections": cap,
        "warm_connections": sizing.warm,
        "pool_exhausted_seconds": len(sink.pool_exhausted_s),
        "lanes_cpu_saturated_share": busy_share,
    }


def _metrics(
    cfg: BlastConfig,
    sink: MetricsSink,
    prefix: PrefixHitCounter,
    builder: PromptBuilder,
    outcome: StreamOutcome,
    quiet: bool,
) -> dict[str, Any]:
    """The run's metrics, with the schedule's prefix sharing, the workers and the prompt
    check."""
    metrics = sink.acc.result(
        percentile_metrics=cfg.metrics.percentile_metrics,
        metric_percentiles=cfg.metrics.metric_percentiles,
    )
    metrics["prefix_hit_rate_theoretical"] = prefix.rate
    events = int(outcome.progress.get("token_events") or 0)
    if events:
        # Which clock timed the token events: the kernel's receive stamps (SO_TIMESTAMPNS)
        # or, where the kernel gave none, the lane's own clock when it read them.
        kernel = int(outcome.progress.get("kernel_stamped_events") or 0) / events
        metrics["kernel_stamped_token_fraction"] = kernel
        metrics["token_time_source"] = (
            "kernel" if kernel >= 0.99 else "user space" if kernel <= 0.01 else "mixed"
        )
    window = steady_window(sink.times) if sink.times is not None else None
    if window is not None and sink.times is not None:
        metrics["steady_state"] = window
        metrics.update(steady_metrics(sink.times, window))
    if outcome.early_stop is not None:
        metrics["early_stop"] = {
            "reason": outcome.early_stop,
            "at_s": (outcome.stopped_at_ns or 0) / 1e9,
        }
    if outcome.workers:
        metrics["workers"] = outcome.workers
    if isinstance(builder, TokenizedPromptBuilder):
        metrics["prompt_check"] = {
            "checked": builder.report.checked,
            "repaired": builder.report.repaired,
            "mismatched": builder.report.mismatched,
        }
        if not quiet:
            note(builder.report.summary())
    return metrics


def _header(
    cfg: BlastConfig,
    mode: str,
    metrics: dict[str, Any],
    sizing: EngineSizing,
    targets: Targets,
) -> dict[str, Any]:
    """What the summary's first rows (and the result JSON) say about the run."""
    rate = cfg.workload.request_rate
    header: dict[str, Any] = {
        "backend": cfg.target.backend,
        "mode": mode,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": cfg.engine.max_concurrency,
        "lanes": sizing.lanes,
        "engine_processes": cfg.scale_out.processes,
        "max_burst_per_ms": sizing.burst_per_ms,
        "class_models": targets.class_models,
    }
    if mode != "poisson":  # the schedule's measured mean rate (a number; text.py says so)
        header["request_rate"] = metrics.get("offered_request_rate")
        header["request_rate_is_mean"] = True
    return header


@dataclass
class RepeatedRuns:
    """``--num-runs``: every run, and the figures across them."""

    runs: list[BlastRun]
    metrics: dict[str, Any]


def run_repeated(
    cfg: BlastConfig,
    servers: list[str] | Callable[[], list[str]],
    *,
    quiet: bool = False,
) -> RepeatedRuns:
    """The same schedule ``cfg.repeat.num_runs`` times (each run its own engine, so fresh
    connections, and its own warm-up), ``--cooldown`` apart, the prefix caches reset in
    between when asked; with ``--save-requests RUN.parquet`` each run writes
    ``RUN-run<k>.parquet``. The metrics: the last run's, its headline figures replaced by
    their means across runs, with ``ci95_``/``cv_`` keys and each run's headline figures
    under ``runs``. An interrupted run ends the series."""
    rep = cfg.repeat
    started: list[list[str]] = []

    def bases() -> list[str]:
        if not started:
            started.append(servers() if callable(servers) else list(servers))
        return started[0]

    runs: list[BlastRun] = []
    for k in range(rep.num_runs):
        if k:
            if rep.cooldown_s:
                time.sleep(rep.cooldown_s)
            if rep.reset_prefix_cache:
                reset_prefix_caches(bases(), cfg.target, quiet)
        run_cfg = cfg
        if cfg.output.save_requests is not None and rep.num_runs > 1:
            output = dataclasses.replace(
                cfg.output, save_requests=sibling_path(cfg.output.save_requests, f"-run{k + 1}")
            )
            run_cfg = dataclasses.replace(cfg, output=output)
        if not quiet and rep.num_runs > 1:
            note(f"run {k + 1} of {rep.num_runs}")
        run = run_blast(run_cfg, bases, quiet=quiet or k > 0)
        runs.append(run)
        if run.interrupted:
            break
    per_run = [
        {key: r.metrics.get(key) for key in (*HEADLINE, "completed", "failed")} for r in runs
    ]
    metrics = {**runs[-1].metrics, **across_runs([r.metrics for r in runs])}
    metrics["runs"] = per_run
    return RepeatedRuns(runs, metrics)


def reset_prefix_caches(bases: list[str], target: TargetConfig, quiet: bool) -> None:
    """``POST /reset_prefix_cache`` on each server (vLLM; it answers 404 unless started
    with VLLM_SERVER_DEV_MODE=1): said in one line when a server does not support it."""
    import urllib.error
    import urllib.request

    from .transport import server_request

    for base in bases:
        req = server_request(base + "/reset_prefix_cache", target.headers, target.api_key, data=b"")
        context = target.tls.context_for(base)
        try:
            with urllib.request.urlopen(req, timeout=10, context=context):
                pass
        except urllib.error.HTTPError as e:
            if not quiet:
                warn(
                    f"{base} cannot reset its prefix cache (HTTP {e.code}; vLLM serves "
                    "/reset_prefix_cache with VLLM_SERVER_DEV_MODE=1)"
                )
        except (urllib.error.URLError, OSError) as e:
            if not quiet:
                warn(f"{base}: resetting the prefix cache failed ({e})")
