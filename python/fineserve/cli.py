"""The ``fineserve`` command line."""

from __future__ import annotations

import ipaddress
import math
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__
from .api import BACKENDS, parse_extra_body
from .blast import execute_blast, result_json, write_result
from .cli_fit import compare_command, fit_command
from .cli_options import (
    NON_NEGATIVE,
    POSITIVE,
    TOKENS,
    GroupedHelpCommand,
    ListOptionsCommand,
    Number,
    OutputFile,
    apply_options,
    fault_kwargs,
    fault_options,
    trace_format_options,
)
from .cli_report import report_command
from .console import note, out, warn
from .distributed import format_workers
from .errors import FineserveError
from .metrics import format_summary
from .metrics.serving import parse_goodput
from .mock import MockServer
from .results import detailed_lists, read_requests
from .schedule import write_schedule
from .server import base_url_from
from .workloads.spec import MODES, build_workload


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fineserve")
def cli() -> None:
    """Replay and synthesize realistic LLM-serving workloads against OpenAI-compatible
    servers, open-loop, with a Rust engine that keeps the schedule."""


def _mock_options(f: Any) -> Any:
    f = click.option(
        "--mock-ttft-ms",
        type=NON_NEGATIVE,
        default=20.0,
        show_default=True,
        help="Embedded mock: time to first token.",
    )(f)
    f = click.option(
        "--mock-itl-ms",
        type=NON_NEGATIVE,
        default=5.0,
        show_default=True,
        help="Embedded mock: inter-token latency.",
    )(f)
    f = click.option(
        "--mock-max-concurrency",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Embedded mock: generations served at once (0 = no limit; the rest queue).",
    )(f)
    f = click.option(
        "--mock-reasoning-ratio",
        type=Number(min=0, max=1),
        default=0.0,
        show_default=True,
        help="Embedded mock: share of each chat/Responses answer streamed as reasoning first "
        "(a schedule's reason_ratio, e.g. ServeGen's reasoning pools, overrides it per "
        "request).",
    )(f)
    f = click.option(
        "--mock-reasoning-field",
        type=click.Choice(["reasoning", "reasoning_content"]),
        default="reasoning",
        show_default=True,
        help="Embedded mock: the delta field reasoning streams in (vLLM >= 0.16: reasoning).",
    )(f)
    f = click.option(
        "--mock-tool-calls",
        type=Number(min=0, max=1),
        default=0.0,
        show_default=True,
        help="Embedded mock: share of chat/Responses answers streamed as tool-call deltas.",
    )(f)
    return fault_options("mock-")(f)


