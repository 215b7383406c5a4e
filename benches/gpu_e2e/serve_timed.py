"""`transformers serve` with a server-side timing hook, for the agreement check.

    python serve_timed.py TIMING.jsonl -- serve MODEL_DIR --continuous-batching --port 8000

Wraps the ASGI app that `transformers serve` hands to uvicorn with a middleware that logs,
per POST request, as one JSON line: the request's fineserve tag (the ``#<hex index>:`` its
prompt starts with), and the server's own wall-clock times of the request's arrival, the
first response bytes, the first bytes carrying generated text, and the end of the
response. The hook sits outside transformers' code (uvicorn.Config is patched), so it
measures what the server process sees of each request.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

TAG = re.compile(rb'"(?:prompt|content)":\s*"(?:[^"#]{0,200})?#([0-9a-f]+):')
TEXT = re.compile(rb'"(?:text|content)":\s*"[^"]')


class Timing:
    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.out = open(path, "a", buffering=1)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        rec: dict[str, Any] = {"path": scope.get("path"), "arrive_ns": time.time_ns()}
        body = bytearray()

        async def recv() -> Any:
            m = await receive()
            if m.get("type") == "http.request":
                body.extend(m.get("body", b""))
            return m

        async def snd(m: Any) -> None:
            if m.get("type") == "http.response.start":
                rec["status"] = m.get("status")
            elif m.get("type") == "http.response.body":
                now = time.time_ns()
                chunk = m.get("body", b"")
                if chunk and "first_byte_ns" not in rec:
                    rec["first_byte_ns"] = now
                if chunk and "first_token_ns" not in rec and TEXT.search(chunk):
                    rec["first_token_ns"] = now
                if not m.get("more_body", False):
                    rec["end_ns"] = now
                    tag = TAG.search(bytes(body))
                    rec["tag"] = int(tag.group(1), 16) if tag else None
                    self.out.write(json.dumps(rec) + "\n")
            await send(m)

        await self.app(scope, recv, snd)


def main() -> None:
    path = sys.argv[1]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    import uvicorn

    original = uvicorn.Config.__init__

    def patched(self: Any, app: Any, *a: Any, **kw: Any) -> None:
        original(self, Timing(app, path), *a, **kw)

    uvicorn.Config.__init__ = patched  # type: ignore[method-assign]
    from transformers.cli.transformers import main as transformers_main

    sys.argv = ["transformers", *argv]
    transformers_main()


if __name__ == "__main__":
    main()
