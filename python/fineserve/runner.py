"""Driving the Rust engine: start, show progress, handle Ctrl-C/SIGTERM, collect records."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from . import _engine
from .console import note
from .errors import FineserveError
from .records import concat_record_batches, records_from_table, records_to_batch, unsent_records


def default_lanes() -> int:
    """Half the CPUs (at least 1, at most 8): each lane can keep a core busy while it paces,
    and the rest is left for parsing responses, Python and, often, a co-located server."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


#: The most reply text the engine keeps per turn for live history (1 MiB).
REPLY_LIMIT_BYTES = 1 << 20


@dataclass
class EngineOptions:
    """How the engine runs. It crosses into Rust as it is: ``_engine.start_run`` reads each
    field by name (all but ``drain_grace_s``, which the stop/drain loop uses), so this is
    the one place an engine setting has its default."""

    stream: bool = True
    max_concurrency: int | None = None
    lanes: int = field(default_factory=default_lanes)
    warm_connections: int = 0
    spin_us: int = 200
    #: Gap between the end of warm-up and the start instant.
    start_delay_ms: float = 10.0
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 600.0
    idle_timeout_s: float = 600.0
    total_timeout_s: float = 3600.0
    #: A response past this size fails as ``too_large`` (endless or runaway answers).
    max_body_bytes: int = 64 << 20
    drain_grace_s: float = 30.0
    realtime_priority: bool = False
    #: Least-outstanding routing groups (endpoint indices); see ``_engine.start_run``.
    route_groups: list[list[int]] = field(default_factory=list)
    #: Local addresses new connections are bound to, in turn (``--source-ip``).
    source_ips: list[str] = field(default_factory=list)
    #: A conversation's later turn goes to the endpoint of its previous turn.
    turn_affinity: bool = True
    #: Live conversation history: which API's bodies the engine splices replies into
    #: (``off``, ``completions``, ``chat``, ``responses``, ``responses-server``,
    #: ``anthropic``; see :func:`fineserve.api.history_api`).
    history_api: str = "off"
    #: The most reply text kept per turn for the next (the rest is dropped; the
    #: follower's ``history_kind`` says so).
    reply_limit_bytes: int = REPLY_LIMIT_BYTES
    #: Connections open at once over every lane (0: no cap); a connect past it waits for
    #: one to close (shown as dispatch lag) instead of failing for want of descriptors.
    max_connections: int = 0
    #: Bearer token; None: ``$OPENAI_API_KEY`` where the engine runs. Never shown.
    api_key: str | None = field(default=None, repr=False)
    #: Headers on every request: (name, value, secret); a secret value is never shown.
    headers: list[tuple[str, str, bool]] = field(default_factory=list, repr=False)
    #: Headers whose value each request carries (``EngineChunk.header_values``).
    request_headers: list[str] = field(default_factory=list)
    #: TLS for https:// endpoints: a PEM CA bundle trusted besides the system's roots,
    #: a client certificate and key, or no verification at all.
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    insecure: bool = False
    #: HTTP/2 (prior knowledge on http://, ALPN h2 on https://): one connection per
    #: endpoint and lane carries every request.
    http2: bool = False


@dataclass
class RunRecords:
    """The engine's per-request columns plus how the run ended."""

    columns: dict[str, Any]
    interrupted: bool
    wall_s: float
    progress: dict[str, Any] = field(default_factory=dict)
    #: Per-worker breakdown when the run was spread over Ray workers.
    workers: list[dict[str, Any]] = field(default_factory=list)

    def col(self, name: str) -> npt.NDArray[Any]:
        return np.asarray(self.columns[name])

    def __len__(self) -> int:
        return len(self.columns["scheduled_ns"])