def _workload_options(f: Any) -> Any:
    """Options that define the schedule; shared by ``generate`` and ``blast``."""
    opts = [
        click.option(
            "--mode",
            type=click.Choice(MODES),
            default="poisson",
            show_default=True,
            help="How arrivals and lengths are made.",
        ),
        click.option(
            "--schedule",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Replay a schedule written by `fineserve generate` exactly (overrides --mode).",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed for arrivals, lengths and prompts; -1 = from the clock.",
        ),
        click.option(
            "--num-prompts",
            type=click.IntRange(min=1),
            help="Requests (poisson; default 100) or a cap on the others.",
        ),
        click.option(
            "--request-rate",
            type=Number(min=0, min_open=True, allow_inf=True),
            default=math.inf,
            show_default=True,
            help="poisson: requests/s (inf = all at once); servegen/burstgpt: target mean rate.",
        ),
        click.option(
            "--burstiness",
            type=POSITIVE,
            default=1.0,
            show_default=True,
            help="poisson: Gamma shape of inter-arrivals (1 = Poisson; < 1 burstier).",
        ),
        click.option("--ramp", type=click.Choice(["linear", "step"]), help="poisson: rate ramp."),
        click.option(
            "--ramp-start-rate",
            type=POSITIVE,
            default=1.0,
            show_default=True,
            help="poisson --ramp: requests/s at the start.",
        ),
        click.option(
            "--ramp-end-rate",
            type=POSITIVE,
            default=10.0,
            show_default=True,
            help="poisson --ramp: requests/s at the end.",
        ),
        click.option(
            "--ramp-steps",
            type=click.IntRange(min=1),
            default=5,
            show_default=True,
            help="poisson --ramp step: number of rate steps.",
        ),
        click.option(
            "--random-input-len",
            type=TOKENS,
            default=1024,
            show_default=True,
            help="Input tokens per request (poisson; and wherever a workload has no lengths "
            "of its own, which is announced).",
        ),
        click.option(
            "--random-output-len",
            type=TOKENS,
            default=128,
            show_default=True,
            help="Output tokens per request (same rules as --random-input-len).",
        ),
        click.option(
            "--random-range-ratio",
            type=Number(min=0, max=1, max_open=True),
            default=0.0,
            show_default=True,
            help="Lengths uniform in [len·(1−r), len·(1+r)].",
        ),
        click.option(
            "--request-lengths-csv",
            type=click.Path(path_type=Path),
            help="Sample (input, output) length pairs from this CSV (poisson/parametric).",
        ),
        click.option(
            "--request-trace-csv",
            type=click.Path(path_type=Path),
            help="replay: FineServe-style trace CSV.",
        ),
        click.option(
            "--trace",
            type=click.Path(path_type=Path),
            help="replay/burstgpt: a trace in any supported format (detected from content).",
        ),
        trace_format_options,
        click.option(
            "--time-scale",
            type=POSITIVE,
            default=1.0,
            show_default=True,
            help="> 1 compresses time (replay, parametric, servegen, burstgpt).",
        ),
        click.option(
            "--start",
            type=NON_NEGATIVE,
            default=0.0,
            help="Trace (or schedule) seconds to skip.",
        ),
        click.option(
            "--duration",
            type=POSITIVE,
            help="Trace (or schedule) seconds to generate or replay; the run lasts "
            "duration / time-scale.",
        ),
        click.option(
            "--model-class",
            multiple=True,
            help="parametric: FineServe class (e.g. Dense_lt10B); repeat to mix classes.",
        ),
        click.option(
            "--datasets-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Directory with Parametric/gamma, Parametric/nb and Parametric/lengths "
            "(also $FINESERVE_DATASETS, then the project's datasets/).",
        ),
        click.option(
            "--gamma-params-csv",
            type=click.Path(path_type=Path),
            help="parametric: a per-window Gamma parameter CSV (FineServe's format) instead "
            "of --model-class.",
        ),
        click.option(
            "--window-start-column",
            default="window_start_ms",
            show_default=True,
            help="--gamma-params-csv: window start column (ms).",
        ),
        click.option(
            "--window-end-column",
            default="window_end_ms",
            show_default=True,
            help="--gamma-params-csv: window end column (ms).",
        ),
        click.option(
            "--gamma-shape-column",
            default="gamma_shape",
            show_default=True,
            help="--gamma-params-csv: Gamma shape column.",
        ),
        click.option(
            "--gamma-scale-column",
            default="gamma_scale",
            show_default=True,
            help="--gamma-params-csv: Gamma scale column (ms).",
        ),
        click.option(
            "--parametric-window-seconds",
            type=POSITIVE,
            default=300.0,
            show_default=True,
            help="parametric: window length when the file gives only window starts.",
        ),
        click.option(
            "--parametric-extension-mode",
            type=click.Choice(["repeat_jitter", "model_sample"]),
            default="repeat_jitter",
            show_default=True,
            help="How windows past the parameter file's end are made.",
        ),
        click.option(
            "--parametric-jitter-ratio",
            type=NON_NEGATIVE,
            default=0.05,
            show_default=True,
            help="repeat_jitter: relative jitter of repeated windows' rates.",
        ),
        click.option(
            "--parametric-arrivals",
            type=click.Choice(["auto", "gamma"]),
            default="auto",
            show_default=True,
            help="auto: the per-window family `fineserve fit` chose (Gamma, Weibull, "
            "Exponential) when the file records it; gamma: the Gamma columns (FineServe).",
        ),
        click.option(
            "--parametric-nb-json",
            type=click.Path(path_type=Path),
            help="NB micro-burst parameters (enables the NB layer for any class).",
        ),
        click.option(
            "--disable-parametric-nb-lt10b",
            is_flag=True,
            help="No NB micro-bursts for *lt10B* classes.",
        ),
        click.option(
            "--class-lengths/--no-class-lengths",
            default=True,
            show_default=True,
            help="parametric: draw lengths from a class's fitted histogram "
            "(Parametric/lengths/<class>_lengths.json) when present, instead of --random-*.",
        ),
        click.option(
            "--parametric-nb-zero",
            type=click.Choice(["truncate", "empty"]),
            default="truncate",
            show_default=True,
            help="A zero NB draw is redrawn (truncate) or empties its slot.",
        ),
        click.option(
            "--servegen-pool",
            type=click.Path(file_okay=False, path_type=Path),
            help="servegen: directory of chunk-<i>-trace.csv / chunk-<i>-dataset.json.",
        ),
        click.option("--servegen-clients", help="servegen: client ids to use, e.g. 0,1."),
        click.option(
            "--burstgpt-params",
            type=click.Path(path_type=Path),
            help="burstgpt: parameter JSON (else fitted from --trace).",
        ),
        click.option(
            "--rate-scale",
            type=POSITIVE,
            help="servegen/burstgpt: multiply every rate (instead of --request-rate).",
        ),
    ]
    return apply_options(f, opts)


def _workload_option_names() -> frozenset[str]:
    def probe() -> None: ...

    return frozenset(p.name for p in _workload_options(probe).__click_params__ if p.name)


#: The workload options' parameter names (to tell which of them a command line gave).
WORKLOAD_OPTION_NAMES = _workload_option_names()


