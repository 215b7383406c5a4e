"""One workload driven from many load-generator machines, on Ray (``fineserve[ray]``).

The driver builds the schedule, splits it across N Ray actors by request (row i goes to
worker i mod N: the members of a 1 ms burst are spread over the workers, each keeping its
absolute send time; all turns of a conversation go to one worker, as a turn waits for its
parent), ships each part as an Arrow table, and agrees a common start instant.
Each actor runs the Rust engine on its node and hands records back as Arrow batches while
the run goes; the driver merges them into the same sink as a single-machine run (same
Parquet, JSON and report), with a per-worker breakdown.

Start instant and clock skew: the driver picks ``t0`` on its own system clock and each
engine starts at that system-clock instant on its node (``start_at_unix_ns``). The
residual skew is the offset between the nodes' system clocks (NTP/PTP keep it to well
under a millisecond on a LAN). Before the run the driver measures each worker's offset
with a few hundred UDP probes stamped by both kernels (:mod:`fineserve.clock`: the
intersection of the exchanges' NTP intervals, a bound of about half the fastest round
trip), falling back to the backend's own calls (Cristian's method) where UDP does not get
through, and measures it again at the end (the drift). The result reports them with each
engine's actual start relative to ``t0`` (late only if its warm-up ran past ``t0``). An
offset within its bound is not applied.

A worker that dies is reported; the requests of its part that never came back are
accounted for: those scheduled before its last progress report as ``cancelled`` (they
may have been in flight), the rest as ``not_sent``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from . import _engine
from .clock import ClockEstimate, ClockResponder, measure_offset
from .console import warn
from .errors import FineserveError
from .records import records_to_batch, unsent_records, with_extra
from .runner import (
    EngineChunk,
    EngineOptions,
    RecordSink,
    RunRecords,
    StreamOutcome,
    _PendingExtras,
    drive,
    run_engine,
)

INSTALL_HINT = "--ray needs Ray: pip install 'fineserve[ray]'"
#: Time between the workers being ready and the common start instant.
START_MARGIN_S = 1.0
POLL_S = 0.25
#: CPU a worker's placement bundle asks for: a token, so that any node takes many.
WORKER_CPU = 0.01
NOT_SENT = _engine.ERROR_KINDS.index("not_sent")
CANCELLED = _engine.ERROR_KINDS.index("cancelled")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FineserveError(INSTALL_HINT) from None
    return ray


@dataclass
class WorkerPart:
    """One worker's share of the schedule: global row indices and the engine columns."""

    index: npt.NDArray[np.int64]
    table: pa.Table
    bodies: list[bytes]


