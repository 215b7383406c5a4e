"""The Python error boundary: domain errors are click exceptions, so users see one line."""

from __future__ import annotations

import click

from .console import one_line


class FineserveError(click.ClickException):
    """A problem the user can fix (bad option, unreachable server, unusable input); its
    message is always one line, whatever text (a server's error page) went into it."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message, limit=600))


class ServerUnreachable(FineserveError):
    """The target server cannot be reached or does not speak the OpenAI API."""
