"""One `blast` run: workload → prompts → request bodies → engine → metrics and files.

Kept apart from the command line so that ``sweep`` (and scripts) can run it many times.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import __version__
from .api import DEFAULT_ENDPOINT, BodyTemplate, is_chat_endpoint
from .console import note, warn
from .errors import FineserveError
from .limits import connection_budget
from .metrics import MetricsAccumulator
from .metrics.fidelity import slot_sizes
from .prompts import (
    PrefixHitCounter,
    SyntheticPromptBuilder,
    TokenizedPromptBuilder,
    load_prompt_dataset,
    load_tokenizer,
)
from .prompts.tokenized import prompt_cache_dir, source_text_from
from .results import RequestsWriter, library_versions, machine_info, records_to_batch
from .routing import Deployment, parse_pairs, parse_route
from .runner import EngineChunk, EngineOptions, RecordSink, default_lanes, run_engine, run_stream
from .schedule import Schedule, ScheduleDigest
from .server import check_url, fetch_models
from .workloads.spec import build_workload, format_duration, plan_workload

#: Cap on connections opened before the start instant when sized automatically.
AUTO_WARM_CAP = 16_384
#: Runs that send for longer than this are called out before they start.
LONG_RUN_S = 600.0
#: Schedule columns carried into the records (labels for breakdowns and the results file).
LABEL_COLUMNS = ("class", "client_id", "session_id", "turn", "reason_ratio")
#: Prompt pools cover at least this many tokens per prompt (longer ones are refused).
MIN_PROMPT_POOL_TOKENS = 65_536


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


def resolve_model(base: str, model: str | None, api_key: str | None) -> str:
    try:
        models = fetch_models(base, api_key=api_key)
    except FineserveError as e:
        if model and "HTTP" in e.message:
            warn(f"{e.message}; using --model {model}")
            return model
        raise
    if model:
        return model
    if not models:
        raise FineserveError(f"GET {base}/v1/models lists no model; pass --model")
    return models[0]


def prompt_builder(
    o: dict[str, Any], seed: int, first: Schedule, chat: bool, quiet: bool, is_mock: bool = False
) -> tuple[SyntheticPromptBuilder | TokenizedPromptBuilder, npt.NDArray[np.int64] | None]:
    """Exact token lengths with ``--tokenizer``; approximate synthetic words without (exact
    against the mock, which counts words, so it needs no notice there). Also the dataset's
    output lengths when ``--dataset-output-len`` asks for them."""
    groups, prefix_len = o.get("shared_prefix_groups") or 0, o.get("shared_prefix_len") or 0
    if bool(groups) != bool(prefix_len):
        raise FineserveError("--shared-prefix-groups and --shared-prefix-len go together")
    block = o.get("prefix_block_size") or 512
    if o.get("apply_chat_template") and chat:
        raise FineserveError(
            "--apply-chat-template is for the completions API; the chat API applies the "
            "server's template itself"
        )
    if o.get("dataset_output_len") and not o.get("dataset_path"):
        raise FineserveError("--dataset-output-len needs --dataset-path")
    if not o.get("tokenizer"):
        if o.get("dataset_path") or o.get("apply_chat_template") or o.get("prompt_suffix"):
            raise FineserveError(
                "--dataset-path, --apply-chat-template and --prompt-suffix need --tokenizer"
            )
        if not quiet and not is_mock:
            note(
                "no --tokenizer: synthetic word prompts; input lengths are approximate "
                "(one word ≈ one token for common tokenizers; the mock counts words)"
            )
        synthetic = SyntheticPromptBuilder(
            seed, block_size=block, shared_prefix_groups=groups, shared_prefix_len=prefix_len
        )
        return synthetic, None
    tok = load_tokenizer(o["tokenizer"])
    source = None
    output_lens = None
    if o.get("dataset_path"):
        texts, outputs, summary = load_prompt_dataset(Path(o["dataset_path"]))
        if not quiet:
            note(summary)
        source = source_text_from(texts)
        if o.get("dataset_output_len"):
            output_lens = np.asarray([x for x in outputs if x > 0], dtype=np.int64)
            if not len(output_lens):
                raise FineserveError(
                    f"--dataset-output-len: {o['dataset_path']} has no output_length "
                    "(or output_len, max_tokens) fields"
                )
    started = time.perf_counter()
    builder = TokenizedPromptBuilder(
        tok,
        source_text=source,
        seed=seed,
        max_input_len=max(int(first.input_len.max()), MIN_PROMPT_POOL_TOKENS),
        block_size=block,
        apply_chat_template=bool(o.get("apply_chat_template")),
        prompt_suffix=o.get("prompt_suffix") or "",
        shared_prefix_groups=groups,
        shared_prefix_len=prefix_len,
        cache_dir=prompt_cache_dir(),
        check=o.get("prompt_check") or "sample",
        count_special_tokens=not chat,
    )
    if not quiet:
        note(
            f"tokenizer {o['tokenizer']}: prompt pool of {builder.pool.n} tokens "
            f"({'cached' if builder.pool.cached else 'tokenized'} in "
            f"{time.perf_counter() - started:.1f} s)"
        )
    return builder, output_lens


class MetricsSink(RecordSink):
    """Folds drained records into the metrics as they arrive (bounded memory), and into the
    per-request results file when one is asked for."""

    def __init__(
        self,
        acc: MetricsAccumulator | None = None,
        writer: RequestsWriter | None = None,
        endpoints: list[str] | None = None,
    ) -> None:
        self.acc = acc or MetricsAccumulator()
        self.writer = writer
        self.endpoints = endpoints or [""]
        self.recent_ttft: collections.deque[tuple[int, npt.NDArray[np.int64]]] = collections.deque()

    def add(self, columns: dict[str, Any], extra: dict[str, Any]) -> None:
        labels = {k: v for k, v in extra.items() if k in ("class", "model")}
        if len(self.endpoints) > 1:
            names = np.asarray(self.endpoints, dtype=object)
            labels["endpoint"] = names[np.asarray(columns["endpoint_idx"]).astype(np.int64)]
        burst = None
        if "_slot_size" in extra and "_slot_edge" in extra:
            burst = (extra["_slot_size"], extra["_slot_edge"])
        self.acc.add(columns, extra["input_len"], labels, burst, extra.get("reason_ratio"))
        ok = (np.asarray(columns["error_kind"]) == 0) & (np.asarray(columns["first_token_ns"]) >= 0)
        if ok.any():
            ttft = np.asarray(columns["first_token_ns"])[ok] - np.asarray(columns["sent_ns"])[ok]
            self.recent_ttft.append((time.monotonic_ns(), ttft.astype(np.int64)))
        if self.writer is not None:
            self.writer.write(records_to_batch(columns, extra, self.endpoints))

    def stopped(self, at_ns: int) -> None:
        self.acc.stopped(at_ns)

    def live(self) -> dict[str, str]:
        """TTFT p50/p99 of the requests that completed in the last 10 s."""
        horizon = time.monotonic_ns() - 10_000_000_000
        while self.recent_ttft and self.recent_ttft[0][0] < horizon:
            self.recent_ttft.popleft()
        if not self.recent_ttft:
            return {}
        ttft = np.concatenate([v for _, v in self.recent_ttft]) / 1e6
        p50, p99 = np.percentile(ttft, [50, 99])
        return {"ttft_p50": f"{p50:.0f}ms", "ttft_p99": f"{p99:.0f}ms"}


@dataclass
class RequestShapes:
    """How a schedule chunk becomes request bodies: prompts, body template per class's
    model, and endpoint assignment."""

    builder: SyntheticPromptBuilder | TokenizedPromptBuilder
    templates: dict[str, BodyTemplate]  # model → template
    default_model: str
    class_models: dict[str, str]
    deployment: Deployment
    #: ``--dataset-output-len``: request i's output length is entry (i mod N)'s.
    output_lens: npt.NDArray[np.int64] | None = None
    #: The target is the embedded mock: tell it, per request, what the schedule says the
    #: server would do (``reason_ratio``; prefix blocks, for its cached-token counts).
    mock_fields: bool = False


def engine_chunks(
    chunks: Iterator[Schedule],
    shapes: RequestShapes,
    digest: ScheduleDigest | None = None,
    prefix: PrefixHitCounter | None = None,
) -> Iterator[EngineChunk]:
    """Schedule chunks → request bodies, in order; request i's prompt is its own unless
    sharing is intended (hash_ids, shared-prefix groups)."""
    base = 0
    builder = shapes.builder
    # Chat requests carry a conversation as alternating messages; completions one text.
    chat = any(t.chat for t in shapes.templates.values())
    # Prompts of turns that later turns extend: index → [text, tokens, answer, followers left].
    history: dict[int, list[Any]] = {}
    for c in chunks:
        n = len(c)
        if shapes.output_lens is not None:
            picks = shapes.output_lens[(base + np.arange(n)) % len(shapes.output_lens)]
            c = dataclasses.replace(c, output_len=picks)
        if digest is not None:
            digest.add(c)
        prompts, actual_len = builder.build_chunk(base, c)
        turns = None
        if "parent" in c.extra:
            actual_len = np.asarray(actual_len, dtype=np.int64).copy()
            extend_turns(builder, base, c, prompts, actual_len, history, chat=chat)
            turns = (c.extra["parent"], c.extra["think_ns"], c.extra["followers"])
        if prefix is not None:
            if c.hash_ids is not None and c.hash_offsets is not None:
                prefix.add(actual_len, c.hash_ids, c.hash_offsets)
            elif builder.groups > 0 and builder.prefix_len > 0:
                prefix.add_shared(base, actual_len, builder.groups, builder.prefix_len)
            else:
                prefix.add_plain(actual_len)
        classes = c.extra.get("class")
        if classes is not None and shapes.class_models:
            models = np.array(
                [shapes.class_models.get(str(k), shapes.default_model) for k in classes],
                dtype=object,
            )
        else:
            models = np.full(n, shapes.default_model, dtype=object)
        fields = mock_fields(c, shapes.builder.block_size) if shapes.mock_fields else None
        bodies = [
            shapes.templates[m].render(p, int(t), f)
            for p, m, t, f in zip(
                prompts, models.tolist(), c.output_len.tolist(), fields or [""] * n
            )
        ]
        slot_size, slot_edge = slot_sizes(c.t_ns)
        extra: dict[str, Any] = {
            "input_len": np.asarray(actual_len, dtype=np.int64),
            "output_len": c.output_len,
            # For the metrics only (micro-burst membership), not written to the results.
            "_slot_size": slot_size,
            "_slot_edge": slot_edge,
            **{k: v for k, v in c.extra.items() if k in LABEL_COLUMNS},
        }
        if len(shapes.templates) > 1:
            extra["model"] = models
        yield EngineChunk(
            t_ns=c.t_ns,
            bodies=bodies,
            body_idx=np.arange(n, dtype=np.uint32),
            endpoint_idx=shapes.deployment.assign(classes, n),
            expected_output_tokens=c.output_len,
            extra=extra,
            turns=turns,
        )
        base += n


def mock_fields(c: Schedule, block_size: int) -> list[str] | None:
    """Per request, the embedded mock's body fields (JSON members) that carry the
    schedule's ``reason_ratio`` and prefix blocks; None when the schedule has neither."""
    ratio = c.extra.get("reason_ratio")
    hashed = c.hash_ids is not None and c.hash_offsets is not None
    if ratio is None and not hashed:
        return None
    out = []
    for i in range(len(c)):
        parts = []
        if ratio is not None and np.isfinite(ratio[i]):
            parts.append(f'"fineserve_reasoning_ratio":{min(max(float(ratio[i]), 0.0), 1.0)!r}')
        if hashed:
            lo, hi = int(c.hash_offsets[i]), int(c.hash_offsets[i + 1])  # type: ignore[index]
            ids = ",".join(str(int(h)) for h in c.hash_ids[lo:hi])  # type: ignore[index]
            parts.append(f'"fineserve_hash_ids":[{ids}],"fineserve_block_size":{block_size}')
        out.append(",".join(parts))
    return out


