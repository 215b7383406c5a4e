"""The Python error boundary: domain errors are click exceptions, so users see one line."""

from __future__ import annotations

import click


class FineserveError(click.ClickException):
    """A problem the user can fix (bad option, unreachable server, unusable input)."""


class ServerUnreachable(FineserveError):
    """The target server cannot be reached or does not speak the OpenAI API."""
