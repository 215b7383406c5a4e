"""Every kind of streamed token counts, and is told apart: reasoning, answer, tool call.

Part (a) runs the engine against an independent server written with the standard library
only, which streams byte for byte what vLLM 0.32 sends (``--reasoning-parser deepseek_r1``,
tool calls) and what the Responses API sends; part (b) checks the embedded mock's
reasoning, tool-call, cached-token and Responses shapes; part (c) the results file.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import kinds, run_schedule
from fineserve import EngineOptions, MockServer
from fineserve.api import BodyTemplate
from fineserve.records import records_from_table, records_to_batch, unsent_records
from fineserve.results import RequestsWriter, read_requests
from fineserve.runner import RunRecords

#: A stream script: (path, request body) → the events' bytes, each written on its own.
Script = Callable[[str, dict[str, Any]], list[bytes]]

#: Between two events, so that each arrives in its own read and gets its own timestamp.
GAP_S = 0.003
#: An event list entry that is a longer pause: where a test compares two events' times,
#: they must not share a read even on a loaded machine.
PAUSE = b""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked bodies, keep-alive: as uvicorn serves vLLM

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: _StdlibServer = self.server.owner  # type: ignore[attr-defined]
        server.bodies.append(body)
        events = server.script(self.path, body)
        whole = server.content_type == "application/json"
        self.send_response(200)
        self.send_header("content-type", server.content_type)
        if whole:
            payload = b"".join(events)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for e in events:
            if e == PAUSE:
                time.sleep(0.05)
                continue
            self.wfile.write(b"%x\r\n%s\r\n" % (len(e), e))
            self.wfile.flush()
            time.sleep(GAP_S)
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: Any) -> None:
        pass


class _StdlibServer:
    """``http.server`` in a thread, answering every POST with ``script``'s events."""

    def __init__(self, script: Script, content_type: str = "text/event-stream") -> None:
        self.script = script
        self.content_type = content_type
        self.bodies: list[dict[str, Any]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        # shutdown() waits out serve_forever's poll interval (0.5 s by default) in every
        # test's teardown: a short one keeps the fast tier fast.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., _StdlibServer]]:
    started: list[_StdlibServer] = []

    def start(script: Script, content_type: str = "text/event-stream") -> _StdlibServer:
        started.append(_StdlibServer(script, content_type))
        return started[-1]

    yield start
    for s in started:
        s.close()


def _data(obj: dict[str, Any] | str) -> bytes:
    text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """A chat chunk as vLLM 0.32 serialises it."""
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None
    return {
        "id": "chatcmpl-8f2c",
        "object": "chat.completion.chunk",
        "created": 1764500000,
        "model": "tiny",
        "choices": [choice],
    }


def _usage_chunk(prompt: int, completion: int, **details: Any) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    usage.update(details)
    return {
        "id": "chatcmpl-8f2c",
        "object": "chat.completion.chunk",
        "created": 1764500000,
        "model": "tiny",
        "choices": [],
        "usage": usage,
    }


def _chat_bodies(n: int, max_tokens: int) -> list[bytes]:
    t = BodyTemplate("openai-chat", "tiny", stream=True, ignore_eos=False, chat=True)
    return [t.render(f"q{i} a b c", max_tokens) for i in range(n)]


def _run(url: str, n: int, max_tokens: int, bodies: list[bytes] | None = None) -> RunRecords:
    return run_schedule(
        url,
        (np.arange(n) * 2e6).astype(np.int64),
        max_tokens=max_tokens,
        options=EngineOptions(),
        bodies=bodies if bodies is not None else _chat_bodies(n, max_tokens),
    )


def _row_chunks(rec: RunRecords, row: int) -> np.ndarray:
    off = rec.col("chunk_offsets")
    return rec.col("chunk_ns")[off[row] : off[row + 1]]


# (a) An independent server streaming what real servers send.


def test_vllm_reasoning_parser_stream_is_ok_and_all_reasoning(serve: Any) -> None:
    """vLLM 0.32 with --reasoning-parser deepseek_r1 on a random model: the role chunk,
    reasoning deltas only (the model never closes its thinking), finish "length", usage
    with cached and reasoning tokens, [DONE]. This used to fail warm-up with "stream
    ended without any token"."""
    n_tok = 16

    def script(path: str, body: dict[str, Any]) -> list[bytes]:
        events = [_data(_chat_chunk({"role": "assistant", "content": ""}))]
        for k in range(n_tok):
            last = k == n_tok - 1
            events.append(_data(_chat_chunk({"reasoning": f" t{k}"}, "length" if last else None)))
        events.append(
            _data(
                _usage_chunk(
                    40,
                    n_tok,
                    prompt_tokens_details={"cached_tokens": 16},
                    completion_tokens_details={"reasoning_tokens": n_tok},
                )
            )
        )
        return [*events, _data("[DONE]")]

    server = serve(script)
    rec = _run(server.url("/v1/chat/completions"), 3, n_tok)
    assert kinds(rec) == ["ok"] * 3, rec.columns["error_message"]
    assert np.all(rec.col("first_token_ns") > rec.col("sent_ns"))
    assert np.all(rec.col("first_answer_ns") == -1)
    assert np.all(rec.col("reasoning_chunks") == n_tok)
    assert np.all(rec.col("n_chunks") == n_tok)
    assert np.all(rec.col("cached_tokens") == 16)
    assert np.all(rec.col("reasoning_tokens") == n_tok)
    assert np.all(rec.col("completion_tokens") == n_tok)
    assert np.all(rec.col("prompt_tokens") == 40)
    assert np.all(rec.col("usage_ignored") == 0)
    for row in range(3):
        chunks = _row_chunks(rec, row)
        assert chunks[0] == rec.col("first_token_ns")[row]
        assert chunks[-1] == rec.col("last_reasoning_ns")[row]
    # The engine sent a chat body the server took as such.
    assert all(b["messages"][0]["role"] == "user" for b in server.bodies)


def test_reasoning_content_field_counts_too(serve: Any) -> None:
    def script(path: str, body: dict[str, Any]) -> list[bytes]:
        return [
            _data(_chat_chunk({"role": "assistant", "content": ""})),
            _data(_chat_chunk({"reasoning_content": "hm"})),
            _data(_chat_chunk({"reasoning_content": "m"}, "length")),
            _data("[DONE]"),
        ]

    rec = _run(serve(script).url("/v1/chat/completions"), 2, 2)
    assert kinds(rec) == ["ok"] * 2
    assert list(rec.col("reasoning_chunks")) == [2, 2]
    assert list(rec.col("cached_tokens")) == [-1, -1]  # not reported
    assert list(rec.col("reasoning_tokens")) == [-1, -1]


def test_tool_call_only_stream_is_ok_with_an_answer_token(serve: Any) -> None:
    """vLLM's tool parser: the first fragment names the function, later ones carry only
    argument text (no id, no name), the last chunk ends with finish "tool_calls"."""

    def script(path: str, body: dict[str, Any]) -> list[bytes]:
        first = {
            "tool_calls": [
                {
                    "id": "chatcmpl-tool-1a",
                    "type": "function",
                    "index": 0,
                    "function": {"name": "get_weather"},
                }
            ]
        }
        frags = ['{"city": ', '"Paris"', "}"]
        return [
            _data(_chat_chunk({"role": "assistant", "content": ""})),
            _data(_chat_chunk(first)),
            *(
                _data(_chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}))
                for a in frags
            ),
            _data(_chat_chunk({}, "tool_calls")),
            _data(_usage_chunk(12, 9)),
            _data("[DONE]"),
        ]

    rec = _run(serve(script).url("/v1/chat/completions"), 2, 9)
    assert kinds(rec) == ["ok"] * 2, rec.columns["error_message"]
    assert np.all(rec.col("first_answer_ns") >= 0)
    assert np.all(rec.col("first_answer_ns") == rec.col("first_token_ns"))
    assert list(rec.col("n_chunks")) == [4, 4]  # the name and three argument fragments
    assert list(rec.col("reasoning_chunks")) == [0, 0]
    assert list(rec.col("last_reasoning_ns")) == [-1, -1]


