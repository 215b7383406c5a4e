"""Click options shared by several commands."""

from __future__ import annotations

from typing import Any

import click

from .traces import FORMATS

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
]


def trace_format_options(f: Any) -> Any:
    """How to read a trace file: format, columns, unit, BurstGPT filters."""
    for opt in reversed(_TRACE_FORMAT_OPTIONS):
        f = opt(f)
    return f
