"""The embedded mock server as a context manager."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _engine
from .errors import FineserveError

#: What each fault does (``--fault KIND=RATIO``); names are ``_engine.MOCK_FAULTS``.
FAULT_HELP = {
    "http_500": "HTTP 500 with a JSON error body",
    "http_429": "HTTP 429 with Retry-After",
    "reset": "connection reset (RST) after half the tokens",
    "malformed_sse": "events without SSE framing (bare JSON lines)",
    "malformed_json": "the middle token's event carries truncated JSON",
    "stall": "no bytes for the stall time after half the tokens",
    "no_done": "stream ends without finish_reason and without [DONE]",
    "slow_first_byte": "response headers only after the first-byte delay",
    "close_keepalive": "connection closed after the response, unannounced",
    "endless": "the response never ends (tokens as fast as they are read)",
}


def parse_faults(specs: Iterable[str], option: str = "--fault") -> list[tuple[str, float]]:
    """``KIND=RATIO`` items (repeated, or comma-separated) as ``[(kind, ratio)]``."""
    faults: list[tuple[str, float]] = []
    for spec in specs:
        for item in filter(None, (x.strip() for x in spec.split(","))):
            kind, sep, ratio = item.partition("=")
            if kind not in FAULT_HELP:
                raise FineserveError(
                    f"{option} {item!r}: unknown fault; known: {', '.join(FAULT_HELP)}"
                )
            try:
                value = float(ratio) if sep else float("nan")
            except ValueError:
                value = float("nan")
            if not 0.0 <= value <= 1.0:
                raise FineserveError(
                    f"{option} {item!r}: expected {kind}=RATIO with RATIO in [0, 1]"
                )
            faults.append((kind, value))
    total = sum(r for _, r in faults)
    if total > 1.0 + 1e-9:
        raise FineserveError(f"{option}: fault ratios add up to {total:g}, more than 1")
    return faults


class MockServer:
    """An OpenAI-compatible mock on its own threads::

        with MockServer(ttft_ms=20, itl_ms=5) as mock:
            ...  # send to mock.base_url

    Routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses`` (Responses
    API events, ending in ``response.completed`` with usage), ``/v1/models``, ``/health``.
    Streams exactly ``max_tokens`` tokens (``max_completion_tokens``,
    ``max_output_tokens``; as with ``ignore_eos``), TTFT = ``ttft_ms`` +
    ``ttft_per_prompt_token_ms`` × prompt words, tokens every ``itl_ms`` (± ``itl_jitter_ms``)
    on absolute deadlines with tokio's ~1 ms timer granularity. ``max_concurrency`` > 0
    serves that many generations at once and queues the rest (a server at capacity).
    ``faults=[("http_500", 0.05), …]`` makes that fraction of completion requests misbehave
    (see :data:`FAULT_HELP`), with ``stall_ms``, ``first_byte_delay_ms``, ``retry_after_s``.

    A reasoning model's answers (chat and Responses routes; ``/v1/completions`` stays plain
    text):

    - ``reasoning_ratio`` (0–1, default 0): the first round(R·N) of N tokens stream as
      reasoning, the rest as content, and usage reports
      ``completion_tokens_details.reasoning_tokens``;
    - ``reasoning_field``: ``"reasoning"`` (vLLM ≥ 0.16, default) or ``"reasoning_content"``
      (DeepSeek, older vLLM), the chat delta/message field that carries it;
    - ``tool_calls`` (0–1, default 0): that fraction of requests answer with
      ``delta.tool_calls`` fragments (Responses: ``response.function_call_arguments.delta``)
      instead of content;
    - ``cache_blocks`` (default 100 000): capacity of the prefix-block LRU behind
      ``prompt_tokens_details.cached_tokens`` (0: nothing is ever cached).

    Body fields for the mock alone (a real server ignores or rejects them):
    ``fineserve_reasoning_ratio`` (0–1) sets R for that request (a schedule's
    ``reason_ratio``); ``fineserve_hash_ids`` (list of ints) with ``fineserve_block_size``
    (tokens a block, default 512) name the prompt's prefix blocks, and usage then reports
    ``cached_tokens`` = the tokens of the leading blocks the mock had seen, at most the
    prompt's. A malformed value is an HTTP 400.

    Chat requests' media count as prompt tokens (usage, and ``ttft_per_prompt_token_ms``):
    each ``data:`` image from its header's pixel size under Qwen2-VL's rule
    (``image_token_side`` 28; 32 for Qwen3-VL), each ``input_audio`` WAV at one token per
    40 ms; media given by URL are not fetched and count 0. Unreadable media are an HTTP 400.

    ``tls=True`` serves HTTPS with a certificate signed by a CA made at start
    (:attr:`ca_pem`, :attr:`ca_file`); :attr:`base_url` is then ``https://``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        try:
            self._server = _engine.MockServer(host, port, **options)
        except _engine.EngineError as e:
            raise FineserveError(f"mock server: {e}") from None
        self._ca_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def tls(self) -> bool:
        return self._server.ca_pem is not None

    @property
    def ca_pem(self) -> str | None:
        """With ``tls=True``: the PEM of the CA made at start, which signed the mock's
        certificate (for ``localhost``, 127.0.0.1, ::1 and its host)."""
        return self._server.ca_pem

    @property
    def ca_file(self) -> Path | None:
        """That CA written to a temporary file (removed at :meth:`stop`): what a client
        passes as ``--cacert``."""
        pem = self.ca_pem
        if pem is None:
            return None
        if self._ca_dir is None:
            self._ca_dir = tempfile.TemporaryDirectory(prefix="fineserve-mock-ca-")
            (Path(self._ca_dir.name) / "ca.pem").write_text(pem)
        return Path(self._ca_dir.name) / "ca.pem"

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def stats(self) -> dict[str, int]:
        return self._server.stats()

    def take_token_times(self) -> dict[str, Any]:
        """Per stream (by the request's ``user``), the instants its tokens left, in ns
        since the mock started; needs ``record_token_times=True``."""
        return self._server.take_token_times()

    def take_arrival_times(self) -> Any:
        """Arrival instants of the completion requests received since the last call, in
        ns since the mock started (int64 array, arrival order); needs
        ``record_arrivals=True``."""
        return self._server.take_arrival_times()

    def stop(self) -> None:
        self._server.stop()
        if self._ca_dir is not None:
            self._ca_dir.cleanup()
            self._ca_dir = None

    def __enter__(self) -> MockServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
