"""The hand-written stub matches the built extension."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_engine_stub_matches_extension() -> None:
    pytest.importorskip("mypy")
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fineserve._engine", "--ignore-missing-stub"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
