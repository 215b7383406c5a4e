"""The command line's options, one group per configuration slice (their defaults come
from :mod:`fineserve.config`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..api import BACKENDS
from ..config import (
    DP_RANK_POLICIES,
    RAY_PLACEMENTS,
    EngineConfig,
    LengthConfig,
    MediaConfig,
    MetricsConfig,
    MockConfig,
    ParametricConfig,
    PinConfig,
    PromptConfig,
    RampConfig,
    RepeatConfig,
    ScaleOutConfig,
    ServerMetricsConfig,
    StopConfig,
    TargetConfig,
    WorkloadConfig,
    default_of,
)
from ..media.budget import IMAGE_FAMILIES
from ..workloads.spec import MODES
from .params import (
    NON_NEGATIVE,
    POSITIVE,
    TOKENS,
    Number,
    OutputFile,
    apply_options,
    fault_options,
    trace_format_options,
)


def mock_server_options(prefix: str, help_prefix: str = "") -> Callable[[Any], Any]:
    """The mock's serving options, named ``--{prefix}ttft-ms`` etc. (``fineserve mock``
    uses no prefix, ``blast`` ``mock-`` for its embedded mock); defaults from
    :class:`~fineserve.config.MockConfig`."""

    def h(text: str) -> str:
        return help_prefix + text if help_prefix else text[0].upper() + text[1:]

    options = [
        click.option(
            f"--{prefix}ttft-ms",
            type=NON_NEGATIVE,
            default=default_of(MockConfig, "ttft_ms"),
            show_default=True,
            help=h(
                "time to first token.",
            ),
        ),
        click.option(
            f"--{prefix}itl-ms",
            type=NON_NEGATIVE,
            default=default_of(MockConfig, "itl_ms"),
            show_default=True,
            help=h(
                "inter-token latency.",
            ),
        ),
        click.option(
            f"--{prefix}max-concurrency",
            type=click.IntRange(min=0),
            default=default_of(MockConfig, "max_concurrency"),
            show_default=True,
            help=h(
                "generations served at once (0 = no limit); the rest queue, "
                "so TTFT grows past capacity like a real server's.",
            ),
        ),
        click.option(
            f"--{prefix}reasoning-ratio",
            type=Number(min=0, max=1),
            default=default_of(MockConfig, "reasoning_ratio"),
            show_default=True,
            help=h(
                "share of each chat/Responses answer streamed as reasoning "
                "first (a request's fineserve_reasoning_ratio field overrides it; blast sends a "
                "schedule's reason_ratio, e.g. ServeGen's reasoning pools, to its embedded mock).",
            ),
        ),
        click.option(
            f"--{prefix}reasoning-field",
            type=click.Choice(["reasoning", "reasoning_content"]),
            default=default_of(MockConfig, "reasoning_field"),
            show_default=True,
            help=h(
                "the delta field reasoning streams in (vLLM >= 0.16: reasoning).",
            ),
        ),
        click.option(
            f"--{prefix}tool-calls",
            type=Number(min=0, max=1),
            default=default_of(MockConfig, "tool_calls"),
            show_default=True,
            help=h(
                "share of chat/Responses answers streamed as tool-call deltas.",
            ),
        ),
        click.option(
            f"--{prefix}tls",
            is_flag=True,
            default=default_of(MockConfig, "tls"),
            help=h(
                "serve HTTPS with a certificate signed by a CA made at start (its PEM is "
                "written to a temporary file, and the path printed: pass it as --cacert).",
            ),
        ),
    ]
    return lambda f: apply_options(f, options)


def mock_options(f: Any) -> Any:
    """The embedded mock's options on blast and sweep."""
    return fault_options("mock-")(mock_server_options("mock-", "Embedded mock: ")(f))