def test_reasoning_then_content_times_both_phases(serve: Any) -> None:
    def script(path: str, body: dict[str, Any]) -> list[bytes]:
        events = [_data(_chat_chunk({"role": "assistant", "content": ""}))]
        events += [_data(_chat_chunk({"reasoning": f" r{k}"})) for k in range(5)]
        events.append(PAUSE)
        # Unknown delta fields (a newer server's) are ignored.
        events.append(
            _data(_chat_chunk({"content": "A", "x_new": {"a": [1, None]}, "audio": None}))
        )
        events += [_data(_chat_chunk({"content": f" c{k}"})) for k in range(4)]
        events.append(_data(_chat_chunk({"content": "."}, "length")))
        events.append(_data(_usage_chunk(8, 11, completion_tokens_details={"reasoning_tokens": 5})))
        return [*events, _data("[DONE]")]

    rec = _run(serve(script).url("/v1/chat/completions"), 3, 11)
    assert kinds(rec) == ["ok"] * 3, rec.columns["error_message"]
    assert np.all(rec.col("n_chunks") == 11)
    assert np.all(rec.col("reasoning_chunks") == 5)
    assert np.all(rec.col("reasoning_tokens") == 5)
    first, answer, last_r = (
        rec.col("first_token_ns"),
        rec.col("first_answer_ns"),
        rec.col("last_reasoning_ns"),
    )
    assert np.all(first < answer) and np.all(answer > last_r) and np.all(last_r > first)
    for row in range(3):
        chunks = _row_chunks(rec, row)
        # Reasoning came first: its events are the first reasoning_chunks of chunk_ns.
        assert chunks[4] == last_r[row] and chunks[5] == answer[row]