def extend_turns(
    builder: SyntheticPromptBuilder | TokenizedPromptBuilder,
    base: int,
    c: Schedule,
    prompts: list[Any],
    actual_len: npt.NDArray[np.int64],
    history: dict[int, list[Any]],
    *,
    chat: bool = False,
) -> None:
    """A turn's prompt is its previous turn's prompt, an answer of that turn's output
    length, and new text up to its own input length, so a prefix cache sees the
    conversation. A turn shorter than its history keeps its own prompt. With ``chat``
    the prompt becomes the conversation's messages: the earlier turns, the stand-in
    answer as the assistant's message, then this turn's text as the user's."""
    parent = c.extra["parent"]
    followers = c.extra["followers"]
    for i in range(len(c)):
        p = int(parent[i])
        if p >= 0 and p in history:
            earlier, tokens, answer, _ = entry = history[p]
            new = int(actual_len[i]) - tokens - answer
            if new > 0 and builder.extends_turns:
                if chat:
                    said, own = builder.continuation_parts(base + i, answer, new)
                    if isinstance(earlier, str):
                        earlier = [("user", earlier)]
                    prompts[i] = [*earlier, ("assistant", said), ("user", own)]
                else:
                    prompts[i] = earlier + builder.continuation(base + i, answer, new)
            entry[3] -= 1
            if entry[3] <= 0:
                del history[p]
        if followers[i] > 0:
            history[base + i] = [
                prompts[i],
                int(actual_len[i]),
                int(c.output_len[i]),
                int(followers[i]),
            ]