#: Arrivals and the schedule (WorkloadConfig).
_SCHEDULE_OPTIONS: list[Any] = [
    click.option(
        "--mode",
        type=click.Choice(MODES),
        default=default_of(WorkloadConfig, "mode"),
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
        default=default_of(WorkloadConfig, "seed"),
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
        default=default_of(WorkloadConfig, "request_rate"),
        show_default=True,
        help="poisson: requests/s (inf = all at once); servegen/burstgpt: target mean rate.",
    ),
    click.option(
        "--burstiness",
        type=POSITIVE,
        default=default_of(WorkloadConfig, "burstiness"),
        show_default=True,
        help="poisson: Gamma shape of inter-arrivals (1 = Poisson; < 1 burstier).",
    ),
    click.option("--ramp", type=click.Choice(["linear", "step"]), help="poisson: rate ramp."),
    click.option(
        "--ramp-start-rate",
        type=POSITIVE,
        default=default_of(RampConfig, "start_rate"),
        show_default=True,
        help="poisson --ramp: requests/s at the start.",
    ),
    click.option(
        "--ramp-end-rate",
        type=POSITIVE,
        default=default_of(RampConfig, "end_rate"),
        show_default=True,
        help="poisson --ramp: requests/s at the end.",
    ),
    click.option(
        "--ramp-steps",
        type=click.IntRange(min=1),
        default=default_of(RampConfig, "steps"),
        show_default=True,
        help="poisson --ramp step: number of rate steps.",
    ),
    click.option(
        "--time-scale",
        type=POSITIVE,
        default=default_of(WorkloadConfig, "time_scale"),
        show_default=True,
        help="> 1 compresses time (replay, parametric, servegen, burstgpt).",
    ),
    click.option(
        "--think-time",
        default=None,
        metavar="MODEL",
        help="Conversation traces (chat_id/parent_chat_id): how long after its previous "
        "turn ends a turn leaves: gap (the trace's gap between their arrivals, the default), "
        "gap-minus-latency (less the previous turn's recorded latency), fixed:SECONDS, "
        "lognormal:MU,SIGMA (of log seconds).",
    ),
    click.option(
        "--tool-latency",
        default=None,
        metavar="MODEL",
        help="Live conversation history: how long after a turn whose reply was a tool call "
        "its tool result is sent: think (the turn's --think-time, the default), "
        "fixed:SECONDS, lognormal:MU,SIGMA (of log seconds).",
    ),
    click.option(
        "--start",
        type=NON_NEGATIVE,
        default=default_of(WorkloadConfig, "start_s"),
        help="Trace (or schedule) seconds to skip.",
    ),
    click.option(
        "--duration",
        type=POSITIVE,
        help="Trace (or schedule) seconds to generate or replay; the run lasts "
        "duration / time-scale.",
    ),
]

#: Request lengths where the workload has none (LengthConfig).
_LENGTH_OPTIONS: list[Any] = [
    click.option(
        "--random-input-len",
        type=TOKENS,
        default=default_of(LengthConfig, "random_input_len"),
        show_default=True,
        help="Input tokens per request (poisson; and wherever a workload has no lengths "
        "of its own, which is announced).",
    ),
    click.option(
        "--random-output-len",
        type=TOKENS,
        default=default_of(LengthConfig, "random_output_len"),
        show_default=True,
        help="Output tokens per request (same rules as --random-input-len).",
    ),
    click.option(
        "--random-range-ratio",
        type=Number(min=0, max=1, max_open=True),
        default=default_of(LengthConfig, "random_range_ratio"),
        show_default=True,
        help="Lengths uniform in [len·(1−r), len·(1+r)].",
    ),
    click.option(
        "--request-lengths-csv",
        type=click.Path(path_type=Path),
        help="Sample (input, output) length pairs from this CSV (poisson/parametric).",
    ),
]

#: Trace files and how to read them (TraceOptions).
_TRACE_OPTIONS: list[Any] = [
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
]