def conversation_roots(parent: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """For each row, the first turn of its conversation (itself when it has no parent);
    parents are earlier rows, so pointer jumping settles in log(turns) passes."""
    root = np.where(parent < 0, np.arange(len(parent)), parent)
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            return root
        root = nxt


def partition(chunks: list[EngineChunk], workers: int) -> list[WorkerPart]:
    """Splits the schedule over ``workers``: conversation k (in order of first turns; a
    request without turns is a conversation of one) goes to worker k mod ``workers``, so
    a turn runs on the worker that ran its parent and rows without turns go round-robin.
    Bodies are renumbered into one table per worker (each body shipped once per worker
    that uses it); turn parents into the worker's own rows."""
    bodies_all: list[bytes] = []
    names = ("t_ns", "body_idx", "endpoint_idx", "expected_output_tokens", "parent", "think_ns")
    cols: dict[str, list[npt.NDArray[Any]]] = {k: [] for k in (*names, "followers")}
    has_turns = any(c.turns is not None for c in chunks)
    # Live history: each turn's delay after a tool call and its body's offsets (six
    # columns turn_text_0 … turn_text_5), with the turn columns.
    has_live = any(c.live is not None for c in chunks)
    live_names = ("tool_ns", *(f"turn_text_{k}" for k in range(6)))
    if has_live:
        cols.update({k: [] for k in live_names})
    # Per-request header columns ship as header_0, header_1, ... (every chunk has them or
    # none does: the run's options fix how many).
    n_headers = max((len(c.header_values) for c in chunks), default=0)
    headers: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(n_headers)]
    for c in chunks:
        n_c = len(c)
        cols["t_ns"].append(np.asarray(c.t_ns, np.int64))
        cols["body_idx"].append(np.asarray(c.body_idx, np.int64) + len(bodies_all))
        cols["endpoint_idx"].append(np.asarray(c.endpoint_idx, np.uint32))
        cols["expected_output_tokens"].append(
            np.clip(np.asarray(c.expected_output_tokens, np.int64), 0, 2**32 - 1)
        )
        parent, think, followers = c.turns or (
            np.full(n_c, -1, np.int64),
            np.zeros(n_c, np.int64),
            np.zeros(n_c, np.int64),
        )
        cols["parent"].append(np.asarray(parent, np.int64))
        cols["think_ns"].append(np.asarray(think, np.int64))
        cols["followers"].append(np.asarray(followers, np.int64))
        if has_live:
            tool_ns, text = c.live or (np.asarray(think, np.int64), np.zeros((n_c, 6), np.uint32))
            cols["tool_ns"].append(np.asarray(tool_ns, np.int64))
            offsets = np.asarray(text, np.int64).reshape(-1, 6)
            for k in range(6):
                cols[f"turn_text_{k}"].append(offsets[:, k])
        for k in range(n_headers):
            values = c.header_values[k] if k < len(c.header_values) else np.full(n_c, -1)
            headers[k].append(np.asarray(values, np.int64))
        bodies_all.extend(c.bodies)
    for k in range(n_headers):
        cols[f"header_{k}"] = headers[k]
    whole = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
    n = len(whole["t_ns"])
    root = conversation_roots(whole["parent"])
    is_root = root == np.arange(n)
    conversation = np.cumsum(is_root) - 1  # rank of each row's own first turn...
    owner = conversation[root] % workers  # ...read at its root
    parts = []
    for w in range(workers):
        rows = np.flatnonzero(owner == w).astype(np.int64)
        used, local_body = np.unique(whole["body_idx"][rows], return_inverse=True)
        columns = {
            "index": pa.array(rows),
            "t_ns": pa.array(whole["t_ns"][rows]),
            "body_idx": pa.array(local_body.astype(np.uint32)),
            "endpoint_idx": pa.array(whole["endpoint_idx"][rows]),
            "expected_output_tokens": pa.array(
                whole["expected_output_tokens"][rows].astype(np.uint32)
            ),
        }
        if has_turns:
            parent = whole["parent"][rows]
            local = np.where(parent >= 0, np.searchsorted(rows, parent), -1)
            columns["parent"] = pa.array(local.astype(np.int64))
            columns["think_ns"] = pa.array(whole["think_ns"][rows])
            columns["followers"] = pa.array(whole["followers"][rows].astype(np.uint32))
        if has_live:
            for name in live_names:
                columns[name] = pa.array(whole[name][rows])
        for k in range(n_headers):
            columns[f"header_{k}"] = pa.array(whole[f"header_{k}"][rows])
        parts.append(WorkerPart(rows, pa.table(columns), [bodies_all[i] for i in used.tolist()]))
    return parts


