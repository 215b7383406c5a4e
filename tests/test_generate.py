"""`fineserve generate` and replaying its schedule through the engine, streamed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import SHARED_DATA, invoke
from fineserve.api import BodyTemplate
from fineserve.mock import MockServer
from fineserve.prompts import SyntheticPromptBuilder
from fineserve.records import records_from_table
from fineserve.requests import RequestShapes, engine_chunks
from fineserve.routing import Deployment
from fineserve.runner import EngineOptions, RecordSink, run_stream
from fineserve.schedule import concat, read_schedule

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data absent")


@needs_shared
def test_generate_parametric_writes_schedule_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    summary = tmp_path / "s.json"
    r = invoke(
        "generate",
        "--mode",
        "parametric",
        "--model-class",
        "Dense_lt10B",
        "--datasets-dir",
        str(SHARED_DATA / "fineserve"),
        "--duration",
        "600",
        "--time-scale",
        "10",
        "--seed",
        "3",
        "-o",
        str(out),
        "--summary-json",
        str(summary),
    )
    assert r.exit_code == 0, r.output
    assert "mean requests per occupied slot" in r.output
    s = json.loads(summary.read_text())
    chunks, rows, meta = read_schedule(out)
    sched = concat(list(chunks))
    assert rows == s["requests"] == len(sched) > 1000
    assert 59 < s["span_s"] <= 60.0
    assert meta["workload"]["classes"][0]["nb"]["mu"] == pytest.approx(2.6285, abs=1e-3)
    assert set(sched.extra["class"]) == {"Dense_lt10B"}
    # Same seed → same digest.
    r2 = invoke(
        "generate",
        "--mode",
        "parametric",
        "--model-class",
        "Dense_lt10B",
        "--datasets-dir",
        str(SHARED_DATA / "fineserve"),
        "--duration",
        "600",
        "--time-scale",
        "10",
        "--seed",
        "3",
        "-o",
        str(tmp_path / "t.parquet"),
    )
    assert s["digest"] in r2.output


@needs_shared
def test_generate_replay_reports_skipped_rows(tmp_path: Path) -> None:
    r = invoke(
        "generate",
        "--mode",
        "replay",
        "--request-trace-csv",
        str(SHARED_DATA / "fineserve/replay/Dense_30to100B.csv"),
        "--time-scale",
        "100",
        "-o",
        str(tmp_path / "r.parquet"),
    )
    assert r.exit_code == 0, r.output
    assert "6350 missing or invalid timestamp" in r.output
    assert "Requests:                                21043" in r.output


def test_generate_errors_are_one_line(tmp_path: Path) -> None:
    r = invoke("generate", "--mode", "replay", "-o", str(tmp_path / "x.parquet"))
    assert r.exit_code != 0 and "needs --request-trace-csv" in r.output
    bad = tmp_path / "g.csv"
    bad.write_text("gamma_shape,gamma_scale\n0.3,50\n-1,50\n")
    r = invoke(
        "generate",
        "--mode",
        "parametric",
        "--gamma-params-csv",
        str(bad),
        "-o",
        "x.parquet",
    )
    assert r.exit_code != 0 and "g.csv:3: gamma_shape must be a positive number" in r.output
    assert "Traceback" not in r.output
    r = invoke("generate", "--mode", "parametric", "--model-class", "Nope", "-o", "x.parquet")
    assert r.exit_code != 0 and "no parameter file" in r.output


class _Collect(RecordSink):
    def __init__(self) -> None:
        self.batches: list[dict] = []

    def add(self, batch: pa.RecordBatch) -> None:
        columns, extra = records_from_table(batch)
        self.batches.append({**columns, **extra})


def test_generated_schedule_replays_exactly_in_streamed_chunks(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    r = invoke(
        "generate",
        "--mode",
        "poisson",
        "--num-prompts",
        "600",
        "--request-rate",
        "400",
        "--random-input-len",
        "8",
        "--random-output-len",
        "2",
        "-o",
        str(path),
    )
    assert r.exit_code == 0, r.output
    chunks, rows, _ = read_schedule(path, chunk_rows=100)  # six chunks
    want = concat(list(read_schedule(path)[0]))
    sink = _Collect()
    template = BodyTemplate("vllm", "fineserve-mock", stream=True, ignore_eos=True)
    with MockServer(ttft_ms=5, itl_ms=1) as m:
        url = m.base_url + "/v1/completions"
        shapes = RequestShapes(
            SyntheticPromptBuilder(0),
            {"fineserve-mock": template},
            "fineserve-mock",
            {},
            Deployment([url]),
        )
        outcome = run_stream(
            [url],
            engine_chunks(chunks, shapes),
            EngineOptions(warm_connections=32),
            sink,
            total=rows,
            lookahead_s=0.3,  # forces feeding while the run goes on
            show_progress=False,
        )
    assert not outcome.interrupted and outcome.fed == 600
    assert len(sink.batches) > 1  # records drained while running, not only at the end
    index = np.concatenate([b["index"] for b in sink.batches])
    sched = np.concatenate([b["scheduled_ns"] for b in sink.batches])
    inp = np.concatenate([b["input_len"] for b in sink.batches])
    order = np.argsort(index)
    assert np.array_equal(index[order], np.arange(600))
    assert np.array_equal(sched[order], want.t_ns)
    assert np.array_equal(inp[order], want.input_len)
    kinds = np.concatenate([b["error_kind"] for b in sink.batches])
    assert np.all(kinds == 0)


def test_blast_replays_a_schedule_file(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    invoke(
        "generate",
        "--mode",
        "poisson",
        "--num-prompts",
        "80",
        "--request-rate",
        "500",
        "--random-input-len",
        "8",
        "--random-output-len",
        "2",
        "-o",
        str(path),
    )
    res = tmp_path / "res.json"
    r = invoke(
        "blast",
        "--schedule",
        str(path),
        "--disable-tqdm",
        "--mock-itl-ms",
        "1",
        "--output-file",
        str(res),
    )
    assert r.exit_code == 0, r.output
    out = json.loads(res.read_text())
    assert out["completed"] == out["scheduled"] == 80
    assert out["workload"]["mode"] == "schedule"


class _StopAfter(RecordSink):
    """Collects batches and raises KeyboardInterrupt (as Ctrl-C would) once ``after_s``
    has passed, to stop a run from inside its loop."""

    def __init__(self, after_s: float) -> None:
        import time

        self.deadline = time.monotonic() + after_s
        self.batches: list[dict] = []
        self.stop_ns: int | None = None
        self.raised = False

    def add(self, batch: pa.RecordBatch) -> None:
        import time

        columns, extra = records_from_table(batch)
        self.batches.append({**columns, **extra})
        if not self.raised and time.monotonic() >= self.deadline:
            self.raised = True
            raise KeyboardInterrupt

    def stopped(self, at_ns: int) -> None:
        self.stop_ns = at_ns


def test_feeding_stays_within_the_lookahead_in_time_not_chunks() -> None:
    """One 65,536-row chunk spanning 655 s at 100 req/s, lookahead 0.5 s, stopped after
    ~1.5 s: the engine was only ever given what was due within half a second, so only a
    handful of its requests are left unsent; everything else was never fed."""
    n = 65_536
    t_ns = np.arange(n, dtype=np.int64) * 10_000_000
    template = BodyTemplate("vllm", "fineserve-mock", stream=True, ignore_eos=True)
    body = template.render("a b c d", 2)
    from fineserve.runner import EngineChunk

    chunk = EngineChunk(
        t_ns,
        [body],
        np.zeros(n, np.uint32),
        np.zeros(n, np.uint32),
        np.full(n, 2),
        {"input_len": np.full(n, 4)},
    )
    sink = _StopAfter(1.5)
    with MockServer(ttft_ms=1, itl_ms=1) as m:
        outcome = run_stream(
            [m.base_url + "/v1/completions"],
            iter([chunk]),
            EngineOptions(warm_connections=4, drain_grace_s=5),
            sink,
            total=n,
            lookahead_s=0.5,
            show_progress=False,
        )
    assert outcome.interrupted and sink.stop_ns is not None
    assert outcome.stopped_at_ns == sink.stop_ns
    # Fed: what was due before the stop plus at most the lookahead (0.5 s = 50 requests).
    assert outcome.fed <= sink.stop_ns / 10_000_000 + 60, (outcome.fed, sink.stop_ns)
    assert outcome.generated_not_fed == n - outcome.fed
    index = np.concatenate([b["index"] for b in sink.batches])
    assert np.array_equal(np.sort(index), np.arange(n))  # every request accounted for
    kinds = np.concatenate([b["error_kind"] for b in sink.batches])
    sched = np.concatenate([b["scheduled_ns"] for b in sink.batches])
    sent = np.concatenate([b["sent_ns"] for b in sink.batches])
    assert np.all(sent[sched < sink.stop_ns - 50_000_000] >= 0)
    assert np.all(kinds[sched > sink.stop_ns + 600_000_000] == 1)  # not_sent


def test_a_schedule_file_is_sliced_and_scaled_or_refuses_what_it_cannot_apply(
    tmp_path: Path,
) -> None:
    """--schedule applies --start/--duration/--num-prompts/--time-scale (the README's
    `blast --schedule g.parquet --time-scale 20` ran at the original rate before) and
    refuses generating options with one line."""
    from fineserve.schedule import Schedule, ScheduleSlice, write_schedule

    t = np.arange(100, dtype=np.int64) * 100_000_000  # 10 req/s for 10 s
    parent = np.full(100, -1, dtype=np.int64)
    parent[41], parent[60] = 39, 41  # 39 -> 41 -> 60: a conversation across the cut at 4 s
    followers = np.bincount(parent[parent >= 0], minlength=100)
    s = Schedule(
        t,
        np.arange(100) + 10,
        np.full(100, 3),
        {"parent": parent, "think_ns": np.full(100, 400_000_000), "followers": followers},
    )
    path = tmp_path / "g.parquet"
    write_schedule(path, iter([s]), {})
    part = ScheduleSlice(start_s=4.0, duration_s=3.0, max_requests=25, time_scale=4.0)
    chunks, rows, _ = read_schedule(path, chunk_rows=7, part=part)
    got = concat(list(chunks))
    assert rows == len(got) == 25
    assert np.array_equal(got.input_len, np.arange(40, 65) + 10)
    assert np.array_equal(got.t_ns, (t[40:65] - 4_000_000_000) // 4)
    # 41's parent (39) is cut off: it starts the conversation; 60 follows 41 (row 1).
    assert got.extra["parent"][1] == -1 and got.extra["parent"][20] == 1
    assert got.extra["followers"][1] == 1 and got.extra["followers"].sum() == 1
    assert got.extra["think_ns"][20] == 100_000_000 and got.extra["think_ns"][1] == 0
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--schedule", str(path), "--time-scale", "20", "--start", "2",
        "--num-prompts", "30", "--disable-tqdm", "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(res.read_text())
    assert out["scheduled"] == out["completed"] == 30
    assert out["workload"]["slice"]["time_scale"] == 20
    assert out["duration"] < 1.0  # 30 requests over 3 s of schedule, 20x faster
    r = invoke("blast", "--schedule", str(path), "--request-rate", "5", "--burstiness", "2")
    assert r.exit_code != 0
    assert r.output.count("\n") == 1 and "--burstiness, --request-rate cannot change it" in r.output
