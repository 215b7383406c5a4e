"""Reaching real deployments: TLS against an independent server with openssl-made
certificates (CA, mTLS, --insecure, wrong name, expired), headers on every request with
credential values kept secret, session and data-parallel-rank headers, LoRA adapter mixes,
and one-line errors for bad TLS and header options."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import invoke, kinds, run_schedule
from fineserve import EngineOptions, MockServer
from fineserve.config import PinConfig
from fineserve.errors import FineserveError
from fineserve.report import load_run
from fineserve.requests.pinning import Pinner, lora_weights
from fineserve.schedule import Schedule
from fineserve.transport import parse_header
from stdlib_server import Certs, OpenAIServer, make_certs

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    return make_certs(tmp_path_factory.mktemp("certs"))


def start(started: list[OpenAIServer], *args: Any, **kwargs: Any) -> OpenAIServer:
    s = OpenAIServer(*args, **kwargs)
    started.append(s)
    return s


def blast(base_url: str, *args: str, n: int = 12) -> Any:
    return invoke(
        "blast", "--base-url", base_url, "--num-prompts", str(n), "--request-rate", "200",
        "--random-input-len", "8", "--random-output-len", "3", "--disable-tqdm", *args,
    )  # fmt: skip


def one_line_error(output: str) -> str:
    """The run's error line; fails the test on a traceback or a multi-line error."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    return errors[0]