class Interrupts:
    """Ctrl-C and SIGTERM during a run, delivered where the run can stop cleanly.

    Python raises KeyboardInterrupt wherever a signal lands: halfway through folding a
    drained batch into the metrics, that batch would be lost from the accounting. Here a
    signal raises at once only while the run is :meth:`waiting`; elsewhere it is kept and
    :meth:`check` raises it at the next safe point."""

    def __init__(self) -> None:
        self.pending = False
        self._waiting = False

    def _handler(self, signum: int, frame: object) -> None:
        if self._waiting:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A stretch (a wait on the engine, a sleep) a signal may cut short at once."""
        self.check()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False


@contextlib.contextmanager
def interrupts() -> Iterator[Interrupts]:
    """Routes SIGINT and SIGTERM (which then behaves like Ctrl-C: drain, keep results)
    through an :class:`Interrupts` for the duration of a run."""
    state = Interrupts()
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = [signal.signal(s, state._handler) for s in signals]
    except ValueError:  # not the main thread: signals stay where they are
        state._waiting = True
        yield state
        return
    try:
        yield state
    finally:
        for s, handler in zip(signals, previous):
            signal.signal(s, handler)


@dataclass
class EngineChunk:
    """One chunk of a schedule as the engine takes it, plus per-request columns
    (``extra``, e.g. ``input_len``) that are joined back onto the records."""

    t_ns: npt.NDArray[np.int64]
    bodies: list[bytes]
    body_idx: npt.NDArray[np.uint32]
    endpoint_idx: npt.NDArray[np.uint32]
    expected_output_tokens: npt.NDArray[np.int64]
    extra: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    #: Conversation turns (parent, think_ns, followers) when the schedule has them.
    turns: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None
    #: Live history: (tool_ns, turn_text as n × 6 byte offsets, ``api.TurnOffsets``).
    live: tuple[npt.NDArray[np.int64], npt.NDArray[np.uint32]] | None = None
    #: One column per ``EngineOptions.request_headers`` (negative: no header), or none.
    header_values: tuple[npt.NDArray[np.int64], ...] = ()

    def __len__(self) -> int:
        return len(self.t_ns)

    def split(self, k: int) -> tuple[EngineChunk, EngineChunk]:
        """The first ``k`` requests and the rest (each with only the bodies it uses)."""

        def part(rows: slice) -> EngineChunk:
            idx = self.body_idx[rows]
            used, local = np.unique(idx, return_inverse=True)
            turns = None
            if self.turns is not None:
                turns = (self.turns[0][rows], self.turns[1][rows], self.turns[2][rows])
            live = None
            if self.live is not None:
                live = (self.live[0][rows], self.live[1][rows])
            return EngineChunk(
                self.t_ns[rows],
                [self.bodies[int(u)] for u in used],
                local.astype(np.uint32),
                self.endpoint_idx[rows],
                self.expected_output_tokens[rows],
                {name: col[rows] for name, col in self.extra.items()},
                turns,
                live,
                tuple(col[rows] for col in self.header_values),
            )

        return part(slice(0, k)), part(slice(k, len(self)))

    def due_before(self, horizon_ns: int) -> int:
        """How many requests are scheduled before ``horizon_ns``."""
        return int(np.searchsorted(self.t_ns, horizon_ns, side="left"))

    def engine_args(self) -> tuple[Any, ...]:
        """``Run.feed``'s arguments for this chunk."""
        turns = None
        if self.turns is not None:
            parent, think, followers = self.turns
            turns = (
                np.ascontiguousarray(parent, dtype=np.int64),
                np.ascontiguousarray(think, dtype=np.int64),
                np.ascontiguousarray(followers, dtype=np.uint32),
            )
        return (
            np.ascontiguousarray(self.t_ns, dtype=np.int64),
            np.ascontiguousarray(self.body_idx, dtype=np.uint32),
            self.bodies,
            np.ascontiguousarray(self.endpoint_idx, dtype=np.uint32),
            np.ascontiguousarray(
                np.clip(self.expected_output_tokens, 0, 2**32 - 1), dtype=np.uint32
            ),
            turns,
            [np.ascontiguousarray(col, dtype=np.int64) for col in self.header_values] or None,
            None
            if self.live is None
            else (
                np.ascontiguousarray(self.live[0], dtype=np.int64),
                np.ascontiguousarray(self.live[1], dtype=np.uint32).reshape(-1, 6),
            ),
        )