class EngineWorker:
    """The Ray actor (wrapped with ``ray.remote`` in :func:`run_stream_ray`): runs one
    part of the schedule with the Rust engine on its node."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.run: Any = None
        self.index = np.zeros(0, np.int64)
        self.endpoints: list[str] = []
        self._clock: ClockResponder | None = None

    def clock_ns(self) -> int:
        return time.time_ns()

    def clock_port(self) -> int:
        """The UDP port this worker answers clock probes on (started on first call)."""
        if self._clock is None:
            self._clock = ClockResponder()
        return self._clock.port

    def node(self) -> dict[str, Any]:
        """Where this worker runs: its node's IP address, host name and process id."""
        return {"node_ip": node_ip(), "hostname": socket.gethostname(), "pid": os.getpid()}

    def start(
        self,
        endpoints: list[str],
        table: pa.Table,
        bodies: list[bytes],
        options: EngineOptions,
        start_at_unix_ns: int,
    ) -> None:
        self.endpoints = endpoints
        self.index = table.column("index").to_numpy()
        turns = None
        if "parent" in table.column_names:
            turns = tuple(table.column(c).to_numpy() for c in ("parent", "think_ns", "followers"))
        live = None
        if "tool_ns" in table.column_names:
            text = np.stack(
                [table.column(f"turn_text_{k}").to_numpy() for k in range(6)], axis=1
            ).astype(np.uint32)
            live = (table.column("tool_ns").to_numpy(), text)
        # No more lanes than requests: a small share needs no idle threads.
        lanes = max(1, min(options.lanes, table.num_rows))
        self.run = _engine.start_run(
            endpoints, replace(options, lanes=lanes), start_at_unix_ns=start_at_unix_ns
        )
        self.run.feed(
            table.column("t_ns").to_numpy(),
            table.column("body_idx").to_numpy(),
            bodies,
            table.column("endpoint_idx").to_numpy(),
            table.column("expected_output_tokens").to_numpy(),
            turns,
            [
                table.column(c).to_numpy()
                for c in sorted(
                    (c for c in table.column_names if c.startswith("header_")),
                    key=lambda c: int(c.split("_")[1]),
                )
            ]
            or None,
            live,
        )
        self.run.close_input()

    def progress(self) -> dict[str, Any]:
        return dict(self.run.progress()) if self.run is not None else {}

    def _batch(self, cols: dict[str, Any]) -> pa.RecordBatch:
        cols = dict(cols)
        cols["index"] = self.index[np.asarray(cols["index"], np.int64)].astype(np.uint64)
        return records_to_batch(cols, {}, self.endpoints)

    def drain(self) -> pa.RecordBatch | None:
        cols = self.run.drain()
        return self._batch(cols) if len(cols["index"]) else None

    def wait(self, timeout_s: float) -> bool:
        return bool(self.run.wait(timeout_s))

    def finish(self) -> tuple[pa.RecordBatch, dict[str, Any], int]:
        while not self.run.wait(1.0):
            pass
        progress = dict(self.run.progress())  # the handle is spent once results() returns
        last = self.run.results()
        t0 = int(last.pop("t0_unix_ns"))
        last.pop("stopped", None)
        return self._batch(last), progress, t0

    def stop(self, reason: str | None = None) -> None:
        if self.run is not None:
            self.run.stop(reason)

    def cancel(self) -> None:
        if self.run is not None:
            self.run.cancel()


def run_engine_ray(
    endpoints: list[str],
    t_ns: npt.NDArray[np.int64],
    bodies: list[bytes],
    body_idx: npt.NDArray[np.uint32],
    endpoint_idx: npt.NDArray[np.uint32],
    expected_output_tokens: npt.NDArray[np.int64],
    options: EngineOptions,
    *,
    address: str = "local",
    workers: int = 2,
    show_progress: bool = True,
) -> RunRecords:
    """:func:`fineserve.run_engine` spread over ``workers`` Ray actors: the same records,
    in schedule order, plus ``RunRecords.workers`` (the per-worker breakdown)."""
    ray_stream = functools.partial(run_stream_ray, address=address, workers=workers)
    return run_engine(
        endpoints,
        t_ns,
        bodies,
        body_idx,
        endpoint_idx,
        expected_output_tokens,
        options,
        show_progress=show_progress,
        stream=ray_stream,
    )


def node_ip() -> str:
    """This node's address as its cluster sees it: Ray's, in a Ray worker; otherwise the
    address of the interface that routes outwards (no packet is sent), or loopback."""
    try:
        import ray

        if ray.is_initialized():
            util: Any = ray.util  # untyped
            return str(util.get_node_ip_address())
    except ImportError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only, nothing is sent
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def share(total: int, workers: int, worker: int) -> int:
    """Worker ``worker``'s part of ``total`` split as evenly as integers allow (parts
    differ by at most one and add up to ``total``)."""
    return total // workers + (1 if worker < total % workers else 0)