def _note_given(o: dict[str, Any]) -> None:
    """Records which workload options the command line (or environment) set, as
    ``o["_workload_given"]``: a written schedule refuses those it cannot apply."""
    ctx = click.get_current_context()
    given = {
        name
        for name in WORKLOAD_OPTION_NAMES
        if ctx.get_parameter_source(name)
        in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    }
    o["_workload_given"] = frozenset(given)


def _blast_options(f: Any) -> Any:
    """Options of `blast`, shared by `sweep` (server, request shape, engine, results)."""
    opts = [
        click.option(
            "--backend",
            type=click.Choice(BACKENDS),
            default="vllm",
            show_default=True,
            help="Request body dialect and default path (vllm/sglang send ignore_eos and "
            "min_tokens for exact output lengths).",
        ),
        click.option(
            "--base-url",
            multiple=True,
            help="Server base URL, e.g. http://10.0.0.5:8000; repeat for a deployment of "
            "several instances. Without it (and without --host/--port) the embedded mock "
            "is started.",
        ),
        click.option(
            "--route",
            multiple=True,
            metavar="POLICY | CLASS=URL[,URL...]",
            help="How requests spread over several --base-url: round-robin (default), or "
            "least-outstanding (decided when each request leaves: the endpoint with the "
            "fewest requests in flight). CLASS=URL[,URL...] sends a class's requests only "
            "to these servers (repeat per class; with a policy, it applies within them).",
        ),
        click.option(
            "--route-class",
            multiple=True,
            hidden=True,
            help="CLASS=URL[,URL...]: the same as --route CLASS=URL[,URL...].",
        ),
        click.option(
            "--turn-affinity/--no-turn-affinity",
            default=True,
            show_default=True,
            help="Send a conversation's later turns to the server that answered its "
            "previous turn (as session-sticky routers do, so its prefix cache can help).",
        ),
        click.option(
            "--class-model",
            multiple=True,
            help="CLASS=MODEL: the model a class's requests ask for (repeat per class).",
        ),
        click.option("--host", help="Server host (with --port)."),
        click.option("--port", type=int, help="Server port."),
        click.option(
            "--endpoint",
            help="API path; default /v1/completions, or /v1/chat/completions for openai-chat.",
        ),
        click.option("--model", help="Model name; default: the first id from GET /v1/models."),
        click.option(
            "--tokenizer",
            help="Hugging Face tokenizer (a local directory, or a name already in the local "
            "cache; never downloaded): prompts get exactly the schedule's input lengths.",
        ),
        click.option(
            "--dataset-name",
            type=click.Choice(["random", "sharegpt"]),
            default="random",
            show_default=True,
            help="vLLM's: random = generated prompts of the workload's lengths; sharegpt = "
            "prompts cut from --dataset-path (lengths still the workload's, not the dataset's).",
        ),
        click.option(
            "--dataset-path",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Prompt source text: ShareGPT JSON, FineServe JSON (input_text) or JSONL "
            "(prompt/text); prompts are cut from it to exact lengths (needs --tokenizer).",
        ),
        click.option(
            "--apply-chat-template",
            is_flag=True,
            help="Completions API: wrap each prompt in the tokenizer's chat template "
            "(its length included).",
        ),
        click.option(
            "--prompt-suffix",
            default="",
            help="Text appended to every prompt, then 'Assistant:' (FineServe's Generator).",
        ),
        click.option(
            "--dataset-output-len",
            is_flag=True,
            help="Take output lengths from --dataset-path (FineServe's output_length, or "
            "output_len / max_tokens): request i gets entry (i mod N)'s, in place of the "
            "workload's.",
        ),
        click.option(
            "--prefix-block-size",
            type=click.IntRange(min=1),
            default=512,
            show_default=True,
            help="Tokens per hash_ids block (Mooncake/Qwen-Bailian traces): equal ids give "
            "identical blocks, so a prefix cache sees the trace's sharing.",
        ),
        click.option(
            "--shared-prefix-groups",
            type=click.IntRange(min=0),
            default=0,
            help="Synthetic prefix sharing: request i uses group (i mod G)'s prefix.",
        ),
        click.option(
            "--shared-prefix-len",
            type=click.IntRange(min=0),
            default=0,
            help="Tokens of the shared prefix per group (the rest of a prompt is its own).",
        ),
        click.option(
            "--prompt-check",
            type=click.Choice(["sample", "all", "off"]),
            default="sample",
            show_default=True,
            help="Re-encode prompts to check their length: a sample of each chunk (all of "
            "them once one is off), every prompt, or none.",
        ),
        click.option(
            "--max-concurrency",
            type=click.IntRange(min=1),
            help="Cap on requests in flight; excess requests queue "
            "(queueing shows as dispatch lag).",
        ),
        click.option("--disable-stream", is_flag=True, help="Send non-streaming requests."),
        click.option("--disable-ignore-eos", is_flag=True, help="Do not send ignore_eos (vllm)."),
        click.option("--extra-request-body", help="JSON object merged into every request body."),
        click.option(
            "--warmup-requests",
            "--num-warmups",
            type=click.IntRange(min=0),
            default=1,
            show_default=True,
            help="Requests sent (and discarded) before the timed run.",
        ),
        click.option(
            "--output-file",
            type=OutputFile(),
            help="Write the result JSON here (.jsonl: append one line, as FineServe).",
        ),
        click.option(
            "--save-result",
            is_flag=True,
            help="vLLM's: write the result JSON to --result-dir/--result-filename (default "
            "name: BACKEND-RATEqps-MODEL-DATE.json), like --output-file.",
        ),
        click.option(
            "--result-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="With --save-result: the directory (default: the current one).",
        ),
        click.option(
            "--result-filename", help="With --save-result: the file name (vLLM's default)."
        ),
        click.option(
            "--save-requests",
            type=OutputFile(),
            help="Per-request Parquet (timestamps, status, error, class, endpoint, lengths, token "
            "times), journaled as the run goes so a crash or Ctrl-C keeps every finished request; "
            "read it with `fineserve report`.",
        ),
        click.option(
            "--save-detailed",
            is_flag=True,
            help="Also put vLLM's per-request lists in the result JSON: input_lens, "
            "output_lens, ttfts and itls (seconds), errors ('' when ok). Response texts are "
            "not kept, so generated_texts is not written.",
        ),
        click.option(
            "--goodput",
            multiple=True,
            help="SLOs in ms for goodput, vLLM's syntax: --goodput ttft:500 --goodput tpot:50 "
            '(or "ttft:500 tpot:50"); metrics ttft, tpot, e2el, and ttfo (first answer '
            "token, for reasoning models).",
        ),
        click.option(
            "--percentile-metrics",
            default="ttft,tpot,itl,e2el",
            show_default=True,
            help="Metrics that get the --metric-percentiles keys (vLLM).",
        ),
        click.option(
            "--metric-percentiles",
            default="99",
            show_default=True,
            help="Comma-separated percentiles reported as p<q>_<metric>_ms (vLLM).",
        ),
        click.option(
            "--metrics-window",
            type=POSITIVE,
            default=10.0,
            show_default=True,
            help="Seconds per window of the instantaneous metrics (rate, failures, tokens/s, "
            "TTFT/ITL mean and p99, ITL jitter).",
        ),
        click.option("--disable-tqdm", is_flag=True, help="No progress bar."),
        click.option(
            "--lanes",
            type=click.IntRange(min=1),
            help="Engine threads (default: half the CPUs, 1 to 8).",
        ),
        click.option(
            "--warm-connections",
            type=click.IntRange(min=0),
            help="Connections opened before the start (default: peak requests in any 1 s, capped).",
        ),
        click.option(
            "--connect-timeout", type=POSITIVE, default=10.0, show_default=True, help="Seconds."
        ),
        click.option(
            "--first-byte-timeout",
            type=POSITIVE,
            default=600.0,
            show_default=True,
            help="Seconds until response headers.",
        ),
        click.option(
            "--idle-timeout",
            type=POSITIVE,
            default=600.0,
            show_default=True,
            help="Seconds without a byte mid-response.",
        ),
        click.option(
            "--request-timeout",
            type=POSITIVE,
            default=3600.0,
            show_default=True,
            help="Seconds for a whole request.",
        ),
        click.option(
            "--max-response-mb",
            type=click.FloatRange(min=0, min_open=True),
            default=64.0,
            show_default=True,
            help="A longer response fails as too_large (a runaway or endless answer).",
        ),
        click.option(
            "--source-ip",
            help="Comma-separated local addresses to open connections from, in turn (e.g. "
            "127.0.0.2,127.0.0.3 towards a server on loopback): past ~28k connections to "
            "one server, one address runs out of ephemeral ports.",
        ),
        click.option(
            "--drain-grace",
            type=POSITIVE,
            default=30.0,
            show_default=True,
            help="On Ctrl-C/SIGTERM, seconds to let in-flight requests finish.",
        ),
        click.option(
            "--realtime-priority",
            is_flag=True,
            help="Run engine lanes under SCHED_FIFO (needs root or CAP_SYS_NICE) while they "
            "are mostly idle: fewer late sends for sparse or bursty schedules on contended "
            "cores. A lane busy more than 60% of the time (a high steady rate) drops back "
            "to normal scheduling, as the kernel's RT throttling would otherwise pause it.",
        ),
    ]
    return apply_options(f, opts)


