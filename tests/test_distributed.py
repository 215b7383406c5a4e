"""Scale-out on Ray: partitioning, Arrow transport of records, and runs on a local cluster."""

from __future__ import annotations

import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import (
    completion_bodies,
    fleet_losing_worker_1,
    interrupted_blast,
    invoke,
    run_schedule,
)
from fineserve import EngineOptions, MockServer
from fineserve.distributed import import_ray, partition, run_engine_ray, run_stream_ray
from fineserve.errors import FineserveError
from fineserve.records import records_from_table, records_to_batch
from fineserve.results import read_requests
from fineserve.runner import EngineChunk, _CollectingSink


def _chunks(n_chunks: int = 3, per: int = 7) -> list[EngineChunk]:
    out, t = [], 0
    for c in range(n_chunks):
        bodies = [b"c%d-b%d" % (c, i) for i in range(3)]
        t_ns = t + np.arange(per, dtype=np.int64) * 1_000_000
        t = int(t_ns[-1]) + 1_000_000
        out.append(
            EngineChunk(
                t_ns,
                bodies,
                (np.arange(per) % 3).astype(np.uint32),
                (np.arange(per) % 2).astype(np.uint32),
                np.full(per, 5 + c),
            )
        )
    return out


def test_partition_keeps_every_request_once_with_its_time_body_and_endpoint() -> None:
    chunks = _chunks()
    whole_t = np.concatenate([c.t_ns for c in chunks])
    whole_body = [c.bodies[i] for c in chunks for i in c.body_idx.tolist()]
    whole_ep = np.concatenate([c.endpoint_idx for c in chunks])
    parts = partition(chunks, 4)
    seen = np.concatenate([p.index for p in parts])
    assert sorted(seen.tolist()) == list(range(len(whole_t)))
    for w, p in enumerate(parts):
        assert np.all(p.index % 4 == w)
        t = p.table.column("t_ns").to_numpy()
        assert np.array_equal(t, whole_t[p.index])  # absolute times kept
        assert np.all(np.diff(t) >= 0)
        bodies = [p.bodies[i] for i in p.table.column("body_idx").to_numpy().tolist()]
        assert bodies == [whole_body[i] for i in p.index.tolist()]
        assert np.array_equal(p.table.column("endpoint_idx").to_numpy(), whole_ep[p.index])


def test_partition_keeps_each_conversation_on_one_worker() -> None:
    # Conversations (parent = an earlier row): {0, 2, 5}, {1, 3}, {4}, {6, 7, 8}.
    parent = np.array([-1, -1, 0, 1, -1, 2, -1, 6, 7])
    n = len(parent)
    followers = np.bincount(parent[parent >= 0], minlength=n)
    c = EngineChunk(
        np.arange(n, dtype=np.int64) * 1_000_000,
        [b"x"],
        np.zeros(n, np.uint32),
        np.zeros(n, np.uint32),
        np.full(n, 4),
        turns=(parent, np.full(n, 7, np.int64), followers),
    )
    parts = partition([c], 2)
    owner = {int(i): w for w, p in enumerate(parts) for i in p.index}
    assert sorted(owner) == list(range(n))
    for conv in ({0, 2, 5}, {1, 3}, {4}, {6, 7, 8}):
        assert len({owner[i] for i in conv}) == 1, conv
    # Conversations alternate between the workers in order of their first turns.
    assert [owner[0], owner[1], owner[4], owner[6]] == [0, 1, 0, 1]
    for p in parts:
        local = p.table.column("parent").to_numpy()
        rows = p.index
        for j, lp in enumerate(local.tolist()):
            assert (rows[lp] if lp >= 0 else -1) == parent[rows[j]]  # same parent, local index
        assert np.array_equal(p.table.column("followers").to_numpy(), followers[rows])
        assert np.all(p.table.column("think_ns").to_numpy() == 7)


def test_records_survive_the_arrow_round_trip(mock: MockServer) -> None:
    t = np.linspace(0, 0.1e9, 40).astype(np.int64)
    rec = run_schedule(mock.base_url + "/v1/completions", t, max_tokens=4)
    cols = dict(rec.columns)
    # Give two rows an error message, as failures have.
    cols["error_index"] = np.array([3, 17], np.int64)
    cols["error_message"] = ["boom", "bang"]
    extra = {"input_len": np.arange(40)}
    batch = records_to_batch(cols, extra, ["http://a"])
    back, back_extra = records_from_table(batch, ["http://a"])
    for c in ("index", "scheduled_ns", "sent_ns", "done_ns", "error_kind", "endpoint_idx"):
        assert np.array_equal(np.asarray(back[c]), np.asarray(cols[c]).astype(back[c].dtype)), c
    assert np.array_equal(back["chunk_ns"], cols["chunk_ns"])
    assert np.array_equal(back["chunk_offsets"], cols["chunk_offsets"])
    assert back["error_index"].tolist() == [3, 17] and back["error_message"] == ["boom", "bang"]
    assert np.array_equal(back_extra["input_len"], np.arange(40))
    # A slice (offsets not starting at 0) comes back consistent too.
    part, _ = records_from_table(batch.slice(10, 5), ["http://a"])
    assert part["chunk_offsets"][0] == 0
    assert np.array_equal(
        part["chunk_ns"], cols["chunk_ns"][cols["chunk_offsets"][10] : cols["chunk_offsets"][15]]
    )