def clock_offset_ns(backend: Any, actor: Any, rounds: int = 5) -> tuple[int, int]:
    """Worker clock minus driver clock over the backend's own calls, and its uncertainty
    (half the best round trip): the fallback where UDP probes do not get through.
    ``backend``: Ray, or anything with its ``get``."""
    best: tuple[int, int] | None = None
    for _ in range(rounds):
        sent = time.time_ns()
        remote = backend.get(actor.clock_ns.remote())
        back = time.time_ns()
        half_rtt = (back - sent) // 2
        if best is None or half_rtt < best[1]:
            best = (remote - (sent + half_rtt), half_rtt)
    assert best is not None
    return best


def measure_clock(backend: Any, actor: Any, host: str) -> ClockEstimate:
    """The worker's clock offset by UDP probes to its node (:mod:`fineserve.clock`), or by
    the backend's calls when no probe gets through (a firewall between the machines)."""
    try:
        port = int(backend.get(actor.clock_port.remote()))
        found = measure_offset(host, port)
    except Exception:  # a worker without the method: the fallback below
        found = None
    if found is not None:
        return found
    offset, bound = clock_offset_ns(backend, actor)
    return ClockEstimate(offset, bound, bound, 2 * bound, 5, time.time_ns(), "rpc")


class _WorkerStats:
    """Per-worker breakdown, folded from the batches as they come back."""

    def __init__(self, worker: int, part: WorkerPart) -> None:
        self.worker = worker
        self.part = part
        self.seen = np.zeros(len(part.index), bool)
        self.lag_ns: list[npt.NDArray[np.int64]] = []
        self.kinds = np.zeros(len(_engine.ERROR_KINDS), np.int64)
        self.first_sent = np.iinfo(np.int64).max
        self.last_sent = -1
        self.progress: dict[str, Any] = {}
        self.dead: str | None = None
        self.done = False
        self.t0_unix_ns: int | None = None
        self.clock: tuple[int, int] = (0, 0)
        self.clock_start: ClockEstimate | None = None
        self.clock_end: ClockEstimate | None = None
        self.applied_offset_ns = 0
        self.node: dict[str, Any] = {}

    def fold(self, batch: pa.RecordBatch) -> None:
        """Folds a record batch (built with the engine's error kinds, as workers do)."""

        def ints(name: str) -> npt.NDArray[np.int64]:
            values: npt.NDArray[np.int64] = batch.column(name).to_numpy().astype(np.int64)
            return values

        idx = ints("index")
        self.seen[np.searchsorted(self.part.index, idx)] = True
        kind = batch.column("error_kind").indices.to_numpy().astype(np.int64)
        self.kinds += np.bincount(kind, minlength=len(self.kinds))
        sent = ints("sent_ns")
        was = sent >= 0
        if was.any():
            self.lag_ns.append(sent[was] - ints("scheduled_ns")[was])
            self.first_sent = min(self.first_sent, int(sent[was].min()))
            self.last_sent = max(self.last_sent, int(sent[was].max()))

    def summary(self, t0_unix_ns: int) -> dict[str, Any]:
        lag = np.concatenate(self.lag_ns) / 1e3 if self.lag_ns else np.zeros(0)
        n_sent = len(lag)
        span_s = (self.last_sent - self.first_sent) / 1e9 if n_sent > 1 else 0.0
        kinds = {_engine.ERROR_KINDS[k]: int(c) for k, c in enumerate(self.kinds.tolist()) if c}
        return {
            "worker": self.worker,
            "requests": len(self.part.index),
            "sent": n_sent,
            "outcomes": kinds,
            "achieved_rps": (n_sent - 1) / span_s if span_s > 0 else None,
            "lag_p50_us": float(np.percentile(lag, 50)) if n_sent else None,
            "lag_p99_us": float(np.percentile(lag, 99)) if n_sent else None,
            "lag_max_us": float(lag.max()) if n_sent else None,
            "clock_offset_us": self.clock[0] / 1e3,
            "clock_offset_uncertainty_us": self.clock[1] / 1e3,
            "clock_offset_applied_us": self.applied_offset_ns / 1e3,
            **self._clock_details(),
            "start_error_us": (self.t0_unix_ns - t0_unix_ns) / 1e3
            if self.t0_unix_ns is not None
            else None,
            "died": self.dead,
            **self.node,
        }

    def _clock_details(self) -> dict[str, Any]:
        """How the offset was measured, and the drift from a second measurement at the end
        (ppm, with its bound; runs under a second say nothing of drift)."""
        start, end = self.clock_start, self.clock_end
        if start is None:
            return {}
        out: dict[str, Any] = {
            "clock_offset_method": start.method,
            "clock_offset_spread_us": start.spread_ns / 1e3,
            "clock_min_round_trip_us": start.min_delay_ns / 1e3,
            "clock_probes": start.samples,
        }
        if end is not None:
            out["clock_offset_end_us"] = end.offset_ns / 1e3
            span_ns = end.at_ns - start.at_ns
            if span_ns >= 1_000_000_000:
                out["clock_drift_ppm"] = (end.offset_ns - start.offset_ns) / span_ns * 1e6
                out["clock_drift_bound_ppm"] = (end.bound_ns + start.bound_ns) / span_ns * 1e6
        return out

    def lost_records(self) -> dict[str, Any]:
        """Records for the rows of a dead worker that never came back."""
        lost = ~self.seen
        rows = self.part.index[lost]
        sched = self.part.table.column("t_ns").to_numpy()[lost]
        elapsed = int(self.progress.get("elapsed_ns", -1)) if self.progress else -1
        maybe_sent = sched <= elapsed
        why_sent = f"worker {self.worker} died ({self.dead}); this request may have been in flight"
        why_not = f"worker {self.worker} died ({self.dead}) before this request's time"
        return unsent_records(
            rows,
            sched,
            self.part.table.column("endpoint_idx").to_numpy()[lost],
            np.where(maybe_sent, CANCELLED, NOT_SENT),
            [why_sent if m else why_not for m in maybe_sent.tolist()],
        )