def warm_up(
    urls: list[str],
    shapes: RequestShapes,
    count: int,
    schedule: Schedule,
    options: EngineOptions,
) -> None:
    """FineServe's warm-up: ``count`` copies of the first prompt, at most 32 tokens out,
    to every endpoint."""
    one = schedule.take(np.arange(1))
    prompts, _ = shapes.builder.build_chunk(0, one, record=False)
    body = shapes.templates[shapes.default_model].render(
        prompts[0], min(int(schedule.output_len[0]), 32)
    )
    warm_opts = EngineOptions(
        **{
            **options.__dict__,
            "warm_connections": 0,
            "max_concurrency": None,
            "route_groups": [],
        }
    )
    total = count * len(urls)
    rec = run_engine(
        urls,
        np.zeros(total, dtype=np.int64),
        [body],
        np.zeros(total, dtype=np.uint32),
        np.repeat(np.arange(len(urls), dtype=np.uint32), count),
        np.full(total, 32),
        warm_opts,
        show_progress=False,
    )
    kinds = rec.col("error_kind")
    if rec.interrupted:
        raise FineserveError("interrupted during warm-up")
    for e, url in enumerate(urls):
        mine = rec.col("endpoint_idx") == e
        if np.all(kinds[mine] != 0):
            rows = np.flatnonzero(mine & (kinds != 0))
            msgs = dict(zip(rec.col("error_index").tolist(), rec.columns["error_message"]))
            msg = msgs.get(int(rows[0]), "unknown") if len(rows) else "unknown"
            raise FineserveError(f"warm-up failed: all {count} requests to {url} failed ({msg})")