def _responses_events(n_reason: int, n_text: int, cached: int) -> list[bytes]:
    """What OpenAI's (and vLLM's) Responses API streams: named events, no [DONE]."""
    seq = iter(range(1000))

    def ev(kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, "sequence_number": next(seq), **fields}
        return f"event: {kind}\ndata: {json.dumps(obj)}\n\n".encode()

    resp = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    out = [ev("response.created", response=resp), ev("response.in_progress", response=resp)]
    out.append(ev("response.output_item.added", output_index=0, item={"type": "reasoning"}))
    for k in range(n_reason):
        out.append(
            ev("response.reasoning_text.delta", item_id="rs_1", output_index=0, delta=f" r{k}")
        )
    out.append(ev("response.reasoning_text.done", item_id="rs_1", text="r"))
    out.append(PAUSE)
    out.append(ev("response.output_item.added", output_index=1, item={"type": "message"}))
    out.append(
        ev("response.content_part.added", part={"type": "output_text", "text": ""}, item_id="m")
    )
    for k in range(n_text):
        out.append(
            ev(
                "response.output_text.delta",
                item_id="msg_1",
                output_index=1,
                content_index=0,
                delta=f" w{k}",
                logprobs=[],
            )
        )
    out.append(ev("response.output_text.done", item_id="msg_1", text="whole text"))
    usage = {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": n_reason + n_text,
        "output_tokens_details": {"reasoning_tokens": n_reason},
        "total_tokens": 7 + n_reason + n_text,
    }
    done = {**resp, "status": "completed", "usage": usage, "output": [{"type": "message"}]}
    out.append(ev("response.completed", response=done))
    return out


def test_responses_api_stream(serve: Any) -> None:
    server = serve(lambda path, body: _responses_events(3, 4, cached=4))
    t = BodyTemplate("openai-responses", "tiny", stream=True, ignore_eos=True, chat=True)
    bodies = [t.render(f"q{i} a b", 7) for i in range(2)]
    rec = _run(server.url("/v1/responses"), 2, 7, bodies=bodies)
    assert kinds(rec) == ["ok"] * 2, rec.columns["error_message"]
    assert list(rec.col("n_chunks")) == [7, 7]
    assert list(rec.col("reasoning_chunks")) == [3, 3]
    assert np.all(rec.col("first_answer_ns") > rec.col("last_reasoning_ns"))
    assert list(rec.col("prompt_tokens")) == [7, 7]
    assert list(rec.col("completion_tokens")) == [7, 7]
    assert list(rec.col("reasoning_tokens")) == [3, 3]
    assert list(rec.col("cached_tokens")) == [4, 4]
    # The Responses body: input and max_output_tokens; no chat or vLLM-only fields.
    for b in server.bodies:
        assert b["input"].startswith("q") and b["max_output_tokens"] == 7 and b["stream"]
        for absent in ("messages", "prompt", "max_tokens", "ignore_eos", "stream_options"):
            assert absent not in b


def test_responses_body_carries_a_conversation_as_messages() -> None:
    t = BodyTemplate("openai-responses", "m", stream=True, ignore_eos=True, chat=True)
    conv = [("user", "hi"), ("assistant", "yes"), ("user", 'more "x"')]
    body = json.loads(t.render(conv, 5))
    assert body["input"] == [{"role": r, "content": c} for r, c in conv]
    assert body["max_output_tokens"] == 5