def run_stream_ray(
    endpoints: list[str],
    chunks: Iterator[EngineChunk],
    options: EngineOptions,
    sink: RecordSink,
    *,
    address: str,
    workers: int,
    placement: str = "spread",
    total: int | None = None,
    show_progress: bool = True,
    description: str = "requests",
    ray_init: dict[str, Any] | None = None,
    on_started: Callable[[list[Any]], None] | None = None,
) -> StreamOutcome:
    """``runner.run_stream`` over Ray actors; same sink contract, plus the per-worker
    breakdown in ``StreamOutcome.workers``. ``address``: a Ray cluster (``auto``, or
    ``ray://host:10001``), or ``local`` to start one on this machine. ``on_started`` is
    called with the actor handles once every worker has started (tests, tooling)."""
    ray = import_ray()
    if workers < 1:
        raise FineserveError("--workers must be >= 1")

    def connect() -> FleetBackend:
        _init_ray(ray, address, ray_init)
        return RayBackend(ray, placement)

    return run_fleet(
        connect, endpoints, chunks, options, sink, workers,
        total=total, show_progress=show_progress, description=description,
        on_started=on_started,
    )  # fmt: skip


def run_fleet(
    make_backend: Callable[[], FleetBackend],
    endpoints: list[str],
    chunks: Iterator[EngineChunk],
    options: EngineOptions,
    sink: RecordSink,
    workers: int,
    *,
    total: int | None = None,
    show_progress: bool = True,
    description: str = "requests",
    on_started: Callable[[list[Any]], None] | None = None,
) -> StreamOutcome:
    """The schedule split over ``workers`` engines, driven to its end. The whole schedule
    is generated first (it is split across the workers); ``make_backend`` (starting Ray,
    say) is called only when it holds a request."""
    all_chunks = list(chunks)
    if not sum(len(c) for c in all_chunks):
        return StreamOutcome(False, 0.0, 0, {}, 0, 0)
    backend = make_backend()
    fleet = Fleet(backend, endpoints, all_chunks, options, sink, workers)
    if on_started is not None:
        on_started(fleet.actors)
    return drive(
        fleet,
        sink,
        grace_s=options.drain_grace_s,
        total=total,
        show_progress=show_progress,
        description=f"{description} ({workers} {backend.noun})",
    )


