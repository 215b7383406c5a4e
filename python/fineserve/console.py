"""All user-facing output goes through here: results to stdout, notices to stderr."""

from __future__ import annotations

import click


def out(message: str = "") -> None:
    """A line of results (stdout)."""
    click.echo(message)


def note(message: str) -> None:
    """A notice about what fineserve is doing (stderr, so results stay pipeable)."""
    click.echo(click.style("fineserve: ", fg="cyan") + message, err=True)


def warn(message: str) -> None:
    click.echo(click.style("fineserve: warning: ", fg="yellow") + message, err=True)
