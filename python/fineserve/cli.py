"""The ``fineserve`` command line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__
from .api import BACKENDS, DEFAULT_ENDPOINT, BodyTemplate, parse_extra_body
from .console import note, out, warn
from .errors import FineserveError
from .metrics import compute_metrics, format_summary
from .mock import MockServer
from .prompts import SyntheticPromptBuilder
from .runner import EngineOptions, default_lanes, run_engine
from .schedule import Schedule
from .server import base_url_from, check_url, fetch_models
from .workloads import poisson_arrivals_ns, random_lengths

#: Cap on connections opened before the start instant when sized automatically.
_AUTO_WARM_CAP = 16_384


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fineserve")
def cli() -> None:
    """Replay and synthesize realistic LLM-serving workloads against OpenAI-compatible
    servers, open-loop, with a Rust engine that keeps the schedule."""


def _mock_options(f: Any) -> Any:
    f = click.option(
        "--mock-ttft-ms",
        type=float,
        default=20.0,
        show_default=True,
        help="Embedded mock: time to first token.",
    )(f)
    f = click.option(
        "--mock-itl-ms",
        type=float,
        default=5.0,
        show_default=True,
        help="Embedded mock: inter-token latency.",
    )(f)
    return f


@cli.command("blast")
@click.option("--backend", type=click.Choice(BACKENDS), default="vllm", show_default=True)
@click.option(
    "--base-url",
    help="Server base URL, e.g. http://10.0.0.5:8000. "
    "Without it (and without --host/--port) the embedded mock is started.",
)
@click.option("--host", help="Server host (with --port).")
@click.option("--port", type=int, help="Server port.")
@click.option(
    "--endpoint", help="API path; default /v1/completions, or /v1/chat/completions for openai-chat."
)
@click.option("--model", help="Model name; default: the first id from GET /v1/models.")
@click.option(
    "--tokenizer",
    help="Tokenizer for exact prompt lengths (accepted; used once real prompt datasets land).",
)
@click.option("--mode", type=click.Choice(["poisson"]), default="poisson", show_default=True)
@click.option(
    "--request-rate",
    type=float,
    default=math.inf,
    show_default=True,
    help="Requests per second; inf sends everything at once.",
)
@click.option(
    "--burstiness",
    type=float,
    default=1.0,
    show_default=True,
    help="Gamma shape of inter-arrivals (1 = Poisson; < 1 burstier).",
)
@click.option("--num-prompts", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    help="Cap on requests in flight; excess requests queue (queueing shows as dispatch lag).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for arrivals, lengths and prompts; -1 = from the clock.",
)
@click.option("--disable-stream", is_flag=True, help="Send non-streaming requests.")
@click.option("--disable-ignore-eos", is_flag=True, help="Do not send ignore_eos (vllm).")
@click.option("--extra-request-body", help="JSON object merged into every request body.")
@click.option(
    "--warmup-requests",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Requests sent (and discarded) before the timed run.",
)
@click.option(
    "--output-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the result JSON here (.jsonl: append one line, as FineServe).",
)
@click.option("--disable-tqdm", is_flag=True, help="No progress bar.")
@click.option("--random-input-len", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--random-output-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--random-range-ratio",
    type=float,
    default=0.0,
    show_default=True,
    help="Lengths uniform in [len·(1−r), len·(1+r)].",
)
@click.option(
    "--lanes", type=click.IntRange(min=1), help="Engine threads (default: half the CPUs, 1 to 8)."
)
@click.option(
    "--warm-connections",
    type=click.IntRange(min=0),
    help="Connections opened before the start (default: peak requests in any 1 s, capped).",
)
@click.option("--connect-timeout", type=float, default=10.0, show_default=True, help="Seconds.")
@click.option(
    "--first-byte-timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds until response headers.",
)
@click.option(
    "--idle-timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds without a byte mid-response.",
)
@click.option(
    "--request-timeout",
    type=float,
    default=3600.0,
    show_default=True,
    help="Seconds for a whole request.",
)
@click.option(
    "--drain-grace",
    type=float,
    default=30.0,
    show_default=True,
    help="On Ctrl-C/SIGTERM, seconds to let in-flight requests finish.",
)
@click.option(
    "--realtime-priority",
    is_flag=True,
    help="Run engine lanes under SCHED_FIFO (needs root or CAP_SYS_NICE): fewer late sends "
    "for sparse or bursty schedules on contended cores; harmful when a lane is busy all the "
    "time (above ~2k req/s per lane the kernel's RT throttling pauses it for 50 ms a second).",
)
@_mock_options
def blast_command(**o: Any) -> None:
    """Drive a server open-loop at a precise schedule and report serving metrics."""
    extra = parse_extra_body(o["extra_request_body"])
    seed = int(time.time()) if o["seed"] == -1 else o["seed"]
    base = base_url_from(o["base_url"], o["host"], o["port"])
    mock: MockServer | None = None
    if base is None:
        mock = MockServer(ttft_ms=o["mock_ttft_ms"], itl_ms=o["mock_itl_ms"])
        base = mock.base_url
        note(
            f"no server given: started the embedded mock server at {base} "
            f"(TTFT {o['mock_ttft_ms']:g} ms, ITL {o['mock_itl_ms']:g} ms); "
            "pass --base-url or --host/--port to target a real server"
        )
    try:
        _blast(o, base, seed, extra, mock is not None)
    finally:
        if mock is not None:
            mock.stop()


def _resolve_model(base: str, model: str | None, api_key: str | None) -> str:
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


def _blast(o: dict[str, Any], base: str, seed: int, extra: dict, is_mock: bool) -> None:
    api_key = os.environ.get("OPENAI_API_KEY") or None
    endpoint = o["endpoint"] or DEFAULT_ENDPOINT[o["backend"]]
    url = base + (endpoint if endpoint.startswith("/") else "/" + endpoint)
    check_url(url)
    model = _resolve_model(base, o["model"], api_key)

    rng = np.random.default_rng(seed)
    n = o["num_prompts"]
    schedule = Schedule(
        t_ns=poisson_arrivals_ns(n, o["request_rate"], rng, o["burstiness"]),
        input_len=random_lengths(n, o["random_input_len"], o["random_range_ratio"], rng),
        output_len=random_lengths(n, o["random_output_len"], o["random_range_ratio"], rng),
    )
    if o["tokenizer"]:
        note(
            "--tokenizer is accepted but prompts are still synthetic words; "
            "input lengths are approximate"
        )
    elif not is_mock:
        note("no --tokenizer: synthetic word prompts, input token counts are approximate")
    builder = SyntheticPromptBuilder(seed)
    template = BodyTemplate(
        o["backend"],
        model,
        stream=not o["disable_stream"],
        ignore_eos=not o["disable_ignore_eos"],
        extra=extra,
    )
    bodies = template.render_all(
        (builder.build(i, int(ln)) for i, ln in enumerate(schedule.input_len)),
        schedule.output_len,
    )

    lanes = o["lanes"] or default_lanes()
    warm = o["warm_connections"]
    if warm is None:
        peak = schedule.peak_in_window(1_000_000_000)
        warm = min(n, o["max_concurrency"] or peak, _AUTO_WARM_CAP)
    options = EngineOptions(
        stream=not o["disable_stream"],
        max_concurrency=o["max_concurrency"],
        lanes=lanes,
        warm_connections=warm,
        connect_timeout_s=o["connect_timeout"],
        first_byte_timeout_s=o["first_byte_timeout"],
        idle_timeout_s=o["idle_timeout"],
        total_timeout_s=o["request_timeout"],
        realtime_priority=o["realtime_priority"],
        drain_grace_s=o["drain_grace"],
    )
    show = not o["disable_tqdm"]

    if o["warmup_requests"]:
        _warm_up(url, template, builder, o["warmup_requests"], schedule, options)

    rate = o["request_rate"]
    note(
        f"{n} requests to {url} (model {model}), rate "
        f"{'inf' if math.isinf(rate) else f'{rate:g}/s'}, seed {seed}, {lanes} lanes, "
        f"{warm} warm connections"
    )
    records = run_engine(
        [url],
        schedule.t_ns,
        bodies,
        np.arange(n, dtype=np.uint32),
        np.zeros(n, dtype=np.uint32),
        schedule.output_len,
        options,
        show_progress=show,
    )
    metrics = compute_metrics(records.columns, schedule.input_len)
    header = {
        "backend": o["backend"],
        "mode": o["mode"],
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": o["max_concurrency"],
    }
    out(format_summary(metrics, header))
    if records.interrupted:
        warn("the run was interrupted: results are partial")
    if o["output_file"]:
        result = _result_json(o, metrics, header, model, seed, url, records.interrupted)
        _write_result(o["output_file"], result)
        note(f"wrote {o['output_file']}")
    if records.interrupted:
        sys.exit(130)


def _warm_up(
    url: str,
    template: BodyTemplate,
    builder: SyntheticPromptBuilder,
    count: int,
    schedule: Schedule,
    options: EngineOptions,
) -> None:
    """FineServe's warm-up: ``count`` copies of the first prompt, at most 32 tokens out."""
    body = template.render(
        builder.build(0, int(schedule.input_len[0])), min(int(schedule.output_len[0]), 32)
    )
    warm_opts = EngineOptions(
        **{**options.__dict__, "warm_connections": 0, "max_concurrency": None}
    )
    rec = run_engine(
        [url],
        np.zeros(count, dtype=np.int64),
        [body],
        np.zeros(count, dtype=np.uint32),
        np.zeros(count, dtype=np.uint32),
        np.full(count, 32),
        warm_opts,
        show_progress=False,
    )
    kinds = rec.col("error_kind")
    if rec.interrupted:
        raise FineserveError("interrupted during warm-up")
    if np.all(kinds != 0):
        msg = rec.columns["error_message"][0] if rec.columns["error_message"] else "unknown"
        raise FineserveError(f"warm-up failed: all {count} requests failed ({msg})")


