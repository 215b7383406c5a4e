"""Click parameter types, the grouped help, and the mock's fault options."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import click

from ..mock import FAULT_HELP
from ..traces import FORMATS
from ..traces.base import MAX_TOKENS_PER_REQUEST


class Number(click.FloatRange):
    """A float in a range that is never NaN (click's FloatRange lets NaN through, since
    every comparison with NaN is false), and finite unless ``allow_inf``."""

    def __init__(self, *args: Any, allow_inf: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_inf = allow_inf

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        rv = super().convert(value, param, ctx)
        if rv != rv or (not self.allow_inf and rv in (float("inf"), float("-inf"))):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


#: ``--help`` sections of blast, sweep and generate, in order; within each, the options in
#: this order (the common ones first). A command's own options that are in none of them
#: come first, under "Options".
HELP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Server",
        (
            "base_url", "host", "port", "backend", "endpoint", "model", "class_model",
            "route", "route_class", "turn_affinity", "conversation_history",
            "responses_history",
        ),
    ),
    (
        "Transport & pinning",
        (
            "header", "cacert", "cert", "key", "insecure", "http2", "session_header", "dp_ranks",
            "dp_rank_policy", "dp_rank_header", "lora_modules", "lora_distribution",
        ),
    ),
    (
        "Workload",
        (
            "mode", "request_rate", "num_prompts", "duration", "time_scale", "start", "seed",
            "think_time", "tool_latency",
            "schedule", "burstiness", "ramp", "ramp_start_rate", "ramp_end_rate", "ramp_steps",
            "trace", "request_trace_csv", "trace_format", "timestamp_column", "timestamp_unit",
            "input_length_column", "output_length_column", "burstgpt_model",
            "burstgpt_log_type", "infer_turns", "model_class", "datasets_dir", "class_lengths",
            "gamma_params_csv", "window_start_column", "window_end_column",
            "gamma_shape_column", "gamma_scale_column", "parametric_window_seconds",
            "parametric_extension_mode", "parametric_jitter_ratio", "parametric_arrivals",
            "dequantize", "parametric_nb_json", "disable_parametric_nb_lt10b", "parametric_nb_zero",
            "servegen_pool", "servegen_clients", "burstgpt_params", "rate_scale",
        ),
    ),
    (
        "Lengths & prompts",
        (
            "random_input_len", "random_output_len", "random_range_ratio",
            "request_lengths_csv", "dataset_name", "tokenizer", "dataset_path",
            "dataset_output_len", "apply_chat_template", "prompt_suffix", "prefix_block_size",
            "shared_prefix_groups", "shared_prefix_len", "prompt_check", "disable_ignore_eos",
            "disable_stream", "extra_request_body",
        ),
    ),
    (
        "Output & metrics",
        (
            "output_file", "save_result", "result_dir", "result_filename", "save_requests",
            "save_detailed", "goodput", "percentile_metrics", "metric_percentiles",
            "metrics_window", "disable_tqdm", "server_metrics", "server_metrics_url",
            "server_metrics_interval",
        ),
    ),
    (
        "Engine & timeouts",
        (
            "max_concurrency", "max_connections", "warmup_requests", "lanes",
            "warm_connections",
            "connect_timeout", "first_byte_timeout", "idle_timeout", "request_timeout",
            "max_response_mb", "source_ip", "drain_grace", "realtime_priority",
        ),
    ),
    (
        "Repeats & early stop",
        (
            "num_runs", "cooldown", "reset_prefix_cache", "stop_on_failure_rate",
            "stop_on_ttft_p99_ms", "stop_on_lag_ms", "stop_window",
        ),
    ),
    (
        "Multimodal",
        (
            "mm_images_per_request", "mm_image_tokens", "mm_audio_per_request",
            "mm_audio_tokens", "mm_videos_per_request", "mm_video_tokens", "mm_model_family",
            "mm_processor", "mm_format", "mm_content", "mm_reuse", "mm_url_base", "mm_dir",
        ),
    ),
    ("Embedded mock (used when no server is given)", ()),
    ("Distributed", ("processes", "ray", "workers", "ray_placement")),
)  # fmt: skip


def help_group(name: str) -> str | None:
    """The ``--help`` section of the option whose parameter is ``name`` (None: its
    command's own)."""
    for title, names in HELP_GROUPS:
        if name in names:
            return title
    if name.startswith(("mock_", "fault")):
        return next(t for t, _ in HELP_GROUPS if t.startswith("Embedded mock"))
    return None


class GroupedHelpCommand(click.Command):
    """``--help`` in sections (:data:`HELP_GROUPS`), the command's own options first."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own: list[tuple[str, str]] = []
        grouped: dict[str, list[tuple[int, tuple[str, str]]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or param.name is None:
                continue
            title = help_group(param.name)
            if title is None:
                own.append(record)
                continue
            names = dict(HELP_GROUPS)[title]
            rank = names.index(param.name) if param.name in names else len(names)
            grouped.setdefault(title, []).append((rank, record))
        if own:
            with formatter.section("Options"):
                formatter.write_dl(own)
        for title, _ in HELP_GROUPS:
            if title in grouped:
                with formatter.section(title):
                    formatter.write_dl([r for _, r in sorted(grouped[title], key=lambda x: x[0])])


class ListOptionsCommand(GroupedHelpCommand):
    """Accepts vLLM's space-separated list options, e.g. ``--goodput ttft:500 tpot:50``
    (argparse ``nargs="+"``, which click's options cannot take): the words after such an
    option, up to the next option, become repeats of it."""

    list_options = ("--goodput",)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        current: str | None = None
        for word in args:
            if word.startswith("-"):
                name = word.split("=", 1)[0]
                current = name if name in self.list_options else None
                out.append(word)
            elif current is not None and out[-1] != current and ":" in word:
                out += [current, word]
            else:
                out.append(word)
        return super().parse_args(ctx, out)


class OutputFile(click.Path):
    """A file to write, checked before any work starts (otherwise a long run would end
    with nowhere to put its results): its directory is created if missing, and must be
    writable."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        path = Path(os.fsdecode(super().convert(value, param, ctx)))
        parent = path.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.fail(f"cannot create directory {str(parent)!r}: {e.strerror}.", param, ctx)
        if not os.access(parent, os.W_OK):
            self.fail(f"directory {str(parent)!r} is not writable.", param, ctx)
        if path.exists() and not os.access(path, os.W_OK):
            self.fail(f"{str(path)!r} is not writable.", param, ctx)
        return path


#: > 0 and finite: rates, scales, shapes, durations.
POSITIVE = Number(min=0, min_open=True)
#: >= 0 and finite: offsets, ratios.
NON_NEGATIVE = Number(min=0)
#: A length in tokens.
TOKENS = click.IntRange(min=1, max=MAX_TOKENS_PER_REQUEST)

_TRACE_FORMAT_OPTIONS = [
    click.option("--trace-format", type=click.Choice(FORMATS), help="Override detection."),
    click.option("--timestamp-column", help="Trace timestamp column (format default)."),
    click.option("--input-length-column", help="Input length column (format default)."),
    click.option("--output-length-column", help="Output length column (format default)."),
    click.option(
        "--timestamp-unit",
        type=click.Choice(["us", "ms", "s"]),
        help="Trace timestamp unit (default: the format's: FineServe us, BurstGPT s, Mooncake ms).",
    ),
    click.option("--burstgpt-model", help="BurstGPT: keep rows of this Model."),
    click.option("--burstgpt-log-type", help="BurstGPT: keep rows of this Log Type."),
    click.option(
        "--infer-turns",
        type=click.Choice(["hash-prefix"]),
        help="Mooncake-format traces without chat ids (e.g. Mooncake's toolagent trace): "
        "link each request to the latest earlier one whose prompt blocks (hash_ids, all "
        "but its last) it extends, as a later turn of that conversation.",
    ),
]


def apply_options(f: Any, options: list[Any]) -> Any:
    """``f`` decorated with ``options`` so that ``--help`` lists them in this order."""
    for opt in reversed(options):
        f = opt(f)
    return f


def trace_format_options(f: Any) -> Any:
    """How to read a trace file: format, columns, unit, BurstGPT filters."""
    return apply_options(f, _TRACE_FORMAT_OPTIONS)


def fault_options(prefix: str) -> Callable[[Any], Any]:
    """The mock's fault-injection options, named ``--{prefix}fault`` etc. (``mock`` uses
    no prefix, ``blast`` ``mock-`` for its embedded mock)."""
    kinds = "; ".join(f"{k}: {v}" for k, v in FAULT_HELP.items())
    options = [
        click.option(
            f"--{prefix}fault",
            "faults",
            multiple=True,
            metavar="KIND=RATIO",
            help=f"Make a fraction of completion requests misbehave ({kinds}).",
        ),
        click.option(
            f"--{prefix}stall-s",
            "fault_stall_s",
            type=NON_NEGATIVE,
            default=30.0,
            show_default=True,
            help="Fault 'stall': seconds without a byte.",
        ),
        click.option(
            f"--{prefix}first-byte-delay-s",
            "fault_first_byte_delay_s",
            type=NON_NEGATIVE,
            default=30.0,
            show_default=True,
            help="Fault 'slow_first_byte': seconds before the response headers.",
        ),
        click.option(
            f"--{prefix}retry-after-s",
            "fault_retry_after_s",
            type=click.IntRange(min=0),
            default=1,
            show_default=True,
            help="Fault 'http_429': the Retry-After value.",
        ),
    ]
    return lambda f: apply_options(f, options)
