"""``python -m fineserve`` (python/fineserve/__main__.py): the same command line as the
``fineserve`` console script, for hosts where the script's directory is not on PATH."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fineserve


def _python_m_fineserve(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fineserve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_version_and_help_name_the_command(tmp_path: Path) -> None:
    done = _python_m_fineserve(tmp_path, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fineserve, version {fineserve.__version__}"
    done = _python_m_fineserve(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: fineserve ")
    assert "blast" in done.stdout


def test_blast_against_the_embedded_mock(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = _python_m_fineserve(
        tmp_path,
        "blast",
        "--num-prompts",
        "10",
        "--random-output-len",
        "8",
        "--disable-tqdm",
        "--output-file",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["scheduled"], result["completed"], result["failed"]) == (10, 10, 0)


def test_a_usage_error_is_clicks_and_exit_status_2(tmp_path: Path) -> None:
    done = _python_m_fineserve(tmp_path, "blast", "--no-such-option")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "Error: No such option" in done.stderr