def test_responses_error_and_failed_events_fail_with_their_message(serve: Any) -> None:
    def script(path: str, body: dict[str, Any]) -> list[bytes]:
        created = _responses_events(1, 0, 0)[:3]
        if body["input"].startswith("q0"):
            err = {"type": "error", "code": "server_error", "message": "engine died"}
            return [*created, b"event: error\ndata: " + json.dumps(err).encode() + b"\n\n"]
        failed = {
            "type": "response.failed",
            "response": {"status": "failed", "error": {"code": "x", "message": "out of KV"}},
        }
        return [*created, b"event: response.failed\ndata: " + json.dumps(failed).encode() + b"\n\n"]

    t = BodyTemplate("openai-responses", "tiny", stream=True, ignore_eos=True, chat=True)
    bodies = [t.render(f"q{i}", 3) for i in range(2)]
    rec = _run(serve(script).url("/v1/responses"), 2, 3, bodies=bodies)
    assert kinds(rec) == ["invalid_response"] * 2
    assert "engine died" in rec.columns["error_message"][0]
    assert "out of KV" in rec.columns["error_message"][1]


def test_error_object_in_a_chat_stream_stays_invalid(serve: Any) -> None:
    def script(path: str, body: dict[str, Any]) -> list[bytes]:
        return [
            _data(_chat_chunk({"reasoning": "a"})),
            _data({"error": {"message": "request preempted", "type": "InternalServerError"}}),
            _data("[DONE]"),
        ]

    rec = _run(serve(script).url("/v1/chat/completions"), 2, 3)
    assert kinds(rec) == ["invalid_response"] * 2
    assert all("request preempted" in m for m in rec.columns["error_message"])


def test_a_stream_without_any_output_still_fails(serve: Any) -> None:
    def script(path: str, body: dict[str, Any]) -> list[bytes]:
        return [
            _data(_chat_chunk({"role": "assistant", "content": ""})),
            _data(_chat_chunk({"reasoning": "", "tool_calls": []}, "length")),
            _data("[DONE]"),
        ]

    rec = _run(serve(script).url("/v1/chat/completions"), 1, 2)
    assert kinds(rec) == ["invalid_response"]
    assert "without any token" in rec.columns["error_message"][0]


def test_usage_of_unexpected_types_is_ignored_and_flagged(serve: Any) -> None:
    def script(path: str, body: dict[str, Any]) -> list[bytes]:
        bad = _usage_chunk(4, 2)
        bad["usage"]["completion_tokens"] = "2"
        bad["usage"]["prompt_tokens_details"] = {"cached_tokens": 1.5}
        return [
            _data(_chat_chunk({"content": "a"})),
            _data(_chat_chunk({"content": "b"}, "length")),
            _data(bad),
            _data("[DONE]"),
        ]

    rec = _run(serve(script).url("/v1/chat/completions"), 2, 2)
    assert kinds(rec) == ["ok"] * 2
    assert list(rec.col("usage_ignored")) == [1, 1]
    assert list(rec.col("completion_tokens")) == [-1, -1]
    assert list(rec.col("cached_tokens")) == [-1, -1]
    assert list(rec.col("prompt_tokens")) == [4, 4]  # the good field is kept


def test_non_streamed_reasoning_message(serve: Any) -> None:
    """vLLM's whole chat body with a reasoning parser: ``message.reasoning``, no content."""

    def script(path: str, body: dict[str, Any]) -> list[bytes]:
        whole = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "tiny",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "reasoning": "think", "content": None},
                    "finish_reason": "length",
                }
            ],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": 6,
                "total_tokens": 11,
                "completion_tokens_details": {"reasoning_tokens": 6},
                "prompt_tokens_details": None,
            },
        }
        return [json.dumps(whole).encode()]

    server = serve(script, content_type="application/json")
    t = BodyTemplate("openai-chat", "tiny", stream=False, ignore_eos=False, chat=True)
    rec = run_schedule(
        server.url("/v1/chat/completions"),
        np.zeros(2, np.int64),
        options=EngineOptions(stream=False),
        bodies=[t.render("q", 6)] * 2,
    )
    assert kinds(rec) == ["ok"] * 2
    assert list(rec.col("reasoning_chunks")) == [1, 1]
    assert list(rec.col("first_answer_ns")) == [-1, -1]
    assert list(rec.col("reasoning_tokens")) == [6, 6]
    assert list(rec.col("usage_ignored")) == [0, 0]