class RecordSink:
    """Receives drained record batches: one typed Arrow batch each (the engine's columns
    and the schedule's extra columns of each row, :mod:`fineserve.records`)."""

    def add(self, batch: pa.RecordBatch) -> None:
        raise NotImplementedError

    def live(self) -> dict[str, str]:
        """Extra fields for the progress display (e.g. rolling latency percentiles)."""
        return {}

    def stopped(self, at_ns: int) -> None:
        """The run was stopped at ``at_ns`` (from its start); records of requests that
        were never due follow."""

    def started(self, t0_unix_ns: int) -> None:
        """The run's start instant on the system clock, once it is fixed (before any
        record of the run arrives)."""

    def early_stop(self) -> str | None:
        """Why the run should stop now (a stop condition met), or None."""
        return None

    def watch(self, progress: dict[str, Any]) -> None:
        """The engine's live counters, at every turn of the drive loop."""


class _PendingExtras:
    """Per-request chunk columns kept until every request of the chunk has a record, so
    memory holds only the part of the schedule still in flight."""

    def __init__(self) -> None:
        self._bases: list[int] = []
        self._extras: list[dict[str, npt.NDArray[Any]]] = []
        self._left: list[int] = []

    def push(self, base: int, chunk: EngineChunk) -> None:
        self._bases.append(base)
        self._extras.append(chunk.extra)
        self._left.append(len(chunk))

    def take(self, index: npt.NDArray[np.uint64]) -> dict[str, npt.NDArray[Any]]:
        if not len(index) or not self._bases:
            return {}
        idx = index.astype(np.int64)
        which = np.searchsorted(np.asarray(self._bases), idx, side="right") - 1
        names = self._extras[0].keys()
        out: dict[str, npt.NDArray[Any]] = {}
        for name in names:
            sample = self._extras[0][name]
            col = np.empty(len(idx), dtype=sample.dtype)
            for c in np.unique(which):
                rows = which == c
                col[rows] = self._extras[c][name][idx[rows] - self._bases[c]]
            out[name] = col
        for c, n in zip(*np.unique(which, return_counts=True)):
            self._left[c] -= int(n)
        while self._left and self._left[0] == 0:
            del self._bases[0], self._extras[0], self._left[0]
        return out


class _CollectingSink(RecordSink):
    """Keeps every batch; concatenated in schedule order at the end (short runs).
    ``endpoints``: the run's list, which ``endpoint_idx`` indexes (default: the
    endpoints in order of first appearance)."""

    def __init__(self, endpoints: list[str] | None = None) -> None:
        self.endpoints = endpoints
        self.batches: list[pa.RecordBatch] = []

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self.batches.append(batch)

    def columns(self) -> dict[str, Any]:
        views = [dict(records_from_table(b, self.endpoints)[0]) for b in self.batches]
        return concat_record_batches(views, sort=True)


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
    stream: Callable[..., StreamOutcome] | None = None,
) -> RunRecords:
    """Runs one whole schedule to completion (or interruption) and returns its records
    in schedule order. ``stream`` runs it (default :func:`run_stream`; the Ray path
    passes its own)."""
    sink = _CollectingSink(endpoints)
    chunk = EngineChunk(t_ns, bodies, body_idx, endpoint_idx, expected_output_tokens)
    outcome = (stream or run_stream)(
        endpoints,
        iter([chunk]),
        options,
        sink,
        total=len(t_ns),
        show_progress=show_progress,
        description=description,
    )
    columns = sink.columns()
    columns["t0_unix_ns"] = outcome.t0_unix_ns
    columns["stopped"] = outcome.interrupted
    return RunRecords(
        columns, outcome.interrupted, outcome.wall_s, outcome.progress, outcome.workers
    )


@dataclass
class StreamOutcome:
    interrupted: bool
    wall_s: float
    t0_unix_ns: int
    progress: dict[str, Any]
    fed: int
    generated_not_fed: int
    #: Per-worker breakdown of a run spread over Ray workers (``distributed``).
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: Where a stopped run stopped, ns from its start (None: it ran to the end).
    stopped_at_ns: int | None = None
    #: Why the run stopped itself early (a --stop-on-* condition), None otherwise.
    early_stop: str | None = None


