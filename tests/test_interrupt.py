"""Ctrl-C and SIGTERM during `fineserve blast`: dispatch stops, in-flight requests drain,
partial results are printed and written, exit status 130."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import interrupted_blast


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_dispatch_and_keeps_partial_results(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "partial.json"
    done = interrupted_blast(sig, "--output-file", str(out))
    stdout, stderr = done.stdout, done.stderr
    assert done.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted: dispatch stopped" in stderr
    assert "results are partial" in stderr
    assert "Successful requests:" in stdout
    res = json.loads(out.read_text())
    assert res["partial"] is True
    assert res["scheduled"] == 600 == res["sent"] + res["not_sent"]
    assert res["sent"] == res["completed"] + res["failed"]
    assert 50 < res["sent"] < 550
    assert res["errors_by_kind"]["not_sent"] == res["not_sent"]
