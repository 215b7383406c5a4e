"""``fineserve generate`` (a schedule, nothing sent) and ``fineserve mock``."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..config import WorkloadConfig, mock_fault_kwargs
from ..console import note, out
from ..mock import MockServer
from ..results import write_result
from ..schedule import write_schedule
from ..text import format_schedule_summary
from ..workloads.spec import build_workload
from .options import given_workload_options, mock_server_options, workload_options
from .params import NON_NEGATIVE, GroupedHelpCommand, OutputFile, fault_options


@click.command("generate", cls=GroupedHelpCommand)
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
@workload_options
def generate_command(output: Path, summary_json: Path | None, **params: Any) -> None:
    """Write a schedule (Parquet) without sending anything, and summarise it."""
    cfg = WorkloadConfig.from_params(params, given_workload_options())
    workload = build_workload(cfg)
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


@click.command("mock")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--model", default="fineserve-mock", show_default=True, help="Model id it serves.")
@mock_server_options("")
@click.option(
    "--ttft-per-prompt-token-ms",
    type=NON_NEGATIVE,
    default=0.0,
    show_default=True,
    help="Added to the TTFT per prompt token (a prefill cost).",
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
    "--mm-model-family",
    type=click.Choice(["qwen2-vl", "qwen3-vl"]),
    default="qwen2-vl",
    show_default=True,
    help="Whose rule counts chat images as prompt tokens (28 or 32 px per token side).",
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
    mm_model_family: str,
    reasoning_ratio: float,
    reasoning_field: str,
    tool_calls: float,
    max_concurrency: int,
    tls: bool,
    **fault_opts: Any,
) -> None:
    """Run the embedded OpenAI-compatible mock server until Ctrl-C."""
    faults = mock_fault_kwargs(fault_opts, "--fault")
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
        tls=tls,
        image_token_side=32 if mm_model_family == "qwen3-vl" else 28,
        **faults,
    )
    out(
        f"fineserve mock serving {model!r} at {server.base_url} "
        f"(TTFT {ttft_ms:g} ms, ITL {itl_ms:g} ms); Ctrl-C to stop"
    )
    if server.ca_file is not None:
        out(
            "TLS: a certificate signed by a CA made at start; clients pass "
            f"--cacert {server.ca_file}"
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