class Driver(Protocol):
    """A run as the stop/drain loop (:func:`drive`) sees it: one engine here
    (:class:`LocalRun`) or a fleet of Ray workers (``distributed.Fleet``)."""

    #: Appended to the loop's notes about the run ("" or " on every worker").
    where: str

    def wait(self) -> None:
        """Blocks a short while (a signal may cut it short)."""

    def poll(self) -> bool:
        """Hands the records completed since the last poll to the sink and, unless
        stopping, feeds what comes due; True once every request has ended."""

    def progress(self) -> dict[str, Any]:
        """The engine's counters (summed over workers)."""

    def elapsed_ns(self) -> int:
        """Time since the run's start instant."""

    def t0_unix_ns(self) -> int | None:
        """The start instant on the system clock; None until it is fixed."""

    def stop(self, reason: str | None = None) -> str:
        """Stops dispatch (in-flight requests go on); says what it stopped. ``reason``:
        what the requests never sent say."""

    def cancel(self) -> None:
        """Aborts the requests in flight."""

    def finish(self) -> StreamOutcome:
        """After the loop: the last records to the sink, and what the run did."""


def drive(
    driver: Driver,
    sink: RecordSink,
    *,
    grace_s: float,
    total: int | None = None,
    show_progress: bool = True,
    description: str = "requests",
) -> StreamOutcome:
    """The stop/drain loop both local and Ray runs use: poll until every request has
    ended, with a progress bar. On Ctrl-C/SIGTERM dispatch stops (``sink.stopped``), the
    requests in flight get ``grace_s`` to end and are then cancelled; a second Ctrl-C
    cancels them at once. A signal raises only while the loop waits, so a batch is never
    half-folded into the sink."""
    bar = _ProgressBar(total, description) if show_progress else None
    started = time.monotonic()
    stop = _poll_until_over(driver, sink, grace_s, bar)
    outcome = driver.finish()
    if bar:
        bar.update(driver.progress(), sink.live(), force=True)
        bar.close()
    return dataclasses.replace(
        outcome,
        interrupted=stop.at_ns is not None and stop.early is None,
        wall_s=time.monotonic() - started,
        stopped_at_ns=stop.at_ns,
        early_stop=stop.early,
    )


@dataclass
class _Stop:
    """Where the run was stopped (None: it ran to the end), and the stop condition that
    stopped it (None: a signal, or no stop)."""

    at_ns: int | None = None
    early: str | None = None


def _poll_until_over(
    driver: Driver, sink: RecordSink, grace_s: float, bar: _ProgressBar | None
) -> _Stop:
    """:func:`drive`'s loop; returns where (and why) the run was stopped."""
    stopped_at_ns: int | None = None
    early: str | None = None
    cancel_at = math.inf
    t0_told = False
    with interrupts() as intr:
        try:
            while True:
                try:
                    intr.check()
                    with intr.waiting():
                        driver.wait()
                    if not t0_told and (t0 := driver.t0_unix_ns()) is not None:
                        sink.started(t0)
                        t0_told = True
                    over = driver.poll()
                    progress = driver.progress()
                    sink.watch(progress)
                    if bar:
                        bar.update(progress, sink.live())
                    if over:
                        return _Stop(stopped_at_ns, early)
                    if stopped_at_ns is None and (early := sink.early_stop()) is not None:
                        stopped_at_ns = driver.elapsed_ns()
                        sink.stopped(stopped_at_ns)
                        note(f"stopping early: {early}; {driver.stop(early)}")
                        cancel_at = time.monotonic() + grace_s
                    if time.monotonic() >= cancel_at:
                        note(f"drain grace period over: cancelling the rest{driver.where}")
                        driver.cancel()
                        cancel_at = math.inf
                except KeyboardInterrupt:
                    if stopped_at_ns is not None:  # the second one
                        note(f"aborting in-flight requests{driver.where}")
                        driver.cancel()
                        cancel_at = math.inf
                        continue
                    stopped_at_ns = driver.elapsed_ns()
                    sink.stopped(stopped_at_ns)
                    note(
                        f"interrupted: {driver.stop()} for up to {grace_s:g}s "
                        "(Ctrl-C again to abort them)"
                    )
                    cancel_at = time.monotonic() + grace_s
        except BaseException:
            driver.cancel()
            raise