#: FineServe parametric (ParametricConfig).
_PARAMETRIC_OPTIONS: list[Any] = [
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
        default=default_of(ParametricConfig, "window_start_column"),
        show_default=True,
        help="--gamma-params-csv: window start column (ms).",
    ),
    click.option(
        "--window-end-column",
        default=default_of(ParametricConfig, "window_end_column"),
        show_default=True,
        help="--gamma-params-csv: window end column (ms).",
    ),
    click.option(
        "--gamma-shape-column",
        default=default_of(ParametricConfig, "gamma_shape_column"),
        show_default=True,
        help="--gamma-params-csv: Gamma shape column.",
    ),
    click.option(
        "--gamma-scale-column",
        default=default_of(ParametricConfig, "gamma_scale_column"),
        show_default=True,
        help="--gamma-params-csv: Gamma scale column (ms).",
    ),
    click.option(
        "--parametric-window-seconds",
        type=POSITIVE,
        default=default_of(ParametricConfig, "window_s"),
        show_default=True,
        help="parametric: window length when the file gives only window starts.",
    ),
    click.option(
        "--parametric-extension-mode",
        type=click.Choice(["repeat_jitter", "model_sample"]),
        default=default_of(ParametricConfig, "extension_mode"),
        show_default=True,
        help="How windows past the parameter file's end are made.",
    ),
    click.option(
        "--parametric-jitter-ratio",
        type=NON_NEGATIVE,
        default=default_of(ParametricConfig, "jitter_ratio"),
        show_default=True,
        help="repeat_jitter: relative jitter of repeated windows' rates.",
    ),
    click.option(
        "--parametric-arrivals",
        type=click.Choice(["auto", "renewal", "gamma"]),
        default=default_of(ParametricConfig, "arrivals"),
        show_default=True,
        help="auto: the slot-process model `fineserve fit` wrote "
        "(Parametric/arrivals/<class>_arrivals.json) when the class has one, else as "
        "renewal; renewal: per-window renewal gaps of the family `fineserve fit` chose "
        "(Gamma, Weibull, Exponential) when the file records it; gamma: the Gamma columns "
        "(FineServe).",
    ),
    click.option(
        "--dequantize",
        is_flag=True,
        default=None,
        help="Spread requests uniformly inside their slot instead of where the trace put "
        "them (a trace on a clock grid, e.g. whole milliseconds, otherwise generates on the "
        "same grid).",
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
        default=default_of(ParametricConfig, "class_lengths"),
        show_default=True,
        help="parametric: draw lengths from a class's fitted histogram "
        "(Parametric/lengths/<class>_lengths.json) when present, instead of --random-*.",
    ),
    click.option(
        "--parametric-nb-zero",
        type=click.Choice(["truncate", "empty"]),
        default=default_of(ParametricConfig, "nb_zero"),
        show_default=True,
        help="A zero NB draw is redrawn (truncate) or empties its slot.",
    ),
]

#: Synthetic media per request (MediaMixConfig).
_MEDIA_MIX_OPTIONS: list[Any] = [
    click.option(
        "--mm-images-per-request",
        metavar="N|DIST",
        help="Images per request (any mode but a multimodal ServeGen pool, which has its "
        "own): a number, uniform:LO,HI, choice:A,B, pdf:V=P,V=P, poisson:MEAN.",
    ),
    click.option(
        "--mm-image-tokens",
        metavar="T|DIST",
        help="Token budget per image (same forms; each image is sized so that the model "
        "family's processor makes that many tokens of it).",
    ),
    click.option("--mm-audio-per-request", metavar="N|DIST", help="Audio clips per request."),
    click.option("--mm-audio-tokens", metavar="T|DIST", help="Token budget per audio clip."),
    click.option(
        "--mm-videos-per-request",
        metavar="N|DIST",
        help="Videos per request (sent as JPEG frames, data:video/jpeg, sized for "
        "Qwen2-VL's video processor).",
    ),
    click.option("--mm-video-tokens", metavar="T|DIST", help="Token budget per video."),
]

