"""The ``fineserve`` command line: one group, its commands in modules of their own."""

from __future__ import annotations

import click

from .. import __version__
from .fit import compare_command, fit_command
from .generate import generate_command, mock_command
from .report import report_command
from .run import blast_command, sweep_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fineserve")
def cli() -> None:
    """Replay and synthesize realistic LLM-serving workloads against OpenAI-compatible
    servers, open-loop, with a Rust engine that keeps the schedule."""


for _command in (
    blast_command,
    sweep_command,
    generate_command,
    mock_command,
    fit_command,
    compare_command,
    report_command,
):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="fineserve")


__all__ = ["cli", "main"]
