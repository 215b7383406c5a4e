"""Driving the Rust engine: start, show progress, handle Ctrl-C/SIGTERM, collect records."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _engine
from .console import note
from .errors import FineserveError


def default_lanes() -> int:
    """Half the CPUs (at least 1, at most 8): each lane can keep a core busy while it paces,
    and the rest is left for parsing responses, Python and, often, a co-located server."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass
class EngineOptions:
    stream: bool = True
    max_concurrency: int | None = None
    lanes: int = field(default_factory=default_lanes)
    warm_connections: int = 0
    spin_us: int = 200
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 600.0
    idle_timeout_s: float = 600.0
    total_timeout_s: float = 3600.0
    drain_grace_s: float = 30.0
    realtime_priority: bool = False


@dataclass
class RunRecords:
    """The engine's per-request columns plus how the run ended."""

    columns: dict[str, Any]
    interrupted: bool
    wall_s: float
    progress: dict[str, Any] = field(default_factory=dict)

    def col(self, name: str) -> npt.NDArray[Any]:
        return np.asarray(self.columns[name])

    def __len__(self) -> int:
        return len(self.columns["scheduled_ns"])


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C while a run is going (drain, then keep results)."""

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_engine(
    endpoints: list[str],
    t_ns: npt.NDArray[np.int64],
    bodies: list[bytes],
    body_idx: npt.NDArray[np.uint32],
    endpoint_idx: npt.NDArray[np.uint32],
    expected_output_tokens: npt.NDArray[np.int64],
    options: EngineOptions,
    *,
    show_progress: bool = True,
    description: str = "requests",
) -> RunRecords:
    """Runs one schedule to completion (or interruption) and returns its records."""
    try:
        run = _engine.start_run(
            endpoints,
            np.ascontiguousarray(t_ns, dtype=np.int64),
            np.ascontiguousarray(body_idx, dtype=np.uint32),
            bodies,
            np.ascontiguousarray(endpoint_idx, dtype=np.uint32),
            np.ascontiguousarray(np.clip(expected_output_tokens, 0, 2**32 - 1), dtype=np.uint32),
            stream=options.stream,
            max_concurrency=options.max_concurrency,
            lanes=options.lanes,
            warm_connections=options.warm_connections,
            spin_us=options.spin_us,
            connect_timeout_s=options.connect_timeout_s,
            first_byte_timeout_s=options.first_byte_timeout_s,
            idle_timeout_s=options.idle_timeout_s,
            total_timeout_s=options.total_timeout_s,
            realtime_priority=options.realtime_priority,
        )
    except _engine.EngineError as e:
        raise FineserveError(str(e)) from None

    if options.realtime_priority:
        _report_realtime(run)
    bar = _ProgressBar(len(t_ns), description) if show_progress else None
    interrupted = False
    started = time.monotonic()
    with _sigterm_as_interrupt():
        try:
            while not run.wait(0.1):
                if bar:
                    bar.update(run.progress())
        except KeyboardInterrupt:
            interrupted = True
            _drain(run, options.drain_grace_s)
    if bar:
        bar.update(run.progress())
        bar.close()
    final = run.progress()
    columns = run.results()
    return RunRecords(columns, interrupted, time.monotonic() - started, dict(final))


def _report_realtime(run: _engine.Run) -> None:
    """Says whether SCHED_FIFO took effect once the lanes have started."""
    while not run.progress()["started"] and not run.wait(0.005):
        pass
    if not run.progress()["realtime_lanes"]:
        note(
            "--realtime-priority: not permitted here (needs root or CAP_SYS_NICE); "
            "lanes run at normal priority"
        )


def _drain(run: _engine.Run, grace_s: float) -> None:
    run.stop()
    in_flight = run.progress()["in_flight"]
    note(
        f"interrupted: dispatch stopped; draining {in_flight} in-flight requests for up to "
        f"{grace_s:g}s (Ctrl-C again to abort them)"
    )
    deadline = time.monotonic() + grace_s
    try:
        while not run.wait(0.1):
            if time.monotonic() >= deadline:
                note("drain grace period over: cancelling the rest")
                run.cancel()
                break
    except KeyboardInterrupt:
        note("aborting in-flight requests")
        run.cancel()


class _ProgressBar:
    """tqdm over finished requests, with the engine's live counters as postfix."""

    def __init__(self, total: int, description: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=description, unit="req", dynamic_ncols=True)
        self._done = 0

    def update(self, p: dict[str, Any]) -> None:
        done = int(p["succeeded"]) + int(p["failed"]) + int(p["not_sent"])
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done
        self._bar.set_postfix(
            sent=p["sent"], in_flight=p["in_flight"], failed=p["failed"], refresh=False
        )

    def close(self) -> None:
        self._bar.close()
