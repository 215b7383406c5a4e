"""Type stub for the Rust extension ``fineserve._engine``.

Times in records are nanoseconds since the run's start instant (``t0``); ``-1`` means the
event never happened.
"""

from collections.abc import Sequence
from typing import Protocol, TypeAlias, final

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

__version__: str
#: Conversation columns: (parent, think_ns, followers).
_Turns: TypeAlias = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint32]]
#: Live-history columns: (tool_ns, turn_text: n × 6 uint32 byte offsets).
_Live: TypeAlias = tuple[npt.NDArray[np.int64], npt.NDArray[np.uint32]]
#: Names of ``error_kind`` codes, indexed by code (0 = ``"ok"``).
ERROR_KINDS: list[str]
#: Names of the faults the mock can inject (``faults=[(name, ratio), …]``).
MOCK_FAULTS: list[str]

class EngineError(Exception):
    """A run or mock could not start: bad schedule, endpoint or configuration."""

@final
class Run:
    """A run in progress, returned by :func:`start_run`."""

    def progress(self) -> dict[str, int | bool]:
        """Live counters: scheduled, dispatched, sent, succeeded, failed, not_sent,
        in_flight, elapsed_ns, started, t0_unix_ns, connections_open, connections_peak,
        connections_opened (in all, warm ones included), connection_waiting,
        connection_waits, connection_wait_ns, token_events, kernel_stamped_events,
        warm_connections, warm_failures,
        realtime_lanes, realtime_demotions (times a busy lane left SCHED_FIFO),
        lane_windows, lane_saturated_windows (100 ms windows of the lanes' pacing, and
        those in which a lane used over 90% of its core for work; counted as lanes end)."""
    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` (GIL released); True once every request is done."""
    def stop(self, reason: str | None = None) -> None:
        """Stop dispatching; requests in flight go on until done or :meth:`cancel`. With
        ``reason``, the requests never sent give it as their error message."""
    def cancel(self) -> None:
        """Abort requests in flight (recorded as ``cancelled``) and stop dispatching."""
    def feed(
        self,
        t_ns: npt.NDArray[np.int64],
        body_idx: npt.NDArray[np.uint32],
        bodies: list[bytes],
        endpoint_idx: npt.NDArray[np.uint32],
        expected_output_tokens: npt.NDArray[np.uint32],
        turns: _Turns | None = None,
        header_values: Sequence[npt.NDArray[np.int64]] | None = None,
        live: _Live | None = None,
    ) -> None:
        """Append a chunk to the schedule; its send offsets continue the previous chunk's.

        ``t_ns`` are send offsets from the start instant (non-decreasing); request i sends
        ``bodies[body_idx[i]]`` as a POST to ``endpoints[endpoint_idx[i]]``;
        ``endpoint_idx`` = ``len(endpoints) + g`` routes it, when it is sent, to the
        endpoint of ``route_groups[g]`` with the fewest requests outstanding. ``turns`` =
        (parent, think_ns, followers) makes request i wait for request ``parent[i]`` (an
        earlier schedule index; -1: none) to end and leave ``think_ns[i]`` later (its
        recorded ``scheduled_ns`` is that release time); if that turn fails or is not
        sent, request i is not sent. ``followers[i]`` counts the requests that follow
        request i. With ``turn_affinity``, request i goes to the endpoint that served
        ``parent[i]``. ``header_values``: one column per ``request_headers`` option,
        request i's value of that header (negative: it carries none); None: no request
        of this chunk carries them. ``live`` (with ``history_api`` other than ``"off"``):
        each turn's body gets the history of its previous turn spliced in when it is
        released (``turn_text[i]``: splice point, messages start, own message start/end,
        own text literal start/end, as byte offsets), and leaves ``tool_ns[i]`` instead
        of ``think_ns[i]`` after a previous turn whose reply was a tool call. Raises
        :class:`EngineError`, accepting nothing, if the chunk is invalid, the input is
        closed or the run is stopping."""
    def close_input(self) -> None:
        """Declare the schedule complete; the run ends when every fed request is done."""
    def drain(self) -> dict[str, npt.NDArray[np.generic] | list[str]]:
        """Records completed since the last drain, as in :meth:`results` but in
        completion order and without ``t0_unix_ns``/``stopped``."""
    def results(self) -> dict[str, npt.NDArray[np.generic] | list[str] | int | bool]:
        """Close the input, block until the run ends and return the records not drained
        yet, in schedule order.

        Keys: index (uint64, position in the whole schedule); scheduled_ns, sent_ns,
        first_byte_ns, first_token_ns, done_ns (int64);
        n_chunks (uint32); completion_tokens, prompt_tokens (int64, -1 = not reported);
        http_status (uint16, 0 = none); error_kind (uint8, see ERROR_KINDS);
        endpoint_idx (uint32); chunk_ns (int64) with chunk_offsets (uint64, n+1) so that
        ``chunk_ns[chunk_offsets[r]:chunk_offsets[r+1]]`` are row r's token-event
        arrival times (every event with output: reasoning, answer or tool call);
        first_answer_ns (int64, first content or tool-call event; -1 = none);
        last_reasoning_ns (int64, -1 = no reasoning); reasoning_chunks (uint32, reasoning
        events); reasoning_tokens, cached_tokens (int64, the server's
        ``completion_tokens_details.reasoning_tokens`` and
        ``prompt_tokens_details.cached_tokens``, -1 = not reported); usage_ignored (uint8,
        1 = a usage value of an unexpected type was ignored); conn_wait_ns (int64, ns
        waited for connection budget before the send, part of the dispatch lag);
        error_index (int64 rows)
        with error_message (list[str]); t0_unix_ns; stopped. Can be called once.
        """

class _EngineOptions(Protocol):
    """What :func:`start_run` reads from its options, by attribute name: a
    ``fineserve.EngineOptions``, or any object with these attributes."""

    stream: bool
    max_concurrency: int | None
    max_connections: int
    lanes: int
    warm_connections: int
    spin_us: int
    start_delay_ms: float
    connect_timeout_s: float
    first_byte_timeout_s: float
    idle_timeout_s: float
    total_timeout_s: float
    max_body_bytes: int
    api_key: str | None
    realtime_priority: bool
    route_groups: list[list[int]]
    source_ips: list[str]
    turn_affinity: bool
    history_api: str
    reply_limit_bytes: int
    headers: list[tuple[str, str, bool]]
    request_headers: list[str]
    ca_file: str | None
    client_cert_file: str | None
    client_key_file: str | None
    insecure: bool
    http2: bool

def start_run(
    endpoints: list[str],
    options: _EngineOptions,
    *,
    start_at_unix_ns: int | None = None,
) -> Run:
    """Start an open-loop run over ``endpoints`` (full http:// or https:// URLs) and
    return at once;
    the schedule comes through :meth:`Run.feed` until :meth:`Run.close_input`.

    ``options`` (see ``fineserve.EngineOptions``): ``warm_connections`` per endpoint are
    opened before the start instant, which is ``start_delay_ms`` after warm-up or, with
    ``start_at_unix_ns``, that system-clock instant (a common start for several
    machines; if warm-up ends later, the run starts then: compare ``t0_unix_ns`` in the
    results). ``source_ips``: local addresses new connections are bound to, in turn (each
    lane starts at a different one), to get past one address's ~28k ephemeral ports per
    server. The bearer token is ``api_key`` or else ``$OPENAI_API_KEY``; it never appears
    in any output. ``headers`` (name, value, secret) go on every request; a secret value
    is blanked out of every error message. ``https://`` endpoints are checked against
    the system's roots plus ``ca_file`` (PEM), or not at all with ``insecure``;
    ``client_cert_file``/``client_key_file`` answer a server that asks for a client
    certificate. TLS handshakes happen while warming connections; a TLS failure is
    error kind ``tls``. ``realtime_priority`` runs the lanes under SCHED_FIFO when the process
    may (root or CAP_SYS_NICE); otherwise lanes only ask for nice -10. Bad options raise
    :class:`EngineError` in one line.
    """

@final
class MockServer:
    """The embedded OpenAI-compatible mock server (own threads; ``port=0`` picks one).
    ``max_concurrency`` > 0 serves at most that many generations at once; the rest wait
    for a slot (their TTFT grows), like a server at its batch capacity.
    ``reasoning_ratio`` streams that share of each chat/Responses answer as reasoning
    first (in ``reasoning_field``: ``"reasoning"`` or ``"reasoning_content"``);
    ``tool_calls`` is the fraction of requests answered with tool-call fragments;
    ``cache_blocks`` bounds the prefix-block LRU behind ``cached_tokens``;
    ``image_token_side`` (28 or 32) is the pixels per token side when chat images count
    as prompt tokens. See ``fineserve.mock.MockServer`` for the per-request body fields."""

    def __new__(
        cls,
        host: str = ...,  # "127.0.0.1"
        port: int = 0,
        *,
        model: str = ...,  # "fineserve-mock"
        ttft_ms: float = 20.0,
        ttft_per_prompt_token_ms: float = 0.0,
        itl_ms: float = 5.0,
        itl_jitter_ms: float = 0.0,
        default_max_tokens: int = 16,
        workers: int = 1,
        max_concurrency: int = 0,
        faults: Sequence[tuple[str, float]] = ...,  # ()
        stall_ms: float = 30000.0,
        first_byte_delay_ms: float = 30000.0,
        retry_after_s: int = 1,
        record_token_times: bool = False,
        record_arrivals: bool = False,
        reasoning_ratio: float = 0.0,
        reasoning_field: str = ...,  # "reasoning"
        tool_calls: float = 0.0,
        cache_blocks: int = 100_000,
        tls: bool = False,
        image_token_side: int = 28,
    ) -> Self: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def ca_pem(self) -> str | None:
        """With ``tls=True``: the PEM of the CA made at start that signed the mock's
        certificate; None otherwise."""
    def stats(self) -> dict[str, int]:
        """Counters: requests, completions, active_streams, bad_requests, connections,
        tls_failures, tls_resumed (handshakes that resumed a session), and
        ``fault_<name>`` for each injected fault."""
    def take_token_times(self) -> dict[str, npt.NDArray[np.int64]]:
        """Token emission instants (ns since the mock started) of the streams finished
        since the last call, by the requests' ``user`` field (needs
        ``record_token_times=True``)."""
    def take_arrival_times(self) -> npt.NDArray[np.int64]:
        """Arrival instants (ns since the mock started) of the completion requests received
        since the last call, in arrival order (needs ``record_arrivals=True``)."""
    def stop(self) -> None:
        """Stop accepting and close every connection. Idempotent."""

def raise_open_files_limit() -> tuple[int, int]:
    """Raise the open-files limit as far as allowed; the soft limit (before, after)."""

def ephemeral_port_range() -> tuple[int, int] | None:
    """The kernel's ephemeral port range (inclusive), or None where it cannot be read."""

__all__ = [
    "ERROR_KINDS",
    "MOCK_FAULTS",
    "EngineError",
    "MockServer",
    "Run",
    "__version__",
    "ephemeral_port_range",
    "raise_open_files_limit",
    "start_run",
]
