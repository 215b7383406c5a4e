"""``fineserve blast`` and ``fineserve sweep``: parse once into a BlastConfig, run, print,
write."""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from ..blast import BlastRun, run_blast, run_repeated
from ..config import BlastConfig, MockConfig
from ..console import note, out, warn
from ..errors import FineserveError
from ..mock import MockServer
from ..results import detailed_lists, read_requests, result_json, write_result
from ..text import format_summary, format_sweep, format_workers
from .options import (
    blast_options,
    given_workload_options,
    mock_options,
    ray_options,
    workload_options,
)
from .params import POSITIVE, ListOptionsCommand, Number, OutputFile


@click.command("blast", cls=ListOptionsCommand)
@blast_options
@ray_options
@mock_options
@workload_options
def blast_command(**params: Any) -> None:
    """Drive a server open-loop at a precise schedule and report serving metrics."""
    cfg = BlastConfig.from_params(params, given_workload_options())
    started: list[MockServer] = []
    with tempfile.TemporaryDirectory(prefix="fineserve-") as tmp:
        cfg, ca_file = trust_mock(cfg, Path(tmp))

        def servers() -> list[str]:
            """Called once the workload is built (a bad option never starts the mock)."""
            if cfg.target.base_urls:
                return list(cfg.target.base_urls)
            started.append(start_mock(cfg.mock, ca_file))
            return [started[0].base_url]

        try:
            _blast(cfg, servers)
        finally:
            for mock in started:
                mock.stop()


def trust_mock(cfg: BlastConfig, tmp: Path) -> tuple[BlastConfig, Path | None]:
    """With the embedded mock over TLS, the run trusts the mock's CA: the mock writes it
    to ``tmp/mock-ca.pem`` as it starts, and that file is the run's ``--cacert`` (unless
    ``--insecure``)."""
    if not (cfg.uses_mock and cfg.mock.tls) or cfg.target.tls.insecure:
        return cfg, None
    if cfg.target.tls.ca_file is not None:
        raise FineserveError("--cacert is for a given server; the embedded mock uses its own CA")
    ca_file = tmp / "mock-ca.pem"
    tls = dataclasses.replace(cfg.target.tls, ca_file=ca_file)
    return dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, tls=tls)), ca_file


def start_mock(cfg: MockConfig, ca_file: Path | None = None) -> MockServer:
    """The embedded mock server, said in one line; over TLS, its CA goes to ``ca_file``."""
    mock = MockServer(
        ttft_ms=cfg.ttft_ms,
        itl_ms=cfg.itl_ms,
        max_concurrency=cfg.max_concurrency,
        reasoning_ratio=cfg.reasoning_ratio,
        reasoning_field=cfg.reasoning_field,
        tool_calls=cfg.tool_calls,
        tls=cfg.tls,
        image_token_side=cfg.image_token_side,
        **cfg.faults,
    )
    if ca_file is not None and mock.ca_pem is not None:
        ca_file.write_text(mock.ca_pem)
    injected = ", ".join(f"{k} {r:.1%}" for k, r in cfg.faults.get("faults", ()) if r > 0)
    note(
        f"no server given: started the embedded mock server at {mock.base_url} "
        f"(TTFT {cfg.ttft_ms:g} ms, ITL {cfg.itl_ms:g} ms"
        + (f", {cfg.max_concurrency} generations at once" if cfg.max_concurrency else "")
        + (
            f", {cfg.reasoning_ratio:.0%} reasoning as delta.{cfg.reasoning_field}"
            if cfg.reasoning_ratio
            else ""
        )
        + (f", {cfg.tool_calls:.0%} tool-call answers" if cfg.tool_calls else "")
        + (f", faults: {injected}" if injected else "")
        + (", TLS with a CA made at start" if cfg.tls else "")
        + "); pass --base-url or --host/--port to target a real server"
    )
    return mock


def _blast(cfg: BlastConfig, servers: Callable[[], list[str]]) -> None:
    if cfg.output.save_detailed and cfg.output.save_requests is None:
        # The per-request lists are read back from a results file: a temporary one.
        with tempfile.TemporaryDirectory(prefix="fineserve-") as tmp:
            output = dataclasses.replace(cfg.output, save_requests=Path(tmp) / "requests.parquet")
            _blast_once(dataclasses.replace(cfg, output=output), servers, announce=False)
        return
    _blast_once(cfg, servers)