def _ray_options(f: Any) -> Any:
    opts = [
        click.option(
            "--ray",
            metavar="ADDRESS",
            help="Spread the run over Ray workers: a cluster address (auto, ray://HOST:10001) "
            "or 'local' to start Ray on this machine. Needs pip install 'fineserve[ray]'.",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=2,
            show_default=True,
            help="Ray workers (engine instances) the schedule is split over (with --ray).",
        ),
    ]
    return apply_options(f, opts)


@cli.command("blast", cls=ListOptionsCommand)
@_blast_options
@_ray_options
@_mock_options
@_workload_options
def blast_command(**o: Any) -> None:
    """Drive a server open-loop at a precise schedule and report serving metrics."""
    _note_given(o)
    extra = _prepare_blast_options(o)
    seed = int(time.time()) if o["seed"] == -1 else o["seed"]
    given = _given_servers(o)
    started: list[MockServer] = []

    def servers() -> list[str]:
        """Called once the workload is built (a bad option never starts the mock)."""
        if given:
            return given
        started.append(_start_mock(o))
        return [started[0].base_url]

    try:
        _blast(o, servers, seed, extra, not given)
    finally:
        for mock in started:
            mock.stop()


def _given_servers(o: dict[str, Any]) -> list[str]:
    """The base URLs of --base-url or --host/--port; empty when no server is given."""
    bases = [b for b in (base_url_from(u, None, None) for u in o["base_url"]) if b]
    if not bases:
        single = base_url_from(None, o["host"], o["port"])
        bases = [single] if single else []
    elif o["host"] or o["port"]:
        raise FineserveError("give either --base-url or --host/--port, not both")
    return bases