@needs_openssl
def test_cacert_completes_and_every_request_carries_the_header(
    certs: Certs, servers: list[OpenAIServer], tmp_path: Path
) -> None:
    srv = start(servers, certs.server_cert, certs.server_key)
    res = tmp_path / "r.json"
    r = blast(
        srv.base_url(), "--cacert", str(certs.ca), "-H", "X-Test: 42",
        "--header", "X-Tenant=blue", "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(res.read_text())
    assert data["completed"] == 12 and data["failed"] == 0
    # GET /v1/models, the warm-up and the run: every one carried both headers.
    assert {s.method for s in srv.seen} == {"GET", "POST"}
    assert len(srv.posts()) == 12 + 1
    assert all(s.headers.get("x-test") == "42" for s in srv.seen)
    assert all(s.headers.get("x-tenant") == "blue" for s in srv.seen)
    assert not srv.handshake_errors


@needs_openssl
def test_an_untrusted_server_is_refused_in_one_line(
    certs: Certs, servers: list[OpenAIServer]
) -> None:
    srv = start(servers, certs.server_cert, certs.server_key)
    r = blast(srv.base_url())
    assert r.exit_code != 0
    line = one_line_error(r.output)
    assert "unknown issuer" in line and "--cacert" in line, line
    assert not srv.posts()


@needs_openssl
def test_insecure_completes_and_says_so(certs: Certs, servers: list[OpenAIServer]) -> None:
    srv = start(servers, certs.server_cert, certs.server_key)
    r = blast(srv.base_url(), "--insecure")
    assert r.exit_code == 0, r.output
    assert "--insecure: server certificates are not verified" in r.output
    assert len(srv.posts()) == 13


@needs_openssl
def test_a_server_requiring_client_certificates(certs: Certs, servers: list[OpenAIServer]) -> None:
    srv = start(servers, certs.server_cert, certs.server_key, client_ca=certs.ca)
    ok = blast(
        srv.base_url(), "--cacert", str(certs.ca), "--cert", str(certs.client_cert),
        "--key", str(certs.client_key),
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert len(srv.posts()) == 13
    refused = blast(srv.base_url(), "--cacert", str(certs.ca))
    assert refused.exit_code != 0
    line = one_line_error(refused.output)
    assert "TLS" in line and "client certificate" in line, line


@needs_openssl
def test_the_engine_fails_requests_as_tls_when_the_server_refuses_the_client(
    certs: Certs, servers: list[OpenAIServer]
) -> None:
    """Without Python's check before the run: the engine's own classification. TLS 1.3
    servers refuse a missing client certificate after the client's handshake, so the
    refusal arrives with the first request, as kind `tls`."""
    srv = start(servers, certs.server_cert, certs.server_key, client_ca=certs.ca)
    rec = run_schedule(
        srv.base_url() + "/v1/completions",
        np.arange(6) * 1_000_000,
        max_tokens=3,
        options=EngineOptions(warm_connections=2, ca_file=str(certs.ca)),
    )
    assert kinds(rec) == ["tls"] * 6
    assert all("client certificate" in m for m in rec.columns["error_message"]), rec.columns


@needs_openssl
def test_wrong_name_and_expired_certificates_name_their_cause(
    certs: Certs, servers: list[OpenAIServer]
) -> None:
    srv = start(servers, certs.server_cert, certs.server_key)
    # The certificate is for 127.0.0.1 only.
    r = blast(srv.base_url("localhost"), "--cacert", str(certs.ca))
    assert "name mismatch" in one_line_error(r.output)
    rec = run_schedule(
        srv.base_url("localhost") + "/v1/completions",
        np.zeros(2, np.int64),
        options=EngineOptions(ca_file=str(certs.ca)),
    )
    assert kinds(rec) == ["tls", "tls"]
    assert "name mismatch" in rec.columns["error_message"][0]
    old = start(servers, certs.expired_cert, certs.server_key)
    r = blast(old.base_url(), "--cacert", str(certs.ca))
    assert "expired" in one_line_error(r.output)
    rec = run_schedule(
        old.base_url() + "/v1/completions",
        np.zeros(2, np.int64),
        options=EngineOptions(ca_file=str(certs.ca)),
    )
    assert kinds(rec) == ["tls", "tls"] and "expired" in rec.columns["error_message"][0]


@needs_openssl
def test_a_server_dropping_tls_mid_stream_is_accounted(
    certs: Certs, servers: list[OpenAIServer]
) -> None:
    srv = start(servers, certs.server_cert, certs.server_key, drop_after=2)
    rec = run_schedule(
        srv.base_url() + "/v1/completions",
        np.arange(5) * 1_000_000,
        max_tokens=6,
        options=EngineOptions(warm_connections=2, ca_file=str(certs.ca)),
    )
    assert len(rec) == 5
    assert set(kinds(rec)) <= {"tls", "transport", "incomplete"}, rec.columns["error_message"]
    assert (rec.col("n_chunks") == 2).all()  # the tokens before the drop were timed


def test_the_embedded_mock_over_tls(tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--mock-tls", "--num-prompts", "10", "--request-rate", "200",
        "--random-input-len", "8", "--random-output-len", "3", "--disable-tqdm",
        "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "TLS with a CA made at start" in r.output
    assert json.loads(res.read_text())["completed"] == 10
    with MockServer(tls=True) as m:
        assert m.base_url.startswith("https://") and m.ca_file is not None
        assert m.ca_file.read_text() == m.ca_pem and "BEGIN CERTIFICATE" in m.ca_pem
        plain = run_schedule(m.base_url + "/v1/completions", np.zeros(2, np.int64))
        assert kinds(plain) == ["tls", "tls"]  # the system's roots do not know the CA
        trusted = run_schedule(
            m.base_url + "/v1/completions",
            np.zeros(4, np.int64),
            options=EngineOptions(warm_connections=2, ca_file=str(m.ca_file)),
        )
        assert kinds(trusted) == ["ok"] * 4
        assert m.stats()["tls_failures"] >= 1


def test_reconnects_resume_their_tls_session() -> None:
    """The mock closes every connection after its response (close_keepalive), so each
    request after the first reconnects: those handshakes resume the run's TLS session."""
    with MockServer(tls=True, ttft_ms=1, itl_ms=1, faults=[("close_keepalive", 1.0)]) as m:
        rec = run_schedule(
            m.base_url + "/v1/completions",
            np.arange(8) * 20_000_000,
            max_tokens=2,
            options=EngineOptions(lanes=1, warm_connections=1, ca_file=str(m.ca_file)),
        )
        assert kinds(rec) == ["ok"] * 8
        stats = m.stats()
        assert stats["connections"] >= 8
        assert stats["tls_resumed"] >= 6, stats


def test_credential_header_values_never_leave(
    servers: list[OpenAIServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server echoes the header into its 401 body; neither the output, the JSON, the
    Parquet nor its metadata (the command line included) shows the value."""
    srv = start(servers, reject_header="X-Gateway-Token")
    res, req = tmp_path / "r.json", tmp_path / "r.parquet"
    args = [
        "-H", "X-Gateway-Token: gw-s3cret-value", "-H", "Cookie=c00kie-v",
        "--warmup-requests", "0", "--output-file", str(res), "--save-requests", str(req),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["fineserve", "blast", "--base-url", srv.base_url(), *args])
    r = blast(srv.base_url(), *args)
    assert r.exit_code == 0, r.output
    assert all(s.headers.get("x-gateway-token") == "gw-s3cret-value" for s in srv.seen)
    data = res.read_text()
    assert json.loads(data)["failed"] == 12
    blobs = [r.output, data, req.read_bytes().decode("latin-1")]
    for blob in blobs:
        assert "gw-s3cret-value" not in blob and "c00kie-v" not in blob
    table = pq.read_table(req)
    messages = [m for m in table.column("error_message").to_pylist() if m]
    assert messages and all("[redacted]" in m for m in messages)
    assert "[redacted]" in data
    command = json.loads(table.schema.metadata[b"fineserve.run"])["command"]
    assert "X-Gateway-Token: [redacted]" in command, command


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--cacert", "/nonexistent/ca.pem"], "--cacert /nonexistent/ca.pem"),
        (["--insecure", "--cacert", "CA"], "exclude each other"),
        (["--cert", "CLIENT"], "--cert and --key go together"),
        (["--cert", "CLIENT", "--key", "OTHER"], "does not match"),
        (["--cacert", "NOTPEM"], "not a PEM file"),
        (["-H", ": value"], "no name"),
        (["-H", "X-A: b\nc"], "line break"),
        (["-H", "novalue"], "expected 'Name: value'"),
        (["-H", "Bad Name: x"], "not a valid header name"),
        (["-H", "Content-Type: text/plain"], "set by fineserve"),
        (["--dp-ranks", "0"], "--dp-ranks"),
        (["--lora-modules", "a,b", "--lora-distribution", "weights:1"], "one non-negative"),
        (["--lora-modules", "a", "--lora-distribution", "zipf:x"], "zipf:S"),
        (["--dp-ranks", "2", "--dp-rank-policy", "by-session"], "needs a workload with"),
        (["--session-header", "X-Session"], "no sessions"),
    ],
)
def test_bad_transport_options_are_one_line_errors_before_any_connection(
    certs: Certs, servers: list[OpenAIServer], tmp_path: Path, args: list[str], says: str
) -> None:
    srv = start(servers)
    (tmp_path / "x.txt").write_text("hello\n")
    swap = {
        "CA": str(certs.ca),
        "CLIENT": str(certs.client_cert),
        "OTHER": str(certs.other_key),
        "NOTPEM": str(tmp_path / "x.txt"),
    }
    r = blast(srv.base_url(), *[swap.get(a, a) for a in args])
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    assert says in r.output, r.output
    assert not srv.seen  # refused before any connection


def _bailian(path: Path, conversations: int = 8, turns: int = 3) -> None:
    rows, cid = [], 1000
    for c in range(conversations):
        parent = -1
        for t in range(turns):
            rows.append(
                {"chat_id": cid, "parent_chat_id": parent, "turn": t + 1,
                 "timestamp": 50 * c + 400 * t, "input_length": 20, "output_length": 3}
            )  # fmt: skip
            parent, cid = cid, cid + 1
    rows.sort(key=lambda r: r["timestamp"])
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_sessions_ranks_and_adapters_reach_the_server_and_break_down(
    servers: list[OpenAIServer], tmp_path: Path
) -> None:
    srv = start(servers, models=("base", "sql-lora", "chat-lora"))
    trace = tmp_path / "bailian.jsonl"
    _bailian(trace)
    res, req = tmp_path / "r.json", tmp_path / "r.parquet"
    r = invoke(
        "blast", "--base-url", srv.base_url(), "--mode", "replay", "--trace", str(trace),
        "--time-scale", "4", "--disable-tqdm", "--warmup-requests", "0",
        "--session-header", "X-Session-Id", "--dp-ranks", "3", "--dp-rank-policy",
        "by-session", "--lora-modules", "sql-lora,chat-lora", "--output-file", str(res),
        "--save-requests", str(req),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    posts = srv.posts()
    assert len(posts) == 24
    by_session: dict[str, set[tuple[str, str]]] = {}
    for p in posts:
        sid, rank = p.headers["x-session-id"], p.headers["x-data-parallel-rank"]
        by_session.setdefault(sid, set()).add((rank, p.body["model"]))
    # 8 conversations, each on one rank with one adapter on all of its turns.
    assert len(by_session) == 8 and all(len(v) == 1 for v in by_session.values())
    assert {m for v in by_session.values() for _, m in v} == {"sql-lora", "chat-lora"}
    data = json.loads(res.read_text())
    ranks = data["breakdown"]["dp_rank"]
    assert sorted(ranks) == ["0", "1", "2"]
    assert sum(v["completed"] for v in ranks.values()) == 24
    models = data["breakdown"]["model"]
    assert set(models) == {"sql-lora", "chat-lora"}
    assert sum(v["completed"] for v in models.values()) == 24
    table = pq.read_table(req)
    assert set(table.column("dp_rank").to_pylist()) == {0, 1, 2}
    assert "dp_rank" in r.output  # the summary's breakdown
    # The report recomputes the same breakdown from the Parquet.
    again = load_run(req).metrics["breakdown"]
    assert {str(k): v["completed"] for k, v in again["dp_rank"].items()} == {
        k: v["completed"] for k, v in ranks.items()
    }
    assert set(again["model"]) == {"sql-lora", "chat-lora"}


def test_header_columns_survive_the_split_over_ray_workers() -> None:
    from fineserve.distributed import partition
    from fineserve.runner import EngineChunk

    n = 10
    chunk = EngineChunk(
        np.arange(n, dtype=np.int64), [b"{}"], np.zeros(n, np.uint32), np.zeros(n, np.uint32),
        np.full(n, 4), header_values=(np.arange(n) + 100, np.arange(n) % 3),
    )  # fmt: skip
    parts = partition([chunk], 3)
    for part in parts:
        rows = part.index
        assert part.table.column("header_0").to_pylist() == (rows + 100).tolist()
        assert part.table.column("header_1").to_pylist() == (rows % 3).tolist()


def _chunk(n: int, **extra: Any) -> Schedule:
    return Schedule(
        np.arange(n, dtype=np.int64), np.full(n, 8), np.full(n, 4),
        extra={k: np.asarray(v) for k, v in extra.items()},
    )  # fmt: skip


def test_rank_policies() -> None:
    rr = Pinner(PinConfig(dp_ranks=4), seed=0)
    first = rr.pins(0, _chunk(6)).labels["dp_rank"].tolist()
    assert first == [0, 1, 2, 3, 0, 1]
    assert rr.pins(6, _chunk(3)).labels["dp_rank"].tolist() == [2, 3, 0]  # continues
    by_class = Pinner(PinConfig(dp_ranks=2, dp_rank_policy="by-class"), seed=0)
    classes = np.array(["b", "a", "b", "c", "a"], dtype=object)
    ranks = by_class.pins(0, _chunk(5, **{"class": classes})).labels["dp_rank"].tolist()
    assert ranks == [0, 1, 0, 0, 1]  # b, a, c in order of appearance, over 2 ranks
    again = by_class.pins(5, _chunk(2, **{"class": np.array(["c", "a"], dtype=object)}))
    assert again.labels["dp_rank"].tolist() == [0, 1]  # the same class, the same rank
    by_session = Pinner(PinConfig(dp_ranks=3, dp_rank_policy="by-session"), seed=0)
    # Strided ids (one per turn, as Bailian's chat ids): hashed, they still spread.
    sessions = np.repeat(np.arange(1000, 1000 + 3 * 3000, 3), 2)
    ranks = by_session.pins(0, _chunk(len(sessions), session_id=sessions)).labels["dp_rank"]
    assert (ranks[0::2] == ranks[1::2]).all()  # a session stays on its rank
    assert np.allclose(np.bincount(ranks) / len(ranks), 1 / 3, atol=0.03)
    with pytest.raises(FineserveError, match="sessions"):
        by_session.check(_chunk(2))


def test_adapter_mixes_follow_their_distribution_and_stick_to_sessions() -> None:
    assert lora_weights("uniform", 4).tolist() == [0.25] * 4
    z = lora_weights("zipf:1", 3)
    assert np.allclose(z, np.array([1, 1 / 2, 1 / 3]) / (11 / 6))
    assert lora_weights("weights:3,1", 2).tolist() == [0.75, 0.25]
    n = 40_000
    for spec, want in (("uniform", [1 / 3] * 3), ("zipf:1.2", None), ("weights:6,3,1", None)):
        cfg = PinConfig(lora_modules=("a", "b", "c"), lora_distribution=spec)
        models = Pinner(cfg, seed=3).pins(0, _chunk(n)).models
        assert models is not None
        counts = Counter(models.tolist())
        share = np.array([counts[m] / n for m in "abc"])
        expected = lora_weights(spec, 3) if want is None else np.array(want)
        assert np.allclose(share, expected, atol=0.01), (spec, share)
    # Sticky: every request of a session asks for the same adapter, whatever its chunk;
    # and the seed changes the draw.
    cfg = PinConfig(lora_modules=tuple("abcdefgh"))
    sessions = np.repeat(np.arange(50), 4)
    one = Pinner(cfg, seed=1).pins(0, _chunk(200, session_id=sessions)).models
    assert one is not None
    for s in range(50):
        assert len(set(one[sessions == s].tolist())) == 1
    later = Pinner(cfg, seed=1).pins(999, _chunk(4, session_id=[3, 3, 17, 17])).models
    assert later is not None and later.tolist() == [one[12], one[12], one[68], one[68]]
    other = Pinner(cfg, seed=2).pins(0, _chunk(200, session_id=sessions)).models
    assert other is not None and other.tolist() != one.tolist()


def test_header_forms() -> None:
    assert parse_header("X-Test: 42").value == "42"
    assert parse_header("X-Test=a=b").value == "a=b"  # vLLM's NAME=VALUE
    assert parse_header("Authorization: Bearer x:y").value == "Bearer x:y"
    h = parse_header("X-Api-Key: s3")
    assert h.secret and h.shown == "[redacted]" and "s3" not in repr(h)
    assert not parse_header("X-Routing: r").secret
    with pytest.raises(FineserveError) as e:
        parse_header("Authorization")
    assert "Authorization" in str(e.value)


@pytest.mark.parametrize("tls", [False, True])
def test_http2_multiplexes_each_lanes_requests_over_one_connection(tls: bool) -> None:
    """--http2 against the mock (h2c prior knowledge, or ALPN h2 over TLS): every request
    completes, timed per token, over one connection per lane."""
    with MockServer(tls=tls, ttft_ms=5, itl_ms=2) as m:
        rec = run_schedule(
            m.base_url + "/v1/completions",
            np.arange(60) * 1_000_000,
            max_tokens=6,
            options=EngineOptions(
                lanes=2, warm_connections=0, http2=True,
                ca_file=str(m.ca_file) if tls else None,
            ),
        )  # fmt: skip
        assert kinds(rec) == ["ok"] * 60
        assert (rec.col("n_chunks") == 6).all()
        assert m.stats()["connections"] <= 2  # one per lane, every request multiplexed


def test_blast_over_http2_says_what_it_costs(tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--http2", "--mock-tls", "--num-prompts", "30", "--request-rate", "200",
        "--random-input-len", "8", "--random-output-len", "4", "--disable-tqdm",
        "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "--http2: each lane's requests share one connection" in r.output
    assert json.loads(res.read_text())["completed"] == 30