def _blast_once(cfg: BlastConfig, servers: Callable[[], list[str]], announce: bool = True) -> None:
    if cfg.repeat.num_runs > 1:
        repeated = run_repeated(cfg, servers)
        for earlier in repeated.runs[:-1]:
            if announce and earlier.writer is not None and earlier.writer.final_path:
                note(f"wrote {earlier.writer.rows} request records to {earlier.writer.final_path}")
        run = dataclasses.replace(repeated.runs[-1], metrics=repeated.metrics)
    else:
        run = run_blast(cfg, servers)
    out(format_summary(run.metrics, run.header))
    if "workers" in run.metrics:
        out(format_workers(run.metrics["workers"]))
    if run.interrupted:
        warn("the run was interrupted: results are partial")
    saved = run.writer.final_path if run.writer is not None else None
    if saved is not None and announce and run.writer is not None:
        note(f"wrote {run.writer.rows} request records to {saved}")
    if run.writer is not None and run.writer.dropped:
        warn(f"{run.writer.dropped} request records could not be written (see above)")
    if cfg.output.writes_result:
        _write_result_json(cfg, run, saved)
    if run.interrupted:
        sys.exit(130)


def _write_result_json(cfg: BlastConfig, run: BlastRun, saved: Path | None) -> None:
    path = cfg.output.output_file or vllm_result_path(cfg, run.model)
    result = result_json(cfg, run.metrics, run.header, run.model, run.url, run.interrupted)
    result["workload"] = run.workload_info
    result["schedule_digest"] = run.digest
    if "workers" in run.metrics:
        result["workers"] = run.metrics["workers"]
    if cfg.output.save_detailed and saved is not None:
        result.update(detailed_lists(read_requests(saved)[0]))
    write_result(path, result)
    note(f"wrote {path}")


def vllm_result_path(cfg: BlastConfig, model: str) -> Path:
    """vLLM's --save-result file: RESULT_DIR/BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json
    unless --result-filename names it."""
    oc = cfg.output
    if oc.result_filename:
        name = oc.result_filename
    else:
        rate = cfg.workload.request_rate
        mc = cfg.engine.max_concurrency
        concurrency = f"-concurrency{mc}" if mc else ""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base_model = model.rstrip("/").split("/")[-1]
        rate_text = "inf" if math.isinf(rate) else f"{rate:g}"
        name = f"{cfg.target.backend}-{rate_text}qps{concurrency}-{base_model}-{stamp}.json"
    return (oc.result_dir or Path(".")) / name


@click.command("sweep", cls=ListOptionsCommand)
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
    "--sweep-repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run each probe of the bisection (near the boundary) this many times; a load "
    "passes when most of its runs pass.",
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
@blast_options
@mock_options
@workload_options
def sweep_command(
    slo_texts: tuple[str, ...],
    scale: str,
    start_load: float | None,
    step_seconds: float,
    max_failure_rate: float,
    min_sustained: float,
    tolerance: float,
    max_probes: int,
    sweep_repeats: int,
    target_load: float | None,
    plot_path: Path | None,
    **params: Any,
) -> None:
    """Find the highest load (request rate or time scale) at which the workload still
    meets the SLOs, by bracketing and bisection; --output-file writes the JSON."""
    from ..sweep import (
        SweepConfig,
        parse_slo,
        plot_sweep,
        resolve_scale,
        run_sweep,
        sweep_json,
    )

    sweep = SweepConfig(
        tuple(parse_slo(t) for t in slo_texts),
        scale,
        start_load,
        step_seconds,
        max_failure_rate,
        min_sustained,
        tolerance,
        max_probes,
        target_load,
        sweep_repeats,
    )
    cfg = BlastConfig.from_params(params, given_workload_options())
    resolved = resolve_scale(cfg.workload, scale)  # refused before the mock starts
    if cfg.output.save_requests is not None:
        warn("--save-requests is ignored by sweep (one file per probe is not written)")
    if cfg.repeat.num_runs > 1:
        warn("--num-runs is ignored by sweep; --sweep-repeats repeats its bisection probes")
    tmp = tempfile.TemporaryDirectory(prefix="fineserve-")
    cfg, ca_file = trust_mock(cfg, Path(tmp.name))
    mock = start_mock(cfg.mock, ca_file) if cfg.uses_mock else None
    bases = [mock.base_url] if mock is not None else list(cfg.target.base_urls)
    probes: list[Any] = []

    def log(p: Any) -> None:
        probes.append(p)
        note(
            f"probe {len(probes)}: {resolved} {p.load:.3f} -> "
            f"{'PASS' if p.passed else 'fail'} ({p.why})"
        )

    try:
        result = run_sweep(cfg, sweep, bases, log)
    finally:
        if mock is not None:
            mock.stop()
        tmp.cleanup()
    out(format_sweep(result, target_load))
    if cfg.output.output_file:
        write_result(cfg.output.output_file, sweep_json(result, target_load))
        note(f"wrote {cfg.output.output_file}")
    if plot_path:
        note(f"wrote {plot_sweep(result, plot_path)}")
