"""Clock offsets by UDP probes (issue 28, item 4): the NTP interval arithmetic on known
delays, a responder on loopback, and the fallbacks."""

from __future__ import annotations

import socket

import numpy as np

from fineserve.clock import ClockResponder, estimate, measure_offset
from fineserve.distributed import measure_clock


def test_the_interval_intersection_holds_the_true_offset_whatever_the_asymmetry() -> None:
    rng = np.random.default_rng(3)
    true_offset = 12_345.0
    exchanges = []
    for _ in range(300):
        there = 200_000 + rng.exponential(30_000)  # one-way delays: 0.2 ms and more
        back = 150_000 + rng.exponential(80_000)
        t1 = 0.0
        t2 = t1 + there + true_offset
        t3 = t2 + 5_000
        t4 = t3 - true_offset + back
        exchanges.append((((t2 - t1) + (t3 - t4)) / 2, int((t4 - t1) - (t3 - t2))))
    e = estimate(exchanges, 0)
    assert abs(e.offset_ns - true_offset) <= e.bound_ns
    # The bound is half of (the fastest way there + the fastest way back), ~175 µs: no
    # bound can be tighter without assuming both directions take equally long.
    assert 175_000 <= e.bound_ns <= 185_000
    assert e.min_delay_ns >= 350_000 and e.samples == 300
    # Symmetric paths: the fastest exchanges' estimates agree closely (the spread), and
    # the estimate is then within it of the truth.
    sym = []
    for _ in range(300):
        d = 200_000 + rng.exponential(5_000)
        sym.append((true_offset + rng.normal(0, 500), int(2 * d)))
    e = estimate(sym, 0)
    assert abs(e.offset_ns - true_offset) <= 2_000 and e.spread_ns <= 2_000


def test_a_responder_on_loopback_gives_a_tight_bound() -> None:
    r = ClockResponder()
    try:
        e = measure_offset("127.0.0.1", r.port, probes=100)
    finally:
        r.close()
    assert e is not None and e.method == "udp" and e.samples >= 90
    # One clock: the true offset is 0.
    assert abs(e.offset_ns) <= e.bound_ns + 1_000
    assert e.bound_ns < 1_000_000


def test_no_answer_is_none_and_the_driver_falls_back_to_calls() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))  # bound but never read: probes go unanswered
    port = s.getsockname()[1]
    try:
        assert measure_offset("127.0.0.1", port, probes=8, timeout_s=0.01) is None
    finally:
        s.close()

    class Ref:
        def __init__(self, value: object) -> None:
            self.value = value

    class Method:
        def __init__(self, fn: object) -> None:
            self.fn = fn

        def remote(self) -> Ref:
            return Ref(self.fn())  # type: ignore[operator]

    class OldWorker:  # no clock_port: a worker of an older fineserve, say
        clock_ns = Method(lambda: __import__("time").time_ns())

    class Backend:
        @staticmethod
        def get(ref: Ref) -> object:
            return ref.value

    e = measure_clock(Backend(), OldWorker(), "127.0.0.1")
    assert e.method == "rpc" and abs(e.offset_ns) <= e.bound_ns + 1_000