# (b) The embedded mock.


def _mock_post(mock: MockServer, path: str, body: dict[str, Any]) -> str:
    req = urllib.request.Request(
        mock.base_url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def test_mock_reasoning_ratio_splits_each_answer() -> None:
    with MockServer(ttft_ms=5, itl_ms=3, reasoning_ratio=0.75) as m:
        rec = _run(m.base_url + "/v1/chat/completions", 6, 16)
        raw = _mock_post(
            m,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True},
        )
    assert kinds(rec) == ["ok"] * 6, rec.columns["error_message"]
    assert np.all(rec.col("reasoning_chunks") == 12)
    assert np.all(rec.col("reasoning_tokens") == 12)
    assert np.all(rec.col("n_chunks") == 16)
    assert np.all(rec.col("first_answer_ns") >= rec.col("last_reasoning_ns"))
    assert np.all(rec.col("first_token_ns") < rec.col("first_answer_ns"))
    assert raw.count('"reasoning":" tok"') == 3 and raw.count('"content":" tok"') == 1


def test_mock_reasoning_field_and_per_request_ratio() -> None:
    with MockServer(ttft_ms=2, itl_ms=1, reasoning_field="reasoning_content") as m:
        body = {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 8,
            "stream": True,
            "fineserve_reasoning_ratio": 0.25,
        }
        raw = _mock_post(m, "/v1/chat/completions", body)
        assert raw.count('"reasoning_content":" tok"') == 2 and '"reasoning":' not in raw
        t = BodyTemplate(
            "openai-chat",
            "m",
            stream=True,
            ignore_eos=False,
            chat=True,
            extra={"fineserve_reasoning_ratio": 0.5},
        )
        rec = _run(m.base_url + "/v1/chat/completions", 3, 8, bodies=[t.render("a b", 8)] * 3)
        # Without a ratio: plain content, and usage says nothing of reasoning.
        plain = _run(m.base_url + "/v1/chat/completions", 2, 4)
        whole = json.loads(_mock_post(m, "/v1/chat/completions", {**body, "stream": False}))
        with pytest.raises(urllib.error.HTTPError) as bad:
            _mock_post(m, "/v1/chat/completions", {**body, "fineserve_reasoning_ratio": 2})
    assert kinds(rec) == ["ok"] * 3
    assert list(rec.col("reasoning_chunks")) == [4, 4, 4]
    assert list(rec.col("reasoning_tokens")) == [4, 4, 4]
    assert list(plain.col("reasoning_chunks")) == [0, 0]
    assert list(plain.col("reasoning_tokens")) == [-1, -1]
    msg = whole["choices"][0]["message"]
    assert msg["reasoning_content"] == " tok" * 2 and msg["content"] == " tok" * 6
    assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    assert bad.value.code == 400
    bad.value.close()


def test_mock_tool_calls_answer_as_fragments() -> None:
    with MockServer(ttft_ms=2, itl_ms=1, tool_calls=1.0) as m:
        rec = _run(m.base_url + "/v1/chat/completions", 4, 6)
        raw = _mock_post(
            m,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True},
        )
    assert kinds(rec) == ["ok"] * 4, rec.columns["error_message"]
    assert np.all(rec.col("first_answer_ns") >= 0)
    assert np.all(rec.col("first_answer_ns") == rec.col("first_token_ns"))
    assert np.all(rec.col("n_chunks") == 6)
    assert raw.count('"tool_calls"') == 3 and '"content"' not in raw
    assert raw.count('"name":"fineserve_tool"') == 1


def test_mock_tool_call_ratio_holds_its_share() -> None:
    with MockServer(ttft_ms=1, itl_ms=0, tool_calls=0.25) as m:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True}
        tools = sum(
            '"tool_calls"' in _mock_post(m, "/v1/chat/completions", body) for _ in range(40)
        )
    assert 9 <= tools <= 11