def _servers(o: dict[str, Any]) -> tuple[list[str], MockServer | None]:
    """The targets' base URLs, starting the embedded mock when no server is given."""
    bases = _given_servers(o)
    if bases:
        return bases, None
    mock = _start_mock(o)
    return [mock.base_url], mock


def _start_mock(o: dict[str, Any]) -> MockServer:
    """The embedded mock server, with the --mock-* options."""
    faults = fault_kwargs(o, "--mock-fault")
    mock = MockServer(
        ttft_ms=o["mock_ttft_ms"],
        itl_ms=o["mock_itl_ms"],
        max_concurrency=o["mock_max_concurrency"],
        reasoning_ratio=o["mock_reasoning_ratio"],
        reasoning_field=o["mock_reasoning_field"],
        tool_calls=o["mock_tool_calls"],
        **faults,
    )
    cap = o["mock_max_concurrency"]
    injected = ", ".join(f"{k} {r:.1%}" for k, r in faults["faults"] if r > 0)
    note(
        f"no server given: started the embedded mock server at {mock.base_url} "
        f"(TTFT {o['mock_ttft_ms']:g} ms, ITL {o['mock_itl_ms']:g} ms"
        + (f", {cap} generations at once" if cap else "")
        + (
            f", {o['mock_reasoning_ratio']:.0%} reasoning as delta.{o['mock_reasoning_field']}"
            if o["mock_reasoning_ratio"]
            else ""
        )
        + (f", {o['mock_tool_calls']:.0%} tool-call answers" if o["mock_tool_calls"] else "")
        + (f", faults: {injected}" if injected else "")
        + "); pass --base-url or --host/--port to target a real server"
    )
    return mock


def _prepare_blast_options(o: dict[str, Any]) -> dict:
    """Parses the options that need more than click; returns the extra request body."""
    extra = parse_extra_body(o["extra_request_body"])
    o["slos"] = parse_goodput(o["goodput"])
    o["percentile_metrics_list"], o["metric_percentiles_list"] = _percentile_options(
        o["percentile_metrics"], o["metric_percentiles"]
    )
    if not (o["metrics_window"] > 0 and math.isfinite(o["metrics_window"])):
        raise FineserveError("--metrics-window must be a positive number of seconds")
    if o.get("save_result") and o["output_file"]:
        raise FineserveError("give --output-file or --save-result (vLLM's name), not both")
    if (o.get("result_dir") or o.get("result_filename")) and not o.get("save_result"):
        raise FineserveError("--result-dir and --result-filename go with --save-result")
    if o.get("save_result") and o.get("result_dir"):
        OutputFile().convert(str(Path(o["result_dir"]) / "probe"), None, None)
    if o.get("save_detailed") and not (o["output_file"] or o.get("save_result")):
        raise FineserveError("--save-detailed needs --output-file (or --save-result)")
    if o.get("dataset_name") == "sharegpt" and not o.get("dataset_path"):
        raise FineserveError("--dataset-name sharegpt needs --dataset-path (a ShareGPT JSON)")
    if o.get("ray"):
        from .distributed import import_ray

        import_ray()  # refused now, before any server starts, if Ray is missing
    # The engine checks these too; here they are refused before any server starts.
    for address in [a.strip() for a in (o.get("source_ip") or "").split(",") if a.strip()]:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise FineserveError(f"source address {address!r} is not an IP address") from None
    return extra


