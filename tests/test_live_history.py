"""Live conversation history (issue 25): later turns carry the replies their earlier turns
actually received, checked against an independent server (``conversation_server``) on
the chat, Responses (client- and server-side history) and Anthropic Messages APIs, with
tool calls, tool latency and the bad inputs the issue names."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import invoke
from conversation_server import ConversationServer, Exchange, tool_on_first_turn
from fineserve.errors import FineserveError
from fineserve.results import read_requests
from fineserve.traces import TraceOptions, load_trace

CONVERSATIONS, TURNS = 5, 3


def bailian(
    path: Path, conversations: int = CONVERSATIONS, turns: int = TURNS
) -> list[dict[str, Any]]:
    """A Qwen-Bailian-shaped trace: conversations 150 ms apart, turns 1 s apart (trace
    time), each turn's input the whole conversation so far."""
    rows, cid = [], 100
    for c in range(conversations):
        parent = -1
        for t in range(turns):
            rows.append(
                {"chat_id": cid, "parent_chat_id": parent, "turn": t + 1,
                 "timestamp": 150 * c + 1000 * t, "input_length": 30 + 40 * t,
                 "output_length": 6, "type": "text"}
            )  # fmt: skip
            parent, cid = cid, cid + 1
    rows.sort(key=lambda r: r["timestamp"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def blast(*args: str, env: dict[str, str] | None = None) -> Any:
    r = invoke("blast", "--disable-tqdm", "--warmup-requests", "0", *args, env=env)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture
def server() -> Iterator[ConversationServer]:
    s = ConversationServer()
    yield s
    s.close()


def _key(items: list[Any]) -> str:
    return json.dumps(items, sort_keys=True)


def _parents(posts: list[Exchange], field: str, tail: int) -> dict[int, Exchange]:
    """Each later request's previous turn: the request whose whole ``field`` (messages or
    input) is this one's without its last ``tail`` items."""
    by_items = {_key(p.body[field]): p for p in posts}
    out = {}
    for p in posts:
        items = p.body[field]
        if len(items) > tail:
            parent = by_items.get(_key(items[:-tail]))
            assert parent is not None, f"request {p.n}: its history is no earlier request's"
            out[p.n] = parent
    return out


def test_chat_turns_carry_the_replies_they_actually_received(
    tmp_path: Path, server: ConversationServer
) -> None:
    """The issue's "done when": every later turn's assistant messages equal the replies
    its previous turns received, and no turn leaves before its previous reply ended."""
    trace = tmp_path / "bailian.jsonl"
    bailian(trace)
    req = tmp_path / "r.parquet"
    r = blast(
        "--base-url", server.base_url, "--backend", "openai-chat", "--mode", "replay",
        "--trace", str(trace), "--time-scale", "5", "--conversation-history", "live",
        "--save-requests", str(req),
    )  # fmt: skip
    assert "conversation history: live" in r.output
    posts = server.posts()
    assert len(posts) == CONVERSATIONS * TURNS
    parents = _parents(posts, "messages", 2)
    assert len(parents) == CONVERSATIONS * (TURNS - 1)
    for n, parent in parents.items():
        follower = posts[n]
        said, new = follower.body["messages"][-2:]
        assert said == {"role": "assistant", "content": parent.text}
        assert parent.text.startswith(f"r{parent.n}w0")  # a reply only that request got
        assert new["role"] == "user" and new["content"]
        assert follower.received_ns >= parent.ended_ns
    # Whole conversations: turn 3 carries turn 1's and turn 2's replies.
    longest = max(posts, key=lambda p: len(p.body["messages"]))
    assert len(longest.body["messages"]) == 2 * TURNS - 1
    # Each turn's new text is sized so the whole prompt is the trace's input length
    # (synthetic prompts are a word per token; the replies are as long as the trace says).
    for p in posts:
        turn = (len(p.body["messages"]) + 1) // 2
        words = sum(len(m["content"].split()) for m in p.body["messages"])
        assert words == 30 + 40 * (turn - 1), (p.n, turn, words)
    table, _ = read_requests(req)
    kinds = table["history_kind"].to_pylist()
    assert kinds.count(1) == CONVERSATIONS * (TURNS - 1) and kinds.count(0) == CONVERSATIONS
    assert all(k == "ok" for k in table["error_kind"].to_pylist())
    history = np.asarray(table["history_bytes"].to_pylist())
    assert np.all(history[np.asarray(kinds) == 1] > 0)


def test_tool_calls_are_answered_after_the_tool_latency(
    tmp_path: Path,
) -> None:
    server = ConversationServer(tool_on_first_turn)
    try:
        trace = tmp_path / "bailian.jsonl"
        bailian(trace)
        res = tmp_path / "res.json"
        blast(
            "--base-url", server.base_url, "--backend", "openai-chat", "--mode", "replay",
            "--trace", str(trace), "--think-time", "fixed:0", "--tool-latency", "fixed:0.3",
            "--output-file", str(res),
        )  # fmt: skip
        posts = server.posts()
    finally:
        server.close()
    parents = _parents(posts, "messages", 2)
    tool_turns = 0
    for n, parent in parents.items():
        follower = posts[n]
        call, result = follower.body["messages"][-2:]
        waited_s = (follower.received_ns - parent.ended_ns) / 1e9
        if parent.tool is None:
            assert call == {"role": "assistant", "content": parent.text}
            assert result["role"] == "user"
            assert 0 <= waited_s < 0.25  # think time 0
            continue
        tool_turns += 1
        cid, name, args = parent.tool
        assert call == {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            ],
        }
        assert result["role"] == "tool" and result["tool_call_id"] == cid and result["content"]
        assert 0.3 <= waited_s < 0.55  # the tool latency, not the think time
    assert tool_turns == CONVERSATIONS
    m = json.loads(res.read_text())
    assert m["live_history_turns"] == {
        "after_text_reply": CONVERSATIONS,
        "tool_result_after_tool_call": CONVERSATIONS,
    }
    # Per turn: TTFT and measured cache hits by turn number.
    assert sorted(m["breakdown"]["turn"]) == ["1", "2", "3"]
    assert all(g["completed"] == CONVERSATIONS for g in m["breakdown"]["turn"].values())


@pytest.mark.parametrize("history", ["client", "server"])
def test_responses_api_keeps_the_conversation_client_or_server_side(
    tmp_path: Path, history: str
) -> None:
    server = ConversationServer(tool_on_first_turn)
    try:
        trace = tmp_path / "bailian.jsonl"
        bailian(trace)
        blast(
            "--base-url", server.base_url, "--backend", "openai-responses", "--mode", "replay",
            "--trace", str(trace), "--time-scale", "5", "--responses-history", history,
        )  # fmt: skip
        posts = server.posts()
        stored = dict(server.stored)
    finally:
        server.close()
    assert len(posts) == CONVERSATIONS * TURNS
    by_id = {p.response_id: p for p in posts}
    followers = [p for p in posts if len(p.history) > 1]
    assert len(followers) == CONVERSATIONS * (TURNS - 1)
    for follower in followers:
        own = follower.body["input"][-1]
        if history == "server":
            # Only the new item goes; the server holds the rest.
            assert len(follower.body["input"]) == 1 and follower.body.get("store") is True
            parent = by_id[follower.previous or ""]
            assert follower.history[:-1] == stored[parent.response_id]
        else:
            assert "previous_response_id" not in follower.body
            parent = next(p for p in posts if p.history == follower.history[:-2])
            said = follower.history[-2]
            if parent.tool is None:
                assert said == {"role": "assistant", "content": parent.text}
            else:
                cid, name, args = parent.tool
                assert said == {
                    "type": "function_call", "call_id": cid, "name": name, "arguments": args
                }  # fmt: skip
        if parent.tool is not None:
            assert own["type"] == "function_call_output"
            assert own["call_id"] == parent.tool[0] and own["output"]
        else:
            assert own["role"] == "user"
        assert follower.received_ns >= parent.ended_ns


def test_anthropic_messages_carry_text_and_tool_use_history(tmp_path: Path) -> None:
    server = ConversationServer(tool_on_first_turn)
    try:
        trace = tmp_path / "bailian.jsonl"
        bailian(trace)
        res, req = tmp_path / "res.json", tmp_path / "r.parquet"
        r = blast(
            "--base-url", server.base_url, "--backend", "anthropic-messages", "--mode",
            "replay", "--trace", str(trace), "--time-scale", "5", "--model", "conv-model",
            "--output-file", str(res), "--save-requests", str(req),
            env={"ANTHROPIC_API_KEY": "sk-ant-test-secret", "OPENAI_API_KEY": ""},
        )  # fmt: skip
        posts = server.posts()
    finally:
        server.close()
    # The key reaches the server and nothing else.
    for text in (r.output, res.read_text(), req.read_bytes().decode("latin-1")):
        assert "sk-ant-test-secret" not in text
    assert all(p.path == "/v1/messages" for p in posts)
    assert all(p.headers.get("x-api-key") == "sk-ant-test-secret" for p in posts)
    assert all(p.headers.get("anthropic-version") == "2023-06-01" for p in posts)
    assert all("authorization" not in p.headers for p in posts)
    assert all(p.body["max_tokens"] == 6 and "stream_options" not in p.body for p in posts)
    parents = _parents(posts, "messages", 2)
    assert len(parents) == CONVERSATIONS * (TURNS - 1)
    for n, parent in parents.items():
        said, own = posts[n].body["messages"][-2:]
        if parent.tool is None:
            assert said == {"role": "assistant", "content": parent.text}
            assert own["role"] == "user" and isinstance(own["content"], str)
        else:
            cid, name, _ = parent.tool
            use = {"type": "tool_use", "id": cid, "name": name, "input": {"q": parent.n}}
            assert said == {"role": "assistant", "content": [use]}
            (block,) = own["content"]
            assert own["role"] == "user" and block["type"] == "tool_result"
            assert block["tool_use_id"] == cid and block["content"]


def test_bad_replies_and_links_are_counted_with_reasons(tmp_path: Path) -> None:
    """An empty reply fails its turn (its followers are not sent, with the reason); a
    tool call without arguments is sent back as {} and counted; a parent that points
    nowhere, at the turn itself or forward is reported."""

    def policy(ex: Exchange) -> str:
        first = len(ex.body["messages"]) == 1
        if first and ex.n == 0:
            return "empty"
        return "tool-bare" if first else "text"

    server = ConversationServer(policy)
    trace = tmp_path / "bailian.jsonl"
    rows = bailian(trace)
    # Three more rows: a parent that is not in the trace, one that is the row itself, and
    # one that comes later in the trace.
    rows += [
        {"chat_id": 900, "parent_chat_id": 555, "turn": 2, "timestamp": 5000,
         "input_length": 20, "output_length": 4},
        {"chat_id": 901, "parent_chat_id": 901, "turn": 2, "timestamp": 5100,
         "input_length": 20, "output_length": 4},
        {"chat_id": 902, "parent_chat_id": 903, "turn": 2, "timestamp": 5200,
         "input_length": 20, "output_length": 4},
        {"chat_id": 903, "parent_chat_id": -1, "turn": 1, "timestamp": 5300,
         "input_length": 20, "output_length": 4},
    ]  # fmt: skip
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    req, res = tmp_path / "r.parquet", tmp_path / "res.json"
    try:
        r = blast(
            "--base-url", server.base_url, "--backend", "openai-chat", "--mode", "replay",
            "--trace", str(trace), "--time-scale", "5", "--save-requests", str(req),
            "--output-file", str(res),
        )  # fmt: skip
        posts = server.posts()
    finally:
        server.close()
    assert "1 turns whose previous turn is not in the trace" in r.output
    assert "2 turns whose previous turn is themselves or comes after them" in r.output
    table, _ = read_requests(req)
    kind = table["error_kind"].to_pylist()
    msg = table["error_message"].to_pylist()
    first = rows.index(min(rows, key=lambda x: x["timestamp"]))
    assert kind[first] == "invalid_response" and "without any token" in msg[first]
    unsent = [i for i, k in enumerate(kind) if k == "not_sent"]
    assert len(unsent) == TURNS - 1  # the failed conversation's later turns
    assert all("previous turn of its conversation failed" in msg[i] for i in unsent)
    m = json.loads(res.read_text())
    assert m["scheduled"] == len(rows) and m["not_sent"] == TURNS - 1
    assert m["live_history_turns"]["after_tool_call_without_arguments"] == CONVERSATIONS - 1
    bare = [p for p in posts if len(p.body["messages"]) == 3]
    assert bare and all(
        p.body["messages"][1]["tool_calls"][0]["function"]["arguments"] == "{}" for p in bare
    )


def test_synthetic_history_keeps_stand_in_answers(
    tmp_path: Path, server: ConversationServer
) -> None:
    trace = tmp_path / "bailian.jsonl"
    bailian(trace, conversations=2)
    r = blast(
        "--base-url", server.base_url, "--backend", "openai-chat", "--mode", "replay",
        "--trace", str(trace), "--time-scale", "5", "--conversation-history", "synthetic",
        "--tool-latency", "fixed:1",
    )  # fmt: skip
    assert "conversation history: synthetic" in r.output
    assert "--tool-latency has no effect" in r.output
    replies = {p.text for p in server.posts()}
    later = [p for p in server.posts() if len(p.body["messages"]) > 1]
    assert len(later) == 2 * (TURNS - 1)
    for p in later:
        assert p.body["messages"][-2]["role"] == "assistant"
        assert p.body["messages"][-2]["content"] not in replies


def toolagent(path: Path) -> None:
    """A Mooncake toolagent-shaped trace (no conversation ids): two agents whose requests
    each extend the previous one's full blocks with a new partial block; plus one
    unrelated request."""
    rows = []
    for a, base in enumerate((1000, 2000)):
        blocks = [base, base + 1]
        for step in range(3):
            rows.append({"timestamp": 100 * a + 800 * step, "input_length": 512 * len(blocks),
                         "output_length": 5, "hash_ids": list(blocks)})  # fmt: skip
            blocks = [*blocks[:-1], base + 10 * (step + 1), base + 10 * (step + 1) + 1]
    rows.append({"timestamp": 50, "input_length": 100, "output_length": 5, "hash_ids": [7]})
    rows.sort(key=lambda r: r["timestamp"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_agent_traces_link_turns_by_prompt_prefix_and_replay_live(tmp_path: Path) -> None:
    path = tmp_path / "toolagent.jsonl"
    toolagent(path)
    trace = load_trace(path, TraceOptions(infer_turns="hash-prefix"))
    parent = trace.extra["parent"]
    # Rows in time order: a0s0, unrelated, a1s0, a0s1, a1s1, a0s2, a1s2.
    assert parent.tolist() == [-1, -1, -1, 0, 2, 3, 4]
    assert trace.extra["turn"].tolist() == [1, 1, 1, 2, 2, 3, 3]
    assert any("4 of 7 requests extend" in n for n in trace.notes)
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,2\n")
    with pytest.raises(FineserveError, match="Mooncake-format"):
        load_trace(azure, TraceOptions(infer_turns="hash-prefix"))
    res = tmp_path / "res.json"
    r = blast(
        "--mode", "replay", "--trace", str(path), "--infer-turns", "hash-prefix",
        "--backend", "openai-chat", "--mock-tool-calls", "1", "--tool-latency", "fixed:0.05",
        "--time-scale", "4", "--output-file", str(res),
    )  # fmt: skip
    assert "4 of 7 requests extend" in r.output
    m = json.loads(res.read_text())
    assert m["completed"] == 7
    assert m["live_history_turns"] == {"tool_result_after_tool_call": 4}


def test_mock_serves_messages_and_server_side_responses(tmp_path: Path) -> None:
    trace = tmp_path / "bailian.jsonl"
    bailian(trace, conversations=3)
    for backend, extra in (
        ("anthropic-messages", ("--mock-reasoning-ratio", "0.5")),
        ("openai-responses", ("--responses-history", "server")),
    ):
        res = tmp_path / f"{backend}.json"
        blast(
            "--mode", "replay", "--trace", str(trace), "--time-scale", "5", "--backend",
            backend, "--mock-tool-calls", "0.5", "--output-file", str(res), *extra,
        )  # fmt: skip
        m = json.loads(res.read_text())
        assert m["completed"] == 9 and m["failed"] == 0, backend
        assert sum(m["live_history_turns"].values()) == 6
        if backend == "anthropic-messages":
            assert m["total_reasoning_tokens"] > 0


def test_mock_refuses_an_unknown_previous_response() -> None:
    from fineserve import MockServer

    mock = MockServer()
    try:
        body = {
            "model": "m",
            "input": "hi",
            "max_output_tokens": 2,
            "previous_response_id": "resp_999",
        }
        req = urllib.request.Request(
            mock.base_url + "/v1/responses", data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 400 and b"not found" in e.value.read()
        # A stored one is accepted, and its conversation counts in the prompt.
        first = dict(body, previous_response_id=None, stream=False)
        req = urllib.request.Request(
            mock.base_url + "/v1/responses", data=json.dumps(first).encode(),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        rid = json.loads(urllib.request.urlopen(req, timeout=5).read())["id"]
        second = dict(first, previous_response_id=rid)
        req = urllib.request.Request(
            mock.base_url + "/v1/responses", data=json.dumps(second).encode(),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        usage = json.loads(urllib.request.urlopen(req, timeout=5).read())["usage"]
        assert usage["input_tokens"] == 1 + (1 + 2)
    finally:
        mock.stop()


@pytest.mark.parametrize("backend", ["openai-chat", "openai-responses", "anthropic-messages"])
def test_non_streamed_replies_carry_history_too(tmp_path: Path, backend: str) -> None:
    """Whole (non-streamed) bodies are read for the reply as streams are: the mock's tool
    calls (every other answer) come back as tool results, with their arguments."""
    trace = tmp_path / "bailian.jsonl"
    bailian(trace, conversations=4)
    res = tmp_path / "res.json"
    blast(
        "--mode", "replay", "--trace", str(trace), "--time-scale", "5", "--backend", backend,
        "--mock-tool-calls", "0.5", "--disable-stream", "--output-file", str(res),
    )  # fmt: skip
    m = json.loads(res.read_text())
    assert m["completed"] == 12 and m["failed"] == 0
    kinds = m["live_history_turns"]
    assert sum(kinds.values()) == 8
    assert set(kinds) <= {"after_text_reply", "tool_result_after_tool_call"}
    assert kinds.get("tool_result_after_tool_call", 0) > 0


def test_a_history_longer_than_the_trace_says_so(tmp_path: Path) -> None:
    """A turn whose trace input is shorter than its previous turn's input and output: it
    carries the history and one token of new text, and the run says how many did."""
    rows = [
        {"chat_id": 1, "parent_chat_id": -1, "turn": 1, "timestamp": 0,
         "input_length": 100, "output_length": 50},
        {"chat_id": 2, "parent_chat_id": 1, "turn": 2, "timestamp": 500,
         "input_length": 120, "output_length": 5},
        {"chat_id": 3, "parent_chat_id": 2, "turn": 3, "timestamp": 1000,
         "input_length": 400, "output_length": 5},
    ]  # fmt: skip
    trace = tmp_path / "short.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = tmp_path / "res.json"
    r = blast(
        "--mode", "replay", "--trace", str(trace), "--backend", "openai-chat",
        "--time-scale", "5", "--output-file", str(res),
    )  # fmt: skip
    assert "1 of 2 later turns had a history" in r.output
    m = json.loads(res.read_text())
    assert m["live_history_longer_than_trace"] == 1 and m["completed"] == 3
