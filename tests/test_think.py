"""Think time of conversation turns (--think-time): the models, and a replay whose later
turns leave that long after their previous turn ended."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke
from fineserve.errors import FineserveError
from fineserve.results import read_requests
from fineserve.workloads.think import ThinkTime


def bailian(path: Path, conversations: int = 5, turns: int = 3, latency: bool = False) -> None:
    """Turns of a conversation 2 s apart, conversations 0.3 s apart; with ``latency`` each
    turn records a latency of 500 ms + 100 ms × its turn index."""
    rows = []
    cid = 1000
    for c in range(conversations):
        parent = -1
        for t in range(turns):
            row = {
                "chat_id": cid,
                "parent_chat_id": parent,
                "turn": t + 1,
                "timestamp": 300 * c + 2000 * t,
                "input_length": 60 + 48 * t,
                "output_length": 8,
                "hash_ids": [cid],
            }
            if latency:
                row["latency"] = 500 + 100 * t
            rows.append(row)
            parent, cid = cid, cid + 1
    rows.sort(key=lambda r: r["timestamp"])
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_think_time_models_parse_and_draw() -> None:
    parent = np.array([-1, 0, 1, -1, 3])
    gap = np.array([0, 2_000_000_000, 2_000_000_000, 0, 3_000_000_000])
    rng = np.random.default_rng(1)
    got, note = ThinkTime.parse("gap").think_ns(parent, gap, None, rng)
    assert np.array_equal(got, gap) and "4 later" not in note
    got, _ = ThinkTime.parse("fixed:1.5").think_ns(parent, gap, None, rng)
    assert got.tolist() == [0, 1_500_000_000, 1_500_000_000, 0, 1_500_000_000]
    many = np.zeros(20_001, dtype=np.int64)
    many[0] = -1
    draws, note = ThinkTime.parse("lognormal:0.7,0.5").think_ns(
        many, np.zeros_like(many), None, rng
    )
    assert draws[0] == 0
    assert np.median(draws[1:]) / 1e9 == pytest.approx(np.exp(0.7), rel=0.03)
    assert np.std(np.log(draws[1:] / 1e9)) == pytest.approx(0.5, rel=0.03)
    assert "log-normal" in note
    latency = np.array([400_000_000, -1, 700_000_000, 100, 5_000_000_000])
    got, note = ThinkTime.parse("gap-minus-latency").think_ns(parent, gap, latency, rng)
    # turn 1: 2 s − 0.4 s; turn 2: its parent's latency unknown, the whole gap; turn 4: 3 s − 100 ns
    assert got.tolist() == [0, 1_600_000_000, 2_000_000_000, 0, 2_999_999_900]
    assert "1 whose previous turn has no latency" in note
    with pytest.raises(FineserveError, match="records no latency"):
        ThinkTime.parse("gap-minus-latency").think_ns(parent, gap, None, rng)
    for bad in ("fixed", "fixed:-1", "lognormal:1", "lognormal:a,b", "lognormal:0,-1", "soon"):
        with pytest.raises(FineserveError, match="--think-time"):
            ThinkTime.parse(bad)


@pytest.mark.parametrize(
    ("spec", "expected_ns"),
    [
        # fixed 0.8 s of trace time at --time-scale 4: released 200 ms after the end
        ("fixed:0.8", lambda turn: 200_000_000),
        # the trace's 2 s gap less the previous turn's latency (0.5 s + 0.1 s per turn), / 4
        (
            "gap-minus-latency",
            lambda turn: (2_000_000_000 - (500 + 100 * (turn - 2)) * 1_000_000) // 4,
        ),
    ],
)
def test_replayed_turns_leave_their_think_time_after_the_previous_ended(
    tmp_path: Path, spec: str, expected_ns: object
) -> None:
    path = tmp_path / "bailian.jsonl"
    bailian(path, latency=True)
    req = tmp_path / "r.parquet"
    r = invoke(
        "blast", "--mode", "replay", "--trace", str(path), "--time-scale", "4",
        "--think-time", spec, "--disable-tqdm", "--save-requests", str(req),
        "--warmup-requests", "0",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "think time:" in r.output
    table, _ = read_requests(req)
    names = ("done_ns", "scheduled_ns", "sent_ns", "think_ns", "session_id", "turn")
    cols = {c: np.asarray(table[c].to_pylist()) for c in names}
    assert all(k == "ok" for k in table["error_kind"].to_pylist())
    # Records are in schedule order, where a later turn sits at its earliest release (so
    # not necessarily the trace's order): a turn is found by its conversation and number.
    row_of = {(s, t): i for i, (s, t) in enumerate(zip(cols["session_id"], cols["turn"]))}
    later = 0
    for i, (session, turn) in enumerate(zip(cols["session_id"], cols["turn"])):
        if turn == 1:
            continue
        p = row_of[(session, turn - 1)]
        want = expected_ns(turn)  # type: ignore[operator]
        # The record's scheduled time is the release: the previous turn's end + think,
        # and the record keeps the think time it was released after; it left then.
        assert cols["scheduled_ns"][i] == cols["done_ns"][p] + want
        assert cols["think_ns"][i] == want
        assert 0 <= cols["sent_ns"][i] - cols["scheduled_ns"][i] < 20_000_000
        later += 1
    assert later == 10


def test_think_time_without_conversations_says_so(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text(
        "".join(
            json.dumps({"timestamp": 10 * i, "input_length": 20, "output_length": 4}) + "\n"
            for i in range(20)
        )
    )
    r = invoke(
        "generate", "--mode", "replay", "--trace", str(path), "--think-time", "fixed:1",
        "-o", str(tmp_path / "s.parquet"),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "--think-time has no effect: the trace has no conversations" in r.output
    r = invoke(
        "generate", "--mode", "replay", "--trace", str(path), "--think-time", "later",
        "-o", str(tmp_path / "s.parquet"),
    )  # fmt: skip
    assert r.exit_code != 0 and "--think-time 'later'" in r.output
    assert "Traceback" not in r.output
