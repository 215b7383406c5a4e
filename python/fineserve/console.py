"""All user-facing output goes through here: results to stdout, notices to stderr."""

from __future__ import annotations

import re

import click

_TAG = re.compile(r"<[^>]*>")
_HTML = re.compile(r"<(html|head|body|title|h1|p|!doctype)", re.IGNORECASE)


def one_line(text: str, limit: int = 300) -> str:
    """Text from a server or a library as one line: an HTML error page loses its tags,
    whitespace runs (newlines included) become one space, and past ``limit`` it is cut."""
    if (
        "<" in text
        and ">" in text
        and re.search(r"<(html|head|body|title|h1|p|!doctype)", text, re.I)
    ):
        text = _TAG.sub(" ", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def out(message: str = "") -> None:
    """A line of results (stdout)."""
    click.echo(message)


def note(message: str) -> None:
    """A notice about what fineserve is doing (stderr, so results stay pipeable)."""
    click.echo(click.style("fineserve: ", fg="cyan") + message, err=True)


def warn(message: str) -> None:
    click.echo(click.style("fineserve: warning: ", fg="yellow") + message, err=True)