def test_mock_cached_tokens_follow_repeated_hash_ids() -> None:
    def body(ids: list[int]) -> bytes:
        t = BodyTemplate(
            "vllm",
            "m",
            stream=True,
            ignore_eos=True,
            extra={"fineserve_hash_ids": ids, "fineserve_block_size": 4},
        )
        return t.render("w " * 12, 2)  # 12 words: three blocks of 4

    bodies = [body([1, 2, 3]), body([1, 2, 3]), body([1, 2, 9]), body([5, 2, 3]), body([1])]
    with MockServer(ttft_ms=2, itl_ms=1) as m:
        # 30 ms apart: each request reaches the mock after the previous one.
        rec = run_schedule(
            m.base_url + "/v1/completions",
            (np.arange(len(bodies)) * 30e6).astype(np.int64),
            max_tokens=2,
            options=EngineOptions(),
            bodies=bodies,
        )
        plain = _run(
            m.base_url + "/v1/completions",
            1,
            2,
            bodies=[BodyTemplate("vllm", "m", stream=True, ignore_eos=True).render("a b", 2)],
        )
    assert kinds(rec) == ["ok"] * 5
    assert list(rec.col("prompt_tokens")) == [12] * 4 + [12]
    assert list(rec.col("cached_tokens")) == [0, 12, 8, 0, 4]
    assert list(plain.col("cached_tokens")) == [-1]


def test_mock_cache_is_bounded() -> None:
    def body(ids: list[int]) -> dict[str, Any]:
        return {
            "prompt": "a b",
            "max_tokens": 1,
            "fineserve_hash_ids": ids,
            "fineserve_block_size": 1,
        }

    def cached(m: MockServer, ids: list[int]) -> int:
        return json.loads(_mock_post(m, "/v1/completions", body(ids)))["usage"][
            "prompt_tokens_details"
        ]["cached_tokens"]

    with MockServer(ttft_ms=1, itl_ms=0, cache_blocks=2) as m:
        assert cached(m, [1, 2]) == 0
        assert cached(m, [1, 2]) == 2
        assert cached(m, [3]) == 0  # evicts block 1, the least recently used
        assert cached(m, [1, 2]) == 0


def test_mock_responses_route() -> None:
    t = BodyTemplate("openai-responses", "m", stream=True, ignore_eos=True, chat=True)
    with MockServer(ttft_ms=3, itl_ms=2, reasoning_ratio=0.5) as m:
        rec = _run(m.base_url + "/v1/responses", 3, 8, bodies=[t.render("a b c", 8)] * 3)
        raw = _mock_post(m, "/v1/responses", {"input": "a", "max_output_tokens": 2, "stream": True})
        whole = json.loads(_mock_post(m, "/v1/responses", {"input": "a", "max_output_tokens": 2}))
    assert kinds(rec) == ["ok"] * 3, rec.columns["error_message"]
    assert list(rec.col("n_chunks")) == [8] * 3
    assert list(rec.col("reasoning_chunks")) == [4] * 3
    assert list(rec.col("reasoning_tokens")) == [4] * 3
    assert list(rec.col("completion_tokens")) == [8] * 3
    assert list(rec.col("prompt_tokens")) == [3] * 3
    assert np.all(rec.col("first_answer_ns") >= rec.col("last_reasoning_ns"))
    assert raw.startswith("event: response.created\ndata: ")
    assert "event: response.reasoning_text.delta" in raw
    assert "event: response.output_text.delta" in raw
    assert raw.rstrip().splitlines()[-2] == "event: response.completed"
    assert "[DONE]" not in raw
    kinds_out = [item["type"] for item in whole["output"]]
    assert kinds_out == ["reasoning", "message"]
    assert whole["usage"]["output_tokens_details"] == {"reasoning_tokens": 1}


def test_mock_rejects_bad_options() -> None:
    from fineserve.errors import FineserveError

    for bad in ({"reasoning_ratio": 1.5}, {"tool_calls": -0.1}, {"reasoning_field": "thoughts"}):
        with pytest.raises(FineserveError):
            MockServer(**bad)


# (c) The results file.


def test_results_file_round_trips_the_new_columns(tmp_path: Path) -> None:
    n = 4
    cols = unsent_records(
        np.arange(n), np.arange(n) * 10, np.zeros(n), np.zeros(n, np.uint8), ["x"] * n
    )
    cols.update(
        first_answer_ns=np.array([5, -1, 7, -1], np.int64),
        last_reasoning_ns=np.array([4, 6, -1, -1], np.int64),
        reasoning_chunks=np.array([3, 2, 0, 0], np.uint32),
        reasoning_tokens=np.array([3, 2, -1, 0], np.int64),
        cached_tokens=np.array([16, -1, 0, 8], np.int64),
        usage_ignored=np.array([0, 1, 0, 0], np.uint8),
        error_index=np.zeros(0, np.int64),
        error_message=[],
    )
    path = tmp_path / "r.parquet"
    w = RequestsWriter(path, {"run": "t"})
    w.write(records_to_batch(cols, {"input_len": np.full(n, 3)}, ["http://x/v1/chat/completions"]))
    w.close({})
    table, _ = read_requests(path)
    for name in ("first_answer_ns", "reasoning_tokens", "cached_tokens"):
        assert name in pq.read_schema(path).names
    back, _ = records_from_table(table)
    for name in (
        "first_answer_ns",
        "last_reasoning_ns",
        "reasoning_chunks",
        "reasoning_tokens",
        "cached_tokens",
        "usage_ignored",
    ):
        assert back[name].tolist() == np.asarray(cols[name]).tolist(), name