def test_without_ray_the_option_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FineserveError, match=r"pip install 'fineserve\[ray\]'"):
        import_ray()
    r = invoke("blast", "--ray", "local", "--num-prompts", "4", "--disable-tqdm")
    assert r.exit_code != 0 and "fineserve[ray]" in r.output and "Traceback" not in r.output


def test_unreachable_ray_address_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = invoke("blast", "--ray", f"127.0.0.1:{port}", "--num-prompts", "4", "--disable-tqdm")
    assert r.exit_code != 0 and "cannot reach a Ray cluster" in r.output
    r = invoke("blast", "--ray", "nonsense", "--num-prompts", "4", "--disable-tqdm")
    assert r.exit_code != 0 and "expected auto, local, HOST:PORT" in r.output


# --- on a local Ray cluster -----------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _blast(tmp: Path, name: str, *extra: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    req, res = tmp / f"{name}.parquet", tmp / f"{name}.json"
    r = invoke(
        "blast", "--num-prompts", "300", "--request-rate", "150", "--seed", "7",
        "--random-input-len", "8", "--random-output-len", "6", "--mock-itl-ms", "1",
        "--save-requests", str(req), "--output-file", str(res), "--disable-tqdm", *extra,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    table, _ = read_requests(req)
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    return json.loads(res.read_text()), cols


@pytest.mark.slow
def test_two_workers_account_like_one_machine(ray_local: Any, tmp_path: Path) -> None:
    one, one_rows = _blast(tmp_path, "single")
    two, two_rows = _blast(tmp_path, "ray2", "--ray", "local", "--workers", "2")
    # Same accounting and the merged schedule equals the original, row for row.
    for k in ("scheduled", "completed", "failed", "not_sent"):
        assert two[k] == one[k], k
    assert two["completed"] == 300
    assert np.array_equal(two_rows["index"], np.arange(300))
    assert np.array_equal(two_rows["scheduled_ns"], one_rows["scheduled_ns"])
    assert np.array_equal(two_rows["input_len"], one_rows["input_len"])
    # Each worker sent its share (row i on worker i mod 2), and says so.
    assert np.array_equal(two_rows["worker"], np.arange(300) % 2)
    workers = two["workers"]
    assert [w["requests"] for w in workers] == [150, 150]
    assert [(w["outcomes"], w["died"]) for w in workers] == [({"ok": 150}, None)] * 2
    # One machine: the common start holds to well under a millisecond.
    assert all(abs(w["start_error_us"]) < 1000 for w in workers)
    assert all(w["lag_p50_us"] < 1000 for w in workers)


@pytest.mark.slow
def test_a_worker_that_dies_is_reported_and_its_requests_accounted(ray_local: Any) -> None:
    def start(url: str, chunk: EngineChunk, sink: _CollectingSink, on_started: Any) -> Any:
        return run_stream_ray(
            [url], iter([chunk]), EngineOptions(lanes=1), sink, address="local", workers=2,
            show_progress=False, on_started=on_started,
        )  # fmt: skip

    _, messages = fleet_losing_worker_1(start, ray_local.kill)
    assert any("worker 1 died" in m for m in messages)


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_keeps_their_results(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "partial.json"
    # Ray starts in the child (local cluster) before the run: the signal comes well after.
    done = interrupted_blast(
        signal.SIGINT, "--ray", "local", "--workers", "2", "--num-prompts", "4000",
        "--output-file", str(out), after_s=20.0,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert "stopping 2 Ray workers" in done.stderr
    res = json.loads(out.read_text())
    assert res["partial"] is True
    # Up to the stop instant the schedule's figures; what was never due counts apart.
    assert res["scheduled"] + res["not_reached"] == 4000
    assert res["scheduled"] == res["sent"] + res["not_sent"]
    assert res["sent"] == res["completed"] + res["failed"]
    assert 100 < res["sent"] < 3900 and res["not_reached"] > 0
    assert 80 < res["offered_request_rate"] < 120  # the part that ran, at 100 req/s
    assert [w["requests"] for w in res["workers"]] == [2000, 2000]
    assert all(w["died"] is None for w in res["workers"])


@pytest.mark.slow
def test_conversations_replay_turn_after_turn_across_workers(
    ray_local: Any, tmp_path: Path
) -> None:
    path = tmp_path / "bailian.jsonl"
    rows, cid = [], 1000
    for c in range(6):  # 6 conversations of 3 turns, 2 s apart, starting 0.3 s apart
        parent = -1
        for t in range(3):
            rows.append(
                {"chat_id": cid, "parent_chat_id": parent, "turn": t + 1,
                 "timestamp": 300 * c + 2000 * t, "input_length": 40 + 48 * t,
                 "output_length": 8, "hash_ids": [cid]}
            )  # fmt: skip
            parent, cid = cid, cid + 1
    rows.sort(key=lambda r: r["timestamp"])
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    req = tmp_path / "r.parquet"
    r = invoke(
        "blast", "--mode", "replay", "--trace", str(path), "--time-scale", "4",
        "--disable-tqdm", "--save-requests", str(req), "--warmup-requests", "0",
        "--ray", "local", "--workers", "2",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    table, _ = read_requests(req)
    t = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    assert all(k == "ok" for k in t["error_kind"])
    ids = [row["chat_id"] for row in rows]
    for i, row in enumerate(rows):
        if row["parent_chat_id"] < 0:
            continue
        p = ids.index(row["parent_chat_id"])
        assert t["worker"][i] == t["worker"][p]  # the turn ran where its parent did
        # Released 0.5 s (2 s / 4) after the previous turn ended, and sent then.
        assert t["scheduled_ns"][i] == t["done_ns"][p] + 500_000_000
        assert 0 <= t["sent_ns"][i] - t["scheduled_ns"][i] < 5_000_000
    assert set(t["worker"].tolist()) == {0, 1}


@pytest.mark.slow
def test_live_history_stays_with_each_conversation_across_workers(
    ray_local: Any, tmp_path: Path
) -> None:
    """Live history over two Ray workers: each later turn carries the reply its previous
    turn actually received (an independent server's), on the worker that sent that turn."""
    from conversation_server import ConversationServer
    from test_live_history import bailian

    server = ConversationServer()
    trace, req = tmp_path / "bailian.jsonl", tmp_path / "r.parquet"
    rows = bailian(trace, conversations=6)
    try:
        r = invoke(
            "blast", "--mode", "replay", "--trace", str(trace), "--time-scale", "5",
            "--base-url", server.base_url, "--backend", "openai-chat", "--disable-tqdm",
            "--save-requests", str(req), "--warmup-requests", "0", "--ray", "local",
            "--workers", "2",
        )  # fmt: skip
        posts = server.posts()
    finally:
        server.close()
    assert r.exit_code == 0, r.output
    by_messages = {json.dumps(p.body["messages"]): p for p in posts}
    later = [p for p in posts if len(p.body["messages"]) > 1]
    assert len(later) == 12
    for p in later:
        parent = by_messages[json.dumps(p.body["messages"][:-2])]
        assert p.body["messages"][-2] == {"role": "assistant", "content": parent.text}
        assert p.received_ns >= parent.ended_ns
    table, _ = read_requests(req)
    t = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    assert list(t["history_kind"]).count(1) == 12
    ids = [row["chat_id"] for row in rows]
    for i, row in enumerate(rows):
        if row["parent_chat_id"] >= 0:
            assert t["worker"][i] == t["worker"][ids.index(row["parent_chat_id"])]
    assert set(t["worker"].tolist()) == {0, 1}


@pytest.mark.slow
def test_python_api_spreads_a_schedule_like_run_engine(ray_local: Any, mock: MockServer) -> None:
    n = 120
    t = np.linspace(0, 0.6e9, n).astype(np.int64)
    rec = run_engine_ray(
        [mock.base_url + "/v1/completions"],
        t,
        completion_bodies(n, 4),
        np.arange(n, dtype=np.uint32),
        np.zeros(n, np.uint32),
        np.full(n, 4),
        EngineOptions(lanes=1),
        workers=3,
        show_progress=False,
    )
    assert np.array_equal(rec.col("index"), np.arange(n))
    assert np.array_equal(rec.col("scheduled_ns"), t)
    assert np.all(rec.col("error_kind") == 0) and np.all(rec.col("n_chunks") == 4)
    assert [w["requests"] for w in rec.workers] == [40, 40, 40]
    assert rec.progress["succeeded"] == n


def test_ray_init_failures_name_their_cause() -> None:
    from fineserve.distributed import ray_init_error

    log = "gcs_client.cc:210: Unauthenticated: RPC error: InvalidAuthToken: missing or incorrect"
    line = ray_init_error("h:6379", ConnectionError("Failed to connect to Ray cluster"), log)
    assert "refused this driver's token" in line and "RAY_AUTH_TOKEN" in line
    line = ray_init_error(
        "h:6379",
        RuntimeError("Version mismatch: The cluster was started with Ray 2.9 / Python 3.10"),
        "",
    )
    assert "another Ray or Python version" in line and "Ray 2.9" in line
    assert ray_init_error("h:6379", RuntimeError("boom\nmore"), "") == "--ray h:6379: boom"