@cli.command("sweep", cls=ListOptionsCommand)
@click.option(
    "--slo",
    "slo_texts",
    multiple=True,
    required=True,
    help="METRIC:pQ:MS, e.g. --slo ttft:p99:2250 --slo tpot:p99:500 (ttft, tpot, itl, e2el).",
)
@click.option(
    "--scale",
    type=click.Choice(["auto", "rate", "time-scale"]),
    default="auto",
    show_default=True,
    help="What the load is: the Poisson request rate, or the time scale of any other mode "
    "(auto: rate for poisson, time-scale otherwise).",
)
@click.option(
    "--start-load",
    type=POSITIVE,
    help="First load probed (default: --request-rate or --time-scale).",
)
@click.option(
    "--step-seconds",
    type=POSITIVE,
    default=10.0,
    show_default=True,
    help="Wall seconds per probe (rate); for time-scale, the trace span of every probe is "
    "--duration, or step-seconds x the starting time scale.",
)
@click.option(
    "--max-failure-rate",
    type=Number(min=0, max=1),
    default=0.01,
    show_default=True,
    help="A probe fails when more than this share of its requests failed.",
)
@click.option(
    "--min-sustained",
    type=Number(min=0, max=1),
    default=0.9,
    show_default=True,
    help="A probe fails when the server completed fewer requests per second, during the "
    "schedule, than this share of the offered rate (0 turns the check off).",
)
@click.option(
    "--tolerance",
    type=POSITIVE,
    default=0.05,
    show_default=True,
    help="Stop when the bracket is this narrow (relative).",
)
@click.option(
    "--max-probes",
    type=click.IntRange(min=2),
    default=14,
    show_default=True,
    help="Stop after this many probes, bracket or not.",
)
@click.option(
    "--target-load",
    type=POSITIVE,
    help="Total load to provision for: prints the implied instance count.",
)
@click.option(
    "--plot",
    "plot_path",
    type=OutputFile(),
    help="PNG of load vs the SLO percentiles.",
)
@_blast_options
@_mock_options
@_workload_options
def sweep_command(
    slo_texts: tuple[str, ...],
    scale: str,
    start_load: float | None,
    step_seconds: float,
    max_failure_rate: float,
    min_sustained: float,
    tolerance: float,
    max_probes: int,
    target_load: float | None,
    plot_path: Path | None,
    **o: Any,
) -> None:
    """Find the highest load (request rate or time scale) at which the workload still
    meets the SLOs, by bracketing and bisection; --output-file writes the JSON."""
    from .sweep import RATE_UNIT, format_sweep, parse_slo, plot_sweep, search, sweep_json

    slos = [parse_slo(t) for t in slo_texts]
    _note_given(o)
    extra = _prepare_blast_options(o)
    if not (step_seconds > 0 and 0 <= max_failure_rate < 1 and tolerance > 0):
        raise FineserveError(
            "--step-seconds and --tolerance must be > 0, --max-failure-rate in [0, 1)"
        )
    if o["save_requests"]:
        warn("--save-requests is ignored by sweep (one file per probe is not written)")
    mode = o["mode"] if not o["schedule"] else "schedule"
    if scale == "auto":
        scale = "rate" if mode == "poisson" else "time-scale"
    if scale == "rate" and mode != "poisson":
        raise FineserveError("--scale rate needs --mode poisson; use --scale time-scale")
    if scale == "rate":
        start = start_load or (o["request_rate"] if math.isfinite(o["request_rate"]) else 10.0)
    else:
        start = start_load or o["time_scale"] or 1.0
    span = o["duration"] or step_seconds * start
    seed = int(time.time()) if o["seed"] == -1 else o["seed"]
    o["percentile_metrics_list"] = tuple(
        dict.fromkeys([*o["percentile_metrics_list"], *(x.metric for x in slos)])
    )
    o["metric_percentiles_list"] = tuple(
        dict.fromkeys([*o["metric_percentiles_list"], *(x.percentile for x in slos)])
    )
    bases, mock = _servers(o)
    probes_done = 0

    def probe(load: float) -> dict[str, Any]:
        nonlocal probes_done
        step = {**o, "save_requests": None, "output_file": None, "disable_tqdm": True}
        if probes_done:
            step["warmup_requests"] = 0
        if scale == "rate":
            step.update(request_rate=load, num_prompts=max(20, round(load * step_seconds)))
        else:
            step.update(time_scale=load, duration=span)
        probes_done += 1
        run = execute_blast(step, bases, seed, extra, mock is not None, quiet=probes_done > 1)
        if run.interrupted:
            raise KeyboardInterrupt
        return run.metrics

    def log(p: Any) -> None:
        note(
            f"probe {len(result_probes) + 1}: {scale} {p.load:.3f} -> "
            f"{'PASS' if p.passed else 'fail'} ({p.why})"
        )
        result_probes.append(p)

    result_probes: list[Any] = []
    try:
        result = search(
            probe,
            start,
            slos,
            unit=RATE_UNIT if scale == "rate" else "time scale",
            max_failure_rate=max_failure_rate,
            min_sustained=min_sustained,
            rel_tolerance=tolerance,
            max_probes=max_probes,
            log=log,
        )
    finally:
        if mock is not None:
            mock.stop()
    out(format_sweep(result, target_load))
    if o["output_file"]:
        write_result(o["output_file"], sweep_json(result, target_load))
        note(f"wrote {o['output_file']}")
    if plot_path:
        note(f"wrote {plot_sweep(result, plot_path)}")