class LocalRun:
    """A :class:`Driver` over one engine run on this machine. Chunks are fed while the fed
    schedule reaches less than ``lookahead_ns`` past the run's clock: a chunk is split at
    that horizon and the rest held, so a chunk of 65,536 rows at 50 req/s is not fed 22
    minutes ahead. Records drain into ``sink`` as they complete, so memory follows the
    requests in flight, not the run's length."""

    where = ""

    def __init__(
        self,
        endpoints: list[str],
        chunks: Iterator[EngineChunk],
        options: EngineOptions,
        sink: RecordSink,
        lookahead_ns: int,
    ) -> None:
        self._chunks = chunks
        self._sink = sink
        self._endpoints = endpoints
        self._lookahead_ns = lookahead_ns
        self._pending = _PendingExtras()
        #: Generated, waiting for its turn to be fed.
        self.held: EngineChunk | None = None
        self._stop_reason: str | None = None
        self.fed = 0
        self._fed_until_ns = 0
        self._exhausted = False
        self._stopping = False
        self._over = False
        self._final: dict[str, Any] | None = None
        try:
            self._run = _engine.start_run(endpoints, options)
        except _engine.EngineError as e:
            raise FineserveError(str(e)) from None
        try:
            self._feed_due(lookahead_ns, at_least_one=True)
        except BaseException:
            self._run.cancel()
            raise
        if options.realtime_priority:
            _report_realtime(self._run)

    def _feed_due(self, horizon_ns: int, *, at_least_one: bool = False) -> None:
        """Feeds what is due before ``horizon_ns`` (with ``at_least_one``, at least one
        request); closes the input once the chunks run out."""
        while not self._exhausted and (at_least_one or self._fed_until_ns < horizon_ns):
            if self.held is None:
                self.held = next(self._chunks, None)
                if self.held is None:
                    self._exhausted = True
                    self._run.close_input()
                    return
            held = self.held
            cut = max(held.due_before(horizon_ns), 1 if at_least_one else 0)
            at_least_one = False
            if cut == 0 and len(held):
                return
            part, rest = held.split(cut) if cut < len(held) else (held, None)
            try:
                self._run.feed(*part.engine_args())
            except _engine.EngineError as e:
                raise FineserveError(str(e)) from None
            self._pending.push(self.fed, part)
            self.fed += len(part)
            if len(part):
                self._fed_until_ns = int(part.t_ns[-1])
            self.held = rest

    def wait(self) -> None:
        self._over = self._run.wait(0.1 if self._exhausted or self._stopping else 0.02)

    def poll(self) -> bool:
        cols: dict[str, Any] = self._run.drain()
        if len(cols["index"]):
            self._sink.add(self._batch(cols))
        if not (self._over or self._stopping or self._exhausted):
            self._feed_due(self.elapsed_ns() + self._lookahead_ns)
        return self._over

    def _batch(self, cols: dict[str, Any]) -> pa.RecordBatch:
        """Drained engine columns joined with their rows' chunk columns."""
        return records_to_batch(cols, self._pending.take(cols["index"]), self._endpoints)

    def progress(self) -> dict[str, Any]:
        return self._final if self._final is not None else dict(self._run.progress())

    def elapsed_ns(self) -> int:
        return int(self._run.progress()["elapsed_ns"])

    def t0_unix_ns(self) -> int | None:
        t0 = int(self._run.progress()["t0_unix_ns"])
        return t0 if t0 > 0 else None

    def stop(self, reason: str | None = None) -> str:
        self._stopping = True
        self._stop_reason = reason
        self._run.stop(reason)
        in_flight = self._run.progress()["in_flight"]
        return f"dispatch stopped; draining {in_flight} in-flight requests"

    def cancel(self) -> None:
        self._stopping = True
        self._run.cancel()

    def finish(self) -> StreamOutcome:
        held = self.held
        generated_not_fed = len(held) if held is not None else 0
        if held is not None and generated_not_fed:
            # Explicit records, so the results file accounts for them row by row too.
            reason = self._stop_reason or "run stopped before this request was fed"
            unsent = _not_sent_records(self.fed, held, reason)
            self._sink.add(records_to_batch(unsent, held.extra, self._endpoints))
        self._final = dict(self._run.progress())  # the handle is spent once results() returns
        last: dict[str, Any] = self._run.results()
        if len(last["index"]):
            self._sink.add(self._batch(last))
        return StreamOutcome(
            False, 0.0, int(last["t0_unix_ns"]), self._final, self.fed, generated_not_fed
        )


