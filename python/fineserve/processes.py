"""Several engine processes on one host (``--processes N``).

One process has one open-files limit (often 20,000 hard) and its lanes share one
process's scheduler slice; a run past either is split over N child processes, each
running :class:`distributed.EngineWorker` (the engine that a Ray actor runs) on its
share of the schedule. The driver is :class:`distributed.Fleet`, as for Ray: the same
partition (row i to process i mod N, conversations kept together), common start instant,
merged records, per-worker breakdown and accounting for a process that dies.

Each child is ``python -m fineserve.processes FD WORKER``: a fresh interpreter (never a
fork of a driver that already runs threads: the mock, scrapers, tokio) talking over one
end of a socketpair with ``multiprocessing.connection.Connection`` (length-prefixed
pickles; Arrow tables pickle as their buffers). It runs in its own session, so a Ctrl-C at
the terminal reaches only the driver, which stops and drains the children itself; a child
whose driver is gone sees its socket close and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from .errors import FineserveError
from .runner import EngineChunk, EngineOptions, RecordSink, StreamOutcome

#: Calls a child runs at once: the stop/drain loop's drain, progress and wait, plus a stop
#: or cancel that must not queue behind a ``finish`` that blocks until the run ends (Ray
#: actors get the same with ``max_concurrency``).
CHILD_THREADS = 4
#: How long a child whose process has exited gets to report its exit status.
EXIT_WAIT_S = 2.0


class WorkerGone(Exception):
    """The child process ended (or its socket broke) before answering."""


class WorkerCallFailed(Exception):
    """The call raised in the child; the message is its first line."""


class _Ref:
    """A pending call: :meth:`ProcessBackend.get` waits for its reply."""

    def __init__(self, worker: ProcessWorker, seq: int) -> None:
        self.worker = worker
        self.seq = seq


class _Method:
    def __init__(self, worker: ProcessWorker, name: str) -> None:
        self._worker = worker
        self._name = name

    def remote(self, *args: Any) -> _Ref:
        return self._worker.call(self._name, args)


class ProcessWorker:
    """A child process running one ``EngineWorker``; its methods are called as a Ray
    actor's are (``worker.drain.remote()``)."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "fineserve.processes", str(theirs.fileno()), str(worker)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            ours.close()
            raise FineserveError(f"--processes: cannot start process {worker}: {e}") from None
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._seq = 0
        self._replies: dict[int, tuple[bool, Any]] = {}
        self._gone: str | None = None

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    def call(self, name: str, args: tuple[Any, ...]) -> _Ref:
        self._seq += 1
        if self._gone is None:
            try:
                self._conn.send((self._seq, name, args))
            except OSError:
                self._gone = self._exit_text()
        return _Ref(self, self._seq)

    def result(self, seq: int) -> Any:
        while seq not in self._replies:
            if self._gone is not None:
                raise WorkerGone(self._gone)
            try:
                got, ok, value = self._conn.recv()
            except (EOFError, OSError):
                self._gone = self._exit_text()
                continue
            self._replies[got] = (ok, value)
        ok, value = self._replies.pop(seq)
        if not ok:
            raise WorkerCallFailed(value)
        return value

    def _exit_text(self) -> str:
        try:
            code = self._proc.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return "process stopped answering"
        if code < 0:
            return f"process killed by {signal.Signals(-code).name}"
        return f"process exited with status {code}"

    def kill(self) -> None:
        if self._proc.poll() is None:
            try:
                self._conn.send(None)  # a clean end: the child leaves its loop
                self._proc.wait(EXIT_WAIT_S)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._conn.close()

    def pid(self) -> int:
        return self._proc.pid


class ProcessBackend:
    """:class:`distributed.FleetBackend` over child processes of this host."""

    noun = "processes"
    #: The children share this host: the run's connection caps (computed for all of
    #: them) and warm connections are split over them.
    shares_host = True

    def spawn(self, workers: int) -> list[ProcessWorker]:
        started: list[ProcessWorker] = []
        try:
            for w in range(workers):
                started.append(ProcessWorker(w))
        except FineserveError:
            for p in started:
                p.kill()
            raise
        return started

    def get(self, refs: Any) -> Any:
        if isinstance(refs, list):
            return [r.worker.result(r.seq) for r in refs]
        return refs.worker.result(refs.seq)

    def kill(self, actor: ProcessWorker) -> None:
        actor.kill()


def run_stream_processes(
    endpoints: list[str],
    chunks: Iterator[EngineChunk],
    options: EngineOptions,
    sink: RecordSink,
    *,
    processes: int,
    total: int | None = None,
    show_progress: bool = True,
    description: str = "requests",
    on_started: Callable[[list[Any]], None] | None = None,
) -> StreamOutcome:
    """``runner.run_stream`` over ``processes`` engine processes of this host; same sink
    contract, plus the per-process breakdown in ``StreamOutcome.workers``. ``options``'
    connection caps and warm connections are for the whole run (split evenly); ``lanes``
    is per process."""
    from .distributed import run_fleet

    return run_fleet(
        ProcessBackend, endpoints, chunks, options, sink, processes,
        total=total, show_progress=show_progress, description=description,
        on_started=on_started,
    )  # fmt: skip


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}"


def _serve(conn: Connection, worker: int) -> None:
    """The child's loop: runs each call on a small pool, answers ``(seq, ok, value)``."""
    from .distributed import EngineWorker

    engine = EngineWorker(worker)
    send_lock = threading.Lock()

    def answer(seq: int, name: str, args: tuple[Any, ...]) -> None:
        try:
            reply: tuple[int, bool, Any] = (seq, True, getattr(engine, name)(*args))
        except Exception as e:  # reported to the driver, which names the worker
            reply = (seq, False, _first_line(e))
        with send_lock:
            try:
                conn.send(reply)
            except OSError:
                pass  # the driver is gone; the loop sees the socket close

    with ThreadPoolExecutor(CHILD_THREADS) as pool:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = None
            if msg is None:
                try:
                    engine.cancel()  # a run still going: its driver is gone
                except Exception:
                    pass  # spent already (results taken): nothing to cancel
                break
            pool.submit(answer, *msg)


def main() -> None:
    # Ctrl-C is the driver's to handle (the child has its own session, but a signal sent
    # to the process group by hand must not kill it mid-batch either).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, worker = int(sys.argv[1]), int(sys.argv[2])
    _serve(Connection(fd), worker)
    os._exit(0)  # the engine's threads are done or cancelled; no interpreter teardown


if __name__ == "__main__":
    main()
