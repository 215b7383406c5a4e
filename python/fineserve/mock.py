"""The embedded mock server as a context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from . import _engine


class MockServer:
    """An OpenAI-compatible mock on its own threads::

        with MockServer(ttft_ms=20, itl_ms=5) as mock:
            ...  # send to mock.base_url

    Streams exactly ``max_tokens`` tokens (as with ``ignore_eos``), TTFT = ``ttft_ms`` +
    ``ttft_per_prompt_token_ms`` × prompt words, tokens every ``itl_ms`` (± ``itl_jitter_ms``)
    on absolute deadlines with tokio's ~1 ms timer granularity. ``max_concurrency`` > 0
    serves that many generations at once and queues the rest (a server at capacity).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        try:
            self._server = _engine.MockServer(host, port, **options)
        except _engine.EngineError as e:
            from .errors import FineserveError

            raise FineserveError(f"mock server: {e}") from None

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stats(self) -> dict[str, int]:
        return self._server.stats()

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> MockServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