#: ServeGen and BurstGPT.
_SERVEGEN_BURSTGPT_OPTIONS: list[Any] = [
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

#: Servers and request bodies (TargetConfig).
_TARGET_OPTIONS: list[Any] = [
    click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default=default_of(TargetConfig, "backend"),
        show_default=True,
        help="Request body dialect and default path (vllm/sglang send ignore_eos and "
        "min_tokens for exact output lengths).",
    ),
    click.option(
        "--conversation-history",
        type=click.Choice(["auto", "live", "synthetic"]),
        default=default_of(TargetConfig, "conversation_history"),
        show_default=True,
        help="Conversation traces: later turns carry the replies their earlier turns "
        "actually received (live; auto: on chat, Responses and Messages APIs) or "
        "stand-in answers of the traced output length made before the run (synthetic).",
    ),
    click.option(
        "--responses-history",
        type=click.Choice(["client", "server"]),
        default=default_of(TargetConfig, "responses_history"),
        show_default=True,
        help="--backend openai-responses with live history: the whole conversation in each "
        "request's input (client), or only the new message and previous_response_id "
        "(server; the server must store responses).",
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
    click.option("--disable-stream", is_flag=True, help="Send non-streaming requests."),
    click.option("--disable-ignore-eos", is_flag=True, help="Do not send ignore_eos (vllm)."),
    click.option("--extra-request-body", help="JSON object merged into every request body."),
]

#: Prompts (PromptConfig).
#: How media is made and sent (MediaConfig).
_MEDIA_OPTIONS: list[Any] = [
    click.option(
        "--mm-model-family",
        type=click.Choice(IMAGE_FAMILIES),
        help="Whose processor sizes images to their token budgets (default: from "
        "--mm-processor's or --tokenizer's config.json, else qwen2-vl).",
    ),
    click.option(
        "--mm-processor",
        type=click.Path(file_okay=False, path_type=Path),
        help="A local Hugging Face processor directory whose image processor counts the "
        "tokens (Qwen-VL-style processors that report an image grid), offline.",
    ),
    click.option(
        "--mm-format",
        type=click.Choice(["png", "jpeg"]),
        default=default_of(MediaConfig, "image_format"),
        show_default=True,
        help="Image encoding (png is spliced from cached bases: fast; jpeg is encoded "
        "per image with Pillow: slower).",
    ),
    click.option(
        "--mm-content",
        type=click.Choice(["gradient", "noise"]),
        default=default_of(MediaConfig, "content"),
        show_default=True,
        help="Image pixels: gradient (small bodies) or noise (bodies as large as raw "
        "pixels); each image carries its own tag either way.",
    ),
    click.option(
        "--mm-reuse",
        type=Number(min=0, max=1),
        default=default_of(MediaConfig, "reuse"),
        show_default=True,
        help="Probability that an image repeats an earlier one of the same size (to "
        "study the server's multimodal cache); otherwise every image is distinct.",
    ),
    click.option(
        "--mm-url-base",
        metavar="URL",
        help="Send media as URLs under this base instead of data: URIs; the files are "
        "written to --mm-dir for you to serve there.",
    ),
    click.option(
        "--mm-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Where --mm-url-base's files are written (default: ./fineserve-media).",
    ),
]

_PROMPT_OPTIONS: list[Any] = [
    click.option(
        "--tokenizer",
        help="Hugging Face tokenizer (a local directory, or a name already in the local "
        "cache; never downloaded): prompts get exactly the schedule's input lengths.",
    ),
    click.option(
        "--dataset-name",
        type=click.Choice(["random", "sharegpt"]),
        default=default_of(PromptConfig, "dataset_name"),
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
        default=default_of(PromptConfig, "prompt_suffix"),
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
        default=default_of(PromptConfig, "prefix_block_size"),
        show_default=True,
        help="Tokens per hash_ids block (Mooncake/Qwen-Bailian traces): equal ids give "
        "identical blocks, so a prefix cache sees the trace's sharing.",
    ),
    click.option(
        "--shared-prefix-groups",
        type=click.IntRange(min=0),
        default=default_of(PromptConfig, "shared_prefix_groups"),
        help="Synthetic prefix sharing: request i uses group (i mod G)'s prefix.",
    ),
    click.option(
        "--shared-prefix-len",
        type=click.IntRange(min=0),
        default=default_of(PromptConfig, "shared_prefix_len"),
        help="Tokens of the shared prefix per group (the rest of a prompt is its own).",
    ),
    click.option(
        "--prompt-check",
        type=click.Choice(["sample", "all", "off"]),
        default=default_of(PromptConfig, "prompt_check"),
        show_default=True,
        help="Re-encode prompts to check their length: a sample of each chunk (all of "
        "them once one is off), every prompt, or none.",
    ),
]

#: Files and progress (OutputConfig).
_OUTPUT_OPTIONS: list[Any] = [
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
    click.option("--result-filename", help="With --save-result: the file name (vLLM's default)."),
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
    click.option("--disable-tqdm", is_flag=True, help="No progress bar."),
]

#: Metrics (MetricsConfig).
_METRICS_OPTIONS: list[Any] = [
    click.option(
        "--goodput",
        multiple=True,
        help="SLOs in ms for goodput, vLLM's syntax: --goodput ttft:500 --goodput tpot:50 "
        '(or "ttft:500 tpot:50"); metrics ttft, tpot, e2el, and ttfo (first answer '
        "token, for reasoning models).",
    ),
    click.option(
        "--percentile-metrics",
        default=",".join(default_of(MetricsConfig, "percentile_metrics")),
        show_default=True,
        help="Metrics that get the --metric-percentiles keys (vLLM).",
    ),
    click.option(
        "--metric-percentiles",
        default=",".join(f"{q:g}" for q in default_of(MetricsConfig, "metric_percentiles")),
        show_default=True,
        help="Comma-separated percentiles reported as p<q>_<metric>_ms (vLLM).",
    ),
    click.option(
        "--metrics-window",
        type=POSITIVE,
        default=default_of(MetricsConfig, "window_s"),
        show_default=True,
        help="Seconds per window of the instantaneous metrics (rate, failures, tokens/s, "
        "TTFT/ITL mean and p99, ITL jitter).",
    ),
]

#: How requests reach the servers: headers, TLS, session / rank pinning, LoRA adapters
#: (TargetConfig.headers, .tls, .pins).
_TRANSPORT_OPTIONS: list[Any] = [
    click.option(
        "--header",
        "-H",
        multiple=True,
        metavar="'NAME: VALUE'",
        help="A header on every request, warm-up and GET /v1/models included; repeatable. "
        "Also NAME=VALUE. Values of credential-like headers (Authorization, names with "
        "auth, key, token, secret, cookie, password) are never shown or stored.",
    ),
    click.option(
        "--cacert",
        type=click.Path(dir_okay=False, path_type=Path),
        help="PEM bundle of CAs trusted for https:// servers, besides the system's roots.",
    ),
    click.option(
        "--cert",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Client certificate (PEM) for servers that require one (mTLS); with --key.",
    ),
    click.option(
        "--key",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Private key (PEM) of --cert.",
    ),
    click.option(
        "--insecure",
        "-k",
        is_flag=True,
        help="Do not verify https:// servers' certificates.",
    ),
    click.option(
        "--http2",
        is_flag=True,
        help="Speak HTTP/2 (prior knowledge on http://, ALPN h2 on https://): each lane "
        "multiplexes its requests over one connection per endpoint.",
    ),
    click.option(
        "--session-header",
        metavar="NAME",
        help="Header that carries each request's session: its conversation id (ServeGen: "
        "its client id), so a router can keep sessions sticky.",
    ),
    click.option(
        "--dp-ranks",
        type=click.IntRange(min=1),
        help="Pin each request to one of this many data-parallel ranks, in --dp-rank-header "
        "(vLLM >= 0.18 honours X-data-parallel-rank); metrics are broken down by rank.",
    ),
    click.option(
        "--dp-rank-policy",
        type=click.Choice(DP_RANK_POLICIES),
        default=default_of(PinConfig, "dp_rank_policy"),
        show_default=True,
        help="round-robin over requests; by-class: each class on one rank; by-session: a "
        "conversation (or ServeGen client) stays on one rank.",
    ),
    click.option(
        "--dp-rank-header",
        default=default_of(PinConfig, "dp_rank_header"),
        show_default=True,
        help="Header that carries the rank.",
    ),
    click.option(
        "--lora-modules",
        metavar="A,B,...",
        help="LoRA adapters (served as model names): each request asks for one, a "
        "conversation keeps its adapter; metrics are broken down by model.",
    ),
    click.option(
        "--lora-distribution",
        help="How adapters are drawn: uniform, zipf:S (adapter k has weight 1/k^S) or "
        "weights:w1,w2,... [default: uniform]",
    ),
]

#: The servers' Prometheus metrics beside the run (ServerMetricsConfig).
_SERVER_METRICS_OPTIONS: list[Any] = [
    click.option(
        "--server-metrics",
        is_flag=True,
        help="Scrape GET <base-url>/metrics of every endpoint during the run: a summary "
        "per metric in the result JSON (server_metrics), a block in the summary, the "
        "server's waiting/running/KV usage joined to each request (srv_* columns), and "
        "RUN.server-metrics.parquet beside --save-requests RUN.parquet.",
    ),
    click.option(
        "--server-metrics-url",
        multiple=True,
        metavar="URL",
        help="Another page to scrape (a router, a DCGM or node exporter); repeatable.",
    ),
    click.option(
        "--server-metrics-interval",
        type=click.FloatRange(min=0.05),
        default=default_of(ServerMetricsConfig, "interval_s"),
        show_default=True,
        help="Seconds between scrapes (at least 0.05).",
    ),
]

#: Repeated runs and early stop (RepeatConfig, StopConfig).
_RUN_CONTROL_OPTIONS: list[Any] = [
    click.option(
        "--num-runs",
        type=click.IntRange(min=1),
        default=default_of(RepeatConfig, "num_runs"),
        show_default=True,
        help="Run the same schedule this many times (fresh connections each time): each "
        "headline metric's mean, 95% confidence interval and CV across runs.",
    ),
    click.option(
        "--cooldown",
        type=click.FloatRange(min=0),
        default=default_of(RepeatConfig, "cooldown_s"),
        show_default=True,
        help="Seconds between runs (with --num-runs).",
    ),
    click.option(
        "--reset-prefix-cache",
        is_flag=True,
        help="Between runs, POST /reset_prefix_cache to every endpoint (vLLM), so each run "
        "starts with a cold prefix cache.",
    ),
    click.option(
        "--stop-on-failure-rate",
        type=click.FloatRange(min=0, max=1, min_open=True),
        help="End the run early when this share of the requests that completed in the last "
        "--stop-window seconds failed; the rest of the schedule is not sent (with the reason).",
    ),
    click.option(
        "--stop-on-ttft-p99-ms",
        type=POSITIVE,
        help="End the run early when p99 TTFT over the last --stop-window seconds exceeds this.",
    ),
    click.option(
        "--stop-on-lag-ms",
        type=POSITIVE,
        help="End the run early when p99 dispatch lag (sent - scheduled) over the last "
        "--stop-window seconds exceeds this: the client cannot keep the schedule.",
    ),
    click.option(
        "--stop-window",
        type=POSITIVE,
        default=default_of(StopConfig, "window_s"),
        show_default=True,
        help="Seconds of completed requests the --stop-on-* conditions look at (at least "
        f"{default_of(StopConfig, 'min_requests')} requests).",
    ),
]

#: Engine sizing, warm-up and timeouts (EngineConfig).
_ENGINE_OPTIONS: list[Any] = [
    click.option(
        "--turn-affinity/--no-turn-affinity",
        default=default_of(TargetConfig, "turn_affinity"),
        show_default=True,
        help="Send a conversation's later turns to the server that answered its "
        "previous turn (as session-sticky routers do, so its prefix cache can help).",
    ),
    click.option(
        "--max-concurrency",
        type=click.IntRange(min=1),
        help="Cap on requests in flight; excess requests queue (queueing shows as dispatch lag).",
    ),
    click.option(
        "--max-connections",
        type=click.IntRange(min=1),
        help="Connections open at once over every lane (default: what the open-files limit "
        "and the ephemeral ports connect() hands out cheaply allow); a request past it "
        "waits for one to close (shown as dispatch lag and in the saturation verdict) "
        "instead of failing.",
    ),
    click.option(
        "--warmup-requests",
        "--num-warmups",
        type=click.IntRange(min=0),
        default=default_of(EngineConfig, "warmup_requests"),
        show_default=True,
        help="Requests sent (and discarded) before the timed run.",
    ),
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
        "--connect-timeout",
        type=POSITIVE,
        default=default_of(EngineConfig, "connect_timeout_s"),
        show_default=True,
        help="Seconds.",
    ),
    click.option(
        "--first-byte-timeout",
        type=POSITIVE,
        default=default_of(EngineConfig, "first_byte_timeout_s"),
        show_default=True,
        help="Seconds until response headers.",
    ),
    click.option(
        "--idle-timeout",
        type=POSITIVE,
        default=default_of(EngineConfig, "idle_timeout_s"),
        show_default=True,
        help="Seconds without a byte mid-response.",
    ),
    click.option(
        "--request-timeout",
        type=POSITIVE,
        default=default_of(EngineConfig, "request_timeout_s"),
        show_default=True,
        help="Seconds for a whole request.",
    ),
    click.option(
        "--max-response-mb",
        type=click.FloatRange(min=0, min_open=True),
        default=default_of(EngineConfig, "max_response_mb"),
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
        default=default_of(EngineConfig, "drain_grace_s"),
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


def workload_options(f: Any) -> Any:
    """Options that define the schedule; shared by ``generate``, ``blast`` and ``sweep``."""
    return apply_options(
        f,
        [
            *_SCHEDULE_OPTIONS,
            *_LENGTH_OPTIONS,
            *_TRACE_OPTIONS,
            *_PARAMETRIC_OPTIONS,
            *_SERVEGEN_BURSTGPT_OPTIONS,
            *_MEDIA_MIX_OPTIONS,
        ],
    )


def _workload_option_names() -> frozenset[str]:
    def probe() -> None: ...

    return frozenset(p.name for p in workload_options(probe).__click_params__ if p.name)


#: The workload options' parameter names (to tell which of them a command line gave).
WORKLOAD_OPTION_NAMES = _workload_option_names()


def given_workload_options() -> frozenset[str]:
    """Which workload options the command line (or environment) set: a written schedule
    refuses those it cannot apply, and an explicit --start is kept even when idle."""
    ctx = click.get_current_context()
    return frozenset(
        name
        for name in WORKLOAD_OPTION_NAMES
        if ctx.get_parameter_source(name)
        in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    )


def blast_options(f: Any) -> Any:
    """Options of `blast`, shared by `sweep` (server, prompts, results, metrics, engine)."""
    return apply_options(
        f,
        [
            *_TARGET_OPTIONS,
            *_TRANSPORT_OPTIONS,
            *_PROMPT_OPTIONS,
            *_MEDIA_OPTIONS,
            *_OUTPUT_OPTIONS,
            *_METRICS_OPTIONS,
            *_SERVER_METRICS_OPTIONS,
            *_RUN_CONTROL_OPTIONS,
            *_ENGINE_OPTIONS,
        ],
    )


def ray_options(f: Any) -> Any:
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
            default=default_of(ScaleOutConfig, "workers"),
            show_default=True,
            help="Ray workers (engine instances) the schedule is split over (with --ray).",
        ),
        click.option(
            "--ray-placement",
            type=click.Choice(RAY_PLACEMENTS),
            default=default_of(ScaleOutConfig, "ray_placement"),
            show_default=True,
            help="Where Ray puts the workers: spread over the nodes, or packed onto as few "
            "as hold them (with --ray).",
        ),
        click.option(
            "--processes",
            type=click.IntRange(min=1),
            default=default_of(ScaleOutConfig, "processes"),
            show_default=True,
            help="Engine processes on this host the schedule is split over: each has its "
            "own open-files limit and lanes (--lanes is per process), for more connections "
            "and cores than one process has. Results merge as with --ray.",
        ),
    ]
    return apply_options(f, opts)
