"""`fineserve generate` and replaying its schedule through the engine, streamed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, invoke
from fineserve.api import BodyTemplate
from fineserve.blast import RequestShapes, engine_chunks
from fineserve.mock import MockServer
from fineserve.prompts import SyntheticPromptBuilder
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

    def add(self, columns: dict, extra: dict) -> None:
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
