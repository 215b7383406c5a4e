"""Trace readers: every format parses; malformed and invalid rows are counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA
from fineserve.errors import FineserveError
from fineserve.traces import TraceOptions, detect_format, load_trace

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data absent")


@needs_shared
def test_fineserve_csv_skips_and_counts_missing_timestamps_and_zero_outputs() -> None:
    t = load_trace(SHARED_DATA / "fineserve/replay/Dense_30to100B.csv")
    assert t.format == "fineserve"
    assert t.rows_read == 27_466
    assert t.skipped["missing or invalid timestamp"] == 6_350
    assert t.skipped["output length < 1"] > 0
    assert len(t) + sum(t.skipped.values()) == t.rows_read
    # Microseconds by default: the real file spans about 8 hours.
    assert 7 * 3600 < t.span_s < 9 * 3600
    assert np.all(np.diff(t.t_ns) >= 0) and t.t_ns[0] == 0


@needs_shared
def test_wrong_unit_is_called_implausible() -> None:
    path = SHARED_DATA / "fineserve/replay/Dense_30to100B.csv"
    # Microseconds read as milliseconds: 8 hours become 333 days.
    t = load_trace(path, TraceOptions(timestamp_unit="ms"))
    assert any("implausible" in n and "--timestamp-unit" in n for n in t.notes)
    with pytest.raises(FineserveError, match="implausible"):
        load_trace(path, TraceOptions(timestamp_unit="s"))


@needs_shared
def test_mooncake_jsonl_keeps_hash_ids_per_request() -> None:
    path = SHARED_DATA / "mooncake/synthetic_trace.jsonl"
    t = load_trace(path)
    assert t.format == "mooncake" and t.hash_ids is not None and t.hash_offsets is not None
    first = path.read_text().splitlines()[0]
    import json

    obj = json.loads(first)
    assert list(t.hash_ids[t.hash_offsets[0] : t.hash_offsets[1]]) == obj["hash_ids"]
    assert t.input_len[0] == obj["input_length"]


@needs_shared
def test_azure_wall_clock_timestamps_keep_sub_millisecond_gaps() -> None:
    t = load_trace(SHARED_DATA / "azure/AzureLLMInferenceTrace_code.csv")
    assert t.format == "azure"
    # 18:17:03.9799600 → 18:17:04.0319600
    assert t.t_ns[1] - t.t_ns[0] == 52_000_000


def test_malformed_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text(
        "timestamp,input_length,output_length\n"
        "0,10,5\n"
        "1000,abc,5\n"  # unparsable length
        "2000,10\n"  # wrong field count
        "3000,10,5,9,9\n"  # wrong field count
        ",10,5\n"  # missing timestamp
        "NaN,10,5\n"
        "-5,10,5\n"
        "4000,10,0\n"
        "5000,12,7\n"
    )
    t = load_trace(p)
    assert len(t) == 2 and list(t.input_len) == [10, 12]
    assert t.skipped["malformed line"] == 2
    assert t.skipped["missing or invalid input length"] == 1
    assert t.skipped["missing or invalid timestamp"] == 2
    assert t.skipped["negative timestamp"] == 1
    assert t.skipped["output length < 1"] == 1
    assert "skipped 7" in t.skip_summary()


def test_bad_jsonl_lines_are_counted(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text(
        '{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [1, 2]}\n'
        "{not json\n"
        '{"timestamp": 7, "input_length": 6, "output_length": 3, "hash_ids": [1, 3]}\n'
    )
    t = load_trace(p)
    assert len(t) == 2 and t.skipped["malformed line"] == 1
    assert list(t.t_ns) == [0, 7_000_000]


def test_burstgpt_filters_and_flags_failed_rows(tmp_path: Path) -> None:
    p = tmp_path / "b.csv"
    p.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,100,20,120,Conversation log\n"
        "6,GPT-4,50,0,50,Conversation log\n"
        "7,ChatGPT,80,0,80,Conversation log\n"
        "9,ChatGPT,30,10,40,API log\n"
    )
    t = load_trace(p, TraceOptions(burstgpt_model="ChatGPT"))
    assert t.format == "burstgpt"
    assert list(t.t_ns) == [0, 4_000_000_000]
    assert t.skipped["failed request in trace (0 response tokens)"] == 1
    assert t.skipped["filtered out by --burstgpt-model ChatGPT"] == 1


def test_unsorted_timestamps_are_sorted_and_said(tmp_path: Path) -> None:
    p = tmp_path / "u.csv"
    p.write_text("timestamp,input_length,output_length\n3000,1,1\n1000,2,2\n2000,3,3\n")
    t = load_trace(p)
    assert list(t.input_len) == [2, 3, 1]
    assert any("out of order" in n for n in t.notes)


def test_errors_are_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(FineserveError, match="empty trace file"):
        load_trace(empty)
    wrong = tmp_path / "w.csv"
    wrong.write_text("timestamp,input_length,out\n1,2,3\n")
    with pytest.raises(FineserveError, match="missing column 'output_length'"):
        load_trace(wrong)
    with pytest.raises(FineserveError, match="not found"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(FineserveError, match="is a directory, not a trace file"):
        load_trace(tmp_path)
    junk = tmp_path / "j.csv"
    junk.write_text("a,b\n1,2\n")
    with pytest.raises(FineserveError, match="cannot tell the trace format"):
        detect_format(junk)


row = st.tuples(
    st.one_of(st.integers(-10, 10**9), st.just(""), st.just("x")),
    st.one_of(st.integers(-2, 10**5), st.just("")),
    st.one_of(st.integers(-2, 10**5), st.just("nan")),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(row, min_size=1, max_size=40))
def test_every_row_is_used_or_counted(tmp_path: Path, rows: list[tuple]) -> None:
    p = tmp_path / "h.csv"
    p.write_text(
        "timestamp,input_length,output_length\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    )
    try:
        t = load_trace(p)
    except FineserveError as e:
        assert "no usable requests" in str(e)
        return
    assert len(t) + sum(t.skipped.values()) == len(rows)
    assert np.all(t.input_len >= 1) and np.all(t.output_len >= 1)
    assert np.all(np.diff(t.t_ns) >= 0)