def _result_json(
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
        "mode": o["mode"],
        "endpoint": url,
        "model_id": model,
        "tokenizer_id": o["tokenizer"],
        "num_prompts": o["num_prompts"],
        "request_rate": header["request_rate"],
        "burstiness": o["burstiness"],
        "max_concurrency": o["max_concurrency"],
        "seed": seed,
        "partial": partial,
    }
    result.update(m)
    return result


def _write_result(path: Path, result: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".jsonl":
            with path.open("a") as f:
                f.write(json.dumps(result) + "\n")
        else:
            path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise FineserveError(f"cannot write {path}: {e.strerror}") from None


@cli.command("mock")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--model", default="fineserve-mock", show_default=True)
@click.option("--ttft-ms", type=float, default=20.0, show_default=True)
@click.option("--ttft-per-prompt-token-ms", type=float, default=0.0, show_default=True)
@click.option("--itl-ms", type=float, default=5.0, show_default=True)
@click.option("--itl-jitter-ms", type=float, default=0.0, show_default=True)
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Server threads."
)
def mock_command(
    host: str,
    port: int,
    model: str,
    ttft_ms: float,
    ttft_per_prompt_token_ms: float,
    itl_ms: float,
    itl_jitter_ms: float,
    workers: int,
) -> None:
    """Run the embedded OpenAI-compatible mock server until Ctrl-C."""
    server = MockServer(
        host,
        port,
        model=model,
        ttft_ms=ttft_ms,
        ttft_per_prompt_token_ms=ttft_per_prompt_token_ms,
        itl_ms=itl_ms,
        itl_jitter_ms=itl_jitter_ms,
        workers=workers,
    )
    out(
        f"fineserve mock serving {model!r} at {server.base_url} "
        f"(TTFT {ttft_ms:g} ms, ITL {itl_ms:g} ms); Ctrl-C to stop"
    )
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stats = server.stats()
        server.stop()
        note(f"mock stopped after {stats.get('requests', 0)} requests")


def main() -> None:
    cli(prog_name="fineserve")


if __name__ == "__main__":
    main()
