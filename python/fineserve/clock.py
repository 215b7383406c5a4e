"""Clock offsets between the driver and its workers, NTP-style over UDP.

Each worker answers probes on a UDP port of its own (:class:`ClockResponder`); the driver
sends a few hundred (:func:`measure_offset`). Every exchange stamps four instants: the
driver's send ``t1``, the worker's receive ``t2`` and send ``t3``, the driver's receive
``t4``; both receives are the kernel's stamps of the datagram (``SO_TIMESTAMPNS``), so
neither side's scheduling delay is in them. An exchange says the worker's clock is ahead
of the driver's by ``θ = ((t2 - t1) + (t3 - t4)) / 2`` within ``± δ / 2``, where
``δ = (t4 - t1) - (t3 - t2)`` is its time on the wire. Whatever the asymmetry of the
paths, the true offset lies in every exchange's interval, so in their intersection: the
estimate is its middle and the bound its half-width, about half the smallest round trip
(``(min one-way there + min one-way back) / 2``). No method can bound the offset tighter
than that without assuming the two directions take equally long; ``spread`` (the
dispersion of the fastest exchanges' θ) says how precise the estimate is if they do.

Ray's RPCs (0.5–1 ms a call, with jitter) bounded offsets to ±0.4 ms across two
namespaces of one host; these probes, with kernel stamps on both sides, to ±10–20 µs.
The Python stdlib has no NTP client and NTP servers' own protocol needs their daemon:
this is the small part of it needed here.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

#: Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS); the socket module does not export it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_PROBE = struct.Struct("<Qq")  # probe id, t1
_REPLY = struct.Struct("<Qqqq")  # probe id, t1, t2, t3
_TIMESPEC = struct.Struct("@qq")


def _kernel_stamp(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = _TIMESPEC.unpack(data[:16])
            return int(sec) * 1_000_000_000 + int(nsec)
    return None


def _stamped_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:  # no kernel stamps here: user-space stamps instead
        pass
    return sock


class ClockResponder:
    """Answers clock probes on a UDP port (all addresses) from a daemon thread, stamping
    each reply with the kernel's receive instant and its own send instant."""

    def __init__(self) -> None:
        self._sock = _stamped_socket()
        self._sock.bind(("0.0.0.0", 0))
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="clock", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        space = socket.CMSG_SPACE(_TIMESPEC.size)
        while True:
            try:
                data, ancillary, _, addr = self._sock.recvmsg(64, space)
            except OSError:
                return  # closed
            t2 = _kernel_stamp(ancillary) or time.time_ns()
            if len(data) != _PROBE.size:
                continue
            probe, t1 = _PROBE.unpack(data)
            try:
                self._sock.sendto(_REPLY.pack(probe, t1, t2, time.time_ns()), addr)
            except OSError:
                continue

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class ClockEstimate:
    """Worker clock minus driver clock (ns) and its guaranteed bound; ``spread_ns`` is the
    precision if the paths are symmetric; ``min_delay_ns`` the fastest round trip on the
    wire; ``at_ns`` the driver's clock when measured (for drift)."""

    offset_ns: int
    bound_ns: int
    spread_ns: int
    min_delay_ns: int
    samples: int
    at_ns: int
    method: str = "udp"


def measure_offset(
    host: str, port: int, probes: int = 200, timeout_s: float = 0.2
) -> ClockEstimate | None:
    """Probes a :class:`ClockResponder` at ``host:port``; None when fewer than 5 replies
    come back (UDP blocked between the machines, say)."""
    sock = _stamped_socket()
    sock.settimeout(timeout_s)
    space = socket.CMSG_SPACE(_TIMESPEC.size)
    exchanges: list[tuple[float, int]] = []  # (theta, delta)
    try:
        sock.connect((host, port))
        for probe in range(probes):
            t1 = time.time_ns()
            sock.send(_PROBE.pack(probe, t1))
            while True:
                try:
                    data, ancillary, _, _ = sock.recvmsg(64, space)
                except (TimeoutError, socket.timeout):
                    data = b""
                    break
                t4 = _kernel_stamp(ancillary) or time.time_ns()
                if len(data) == _REPLY.size and _REPLY.unpack(data)[0] == probe:
                    break  # a late reply to an earlier probe is skipped
            if not data:
                continue
            _, _, t2, t3 = _REPLY.unpack(data)
            delta = (t4 - t1) - (t3 - t2)
            if delta >= 0:
                exchanges.append((((t2 - t1) + (t3 - t4)) / 2, delta))
    except OSError:
        return None
    finally:
        sock.close()
    if len(exchanges) < 5:
        return None
    return estimate(exchanges, time.time_ns())


def estimate(exchanges: list[tuple[float, int]], at_ns: int) -> ClockEstimate:
    """The offset from (θ, δ) exchanges: the middle of their intervals' intersection, or,
    when that is empty (a clock stepped meanwhile), the fastest exchange's interval."""
    lo = max(theta - delta / 2 for theta, delta in exchanges)
    hi = min(theta + delta / 2 for theta, delta in exchanges)
    ranked = sorted(exchanges, key=lambda e: e[1])
    if lo > hi:
        theta, delta = ranked[0]
        lo, hi = theta - delta / 2, theta + delta / 2
    best = [theta for theta, _ in ranked[: max(5, len(ranked) // 10)]]
    return ClockEstimate(
        offset_ns=round((lo + hi) / 2),
        bound_ns=round((hi - lo) / 2),
        spread_ns=round((max(best) - min(best)) / 2),
        min_delay_ns=int(ranked[0][1]),
        samples=len(exchanges),
        at_ns=at_ns,
    )