def _init_ray(ray: Any, address: str, ray_init: dict[str, Any] | None) -> None:
    if ray.is_initialized():
        return
    probe_address(address)
    kwargs = dict(ray_init or {})
    kwargs.setdefault("log_to_driver", False)
    kwargs.setdefault("include_dashboard", False)
    with _stderr_captured() as captured:
        try:
            ray.init(address=None if address == "local" else address, **kwargs)
            return
        except Exception as e:  # ConnectionError, RuntimeError, … as Ray words it
            error = e
    raise FineserveError(ray_init_error(address, error, "".join(captured))) from None


def ray_init_error(address: str, error: BaseException, ray_log: str) -> str:
    """One line for a failed ``ray.init``, naming the cause where Ray's own log (its core
    writes to the process's stderr, a dozen lines of retries) or the error says it."""
    text = f"{error}\n{ray_log}"
    if "InvalidAuthToken" in text or "Unauthenticated" in text:
        return (
            f"--ray {address}: the cluster refused this driver's token (Ray's token "
            "authentication): run with the cluster's token, RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<a copy of the head's "
            "~/.ray/auth_token>"
        )
    if "ersion mismatch" in text:
        return (
            f"--ray {address}: the cluster runs another Ray or Python version than this "
            f"driver ({str(error).splitlines()[0][:200]}); install the same versions on "
            "every node"
        )
    return f"--ray {address}: {str(error).splitlines()[0]}"


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """File descriptor 2 redirected to a temporary file while the block runs (Ray's C++
    core logs there directly, past Python's ``sys.stderr``); the list it yields holds
    what was written, once the block has ended."""
    text: list[str] = []
    with tempfile.TemporaryFile(mode="w+", errors="replace") as f:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text.append(f.read())


class FleetBackend(Protocol):
    """Where a fleet's workers run: the part of Ray's actor API the fleet uses. A worker's
    methods are called as ``actor.method.remote(*args)``, which returns a reference;
    :meth:`get` waits for one or a list of them."""

    #: What the workers are called in messages ("Ray workers", "processes").
    noun: str
    #: Whether the workers share this host, so the run's connection caps are split over
    #: them; a cluster's nodes each have their own limits.
    shares_host: bool

    def spawn(self, workers: int) -> list[Any]:
        """Starts ``workers`` :class:`EngineWorker` instances; returns their handles."""

    def get(self, refs: Any) -> Any:
        """The value(s) of one reference or a list of them; raises if a worker failed."""

    def kill(self, actor: Any) -> None:
        """Ends a worker (a no-op for one already gone)."""


class RayBackend:
    """Workers as Ray actors, spread over the cluster's nodes."""

    noun = "Ray workers"
    shares_host = False

    def __init__(self, ray: Any, placement: str = "spread") -> None:
        self._ray = ray
        self._placement = placement

    def spawn(self, workers: int) -> list[Any]:
        # The engine's lanes are threads of the actor's process, not Ray tasks: each worker
        # asks for a token of CPU, in a placement group whose strategy puts the workers on
        # different nodes (SPREAD) or on as few as hold them (PACK). A group waits until
        # its bundles are placed, so a node that joined a moment ago is not passed over.
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = "PACK" if self._placement == "pack" else "SPREAD"
        group = placement_group([{"CPU": WORKER_CPU}] * workers, strategy=strategy)
        try:
            self._ray.get(group.ready(), timeout=60)
        except Exception as e:
            raise FineserveError(
                f"--ray: Ray could not place {workers} workers ({_first_line(e)})"
            ) from None
        remote_cls = self._ray.remote(num_cpus=WORKER_CPU, max_concurrency=4)(EngineWorker)
        return [
            remote_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=w
                ),
            ).remote(w)
            for w in range(workers)
        ]

    def get(self, refs: Any) -> Any:
        return self._ray.get(refs)

    def kill(self, actor: Any) -> None:
        self._ray.kill(actor)


