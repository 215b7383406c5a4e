"""``fineserve fit`` and ``fineserve compare``."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..console import note, out
from ..errors import FineserveError
from .params import POSITIVE, OutputFile, trace_format_options


def _schedule_as_trace(path: Path) -> Any:
    """A schedule Parquet (``generate``'s output: e.g. a ServeGen composition, whose pool
    holds per-client rates rather than requests) as a trace to fit; None for other files."""
    from ..schedule import concat, read_schedule
    from ..traces.base import Trace

    try:
        with Path(path).open("rb") as f:
            if f.read(4) != b"PAR1":
                return None
    except OSError:
        return None  # load_trace gives the one-line error
    chunks, _, _ = read_schedule(path)
    s = concat(list(chunks))
    t0 = int(s.t_ns[0]) if len(s) else 0
    return Trace(Path(path), "schedule", s.t_ns - t0, s.input_len, s.output_len, rows_read=len(s))


@click.command("fit")
@click.argument("trace_path", metavar="TRACE", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory to write Parametric/{gamma,nb,lengths}/ and <name>_fit.json into "
    "(usable as --datasets-dir).",
)
@click.option("--name", help="Class name of the written files; default: the trace file's stem.")
@click.option(
    "--window-seconds", type=POSITIVE, default=300.0, show_default=True, help="Arrival window."
)
@click.option("--slot-ms", type=POSITIVE, default=1.0, show_default=True, help="Micro-burst slot.")
@click.option(
    "--bursts",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Model micro-bursts (NB per occupied slot) in the FineServe-format files: auto when "
    "any occupied slot holds several requests and timestamps are finer than a slot (the "
    "slot-process model always has its count law).",
)
@click.option(
    "--min-window-gaps",
    type=click.IntRange(min=2),
    default=10,
    show_default=True,
    help="Windows with fewer gaps get an Exponential at their own rate.",
)
@click.option(
    "--validate",
    is_flag=True,
    help="Generate with the fitted parameters, compare with the trace, and exit 1 if a "
    "check fails; writes <name>_validate.json and .png.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --validate.")
@click.option(
    "--prefix-block-size",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Tokens per hash_ids block of the trace (Mooncake's 512), for its prefix sharing.",
)
@trace_format_options
def fit_command(
    trace_path: Path,
    output_dir: Path,
    name: str | None,
    window_seconds: float,
    slot_ms: float,
    bursts: str,
    min_window_gaps: int,
    validate: bool,
    seed: int,
    prefix_block_size: int,
    **trace_opts: Any,
) -> None:
    """Fit workload parameters (arrival windows, micro-bursts, lengths) from a trace in
    any supported format, in the files `--mode parametric --model-class NAME` reads."""
    from ..config import trace_options_from_params
    from ..fit import fit_trace, write_fit
    from ..text import format_comparison, format_fit_summary
    from ..traces import load_trace

    started = time.perf_counter()
    options = trace_options_from_params(trace_opts)
    trace = _schedule_as_trace(trace_path) or load_trace(trace_path, options)
    note(trace.skip_summary())
    for line in trace.notes:
        note(line)
    name = name or trace_path.stem
    if not name or "/" in name or name.startswith("."):
        raise FineserveError(f"--name {name!r}: use a plain file-name stem")
    result = fit_trace(
        trace,
        name=name,
        window_s=window_seconds,
        slot_ms=slot_ms,
        bursts=bursts,
        min_gaps=min_window_gaps,
        prefix_block_size=prefix_block_size,
    )
    write_fit(result, output_dir, command=shlex.join(["fineserve", *sys.argv[1:]]))
    out(format_fit_summary(result))
    note(f"fit took {time.perf_counter() - started:.2f} s")
    if validate:
        from ..compare import plot_comparison
        from ..fit.validate import validate_fit

        comparison = validate_fit(result, trace, output_dir, seed)
        out(format_comparison(comparison))
        png = plot_comparison(comparison, output_dir / f"{name}_validate.png")
        report = output_dir / f"{name}_validate.json"
        _write_json(report, comparison.to_json())
        note(f"wrote {report} and {png}")
        if not comparison.passed:
            sys.exit(1)


@click.command("compare")
@click.argument("real_path", metavar="REAL", type=click.Path(dir_okay=False, path_type=Path))
@click.argument(
    "generated_path", metavar="GENERATED", type=click.Path(dir_okay=False, path_type=Path)
)
@click.option(
    "--window-seconds",
    type=POSITIVE,
    default=300.0,
    show_default=True,
    help="Window for the per-window rate and CV comparison.",
)
@click.option(
    "--slot-ms",
    type=POSITIVE,
    default=1.0,
    show_default=True,
    help="Slot for the requests-per-slot (micro-burst) comparison.",
)
@click.option(
    "--time-scale",
    type=POSITIVE,
    default=1.0,
    show_default=True,
    help="The time scale GENERATED was made at; its times are multiplied by it to undo it.",
)
@click.option(
    "--plot",
    "plot_path",
    type=OutputFile(),
    help="Write the side-by-side panels to this PNG.",
)
@click.option("--json", "json_path", type=OutputFile(), help="Write JSON.")
@trace_format_options
def compare_command(
    real_path: Path,
    generated_path: Path,
    window_seconds: float,
    slot_ms: float,
    time_scale: float,
    plot_path: Path | None,
    json_path: Path | None,
    **trace_opts: Any,
) -> None:
    """Compare two workloads (traces in any format, or schedules from `generate`):
    per-window rate and CV, requests per slot, gaps and lengths, by KS and Wasserstein."""
    from ..compare import compare_arrivals, load_arrivals, plot_comparison
    from ..config import trace_options_from_params
    from ..text import format_comparison

    if not (window_seconds > 0 and slot_ms > 0):
        raise FineserveError("--window-seconds and --slot-ms must be > 0")
    options = trace_options_from_params(trace_opts)
    real = load_arrivals(real_path, options)
    gen = load_arrivals(generated_path, options, time_scale=time_scale)
    for line in real.notes + gen.notes:
        note(line)
    comparison = compare_arrivals(real, gen, window_s=window_seconds, slot_ms=slot_ms)
    out(format_comparison(comparison))
    if plot_path:
        note(f"wrote {plot_comparison(comparison, plot_path)}")
    if json_path:
        _write_json(json_path, comparison.to_json())
        note(f"wrote {json_path}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(data, indent=1) + "\n")
    except OSError as e:
        raise FineserveError(f"cannot write {path}: {e.strerror}") from None