def execute_blast(
    o: dict[str, Any],
    bases: list[str] | Callable[[], list[str]],
    seed: int,
    extra: dict,
    is_mock: bool,
    *,
    quiet: bool = False,
) -> BlastRun:
    """Builds the workload, runs it, and returns the metrics; the results file, if asked
    for, is closed with the run's final metadata. ``bases`` may be a function that starts
    the servers (the embedded mock): it is called once the workload and prompts are
    built, so that a bad option is reported before any server starts."""
    api_key = os.environ.get("OPENAI_API_KEY") or None
    endpoint = o["endpoint"] or DEFAULT_ENDPOINT[o["backend"]]
    path = endpoint if endpoint.startswith("/") else "/" + endpoint
    chat = is_chat_endpoint(path)
    workload = build_workload(o, seed)
    for line in workload.notes if not quiet else ():
        note(line)
    first = next(workload.chunks, None)
    if first is None or not len(first):
        raise FineserveError("the workload has no requests")
    builder, dataset_output_lens = prompt_builder(o, seed, first, chat, quiet, is_mock)
    if callable(bases):
        bases = bases()
    urls = [b + path for b in bases]
    if len(set(urls)) < len(urls):
        raise FineserveError("--base-url lists the same server twice")
    for u in urls:
        check_url(u)
    served = [resolve_model(b, o["model"], api_key) for b in bases]
    model = served[0]
    if len(set(served)) > 1 and not o["model"] and not quiet:
        warn(
            f"the endpoints serve different first models {served}; every request asks for "
            f"{model} (pass --model or --class-model)"
        )
    class_models = parse_pairs(o.get("class_model") or (), "--class-model")
    templates = {
        m: BodyTemplate(
            o["backend"],
            m,
            stream=not o["disable_stream"],
            ignore_eos=not o["disable_ignore_eos"],
            extra=extra,
            chat=chat,
        )
        for m in {model, *class_models.values()}
    }
    policy, pins = parse_route(o.get("route"))
    deployment = Deployment.from_options(
        urls,
        policy,
        parse_pairs([*pins, *(o.get("route_class") or ())], "--route"),
        lambda u: u[: len(u) - len(path)],
    )
    shapes = RequestShapes(
        builder,
        templates,
        model,
        class_models,
        deployment,
        dataset_output_lens,
        mock_fields=is_mock,
    )

    burst_per_ms = first.peak_in_window(1_000_000)
    lanes = o["lanes"] or default_lanes()
    if not o["lanes"] and burst_per_ms > 1:
        # Requests due in the same millisecond leave together only if lanes send them side
        # by side: one lane sends a burst one request after another.
        lanes = max(lanes, 2)
    source_ips = [x.strip() for x in (o.get("source_ip") or "").split(",") if x.strip()]
    peak = expected_peak_in_flight(
        first, (o["mock_ttft_ms"], o["mock_itl_ms"]) if is_mock else None
    )
    if o["max_concurrency"]:
        peak = min(peak, o["max_concurrency"])
    budget = connection_budget(peak, len(source_ips), is_mock)
    # One cap on requests in flight: the user's, or what the descriptors allow.
    in_flight_cap = min(o["max_concurrency"] or budget.max_in_flight, budget.max_in_flight)
    warm = o["warm_connections"]
    if warm is None:
        per_second = first.peak_in_window(1_000_000_000)
        warm = min(o["max_concurrency"] or max(1, per_second // len(urls)), AUTO_WARM_CAP)
    warm = min(warm, max(in_flight_cap // len(urls), 1))
    options = EngineOptions(
        stream=not o["disable_stream"],
        max_concurrency=in_flight_cap,
        lanes=lanes,
        warm_connections=warm,
        connect_timeout_s=o["connect_timeout"],
        first_byte_timeout_s=o["first_byte_timeout"],
        idle_timeout_s=o["idle_timeout"],
        total_timeout_s=o["request_timeout"],
        max_body_bytes=int(o["max_response_mb"] * (1 << 20)),
        realtime_priority=o["realtime_priority"],
        drain_grace_s=o["drain_grace"],
        route_groups=deployment.route_groups,
        turn_affinity=o.get("turn_affinity", True),
        source_ips=source_ips,
    )
    if not quiet:
        for line in budget.lines:
            note(line)

    mode = workload.info.get("mode", o["mode"])
    total = workload.total
    target = urls[0] if len(urls) == 1 else f"{len(urls)} endpoints ({deployment.route})"
    models = f"model {model}" + (
        "; by class " + ", ".join(f"{k}={v}" for k, v in class_models.items())
        if class_models
        else ""
    )
    if not quiet:
        plan = plan_workload(o, seed, workload)
        if plan.complete:
            total = plan.requests
        note(
            f"plan: {plan.describe()} to {target} ({models}), mode {mode}, seed {seed}, "
            f"{lanes} lanes, {warm} warm connections per endpoint"
        )
        if plan.span_s > LONG_RUN_S:
            warn(
                f"this run sends for {format_duration(plan.span_s)}; --duration (trace "
                "seconds) or --num-prompts shorten it"
            )
    if o["warmup_requests"]:
        warm_up(urls, shapes, o["warmup_requests"], first, options)
    writer = None
    if o["save_requests"]:
        writer = RequestsWriter(
            o["save_requests"],
            {
                "fineserve_version": __version__,
                "command": shlex.join(["fineserve", *sys.argv[1:]]),
                # The parsed options too: the command line is the process's, which is not
                # this command's when fineserve runs inside another program (tests, scripts).
                "options": jsonable(o),
                "seed": seed,
                "endpoint": urls[0],
                "endpoints": urls,
                "model": model,
                "backend": o["backend"],
                "workload": workload.info,
                "machine": machine_info(),
                "versions": library_versions(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
    sink = MetricsSink(
        MetricsAccumulator(
            slos=o["slos"], window_s=o["metrics_window"], groups=("class", "endpoint", "model")
        ),
        writer,
        urls,
    )
    schedule_digest = ScheduleDigest()
    prefix = PrefixHitCounter(builder.block_size)
    runner: Any = run_stream
    if o.get("ray"):
        from .distributed import run_stream_ray

        runner = functools.partial(run_stream_ray, address=o["ray"], workers=o["workers"])
        if is_mock and not quiet:
            note(
                "--ray with the embedded mock: it listens on this machine's loopback, so only "
                "workers on this node can reach it"
            )
    generated: dict[str, Any] = {}

    def schedule_then_digest() -> Iterator[Schedule]:
        """The schedule's chunks; once the last is generated, its digest goes into the
        results' metadata at once, so that a run that then crashes still has it."""
        yield from (c for part in ([first], workload.chunks) for c in part)
        generated["schedule_digest"] = schedule_digest.hexdigest()
        if writer is not None:
            writer.add_meta(generated)

    try:
        outcome = runner(
            urls,
            engine_chunks(schedule_then_digest(), shapes, schedule_digest, prefix),
            options,
            sink,
            total=total,
            show_progress=not o["disable_tqdm"],
        )
    except BaseException:
        if writer is not None:  # keep what finished, marked as cut short
            try:
                writer.close({"partial": True, "aborted": True, **generated})
            except Exception as e:  # never in place of the error that stopped the run
                warn(f"closing the request records failed too: {e}")
        raise
    metrics = sink.acc.result(
        percentile_metrics=o["percentile_metrics_list"],
        metric_percentiles=o["metric_percentiles_list"],
    )
    metrics["prefix_hit_rate_theoretical"] = prefix.rate
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
    rate = o["request_rate"]
    header = {
        "backend": o["backend"],
        "mode": mode,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": o["max_concurrency"],
        "lanes": lanes,
        "max_burst_per_ms": burst_per_ms,
        "class_models": class_models,
    }
    if mode != "poisson":
        offered = metrics.get("offered_request_rate")
        header["request_rate"] = f"{offered:.2f} (mean)" if offered else "-"
    digest = schedule_digest.hexdigest()
    if writer is not None:
        writer.close(
            {
                "partial": outcome.interrupted,
                "stopped_at_ns": outcome.stopped_at_ns,
                "schedule_digest": digest,
                # Wall clock of the run's start instant: record times + this = Unix ns.
                "t0_unix_ns": outcome.t0_unix_ns,
                "metrics": {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))},
                "header": header,
            }
        )
    return BlastRun(
        metrics, header, outcome.interrupted, model, urls[0], workload.info, writer, digest
    )


def expected_peak_in_flight(first: Schedule, mock_latency_ms: tuple[float, float] | None) -> int:
    """The most requests in flight at once that the schedule's first chunk implies: exact
    against the embedded mock (its TTFT and ITL are known), and for a real server the
    peak requests in any second (in flight at once if each takes about a second)."""
    if mock_latency_ms is None:
        return first.peak_in_window(1_000_000_000)
    ttft_ms, itl_ms = mock_latency_ms
    busy_ns = np.rint((ttft_ms + itl_ms * np.maximum(first.output_len - 1, 0)) * 1e6)
    starts = first.t_ns
    ends = np.sort(starts + busy_ns.astype(np.int64))
    # In flight just after each start: started so far minus ended by then.
    in_flight = np.arange(1, len(starts) + 1) - np.searchsorted(ends, starts, side="right")
    return int(in_flight.max(initial=0))


def jsonable(o: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in o.items():
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def result_json(
    o: dict[str, Any],
    m: dict[str, Any],
    header: dict[str, Any],
    model: str,
    seed: int,
    url: str,
    partial: bool,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "fineserve_version": __version__,
        "backend": o["backend"],
        "mode": header.get("mode", o["mode"]),
        "endpoint": url,
        "model_id": model,
        # --class-model: the model each class's requests asked for (model_id is the rest's).
        "class_models": header.get("class_models") or {},
        # null without --tokenizer: prompts were synthetic words, no tokenizer was used.
        "tokenizer_id": o["tokenizer"],
        "num_prompts": m["scheduled"],
        # A number, as vLLM writes it ("inf" for no pacing); outside Poisson mode the
        # schedule's mean rate.
        "request_rate": (
            header["request_rate"]
            if header.get("mode") == "poisson"
            else m.get("offered_request_rate")
        ),
        "burstiness": o["burstiness"],
        "max_concurrency": o["max_concurrency"],
        "seed": seed,
        "partial": partial,
    }
    result.update(m)
    return result


def write_result(path: Path, result: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".jsonl":
            with path.open("a") as f:
                f.write(json.dumps(result) + "\n")
        else:
            path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise FineserveError(f"cannot write {path}: {e.strerror}") from None