def test_results_files_from_before_the_new_columns_still_read(tmp_path: Path) -> None:
    n = 2
    cols = unsent_records(np.arange(n), np.zeros(n), np.zeros(n), np.zeros(n, np.uint8), ["x"] * n)
    batch = records_to_batch(cols, {"input_len": np.full(n, 3)}, ["http://x/v1/completions"])
    old = pa.Table.from_batches([batch]).drop_columns(
        [
            "first_answer_ns",
            "last_reasoning_ns",
            "reasoning_chunks",
            "reasoning_tokens",
            "cached_tokens",
            "usage_ignored",
        ]
    )
    path = tmp_path / "old.parquet"
    pq.write_table(old, path)
    table, _ = read_requests(path)
    back, _ = records_from_table(table)
    assert back["first_answer_ns"].tolist() == [-1, -1]
    assert back["reasoning_chunks"].tolist() == [0, 0]
    assert back["cached_tokens"].tolist() == [-1, -1]


@pytest.mark.slow
def test_reasoning_metrics_against_the_mock_add_up_from_the_parquet(tmp_path: Path) -> None:
    """A chat blast against the mock streaming 75 % of each answer as reasoning: TTFO,
    reasoning tokens and share, reasoning time, phase ITL/TPOT and the ttfo goodput SLO
    are what the per-request file says, the summary shows them, and the report draws the
    reasoning panel."""
    from conftest import invoke
    from fineserve.results import read_requests

    res, req = tmp_path / "r.json", tmp_path / "r.parquet"
    r = invoke(
        "blast", "--backend", "openai-chat", "--mock-reasoning-ratio", "0.75",
        "--num-prompts", "24", "--request-rate", "40", "--random-output-len", "16",
        "--random-input-len", "8", "--goodput", "ttfo:90", "--disable-tqdm",
        "--percentile-metrics", "ttft,ttfo", "--metric-percentiles", "50,99",
        "--output-file", str(res), "--save-requests", str(req),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "Reasoning and answer" in r.output and "Reasoning share of output (%):" in r.output
    m = json.loads(res.read_text())
    t, _ = read_requests(req)
    col = {c: t[c].to_numpy() for c in t.column_names if c not in ("chunk_ns",)}
    ok = t["error_kind"].to_numpy(zero_copy_only=False) == "ok"
    assert ok.all()
    assert m["total_reasoning_tokens"] == 24 * 12 == col["reasoning_tokens"].sum()
    assert m["reasoning_token_share"] == pytest.approx(0.75)
    ttfo = (col["first_answer_ns"] - col["sent_ns"]) / 1e6
    assert m["mean_ttfo_ms"] == pytest.approx(ttfo.mean(), rel=1e-9)
    assert m["p50_ttfo_ms"] == pytest.approx(np.percentile(ttfo, 50), rel=0.01)
    assert m["mean_ttfo_ms"] > m["mean_ttft_ms"] + 40  # 12 reasoning tokens at 5 ms first
    rtime = (col["last_reasoning_ns"] - col["first_token_ns"]) / 1e6
    assert m["mean_reasoning_time_ms"] == pytest.approx(rtime.mean(), rel=1e-9)
    chunks = t["chunk_ns"].to_pylist()
    r_gaps, a_gaps = [], []
    for c, last in zip(chunks, col["last_reasoning_ns"]):
        for a, b in zip(c, c[1:]):
            (r_gaps if b <= last else a_gaps).append(b - a)
    assert m["mean_reasoning_itl_ms"] == pytest.approx(np.mean(r_gaps) / 1e6, rel=1e-9)
    assert m["mean_answer_itl_ms"] == pytest.approx(np.mean(a_gaps) / 1e6, rel=1e-9)
    assert len(r_gaps) == 24 * 11 and len(a_gaps) == 24 * 4
    tpot = (col["done_ns"] - col["first_answer_ns"]) / 3 / 1e6
    assert m["mean_answer_tpot_ms"] == pytest.approx(tpot.mean(), rel=1e-9)
    assert m["good_requests"] == int((ttfo <= 90).sum())
    assert m["prefix_hit_rate_measured"] is None  # nothing reported cached tokens
    rep = tmp_path / "rep.html"
    r = invoke("report", str(req), "-o", str(rep))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep_reasoning.png").is_file() and 'id="reasoning"' in rep.read_text()


@pytest.mark.slow
def test_servegen_reasoning_share_is_driven_and_compared(tmp_path: Path) -> None:
    """The schedule's reason_ratio reaches the embedded mock per request, and the summary
    compares the achieved reasoning share with the scheduled one."""
    from conftest import invoke

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "chunk-0-trace.csv").write_text("0,20,1,Gamma,1,0.05\n")
    (pool / "chunk-0-dataset.json").write_text(
        json.dumps(
            {
                "0": {
                    "input_tokens": "{8: 1.0}",
                    "output_tokens": "{20: 1.0}",
                    "reason_ratio": "{0.0: 0.5, 0.5: 0.25, 0.9: 0.25}",
                }
            }
        )
    )
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--backend", "openai-chat", "--mode", "servegen", "--servegen-pool",
        str(pool), "--duration", "3", "--disable-tqdm", "--mock-itl-ms", "1",
        "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(res.read_text())
    assert m["completed"] > 30
    assert m["reasoning_token_share_scheduled"] is not None
    # Rounding of ratio x 20 tokens per request aside, the mock did what was scheduled.
    assert m["reasoning_token_share"] == pytest.approx(
        m["reasoning_token_share_scheduled"], abs=0.02
    )
    assert 0.2 < m["reasoning_token_share"] < 0.45
    assert "(scheduled " in r.output