def run_stream(
    endpoints: list[str],
    chunks: Iterator[EngineChunk],
    options: EngineOptions,
    sink: RecordSink,
    *,
    total: int | None = None,
    lookahead_s: float = 20.0,
    show_progress: bool = True,
    description: str = "requests",
) -> StreamOutcome:
    """Runs a schedule given as chunks (send offsets continue across chunks) on this
    machine: fed within ``lookahead_s`` of the run's clock (:class:`LocalRun`), stopped
    and drained by :func:`drive` (``options.drain_grace_s``). Requests already generated
    but not fed when the run stops are reported to the sink as not sent."""
    first = next(chunks, None)
    if first is None:
        return StreamOutcome(False, 0.0, 0, {}, 0, 0)
    chunks = itertools.chain([first], chunks)
    local = LocalRun(endpoints, chunks, options, sink, int(lookahead_s * 1e9))
    return drive(
        local,
        sink,
        grace_s=options.drain_grace_s,
        total=total,
        show_progress=show_progress,
        description=description,
    )


def _not_sent_records(base: int, chunk: EngineChunk, reason: str) -> dict[str, Any]:
    """Record columns for a chunk that was never fed."""
    n = len(chunk)
    return unsent_records(
        np.arange(base, base + n),
        chunk.t_ns,
        chunk.endpoint_idx,
        np.full(n, _engine.ERROR_KINDS.index("not_sent")),
        [reason] * n,
    )


def _report_realtime(run: _engine.Run) -> None:
    """Says whether SCHED_FIFO took effect once the lanes have started."""
    while not run.progress()["started"] and not run.wait(0.005):
        pass
    if not run.progress()["realtime_lanes"]:
        note(
            "--realtime-priority: not permitted here (needs root or CAP_SYS_NICE); "
            "lanes run at normal priority"
        )


class _ProgressBar:
    """tqdm over finished requests, with the engine's live counters, the current send
    rate and the sink's rolling figures as postfix (refreshed at most 4 times a second)."""

    def __init__(self, total: int | None, description: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=description, unit="req", dynamic_ncols=True)
        self._total = total
        self._done = 0
        self._rate_mark = (time.monotonic(), 0)
        self._rate = 0.0
        self._shown_at = 0.0

    def update(
        self, p: dict[str, Any], live: dict[str, str] | None = None, *, force: bool = False
    ) -> None:
        done = int(p["succeeded"]) + int(p["failed"]) + int(p["not_sent"])
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done
        now = time.monotonic()
        t0, sent0 = self._rate_mark
        if now - t0 >= 1.0:
            self._rate = (int(p["sent"]) - sent0) / (now - t0)
            self._rate_mark = (now, int(p["sent"]))
        if now - self._shown_at < 0.25 and not force:
            return
        self._shown_at = now
        sent = f"{p['sent']}/{self._total}" if self._total else str(p["sent"])
        fields = {
            "sent": sent,
            "in_flight": p["in_flight"],
            "failed": p["failed"],
            "rate": f"{self._rate:.0f}/s",
            **(live or {}),
        }
        if p.get("connection_waiting"):
            # The client, not the server, holds requests back right now.
            fields["client-limited"] = f"{p['connection_waiting']} wait for a connection"
        # Redrawn now: tqdm redraws only when its count moves, which leaves the postfix
        # (sent, in flight, rate) stale while long generations are under way.
        self._bar.set_postfix(fields, refresh=True)

    def close(self) -> None:
        self._bar.close()
