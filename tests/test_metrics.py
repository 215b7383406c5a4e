"""Bucketed percentiles agree with numpy's linear percentiles within the bucket error,
also on small samples with a sparse tail (where nearest-rank would round up a sample)."""

from __future__ import annotations

import numpy as np
import pytest

from fineserve.metrics.histogram import LogHistogram
from fineserve.metrics.windows import _Windowed


@pytest.mark.parametrize("seed", range(5))
def test_log_histogram_percentiles_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    v = rng.lognormal(np.log(20e6), 0.8, int(rng.integers(20, 300)))
    h = LogHistogram()
    h.add(v)
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert h.percentile(q) == pytest.approx(np.percentile(v, q), rel=1e-3)
    assert h.mean == pytest.approx(v.mean(), rel=1e-12)
    assert h.std == pytest.approx(v.std(), rel=1e-9)


def test_window_percentiles_match_numpy_on_sparse_tails() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(20, 400))
        v = rng.lognormal(np.log(20e6), 0.5, n)
        w = _Windowed()
        w.add(np.zeros(n, np.int64), v)
        for q in (50, 90, 99):
            assert w.percentile_ms(0, q) == pytest.approx(np.percentile(v, q) / 1e6, rel=0.023)


def _bursty_schedule(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sorted send times in ns: slots of 1 ms holding 1 to 4 requests, many slots empty."""
    slots = np.sort(rng.choice(n, size=n // 2, replace=False))
    per_slot = rng.integers(1, 5, len(slots))
    t = np.repeat(slots, per_slot) * 1_000_000 + rng.integers(0, 1_000_000, per_slot.sum())
    return np.sort(t)[:n]


@pytest.mark.parametrize("seed", range(4))
def test_burst_fidelity_counts_members_across_chunk_edges(seed: int) -> None:
    """Slot membership is decided by the whole schedule even when chunks cut a slot and
    records arrive in shuffled batches; requests alone in their slot never count."""
    from fineserve.metrics.fidelity import BurstFidelity, slot_sizes

    rng = np.random.default_rng(seed)
    sched = _bursty_schedule(rng, 3000)
    lag = rng.choice([0, 50_000, 400_000, 1_500_000], len(sched), p=[0.5, 0.3, 0.15, 0.05])
    sent = np.where(rng.random(len(sched)) < 0.03, -1, sched + lag)  # some never sent
    # The oracle, from the whole schedule at once.
    _, where, counts = np.unique(sched // 1_000_000, return_inverse=True, return_counts=True)
    member = counts[where] > 1
    was = sent >= 0
    inside = was & (sent // 1_000_000 == sched // 1_000_000)
    # Chunks cut anywhere (mid-slot too); each row keeps its chunk's slot size and edge.
    cuts = np.sort(rng.choice(np.arange(1, len(sched)), 25, replace=False))
    size, edge = np.zeros(len(sched), np.int32), np.zeros(len(sched), bool)
    for lo, hi in zip([0, *cuts], [*cuts, len(sched)]):
        size[lo:hi], edge[lo:hi] = slot_sizes(sched[lo:hi])
    acc = BurstFidelity()
    order = rng.permutation(len(sched))
    for rows in np.array_split(order, 17):
        acc.add(sched[rows], sent[rows], size[rows], edge[rows])
    r = acc.result()
    assert r["burst_members"] == member.sum() > 0
    assert r["burst_members_sent"] == (member & was).sum()
    assert r["burst_sent_in_slot_fraction"] == pytest.approx(
        (member & inside).sum() / (member & was).sum(), rel=1e-12
    )
    # Counting every request instead would differ: lone requests are in their slot more.
    assert r["burst_sent_in_slot_fraction"] != pytest.approx(inside[was].mean(), rel=1e-6)
    # Without chunk information the batch is the whole schedule.
    whole = BurstFidelity()
    whole.add(sched, sent)
    assert whole.result() == r


def test_sustained_rate_shows_a_server_that_fell_behind() -> None:
    """1000 requests offered at 100 req/s: a server keeping up completes them 50 ms after
    their schedule; one with capacity for 60 req/s completes one every 1/60 s."""
    from fineserve.metrics.fidelity import SustainedRate

    sched = np.arange(1000, dtype=np.int64) * 10_000_000
    kept_up = SustainedRate()
    kept_up.add(sched, sched + 50_000_000)
    r = kept_up.result(1000, 50e6)
    assert r["offered_request_rate"] == pytest.approx(100, rel=1e-9)
    assert r["sustained_request_rate"] == pytest.approx(100, rel=0.01)
    done = 50_000_000 + np.arange(1000, dtype=np.int64) * 16_666_667
    behind = SustainedRate()
    behind.add(sched, done)
    median_from_scheduled = float(np.median(done - sched))
    r = behind.result(1000, median_from_scheduled)
    assert r["sustained_request_rate"] == pytest.approx(60, rel=0.01)


def test_reasoning_tokens_fall_back_to_events_when_the_server_reports_zero() -> None:
    """vLLM 0.32 reports usage reasoning_tokens 0 while streaming nothing but reasoning:
    the counted events win then; a positive count from the server wins over events."""
    from fineserve.metrics import compute_metrics
    from fineserve.records import unsent_records

    cols = unsent_records(
        np.arange(3), np.zeros(3, np.int64), np.zeros(3), np.zeros(3), ["", "", ""]
    )
    n = 3
    cols.update(
        sent_ns=np.zeros(n, np.int64),
        first_token_ns=np.full(n, 10, np.int64),
        done_ns=np.full(n, 100, np.int64),
        completion_tokens=np.array([6, 6, 6]),
        reasoning_tokens=np.array([0, 4, -1]),
        reasoning_chunks=np.array([6, 6, 2]),
        last_reasoning_ns=np.full(n, 90, np.int64),
        first_answer_ns=np.array([-1, 95, 95]),
        error_index=np.zeros(0, np.int64),
        error_message=[],
    )
    m = compute_metrics(cols, np.full(n, 8))
    assert m["total_reasoning_tokens"] == 6 + 4 + 2
    assert m["reasoning_token_share"] == pytest.approx(12 / 18)
