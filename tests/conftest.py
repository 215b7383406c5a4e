from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from hypothesis import settings

from fineserve import ERROR_KINDS, EngineOptions, MockServer, run_engine
from fineserve.api import BodyTemplate
from fineserve.cli import cli
from fineserve.runner import EngineChunk, RunRecords, _CollectingSink
from stdlib_server import OpenAIServer

# CI draws the same Hypothesis examples every run (a red build is then the code's, not luck's);
# local runs keep exploring. HYPOTHESIS_PROFILE overrides either.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev")
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def servers() -> Iterator[list[OpenAIServer]]:
    """Independent servers (``stdlib_server.OpenAIServer``) a test starts; closed after it."""
    started: list[OpenAIServer] = []
    yield started
    for s in started:
        s.close()


@pytest.fixture
def mock() -> Iterator[MockServer]:
    with MockServer(ttft_ms=20, itl_ms=5) as m:
        yield m


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Runs the CLI in-process; an exception that is not a one-line error fails the test."""
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def kinds(rec: RunRecords) -> list[str]:
    """Each request's error kind name, in schedule order."""
    return [ERROR_KINDS[k] for k in rec.col("error_kind")]


def completion_bodies(n: int, max_tokens: int = 8, words: int = 16) -> list[bytes]:
    t = BodyTemplate("vllm", "fineserve-mock", stream=True, ignore_eos=True)
    return [t.render(f"r{i} " + "word " * (words - 1), max_tokens) for i in range(n)]


def run_schedule(
    url: str,
    t_ns: np.ndarray,
    max_tokens: int = 8,
    options: EngineOptions | None = None,
    bodies: list[bytes] | None = None,
) -> RunRecords:
    n = len(t_ns)
    bodies = bodies if bodies is not None else completion_bodies(n, max_tokens)
    return run_engine(
        [url],
        np.asarray(t_ns, dtype=np.int64),
        bodies,
        np.arange(n, dtype=np.uint32) % len(bodies),
        np.zeros(n, dtype=np.uint32),
        np.full(n, max_tokens),
        options or EngineOptions(warm_connections=min(n, 64)),
        show_progress=False,
    )


class RawHttpServer:
    """A TCP server whose every connection is answered by ``respond(conn)``: lets tests
    send byte-exact, badly behaved HTTP."""

    def __init__(self, respond: Callable[[socket.socket], None]) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._respond = respond
        self._stop = False
        #: Peer addresses of the accepted connections (the client's source addresses).
        self.peers: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/completions"

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                continue
            self.peers.append(peer[0])
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(body) < length:
                body += conn.recv(65536)
            self._respond(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self._sock.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def interrupted_blast(
    sig: int,
    *args: str,
    again_after_s: float | None = None,
    after_s: float = 2.5,
    once_exists: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`fineserve blast` of 600 requests at 100 req/s in its own process, sent ``sig``
    ``after_s`` in (and once more ``again_after_s`` later); with ``once_exists``,
    ``after_s`` counts from when that file appears (a loaded machine may take seconds to
    start the run); ``args`` are added to its command line (a repeated option overrides)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fineserve.cli",
            "blast",
            "--num-prompts",
            "600",
            "--request-rate",
            "100",
            "--random-input-len",
            "8",
            "--random-output-len",
            "4",
            "--disable-tqdm",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if once_exists is not None:
        give_up = time.monotonic() + 60
        while not once_exists.exists() and proc.poll() is None and time.monotonic() < give_up:
            time.sleep(0.05)
    time.sleep(after_s)
    proc.send_signal(sig)
    if again_after_s is not None:
        time.sleep(again_after_s)
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


#: Starts a two-worker fleet: (url, chunk, sink, on_started) -> StreamOutcome.
FleetStart = Callable[[str, EngineChunk, _CollectingSink, Callable[[list[Any]], None]], Any]


def fleet_losing_worker_1(start: FleetStart, kill: Callable[[Any], None]) -> tuple[Any, list[str]]:
    """400 requests over 4 s on a two-worker fleet whose worker 1 is killed (``kill`` of
    its handle) 1.5 s in. Checks that every request is accounted: worker 0's (even rows)
    all ok, worker 1's partly sent, then cancelled or not sent; returns the outcome and
    the records' error messages."""
    n = 400
    chunk = EngineChunk(
        np.linspace(0, 4e9, n).astype(np.int64),
        completion_bodies(1, 4),
        np.zeros(n, np.uint32),
        np.zeros(n, np.uint32),
        np.full(n, 4),
        extra={"input_len": np.full(n, 16)},
    )
    sink = _CollectingSink()
    killed: list[bool] = []

    def kill_second(workers: list[Any]) -> None:
        def later() -> None:
            kill(workers[1])
            killed.append(True)

        threading.Timer(1.5, later).start()

    with MockServer(ttft_ms=5, itl_ms=1) as m:
        outcome = start(m.base_url + "/v1/completions", chunk, sink, kill_second)
    assert killed
    cols = sink.columns()
    assert sorted(np.asarray(cols["index"]).tolist()) == list(range(n))  # all accounted
    kinds = np.array([ERROR_KINDS[k] for k in cols["error_kind"]])
    idx = np.asarray(cols["index"]).astype(np.int64)
    assert np.all(kinds[idx % 2 == 0] == "ok")  # the surviving worker's share
    lost = kinds[idx % 2 == 1]
    assert (lost == "ok").sum() < n // 2  # the dead worker stopped part-way
    assert set(lost) <= {"ok", "cancelled", "not_sent"} and "not_sent" in set(lost)
    w = outcome.workers
    assert w[0]["died"] is None and w[1]["died"]
    assert sum(w[1]["outcomes"].values()) == n // 2
    messages = dict(zip(np.asarray(cols["error_index"]).tolist(), cols["error_message"]))
    return outcome, list(messages.values())
