"""Per-request results on disk and the metrics built from them: every figure of the result
JSON is recomputed here, independently, from the Parquet file."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import interrupted_blast, invoke
from fineserve.metrics import compute_metrics
from fineserve.metrics.serving import MetricsAccumulator, parse_goodput
from fineserve.records import records_to_batch
from fineserve.results import JOURNAL_SUFFIX, RequestsWriter, read_requests


def _hand_records(rows: list[tuple[int, int, int, int, int]]) -> dict:
    """(sent, first_token, done, completion_tokens, error_kind) per request; scheduled = sent."""
    n = len(rows)
    sent = np.array([r[0] for r in rows], np.int64)
    first = np.array([r[1] for r in rows], np.int64)
    done = np.array([r[2] for r in rows], np.int64)
    tokens = np.array([r[3] for r in rows], np.int64)
    kind = np.array([r[4] for r in rows], np.uint8)
    return {
        "index": np.arange(n, dtype=np.uint64),
        "scheduled_ns": sent.copy(),
        "sent_ns": sent,
        "first_byte_ns": first,
        "first_token_ns": first,
        "done_ns": done,
        "n_chunks": tokens.astype(np.uint32),
        "completion_tokens": tokens,
        "prompt_tokens": np.full(n, -1),
        "http_status": np.full(n, 200, np.uint16),
        "error_kind": kind,
        "endpoint_idx": np.zeros(n, np.uint32),
        "chunk_ns": np.zeros(0, np.int64),
        "chunk_offsets": np.zeros(n + 1, np.uint64),
        "error_index": np.flatnonzero(kind != 0),
        "error_message": ["boom"] * int((kind != 0).sum()),
    }


MS = 1_000_000


def test_goodput_counts_requests_meeting_every_slo() -> None:
    cols = _hand_records(
        [
            (0, 100 * MS, 1100 * MS, 11, 0),  # TTFT 100, TPOT 100, E2E 1100: good
            (0, 300 * MS, 1300 * MS, 11, 0),  # TTFT 300: misses ttft
            (0, 100 * MS, 2100 * MS, 11, 0),  # TPOT 200: misses tpot
            (0, 100 * MS, 100 * MS, 1, 0),  # one token: TPOT 0, good
            (0, -1, 50 * MS, 0, 7),  # failed: never good
        ]
    )
    slos = parse_goodput(("ttft:200 tpot:150",))
    m = compute_metrics(cols, np.ones(5), slos=slos)
    assert m["good_requests"] == 2
    assert m["request_goodput"] == pytest.approx(2 / m["duration"])
    m = compute_metrics(cols, np.ones(5), slos=parse_goodput(["e2el:1200"]))
    assert m["good_requests"] == 2  # requests 1 and 4


@pytest.mark.parametrize("bad", ["ttft", "ttft:x", "foo:10", "ttft:-1"])
def test_goodput_syntax_errors_are_one_line(bad: str) -> None:
    r = invoke("blast", "--goodput", bad, "--num-prompts", "1")
    assert r.exit_code != 0 and "--goodput" in r.output and "Traceback" not in r.output


def test_goodput_takes_vllms_space_separated_list(tmp_path: Path) -> None:
    """vLLM writes ``--goodput ttft:500 tpot:50`` (argparse nargs="+"); so can we."""
    res = tmp_path / "r.json"
    r = invoke(
        "blast",
        "--num-prompts",
        "20",
        "--request-rate",
        "200",
        "--disable-tqdm",
        "--goodput",
        "ttft:60000",
        "e2el:0.001",
        "--output-file",
        str(res),
    )
    assert r.exit_code == 0, r.output
    m = json.loads(res.read_text())
    assert m["goodput_slos_ms"] == {"ttft": 60000.0, "e2el": 0.001}
    assert m["good_requests"] == 0  # no request ends within 1 µs: the second SLO was read
    r = invoke("blast", "--num-prompts", "2", "--goodput=ttft:1", "tpot:x")
    assert r.exit_code != 0 and "--goodput" in r.output and "Traceback" not in r.output


def test_save_detailed_writes_vllms_per_request_lists(tmp_path: Path) -> None:
    """--save-detailed: vLLM's per-request lists, equal to the Parquet's own columns."""
    res, req = tmp_path / "r.json", tmp_path / "r.parquet"
    args = [
        "blast",
        "--num-prompts",
        "40",
        "--request-rate",
        "200",
        "--random-output-len",
        "4",
        "--disable-tqdm",
        "--mock-fault",
        "http_500=0.25",
        "--output-file",
        str(res),
    ]
    r = invoke(*args, "--save-detailed", "--save-requests", str(req))
    assert r.exit_code == 0, r.output
    m = json.loads(res.read_text())
    table, _ = read_requests(req)
    ok = [k == "ok" for k in table["error_kind"].to_pylist()]
    assert sum(ok) == m["completed"] and 0 < m["failed"] < 15 and len(m["ttfts"]) == 40
    assert m["input_lens"] == table["input_len"].to_pylist()
    assert m["output_lens"] == [4 if good else 0 for good in ok]
    sent, first = table["sent_ns"].to_pylist(), table["first_token_ns"].to_pylist()
    for i, good in enumerate(ok):
        if good:
            assert m["ttfts"][i] == pytest.approx((first[i] - sent[i]) / 1e9)
            assert len(m["itls"][i]) == 3 and m["errors"][i] == ""
        else:
            assert m["ttfts"][i] == 0 and m["itls"][i] == []
            assert m["errors"][i].startswith("http_status: HTTP 500")
    assert m["ttfts"] and "generated_texts" not in m
    r = invoke(*args, "--save-detailed")  # without --save-requests: a temporary file
    assert r.exit_code == 0 and len(json.loads(res.read_text())["itls"]) == 40
    r = invoke("blast", "--num-prompts", "2", "--save-detailed")
    assert r.exit_code != 0 and "needs --output-file" in r.output


def test_blast_results_parquet_matches_the_summary(tmp_path: Path) -> None:
    req = tmp_path / "req.parquet"
    res = tmp_path / "res.json"
    r = invoke(
        "blast", "--num-prompts", "400", "--request-rate", "200", "--random-input-len", "16",
        "--random-output-len", "12", "--random-range-ratio", "0.5", "--mock-itl-ms", "2",
        "--save-requests", str(req), "--output-file", str(res), "--disable-tqdm",
        "--goodput", "ttft:25", "--metric-percentiles", "50,90,99", "--metrics-window", "1",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert not Path(str(req) + JOURNAL_SUFFIX).exists()
    table, meta = read_requests(req)
    m = json.loads(res.read_text())
    assert meta["complete"] is True and meta["partial"] is False
    assert meta["seed"] == m["seed"] and meta["options"]["num_prompts"] == 400
    assert table.num_rows == m["scheduled"] == 400
    t = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names if c != "chunk_ns"}
    assert np.array_equal(t["index"], np.arange(400))
    ok = t["error_kind"] == "ok"
    assert ok.sum() == m["completed"]

    def close(a: float, b: float, rel: float = 1e-3) -> None:
        assert a == pytest.approx(b, rel=rel, abs=1e-6)

    ttft = (t["first_token_ns"] - t["sent_ns"])[ok] / 1e6
    e2e = (t["done_ns"] - t["sent_ns"])[ok] / 1e6
    close(m["mean_ttft_ms"], ttft.mean(), 1e-9)
    close(m["p50_ttft_ms"], np.percentile(ttft, 50))
    close(m["p90_ttft_ms"], np.percentile(ttft, 90))
    close(m["p99_e2el_ms"], np.percentile(e2e, 99))
    tokens = np.where(t["completion_tokens"] >= 0, t["completion_tokens"], t["n_chunks"])[ok]
    assert m["total_output_tokens"] == tokens.sum()
    assert m["total_input_tokens"] == t["input_len"][ok].sum()
    tpot = ((t["done_ns"] - t["first_token_ns"])[ok] / (tokens - 1))[tokens > 1] / 1e6
    close(m["mean_tpot_ms"], tpot.mean(), 1e-9)
    chunks = table["chunk_ns"].to_pylist()
    itl = np.concatenate([np.diff(c) for c, good in zip(chunks, ok) if good]) / 1e6
    close(m["mean_itl_ms"], itl.mean(), 1e-9)
    close(m["p99_itl_ms"], np.percentile(itl, 99))
    lag = (t["sent_ns"] - t["scheduled_ns"]) / 1e3
    close(m["p50_dispatch_lag_us"], np.percentile(lag, 50), 2e-3)
    ttft_sched = (t["first_token_ns"] - t["scheduled_ns"])[ok] / 1e6
    close(m["mean_ttft_from_scheduled_ms"], ttft_sched.mean(), 1e-9)
    good = ok & ((t["first_token_ns"] - t["sent_ns"]) <= 25 * MS)
    assert m["good_requests"] == good.sum()
    duration = max(t["done_ns"].max(), t["sent_ns"].max()) / 1e9
    close(m["duration"], duration, 1e-9)
    close(m["request_throughput"], ok.sum() / duration, 1e-9)
    # Per-second arrivals and the 1 s windows agree with the file.
    sent_s = np.bincount(t["sent_ns"] // 1_000_000_000)
    assert m["sent_per_second"][: len(sent_s)] == sent_s.tolist()
    windows = m["windows"]
    # Each window's rate over its own length: the last one ends with the run (no false
    # drop), the others are whole.
    assert sum(w["completed_rps"] * w["length_s"] for w in windows) == pytest.approx(ok.sum())
    assert all(w["length_s"] == 1.0 for w in windows[:-1])
    assert windows[-1]["length_s"] == pytest.approx(duration - windows[-1]["start_s"])
    first_w = (t["first_token_ns"][ok] // 1_000_000_000) == 0
    assert windows[0]["mean_ttft_ms"] == pytest.approx(ttft[first_w].mean(), rel=1e-9)
    assert windows[0]["p99_ttft_ms"] == pytest.approx(np.percentile(ttft[first_w], 99), rel=0.03)
    assert list(m.keys())[:3] == ["date", "fineserve_version", "backend"]
    # vLLM's --save-result keys that scripts read.
    for key in ("request_throughput", "output_throughput", "total_token_throughput",
                "mean_ttft_ms", "median_itl_ms", "p99_e2el_ms", "request_goodput"):  # fmt: skip
        assert key in m


def test_journal_keeps_finished_batches_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "r.parquet"
    w = RequestsWriter(path, {"seed": 1})
    rows = [(i * MS, i * MS + 5 * MS, i * MS + 9 * MS, 3, 0) for i in range(10)]
    cols = _hand_records(rows)
    for lo in (0, 5):
        sub = {k: (v[lo : lo + 5] if k not in ("chunk_offsets", "error_index", "error_message")
                   else v) for k, v in cols.items()}  # fmt: skip
        sub["chunk_offsets"] = np.zeros(6, np.uint64)
        w.write(records_to_batch(sub, {"input_len": np.arange(5)}, ["http://x"]))
    # No close: the process "died". The results path resolves to the journal.
    table, meta = read_requests(path)
    assert table.num_rows == 10 and meta["complete"] is False and meta["journal_clean"]
    assert meta["seed"] == 1
    # A journal cut mid-batch keeps the whole batches before the cut.
    journal = Path(str(path) + JOURNAL_SUFFIX)
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) - 40])
    table, meta = read_requests(path)
    assert table.num_rows == 5 and meta["journal_clean"] is False


def test_breakdown_by_class_adds_up() -> None:
    rows = [(i * MS, i * MS + 5 * MS, i * MS + 9 * MS, 3, 0 if i % 3 else 8) for i in range(30)]
    cols = _hand_records(rows)
    labels = {"class": np.array(["a" if i % 2 else "b" for i in range(30)], dtype=object)}
    acc = MetricsAccumulator(groups=("class",))
    acc.add(cols, np.ones(30), labels)
    m = acc.result()
    b = m["breakdown"]["class"]
    assert set(b) == {"a", "b"}
    assert b["a"]["completed"] + b["b"]["completed"] == m["completed"]
    assert b["a"]["failed"] + b["b"]["failed"] == m["failed"] == 10
    assert b["a"]["request_throughput"] + b["b"]["request_throughput"] == pytest.approx(
        m["request_throughput"]
    )


@pytest.mark.slow
def test_a_crash_journal_has_the_schedule_digest(tmp_path: Path) -> None:
    """SIGKILL (no cleanup at all) after the schedule was generated: the journal left
    behind still names the schedule, as `generate` does for the same options."""
    req = tmp_path / "req.parquet"
    journal = Path(str(req) + JOURNAL_SUFFIX)
    # Killed 1.5 s after the journal appears: rows are in it whatever the start-up took.
    done = interrupted_blast(
        signal.SIGKILL, "--save-requests", str(req), once_exists=journal, after_s=1.5
    )
    assert done.returncode == -signal.SIGKILL
    assert not req.exists() and Path(str(req) + JOURNAL_SUFFIX).exists()
    table, meta = read_requests(req)
    assert meta["complete"] is False and 0 < table.num_rows < 600
    summary = tmp_path / "s.json"
    r = invoke(
        "generate", "--num-prompts", "600", "--request-rate", "100", "--random-input-len", "8",
        "--random-output-len", "4", "-o", str(tmp_path / "s.parquet"),
        "--summary-json", str(summary),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert meta["schedule_digest"] == json.loads(summary.read_text())["digest"]


@pytest.mark.slow
def test_sigint_keeps_a_complete_results_file(tmp_path: Path) -> None:
    req = tmp_path / "req.parquet"
    done = interrupted_blast(signal.SIGINT, "--save-requests", str(req))
    assert done.returncode == 130, done.stderr
    table, meta = read_requests(req)
    assert meta["partial"] is True and meta["complete"] is True
    kinds = table["error_kind"].to_pylist()
    # Every scheduled request has a row: sent (ok/failed) or not sent, with a reason.
    assert table.num_rows == 600
    not_sent = [i for i, k in enumerate(kinds) if k == "not_sent"]
    assert 50 < len(not_sent) < 550
    msgs = table["error_message"].to_pylist()
    assert all(msgs[i] for i in not_sent)
    assert isinstance(table.schema.field("chunk_ns").type, pa.LargeListType)


def _png_ok(path: Path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 800
    assert float(img[..., :3].std()) > 0.02  # not a blank canvas
    return img.shape[0], img.shape[1]


@pytest.mark.slow
def test_report_renders_every_panel_and_compares_runs(tmp_path: Path) -> None:
    import base64
    import re

    from fineserve.report import OPTIONAL_PANELS, PANELS

    runs = []
    for rate in ("150", "300"):
        req = tmp_path / f"r{rate}.parquet"
        r = invoke(
            "blast", "--num-prompts", "300", "--request-rate", rate, "--disable-tqdm",
            "--random-output-len", "8", "--save-requests", str(req),
            "--output-file", str(tmp_path / f"r{rate}.json"),
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        runs.append(req)
    out = tmp_path / "rep" / "one.html"
    r = invoke("report", str(runs[0]), "-o", str(out))
    assert r.exit_code == 0, r.output
    doc = out.read_text()
    for key in PANELS:
        if key in OPTIONAL_PANELS:  # plain completions: no reasoning panel
            assert not out.with_name(f"one_{key}.png").exists()
            continue
        _png_ok(out.with_name(f"one_{key}.png"))
        m = re.search(rf'id="{key}"[^>]*src="data:image/png;base64,([^"]+)"', doc)
        assert m, key
        assert base64.b64decode(m.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    # The key-figures table shows the same numbers the run printed.
    summary = json.loads((tmp_path / "r150.json").read_text())
    assert f"<td>{summary['p99_ttft_ms']:.2f}</td>" in doc
    assert f"<td>{summary['completed']}</td>" in doc
    both = tmp_path / "both.html"
    r = invoke("report", str(runs[0]), str(runs[1]), "-o", str(both))
    assert r.exit_code == 0, r.output
    doc = both.read_text()
    assert "r150.parquet" in doc and "r300.parquet" in doc
    assert doc.count("<th>r") >= 2


def test_report_bad_input_is_one_line(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    bad = tmp_path / "x.parquet"
    bad.write_text("not parquet")
    r = invoke("report", str(bad), "-o", str(tmp_path / "r.html"))
    assert r.exit_code != 0 and "not a fineserve results file" in r.output
    # A Parquet file, but not one of ours: the missing columns are named.
    pq.write_table(pa.table({"scheduled_ns": [1, 2]}), bad)
    r = invoke("report", str(bad), "-o", str(tmp_path / "r.html"))
    assert r.exit_code != 0 and "no index, sent_ns" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    r = invoke("report", str(tmp_path / "missing.parquet"))
    assert r.exit_code != 0 and "file not found" in r.output


@pytest.mark.slow
def test_blast_records_the_digest_generate_prints(tmp_path: Path) -> None:
    sched, summary = tmp_path / "s.parquet", tmp_path / "s.json"
    args = ["--mode", "poisson", "--request-rate", "300", "--num-prompts", "200", "--seed", "7"]
    r = invoke("generate", *args, "-o", str(sched), "--summary-json", str(summary))
    assert r.exit_code == 0, r.output
    res = tmp_path / "r.json"
    r = invoke("blast", *args, "--disable-tqdm", "--output-file", str(res))
    assert r.exit_code == 0, r.output
    digest = json.loads(summary.read_text())["digest"]
    assert json.loads(res.read_text())["schedule_digest"] == digest
    r = invoke("blast", *args[:-1], "8", "--disable-tqdm", "--output-file", str(res))
    assert json.loads(res.read_text())["schedule_digest"] != digest


DATASETS = Path(__file__).resolve().parents[1] / "datasets"


@pytest.mark.slow
@pytest.mark.skipif(not (DATASETS / "Parametric").is_dir(), reason="no datasets")
def test_every_figure_recomputed_from_the_parquet(tmp_path: Path) -> None:
    """A bursty two-class run over two servers, one failing 10 % of its requests: the
    result JSON's throughputs, concurrency, latencies from the schedule, dispatch and
    burst fidelity, windows, breakdowns and vLLM's peak figures all follow from the
    per-request file; and `report` recomputes the same figures from it."""
    from fineserve import MockServer
    from fineserve.report import load_run

    a = MockServer(ttft_ms=4, itl_ms=2, itl_jitter_ms=1, faults=[("http_500", 0.1)])
    b = MockServer(ttft_ms=3, itl_ms=1)
    req, res = tmp_path / "r.parquet", tmp_path / "r.json"
    try:
        r = invoke(
            "blast", "--mode", "parametric", "--datasets-dir", str(DATASETS),
            "--model-class", "azure_code", "--model-class", "mooncake_synthetic",
            "--duration", "40", "--time-scale", "8", "--random-output-len", "6",
            "--base-url", a.base_url, "--base-url", b.base_url,
            "--class-model", "mooncake_synthetic=other-model", "--warmup-requests", "0",
            "--metrics-window", "1", "--goodput", "ttft:6", "--metric-percentiles", "50,99.9",
            "--disable-tqdm", "--save-requests", str(req), "--output-file", str(res),
        )  # fmt: skip
    finally:
        a.stop()
        b.stop()
    assert r.exit_code == 0, r.output
    m = json.loads(res.read_text())
    table, meta = read_requests(req)
    t = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names if c != "chunk_ns"}
    chunks = [np.asarray(c, np.int64) for c in table["chunk_ns"].to_pylist()]
    n = table.num_rows
    assert n == m["scheduled"] > 150
    ok = t["error_kind"] == "ok"
    was = t["sent_ns"] >= 0
    assert 0 < (~ok).sum() == m["failed"] and was.all()

    def close(a: float, b: float, rel: float = 1e-9) -> None:
        assert a == pytest.approx(b, rel=rel, abs=1e-9)

    tokens = np.where(t["completion_tokens"] >= 0, t["completion_tokens"], t["n_chunks"])
    sched, sent, first, done = t["scheduled_ns"], t["sent_ns"], t["first_token_ns"], t["done_ns"]
    duration = max(done.max(), sent.max()) / 1e9
    close(m["output_throughput"], tokens[ok].sum() / duration)
    close(m["total_token_throughput"], (tokens[ok].sum() + t["input_len"][ok].sum()) / duration)
    e2e = (done - sent)[ok]
    close(m["concurrency"], e2e.sum() / 1e9 / duration)
    e2e_sched = (done - sched)[ok] / 1e6
    close(m["mean_e2el_from_scheduled_ms"], e2e_sched.mean())
    close(m["p99_e2el_from_scheduled_ms"], np.percentile(e2e_sched, 99), 1e-3)
    ttft = (first - sent)[ok] / 1e6
    close(m["p99.9_ttft_ms"], np.percentile(ttft, 99.9), 1e-3)
    good = ok & ((first - sent) <= 6e6)
    close(m["request_goodput"], good.sum() / duration)
    # Dispatch: every sent request, then burst members only (slots of the whole schedule).
    in_ms = sent // 1_000_000 == sched // 1_000_000
    close(m["sent_in_scheduled_ms_fraction"], in_ms.mean())
    _, where, counts = np.unique(sched // 1_000_000, return_inverse=True, return_counts=True)
    member = counts[where] > 1
    assert m["burst_members"] == member.sum() > 10
    close(m["burst_sent_in_slot_fraction"], in_ms[member].mean())
    per_s_sched = np.bincount(sched // 10**9)
    per_s_sent = np.bincount(sent // 10**9, minlength=len(per_s_sched))
    k = max(len(per_s_sched), len(per_s_sent))
    diff = np.pad(per_s_sent, (0, k - len(per_s_sent))) - np.pad(
        per_s_sched, (0, k - len(per_s_sched))
    )
    close(m["arrival_rate_error"], np.abs(diff).sum() / per_s_sched.sum())
    close(m["offered_request_rate"], (n - 1) / ((sched.max() - sched.min()) / 1e9))
    assert m["request_rate"] == m["offered_request_rate"]
    # vLLM's peaks: token events of successful requests per second; successful requests
    # active in each second (from the second they were sent to the one they ended).
    events = np.concatenate([c for c, good in zip(chunks, ok) if good])
    assert m["max_output_tokens_per_s"] == np.bincount(events // 10**9).max()
    active = np.zeros(int(done.max() // 10**9) + 2, np.int64)
    for s0, s1 in zip(sent[ok] // 10**9, done[ok] // 10**9):
        active[s0 : s1 + 1] += 1
    assert m["max_concurrent_requests"] == active.max()
    # 1 s windows: failures where they ended, output tokens of successes where they ended,
    # ITL jitter as the std of the gaps ending in the window.
    w = m["windows"]
    fail_at = np.where(done >= 0, done, sent)[~ok] // 10**9
    ok_at = done[ok] // 10**9
    gaps = [(np.diff(c), c[1:]) for c, good in zip(chunks, ok) if good and len(c) > 1]
    gap = np.concatenate([g for g, _ in gaps])
    gap_at = np.concatenate([at for _, at in gaps]) // 10**9
    for i, row in enumerate(w):
        nf, nd = (fail_at == i).sum(), (ok_at == i).sum()
        close(row["failure_rate"], nf / (nf + nd) if nf + nd else 0.0)
        close(row["output_tokens_per_s"] * row["length_s"], tokens[ok][ok_at == i].sum())
        if (gap_at == i).sum() > 1:
            close(row["itl_jitter_ms"], gap[gap_at == i].std() / 1e6, 1e-6)
    assert sum(row["failed_rps"] * row["length_s"] for row in w) == pytest.approx(m["failed"])
    # Breakdowns by class, endpoint and model.
    for name in ("class", "endpoint", "model"):
        groups = m["breakdown"][name]
        assert set(groups) == set(t[name].astype(str))
        for value, sub in groups.items():
            rows = t[name].astype(str) == value
            assert sub["completed"] == (ok & rows).sum()
            assert sub["failed"] == (~ok & rows).sum()
            close(sub["p99_ttft_ms"], np.percentile((first - sent)[ok & rows] / 1e6, 99), 1e-3)
    assert set(m["breakdown"]["model"]) == {"fineserve-mock", "other-model"}
    assert meta["versions"]["pyarrow"] == pa.__version__
    # The report recomputes the same figures, with the run's own 1 s windows.
    run = load_run(req)
    for key in ("completed", "failed", "p99_ttft_ms", "p99.9_ttft_ms", "request_goodput",
                "burst_sent_in_slot_fraction", "max_concurrent_requests", "sustained_request_rate",
                "max_output_tokens_per_s", "mean_e2el_from_scheduled_ms"):  # fmt: skip
        close(run.metrics[key], m[key])
    assert run.metrics["window_s"] == 1
    assert [x["completed_rps"] for x in run.metrics["windows"]] == [x["completed_rps"] for x in w]
    assert run.metrics["breakdown"]["model"].keys() == m["breakdown"]["model"].keys()
