"""``fineserve report``."""

from __future__ import annotations

from pathlib import Path

import click

from ..console import note
from ..errors import FineserveError
from .params import POSITIVE, OutputFile


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=OutputFile(),
    default=Path("fineserve-report.html"),
    show_default=True,
    help="HTML file; each panel is also written as <stem>_<panel>.png next to it.",
)
@click.option(
    "--window-seconds",
    type=POSITIVE,
    help="Window of the instantaneous metrics [default: the run's --metrics-window, else 10].",
)
def report_command(results: tuple[Path, ...], output: Path, window_seconds: float | None) -> None:
    """Render per-request results (`blast --save-requests`) as a self-contained HTML
    report with PNG panels; several files are compared side by side."""
    from ..report import render_report

    if window_seconds is not None and not window_seconds > 0:
        raise FineserveError("--window-seconds must be > 0")
    pngs = render_report(list(results), output, window_s=window_seconds)
    note(f"wrote {output} and {len(pngs)} PNG panels ({output.stem}_*.png)")
