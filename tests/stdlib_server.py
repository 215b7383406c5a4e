"""An independent server for the transport and server-metrics tests: an OpenAI-style server
on Python's ``http.server`` + ``ssl`` (nothing of fineserve's) that logs every request's
headers and can serve ``/metrics`` with its true in-flight count and tokens sent; and
certificates made with the ``openssl`` command line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Certs:
    """A CA, a server certificate for 127.0.0.1 (not for ``localhost``), an expired one,
    and a client certificate, all signed by the CA; plus an unrelated key."""

    ca: Path
    server_cert: Path
    server_key: Path
    expired_cert: Path
    client_cert: Path
    client_key: Path
    other_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path) -> Certs:
    """Everything through the ``openssl`` command line (the test skips without it)."""
    if shutil.which("openssl") is None:
        raise FileNotFoundError("openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=fineserve test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
    )
    for name, ext in (("server", "server.ext"), ("client", "client.ext")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=fineserve test {name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext,
                 cwd=d)  # fmt: skip
    # An expired server certificate: `openssl ca` is the tool that takes explicit dates.
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca=ca_default\n[ca_default]\ndatabase=index.txt\nnew_certs_dir=.\n"
        "serial=serial\ndefault_md=sha256\npolicy=policy_any\nunique_subject=no\n"
        "[policy_any]\ncommonName=supplied\n"
    )
    _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
             "-in", "server.csr", "-out", "expired.pem", "-startdate", "20200101000000Z",
             "-enddate", "20200102000000Z", "-extfile", "server.ext", "-notext",
             cwd=d)  # fmt: skip
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-out", "other.key", cwd=d)  # fmt: skip
    return Certs(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "expired.pem",
        d / "client.pem",
        d / "client.key",
        d / "other.key",
    )


@dataclass
class Seen:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)


class JsonSseHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 replies as one JSON body or as chunked SSE events; no access log."""

    protocol_version = "HTTP/1.1"

    def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, *args: Any) -> None:
        pass


class _Handler(JsonSseHandler):
    def _log(self, body: dict[str, Any]) -> None:
        owner: OpenAIServer = self.server.owner  # type: ignore[attr-defined]
        with owner.lock:
            owner.seen.append(
                Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )

    def do_GET(self) -> None:
        self._log({})
        owner: OpenAIServer = self.server.owner  # type: ignore[attr-defined]
        if self.path == "/metrics":
            page = owner.metrics_page()
            if page is None:
                self._json(404, {"error": "no such route"})
                return
            data = page.encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._json(200, {"object": "list", "data": [{"id": m} for m in owner.models]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._log(body)
        owner: OpenAIServer = self.server.owner  # type: ignore[attr-defined]
        if owner.reject_header is not None:
            # Echoes the header back, as some gateways do in their error bodies.
            value = self.headers.get(owner.reject_header, "")
            self._json(401, {"error": f"bad {owner.reject_header}: {value}"})
            return
        n = int(body.get("max_tokens", 4))
        with owner.lock:
            owner.running += 1
        try:
            self._stream(owner, n)
        finally:
            with owner.lock:
                owner.running -= 1

    def _stream(self, owner: OpenAIServer, n: int) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(n):
            if owner.token_gap_s:
                time.sleep(owner.token_gap_s)
            event = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
            if owner.drop_after is not None and i == owner.drop_after:
                # Gone mid-stream, without TLS close_notify or a last chunk.
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            with owner.lock:
                owner.generation_tokens += 1
        done = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
        self._chunk(b"data: " + json.dumps(done).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True
    # A client warms many connections at once: socketserver's default backlog of 5 would
    # drop SYNs, and a dropped SYN is retried only after a second.
    request_queue_size = 256
    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake in the connection's own thread (a failed one is counted),
        not in the accept loop."""
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        owner: OpenAIServer = self.owner  # type: ignore[attr-defined]
        tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as e:
            with owner.lock:
                owner.handshake_errors.append(str(e))
            _linger(tls)
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except OSError:
            pass
        finally:
            tls.close()


def _linger(tls: ssl.SSLSocket) -> None:
    """Closes as nginx does (lingering close): the alert just sent is followed by FIN and
    the client's unread bytes are drained, so the kernel sends no RST that would reach the
    client before the alert does."""
    raw = socket.socket(fileno=os.dup(tls.fileno()))
    try:
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(0.5)
        while raw.recv(65536):
            pass
    except OSError:
        pass
    finally:
        raw.close()
        tls.close()


class OpenAIServer:
    """``/v1/models`` and a streaming ``/v1/completions`` over HTTP or HTTPS (with
    ``cert``/``key``; ``client_ca`` requires a client certificate signed by it)."""

    def __init__(
        self,
        cert: Path | None = None,
        key: Path | None = None,
        client_ca: Path | None = None,
        *,
        models: tuple[str, ...] = ("test-model",),
        reject_header: str | None = None,
        drop_after: int | None = None,
        metrics: str | None = None,
        token_gap_s: float = 0.0,
    ) -> None:
        """``metrics``: None (no /metrics), ``"vllm"`` (the true in-flight count and tokens
        sent, under vLLM's names) or ``"garbage"`` (a page that is not Prometheus text)."""
        self.models = list(models)
        self.metrics = metrics
        self.token_gap_s = token_gap_s
        self.running = 0
        self.generation_tokens = 0
        self.reject_header = reject_header
        self.drop_after = drop_after
        self.seen: list[Seen] = []
        self.handshake_errors: list[str] = []
        self.lock = threading.Lock()
        self.httpd = _TlsServer(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.tls = cert is not None
        if cert is not None and key is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(cert), str(key))
            if client_ca is not None:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(cafile=str(client_ca))
            self.httpd.ssl_context = ctx
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def base_url(self, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def metrics_page(self) -> str | None:
        if self.metrics is None:
            return None
        if self.metrics == "garbage":
            return "<html>this is { not a metrics page\n"
        with self.lock:
            running, tokens = self.running, self.generation_tokens
        return (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="test-model"}} {running}\n'
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{model_name="test-model"}} {tokens}\n'
        )

    def posts(self) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == "POST"]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
