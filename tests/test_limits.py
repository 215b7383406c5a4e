"""Connection limits are stated, and a plan past them is warned about with the remedy."""

from __future__ import annotations

import resource

from fineserve import _engine
from fineserve.limits import connection_limits


def test_open_files_limit_is_raised_to_the_hard_limit_and_stated() -> None:
    lines = connection_limits(10, 0, mock=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY
    assert lines[0].startswith(f"open files: limit {soft}")
    assert len(lines) == 1  # 10 connections fit


def test_plans_past_the_limits_are_warned_about() -> None:
    _, files = _engine.raise_open_files_limit()
    ports = _engine.ephemeral_port_range()
    assert ports is not None and ports[0] <= ports[1]
    per_source = ports[1] - ports[0] + 1
    many = max(files, per_source) + 1
    lines = connection_limits(many, 0, mock=False)
    assert any("more than the open-files limit" in x and "ulimit -n" in x for x in lines)
    assert any("ephemeral ports × 1 source" in x and "--source-ip" in x for x in lines)
    # Enough source addresses lift the port warning (not the descriptor one).
    lines = connection_limits(per_source + 1, 2, mock=False)
    assert not any("ephemeral ports" in x and "warning" in x for x in lines)