class Fleet:
    """A :class:`runner.Driver` over workers (Ray actors, or processes on this host), each
    running its part of the schedule (:func:`partition`) with the engine from a common
    start instant."""

    where = " on every worker"

    def __init__(
        self,
        backend: FleetBackend,
        endpoints: list[str],
        chunks: list[EngineChunk],
        options: EngineOptions,
        sink: RecordSink,
        workers: int,
    ) -> None:
        self._backend = backend
        self._endpoints = endpoints
        self._sink = sink
        self._pending = _PendingExtras()
        self.requests = 0
        for c in chunks:
            self._pending.push(self.requests, c)
            self.requests += len(c)
        parts = partition(chunks, workers)
        self.actors = backend.spawn(workers)
        self.stats = [_WorkerStats(w, p) for w, p in enumerate(parts)]
        try:
            for s, a in zip(self.stats, self.actors):
                s.node = backend.get(a.node.remote())
                s.clock_start = measure_clock(backend, a, s.node.get("node_ip") or "127.0.0.1")
                s.clock = (s.clock_start.offset_ns, s.clock_start.bound_ns)
        except Exception as e:
            self._kill()
            raise FineserveError(f"starting the {backend.noun}: {_first_line(e)}") from None
        for s in self.stats:
            # An offset within its own uncertainty is noise (same host, or clocks already
            # in sync): correcting by it would only add that noise to the start.
            s.applied_offset_ns = s.clock[0] if abs(s.clock[0]) > s.clock[1] else 0
        worker_options = replace(
            options,
            # Warm connections are per engine: the planned count is split over the workers.
            warm_connections=-(-options.warm_connections // workers),
            # The workers' environment may differ from the driver's (other nodes).
            api_key=options.api_key or os.environ.get("OPENAI_API_KEY") or None,
        )
        per_worker = [worker_options] * workers
        if backend.shares_host:
            # Caps computed for the whole host are shared out exactly (0/None: no cap).
            per_worker = [
                replace(
                    worker_options,
                    max_connections=share(options.max_connections, workers, w),
                    max_concurrency=share(options.max_concurrency or 0, workers, w) or None,
                )
                for w in range(workers)
            ]
        self.start_unix_ns = time.time_ns() + int(START_MARGIN_S * 1e9)
        starts = [
            a.start.remote(
                endpoints,
                p.table,
                p.bodies,
                o,
                self.start_unix_ns + s.applied_offset_ns,
            )
            for a, p, s, o in zip(self.actors, parts, self.stats, per_worker)
        ]
        try:
            backend.get(starts)
        except Exception as e:
            self._kill()
            raise FineserveError(f"starting the {backend.noun}: {_first_line(e)}") from None

    def _live(self) -> list[tuple[_WorkerStats, Any]]:
        return [(s, a) for s, a in zip(self.stats, self.actors) if not s.dead]

    def _deliver(self, s: _WorkerStats, batch: pa.RecordBatch | None) -> None:
        """Passes a worker's batch on to the sink with the schedule's extra columns."""
        if batch is None or not batch.num_rows:
            return
        s.fold(batch)
        extra = self._pending.take(batch.column("index").to_numpy().astype(np.uint64))
        extra["worker"] = np.full(batch.num_rows, s.worker, np.uint16)
        self._sink.add(with_extra(batch, extra))

    def wait(self) -> None:
        time.sleep(POLL_S)

    def poll(self) -> bool:
        live = [(s, a) for s, a in self._live() if not s.done]
        calls = [(s, a.drain.remote(), a.progress.remote(), a.wait.remote(0.0)) for s, a in live]
        for s, d, p, w in calls:
            try:
                batch, prog, finished = self._backend.get([d, p, w])
            except Exception as e:  # RayActorError and the like: the worker is gone
                s.dead = _first_line(e)
                warn(f"{self._backend.noun[:-1]} {s.worker} died: {s.dead}")
                continue
            s.progress = prog
            self._deliver(s, batch)
            s.done = bool(finished)
        return all(s.done or s.dead for s in self.stats)

    def progress(self) -> dict[str, Any]:
        return _sum_progress(self.stats)

    def elapsed_ns(self) -> int:
        return max(time.time_ns() - self.start_unix_ns, 0)

    def t0_unix_ns(self) -> int | None:
        return self.start_unix_ns

    def stop(self, reason: str | None = None) -> str:
        for _, a in self._live():
            a.stop.remote(reason)
        return f"stopping {len(self.actors)} {self._backend.noun}; draining in-flight requests"

    def cancel(self) -> None:
        try:
            self._backend.get([a.cancel.remote() for _, a in self._live()])
        except Exception as e:  # a worker died meanwhile: the next poll says which
            warn(f"cancelling the {self._backend.noun}: {_first_line(e)}")

    def finish(self) -> StreamOutcome:
        for s, a in self._live():
            # The offset again, now that the run is over: how far the clocks drifted.
            if s.clock_start is not None and s.clock_start.method == "udp":
                host = s.node.get("node_ip") or "127.0.0.1"
                try:
                    s.clock_end = measure_clock(self._backend, a, host)
                except Exception:  # a worker lost now: finish() says so below
                    s.clock_end = None
            try:
                batch, prog, t0 = self._backend.get(a.finish.remote())
            except Exception as e:
                s.dead = _first_line(e)
                continue
            s.progress, s.t0_unix_ns = prog, t0 - s.applied_offset_ns  # on the driver's clock
            self._deliver(s, batch)
        for s in self.stats:
            if s.dead:
                self._deliver(s, records_to_batch(s.lost_records(), {}, self._endpoints))
        self._kill()
        summaries = [
            {**s.summary(self.start_unix_ns), "kind": self._backend.noun.capitalize()}
            for s in self.stats
        ]
        return StreamOutcome(
            False, 0.0, self.start_unix_ns, self.progress(), self.requests, 0, workers=summaries
        )

    def _kill(self) -> None:
        for a in self.actors:
            self._backend.kill(a)


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """A one-line error for a HOST:PORT (or ray://HOST:PORT) nobody listens on: Ray itself
    retries such an address for minutes before it gives up."""
    if address in ("local", "auto"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise FineserveError(f"--ray {address}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise FineserveError(
            f"--ray {address}: cannot reach a Ray cluster there ({e.strerror or e}); "
            "start one with `ray start --head` or use --ray local"
        ) from None


def _sum_progress(stats: list[_WorkerStats]) -> dict[str, Any]:
    keys = (
        "scheduled", "dispatched", "sent", "succeeded", "failed", "not_sent", "in_flight",
        "connections_open", "connections_peak", "connections_opened", "connection_waiting",
        "connection_waits",
        "connection_wait_ns", "token_events", "kernel_stamped_events", "lane_windows",
        "lane_saturated_windows",
    )  # fmt: skip
    out: dict[str, Any] = {k: sum(int(s.progress.get(k, 0)) for s in stats) for k in keys}
    out["elapsed_ns"] = max((int(s.progress.get("elapsed_ns", 0)) for s in stats), default=0)
    out["started"] = any(s.progress.get("started") for s in stats)
    return out


def _first_line(e: BaseException) -> str:
    # A Ray task error's text starts with the task's name; its cause says what happened.
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