def _percentile_options(
    metrics: str, percentiles: str
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    names = tuple(m.strip() for m in metrics.split(",") if m.strip())
    bad = [m for m in names if m not in ("ttft", "tpot", "itl", "e2el", "ttfo")]
    if bad:
        raise FineserveError(
            f"--percentile-metrics: unknown {bad[0]!r}; choose from ttft, tpot, itl, e2el, ttfo"
        )
    try:
        qs = tuple(float(q) for q in percentiles.split(",") if q.strip())
    except ValueError:
        raise FineserveError("--metric-percentiles takes numbers like 50,90,99") from None
    if any(not 0 < q < 100 for q in qs):
        raise FineserveError("--metric-percentiles must be between 0 and 100 (exclusive)")
    return names, qs


def _blast(
    o: dict[str, Any],
    bases: list[str] | Callable[[], list[str]],
    seed: int,
    extra: dict,
    is_mock: bool,
) -> None:
    if o.get("save_detailed") and not o["save_requests"]:
        # The per-request lists are read back from a results file: a temporary one.
        with tempfile.TemporaryDirectory(prefix="fineserve-") as tmp:
            step = {**o, "save_requests": Path(tmp) / "requests.parquet"}
            _blast_once(step, bases, seed, extra, is_mock, announce_requests=False)
        return
    _blast_once(o, bases, seed, extra, is_mock)


def _blast_once(
    o: dict[str, Any],
    bases: list[str] | Callable[[], list[str]],
    seed: int,
    extra: dict,
    is_mock: bool,
    announce_requests: bool = True,
) -> None:
    run = execute_blast(o, bases, seed, extra, is_mock)
    out(format_summary(run.metrics, run.header))
    if "workers" in run.metrics:
        out(format_workers(run.metrics["workers"]))
    if run.interrupted:
        warn("the run was interrupted: results are partial")
    saved = run.writer.final_path if run.writer is not None else None
    if saved is not None and announce_requests:
        note(f"wrote {run.writer.rows} request records to {saved}")  # type: ignore[union-attr]
    if run.writer is not None and run.writer.dropped:
        warn(f"{run.writer.dropped} request records could not be written (see above)")
    if o.get("save_result") and not o["output_file"]:
        o = {**o, "output_file": _vllm_result_path(o, run.model)}
    if o["output_file"]:
        result = result_json(o, run.metrics, run.header, run.model, seed, run.url, run.interrupted)
        result["workload"] = run.workload_info
        result["schedule_digest"] = run.digest
        if "workers" in run.metrics:
            result["workers"] = run.metrics["workers"]
        if o.get("save_detailed") and saved is not None:
            result.update(detailed_lists(read_requests(saved)[0]))
        write_result(o["output_file"], result)
        note(f"wrote {o['output_file']}")
    if run.interrupted:
        sys.exit(130)


def _vllm_result_path(o: dict[str, Any], model: str) -> Path:
    """vLLM's --save-result file: RESULT_DIR/BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json
    unless --result-filename names it."""
    if o.get("result_filename"):
        name = o["result_filename"]
    else:
        rate = o["request_rate"]
        concurrency = f"-concurrency{o['max_concurrency']}" if o["max_concurrency"] else ""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base_model = model.rstrip("/").split("/")[-1]
        rate_text = "inf" if math.isinf(rate) else f"{rate:g}"
        name = f"{o['backend']}-{rate_text}qps{concurrency}-{base_model}-{stamp}.json"
    return Path(o.get("result_dir") or ".") / name


@cli.command("generate", cls=GroupedHelpCommand)
@click.option(
    "-o",
    "--output",
    type=OutputFile(),
    required=True,
    help="Schedule file to write (Parquet).",
)
@click.option(
    "--summary-json",
    type=OutputFile(),
    help="Also write the printed summary as JSON.",
)
@_workload_options
def generate_command(output: Path, summary_json: Path | None, **o: Any) -> None:
    """Write a schedule (Parquet) without sending anything, and summarise it."""
    _note_given(o)
    seed = int(time.time()) if o["seed"] == -1 else o["seed"]
    workload = build_workload(o, seed)
    for line in workload.notes:
        note(line)
    meta = {
        "fineserve_version": __version__,
        "command": " ".join(sys.argv),
        "workload": workload.info,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    started = time.perf_counter()
    summary = write_schedule(output, workload.chunks, meta)
    elapsed = time.perf_counter() - started
    summary["generation_s"] = elapsed
    out(format_schedule_summary(summary, workload.info))
    note(f"wrote {output} ({summary['requests'] / max(elapsed, 1e-9) / 1e6:.2f} M requests/s)")
    if summary_json:
        write_result(summary_json, {"workload": workload.info, **summary})


def format_schedule_summary(s: dict[str, Any], info: dict[str, Any]) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Schedule ", n=50, c="=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40} {value}")

    row("Mode:", info.get("mode"))
    row("Requests:", s["requests"])
    row("Span (s):", f"{s['span_s']:.3f}")
    row("Mean rate (req/s):", f"{s['mean_rate_rps']:.2f}")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total output tokens:", s["total_output_tokens"])
    windows = s["windows"]
    if windows:
        rates = np.array([w["rate_rps"] for w in windows])
        cvs = np.array([w["iat_cv"] for w in windows])
        row("Windows (300 s):", len(windows))
        row(
            "  rate min/median/max (req/s):",
            f"{rates.min():.2f} / {np.median(rates):.2f} / {rates.max():.2f}",
        )
        row("  IAT CV min/median/max:", f"{cvs.min():.2f} / {np.median(cvs):.2f} / {cvs.max():.2f}")
    row(f"Occupied {s['slot_ms']:g} ms slots:", s["occupied_slots"])
    row("  mean requests per occupied slot:", f"{s['mean_per_occupied_slot']:.3f}")
    row("  max requests in one slot:", s["max_per_slot"])
    row("  requests in multi-request slots (%):", f"{100 * s['fraction_in_bursts']:.2f}")
    if s.get("prefix_hit_rate_theoretical") is not None:
        row(
            "Prefix-cache hit rate, theoretical (%):",
            f"{100 * s['prefix_hit_rate_theoretical']:.2f}",
        )
    row("Digest (t, input, output):", s["digest"])
    lines.append("=" * 50)
    return "\n".join(lines)


@cli.command("mock")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--model", default="fineserve-mock", show_default=True, help="Model id it serves.")
@click.option(
    "--ttft-ms", type=NON_NEGATIVE, default=20.0, show_default=True, help="Time to first token."
)
@click.option(
    "--ttft-per-prompt-token-ms",
    type=NON_NEGATIVE,
    default=0.0,
    show_default=True,
    help="Added to the TTFT per prompt token (a prefill cost).",
)
@click.option(
    "--itl-ms", type=NON_NEGATIVE, default=5.0, show_default=True, help="Inter-token latency."
)
@click.option(
    "--itl-jitter-ms",
    type=NON_NEGATIVE,
    default=0.0,
    show_default=True,
    help="Uniform jitter added to each inter-token gap.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Server threads."
)
@click.option(
    "--reasoning-ratio",
    type=Number(min=0, max=1),
    default=0.0,
    show_default=True,
    help="Share of each chat/Responses answer streamed as reasoning first (a request's "
    "fineserve_reasoning_ratio field overrides it).",
)
@click.option(
    "--reasoning-field",
    type=click.Choice(["reasoning", "reasoning_content"]),
    default="reasoning",
    show_default=True,
    help="The delta field reasoning streams in.",
)
@click.option(
    "--tool-calls",
    type=Number(min=0, max=1),
    default=0.0,
    show_default=True,
    help="Share of chat/Responses answers streamed as tool-call deltas.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Generations served at once (0 = no limit); the rest queue, so TTFT grows past "
    "capacity like a real server's.",
)
@fault_options("")
def mock_command(
    host: str,
    port: int,
    model: str,
    ttft_ms: float,
    ttft_per_prompt_token_ms: float,
    itl_ms: float,
    itl_jitter_ms: float,
    workers: int,
    reasoning_ratio: float,
    reasoning_field: str,
    tool_calls: float,
    max_concurrency: int,
    **fault_opts: Any,
) -> None:
    """Run the embedded OpenAI-compatible mock server until Ctrl-C."""
    faults = fault_kwargs(fault_opts, "--fault")
    server = MockServer(
        host,
        port,
        model=model,
        ttft_ms=ttft_ms,
        ttft_per_prompt_token_ms=ttft_per_prompt_token_ms,
        itl_ms=itl_ms,
        itl_jitter_ms=itl_jitter_ms,
        workers=workers,
        max_concurrency=max_concurrency,
        reasoning_ratio=reasoning_ratio,
        reasoning_field=reasoning_field,
        tool_calls=tool_calls,
        **faults,
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
        injected = ", ".join(
            f"{k[len('fault_') :]} {v}" for k, v in stats.items() if k.startswith("fault_") and v
        )
        note(
            f"mock stopped after {stats.get('requests', 0)} requests"
            + (f" (faults injected: {injected})" if injected else "")
        )


cli.add_command(fit_command)
cli.add_command(compare_command)
cli.add_command(report_command)


def main() -> None:
    cli(prog_name="fineserve")


if __name__ == "__main__":
    main()