def test_measured_prefix_hits_come_from_the_server_and_are_shown_per_endpoint(
    tmp_path: Path,
) -> None:
    """A hash_ids trace against two embedded-style mocks: the requests tell the mock their
    blocks, the mock reports cached tokens, and the measured hit rate sits beside the
    theoretical one, overall and per endpoint."""
    from conftest import invoke
    from fineserve.mock import MockServer

    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": i * 20, "input_length": 64, "output_length": 2, "hash_ids": [1, 2, 3 + i]}
        for i in range(30)
    ]
    trace.write_text("".join(json.dumps(x) + "\n" for x in rows))
    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--mode", "replay", "--trace", str(trace), "--prefix-block-size", "16",
        "--disable-tqdm", "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(res.read_text())
    # Blocks 1 and 2 (32 of 64 tokens) repeat after the first request.
    assert m["prefix_hit_rate_theoretical"] == pytest.approx(29 * 32 / (30 * 64))
    assert m["prefix_hit_rate_measured"] == pytest.approx(
        m["prefix_hit_rate_theoretical"], rel=0.05
    )
    assert "Prefix-cache hit rate, measured (%):" in r.output
    with MockServer(ttft_ms=1, itl_ms=1) as a, MockServer(ttft_ms=1, itl_ms=1) as b:
        r = invoke(
            "blast", "--mode", "replay", "--trace", str(trace), "--prefix-block-size", "16",
            "--disable-tqdm", "--base-url", a.base_url, "--base-url", b.base_url,
            "--output-file", str(res),
        )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(res.read_text())
    # Not the embedded mock: fineserve does not tell these servers the blocks, so no
    # cached tokens are reported and nothing is claimed.
    assert m["prefix_hit_rate_measured"] is None


@pytest.mark.skipif(sys.platform != "linux", reason="SO_TIMESTAMPNS is Linux's")
def test_token_times_are_the_kernels_receive_stamps(tmp_path: Path) -> None:
    """On Linux every token event is timed by the kernel's receive stamp of its bytes,
    and the result says so."""
    from conftest import invoke

    res = tmp_path / "r.json"
    r = invoke(
        "blast", "--num-prompts", "40", "--request-rate", "100", "--random-input-len", "8",
        "--random-output-len", "6", "--disable-tqdm", "--output-file", str(res),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(res.read_text())
    assert out["token_time_source"] == "kernel"
    assert out["kernel_stamped_token_fraction"] == 1.0
    assert "Token times stamped by:" in r.output
