"""Open-files and ephemeral-port limits: raised where allowed, stated, and checked against
the connections a run plans to hold."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _engine
from .schedule import Schedule

#: Descriptors kept for everything but connections: Python and its libraries, result
#: files, the engine's event loops and timers.
RESERVED_DESCRIPTORS = 256
#: Share of the ephemeral ports connect() takes cheaply (per source address and server)
#: that connections may use: some stay in TIME_WAIT after the client closes a connection,
#: and other programs on the host connect too.
PORT_SHARE = 0.9


def cheap_ports(low: int, high: int) -> int:
    """Ports of ``low``..``high`` that connect() hands out cheaply towards one server:
    Linux takes ports of one parity first (the other half is bind()'s) and, once that half
    is used, walks all of it on every connect before trying the rest. Measured on this
    project's machines (range 32768-60999): 30 us a connect up to ~14,100 connections to
    one server, 1-2 ms each past it (the lanes' CPU went to the kernel's port search)."""
    return (high - low + 1) // 2


@dataclass
class ConnectionBudget:
    """How many requests may be in flight at once without running out of descriptors."""

    #: The open-files limit (after raising the soft limit to the hard one).
    limit: int
    #: Descriptors one request in flight holds: its connection, and the server's end of it
    #: when the mock runs in this process.
    per_request: int
    #: Requests in flight the limit allows; more wait for a connection (dispatch lag)
    #: instead of failing with "too many open files" or hanging in an accept queue.
    max_in_flight: int
    lines: list[str] = field(default_factory=list)


def connection_budget(
    expected_peak_in_flight: int,
    n_sources: int,
    mock: bool,
    engine_processes: int = 1,
    n_endpoints: int = 1,
) -> ConnectionBudget:
    """The limits, raised where allowed, and the in-flight cap they imply; ``lines`` state
    the limits and what the expected peak (requests in flight at once) will meet.
    ``engine_processes`` > 1: the client ends live in that many child processes, each
    with the same limit as this one (the embedded mock's ends stay in this process). The
    cap also keeps within the ephemeral ports connect() hands out cheaply (per source
    address and server; :func:`cheap_ports`), which all processes of the host share."""
    _, limit = _engine.raise_open_files_limit()
    per_request = 2 if mock and engine_processes == 1 else 1
    if not limit:  # unknown (not Linux): no cap
        return ConnectionBudget(0, per_request, 1 << 30, connection_limits(0, n_sources, mock))
    cap = max((limit - RESERVED_DESCRIPTORS) // per_request, 1)
    if engine_processes > 1 and not mock:
        cap *= engine_processes
    ports = _engine.ephemeral_port_range()
    if ports is not None:
        per_pair = int(cheap_ports(*ports) * PORT_SHARE)
        cap = max(min(cap, per_pair * max(n_sources, 1) * n_endpoints), 1)
    # Connections are capped below the descriptor limit, so only the ports can fall short.
    lines = connection_limits(min(expected_peak_in_flight, cap), n_sources, mock, engine_processes)
    needed = expected_peak_in_flight * per_request + RESERVED_DESCRIPTORS
    if expected_peak_in_flight > cap:
        where = (
            " (both ends: the mock runs in this process)"
            if per_request == 2
            else " (the mock's ends, in this process)"
            if mock
            else f" over {engine_processes} processes"
            if engine_processes > 1
            else ""
        )
        lines.append(
            f"expected peak of {expected_peak_in_flight} requests in flight needs ~{needed} "
            f"descriptors{where}, more than the open-files limit {limit}: at most "
            f"{cap} are in flight, the rest wait for a connection (shown as dispatch lag); "
            "raise the hard limit (`ulimit -Hn`) or use --processes to send them on time"
        )
    return ConnectionBudget(limit, per_request, cap, lines)


def connection_limits(
    connections_per_endpoint: int, n_sources: int, mock: bool, engine_processes: int = 1
) -> list[str]:
    """Raises the open-files limit; returns a line stating the limits, plus a warning for
    each one that the planned connections (warm connections or the concurrency cap, per
    endpoint) would exceed. ``mock``: the in-process mock holds the other end of each
    connection, which doubles the descriptors."""
    before, after = _engine.raise_open_files_limit()
    files = f"open files: limit {after}" + (f" (raised from {before})" if after > before else "")
    lines = [files]
    ports = _engine.ephemeral_port_range()
    per_source = 0
    if ports is not None:
        per_source = cheap_ports(*ports)
        lines[0] += (
            f"; ephemeral ports {ports[0]}-{ports[1]} (connects stay cheap up to "
            f"{per_source} connections per source address and server)"
        )
    # Client ends spread over the engine processes; the embedded mock's all in this one.
    needed_files = (
        connections_per_endpoint * 2
        if mock and engine_processes == 1
        else connections_per_endpoint
        if mock
        else -(-connections_per_endpoint // engine_processes)
    )
    if after and needed_files > after:
        lines.append(
            f"warning: {needed_files} descriptors planned, more than the open-files limit "
            f"{after}; raise `ulimit -n` (hard limit) or connections will fail"
        )
    if per_source and connections_per_endpoint > per_source * max(n_sources, 1):
        lines.append(
            f"warning: {connections_per_endpoint} connections per server planned, more than "
            f"{per_source} cheap ephemeral ports × {max(n_sources, 1)} source address(es) "
            "(past them each connect walks the used ports, ~1 ms); widen "
            "net.ipv4.ip_local_port_range or add --source-ip addresses"
        )
    return lines


def mock_peak_in_flight(first: Schedule, ttft_ms: float, itl_ms: float) -> int:
    """The most requests in flight at once that the schedule's first chunk implies against
    the embedded mock, whose TTFT and ITL are known (exact)."""
    busy_ns = np.rint((ttft_ms + itl_ms * np.maximum(first.output_len - 1, 0)) * 1e6)
    starts = first.t_ns
    ends = np.sort(starts + busy_ns.astype(np.int64))
    # In flight just after each start: started so far minus ended by then.
    in_flight = np.arange(1, len(starts) + 1) - np.searchsorted(ends, starts, side="right")
    return int(in_flight.max(initial=0))
