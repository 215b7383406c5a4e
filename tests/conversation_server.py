"""An independent conversation server for the live-history tests: chat completions,
Responses (with stored responses for ``previous_response_id``) and Anthropic Messages on
Python's ``http.server`` (nothing of fineserve's). Every reply's text is unique, so a
later turn's history shows which replies it carries; each request is logged with the
instants its body arrived and its reply ended, on one monotonic clock."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stdlib_server import JsonSseHandler, _TlsServer


@dataclass
class Exchange:
    """One request and what the server answered."""

    n: int
    path: str
    body: dict[str, Any]
    received_ns: int
    headers: dict[str, str] = field(default_factory=dict)
    ended_ns: int = -1
    text: str = ""
    #: (id, name, arguments) when the reply was a tool call.
    tool: tuple[str, str, str] | None = None
    response_id: str = ""
    #: Responses: the conversation the server holds for this request (stored history
    #: followed by its input), and the stored response it continued.
    history: list[Any] = field(default_factory=list)
    previous: str | None = None


#: What the server answers to a request: "text", "tool", "tool-bare" (a tool call without
#: arguments) or "empty" (a stream without any token).
Policy = Callable[[Exchange], str]


def tool_on_first_turn(ex: Exchange) -> str:
    """A tool call for each conversation's first request, text afterwards."""
    items = ex.body.get("messages") or ex.body.get("input") or []
    first = isinstance(items, list) and len(items) == 1 and not ex.previous
    return "tool" if first else "text"


class _Handler(JsonSseHandler):
    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": "conv-model"}]})

    def do_POST(self) -> None:
        owner: ConversationServer = self.server.owner  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ex = owner.begin(self.path, body, {k.lower(): v for k, v in self.headers.items()})
        if ex is None:
            self._json(400, {"error": {"message": "previous response not found"}})
            return
        kind = owner.policy(ex)
        keys = ("max_tokens", "max_completion_tokens", "max_output_tokens")
        n_tokens = int(next((body[k] for k in keys if body.get(k)), 4))
        words = [f"r{ex.n}w{i}" for i in range(max(n_tokens, 1))]
        if kind == "empty":
            words = []
        if kind.startswith("tool"):
            args = "" if kind == "tool-bare" else json.dumps({"q": ex.n})
            ex.tool = (f"call_{ex.n}", "lookup", args)
        else:
            ex.text = " ".join(words)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        events = {
            "/v1/chat/completions": self._chat,
            "/v1/responses": self._responses,
            "/v1/messages": self._messages,
        }[self.path](ex, words)
        for k, (ev_type, payload) in enumerate(events):
            if k == len(events) - 1:
                # The reply ends with this event: stamped before it can reach the client.
                owner.end(ex)
            line = b"" if ev_type is None else b"event: " + ev_type.encode() + b"\n"
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self._chunk(line + b"data: " + data.encode() + b"\n\n")
            if owner.token_gap_s:
                time.sleep(owner.token_gap_s)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chat(self, ex: Exchange, words: list[str]) -> list[tuple[str | None, Any]]:
        out: list[tuple[str | None, Any]] = []
        if ex.tool is not None:
            cid, name, args = ex.tool
            call = {"index": 0, "id": cid, "type": "function", "function": {"name": name}}
            out.append((None, {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}))
            if args:
                half = len(args) // 2
                for part in (args[:half], args[half:]):
                    frag = {"index": 0, "function": {"arguments": part}}
                    out.append((None, {"choices": [{"delta": {"tool_calls": [frag]}}]}))
        else:
            for i, w in enumerate(words):
                out.append((None, {"choices": [{"delta": {"content": (" " if i else "") + w}}]}))
        out.append((None, {"choices": [{"delta": {}, "finish_reason": "stop"}]}))
        out.append((None, "[DONE]"))
        return out

    def _responses(self, ex: Exchange, words: list[str]) -> list[tuple[str | None, Any]]:
        rid = ex.response_id
        out: list[tuple[str | None, Any]] = [
            ("response.created", {"type": "response.created", "response": {"id": rid}})
        ]
        if ex.tool is not None:
            cid, name, args = ex.tool
            item = {"type": "function_call", "call_id": cid, "name": name, "arguments": ""}
            out.append(
                (
                    "response.output_item.added",
                    {"type": "response.output_item.added", "output_index": 0, "item": item},
                )
            )
            out.append(
                (
                    "response.function_call_arguments.delta",
                    {
                        "type": "response.function_call_arguments.delta",
                        "output_index": 0,
                        "delta": args,
                    },
                )
            )
        for i, w in enumerate(words if ex.tool is None else []):
            d = {"type": "response.output_text.delta", "delta": (" " if i else "") + w}
            out.append(("response.output_text.delta", d))
        done = {"type": "response.completed", "response": {"id": rid, "status": "completed"}}
        out.append(("response.completed", done))
        return out

    def _messages(self, ex: Exchange, words: list[str]) -> list[tuple[str | None, Any]]:
        out: list[tuple[str | None, Any]] = [
            ("message_start", {"type": "message_start", "message": {"id": f"msg_{ex.n}"}})
        ]
        if ex.tool is not None:
            cid, name, args = ex.tool
            block = {"type": "tool_use", "id": cid, "name": name, "input": {}}
            out.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": block},
                )
            )
            delta = {"type": "input_json_delta", "partial_json": args}
            out.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            )
        else:
            start = {"type": "text", "text": ""}
            out.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": start},
                )
            )
            for i, w in enumerate(words):
                delta = {"type": "text_delta", "text": (" " if i else "") + w}
                out.append(
                    (
                        "content_block_delta",
                        {"type": "content_block_delta", "index": 0, "delta": delta},
                    )
                )
        stop = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
        out.append(("message_delta", stop))
        out.append(("message_stop", {"type": "message_stop"}))
        return out


class ConversationServer:
    def __init__(self, policy: Policy = lambda ex: "text", *, token_gap_s: float = 0.0) -> None:
        self.policy = policy
        self.token_gap_s = token_gap_s
        self.lock = threading.Lock()
        self.exchanges: list[Exchange] = []
        #: Responses the server keeps: id → the conversation so far, its reply included.
        self.stored: dict[str, list[Any]] = {}
        self.httpd = _TlsServer(("127.0.0.1", 0), _Handler)  # plain HTTP: no ssl_context
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def begin(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Exchange | None:
        now = time.monotonic_ns()
        with self.lock:
            ex = Exchange(len(self.exchanges), path, body, now, headers)
            ex.response_id = f"resp_{ex.n}"
            previous = body.get("previous_response_id")
            if previous is not None:
                if previous not in self.stored:
                    return None
                ex.previous = previous
                ex.history = list(self.stored[previous])
            if isinstance(body.get("input"), list):
                ex.history += body["input"]
            self.exchanges.append(ex)
            return ex

    def end(self, ex: Exchange) -> None:
        now = time.monotonic_ns()
        with self.lock:
            ex.ended_ns = now
            if ex.path == "/v1/responses":
                reply: list[Any] = []
                if ex.tool is not None:
                    cid, name, args = ex.tool
                    reply.append(
                        {"type": "function_call", "call_id": cid, "name": name, "arguments": args}
                    )
                else:
                    reply.append({"role": "assistant", "content": ex.text})
                self.stored[ex.response_id] = ex.history + reply

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def posts(self) -> list[Exchange]:
        with self.lock:
            return list(self.exchanges)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
