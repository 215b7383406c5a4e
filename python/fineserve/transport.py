"""How requests reach a server beyond the URL: TLS (``--cacert``, ``--insecure``,
``--cert/--key``) and the headers every request carries (``--header``).

The engine (Rust, rustls) and the model lookup before a run (Python's ``ssl``) are given
the same settings, so both check a server the same way. Values of credential-like headers
are secrets, like the API key: never printed, stored or put in an error."""

from __future__ import annotations

import re
import ssl
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import FineserveError

#: Header names whose value is a credential (matched case-insensitively, as substrings).
CREDENTIAL_MARKERS = ("authorization", "auth", "key", "token", "secret", "cookie", "password")
#: RFC 9110 token characters: what a header name may contain.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
REDACTED = "[redacted]"


def is_credential_header(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in CREDENTIAL_MARKERS)


@dataclass(frozen=True)
class Header:
    name: str
    value: str

    @property
    def secret(self) -> bool:
        return is_credential_header(self.name)

    @property
    def shown(self) -> str:
        """The value as output may show it."""
        return REDACTED if self.secret else self.value

    def __repr__(self) -> str:
        return f"Header({self.name!r}, {self.shown!r})"


def parse_header(spec: str, option: str = "--header") -> Header:
    """``Name: value`` (curl's form) or ``NAME=VALUE`` (vLLM bench's form)."""
    colon, equals = spec.find(":"), spec.find("=")
    if colon < 0 and equals < 0:
        raise FineserveError(f"{option} {_shown_spec(spec)}: expected 'Name: value' or NAME=VALUE")
    cut = colon if colon >= 0 and (equals < 0 or colon < equals) else equals
    name, value = spec[:cut].strip(), spec[cut + 1 :].strip()
    if not name:
        raise FineserveError(f"{option} {_shown_spec(spec)}: the header has no name")
    if not _TOKEN.match(name):
        raise FineserveError(f"{option}: {name!r} is not a valid header name")
    if any(c in value for c in "\r\n\0"):
        raise FineserveError(f"{option} {name}: the value contains a line break or NUL")
    if any(ord(c) > 0xFF for c in value):
        raise FineserveError(f"{option} {name}: the value has characters a header cannot carry")
    return Header(name, value)


def _shown_spec(spec: str) -> str:
    """The spec as an error may quote it: a credential's value is never shown."""
    name = re.split(r"[:=]", spec, maxsplit=1)[0]
    return repr(spec) if not is_credential_header(name) else repr(f"{name.strip()}: {REDACTED}")


def parse_headers(specs: Iterable[str], reserved: Sequence[str] = ()) -> tuple[Header, ...]:
    """Every ``--header``; one the run sets itself per request (``reserved``) is refused."""
    headers = tuple(parse_header(s) for s in specs)
    taken = {r.lower() for r in reserved}
    for h in headers:
        if h.name.lower() in {"host", "content-length", "transfer-encoding", "content-type"}:
            raise FineserveError(f"--header {h.name}: set by fineserve itself")
        if h.name.lower() in taken:
            raise FineserveError(
                f"--header {h.name}: also set per request (--session-header / --dp-rank-header)"
            )
    return headers


def server_request(
    url: str,
    headers: Sequence[Header],
    api_key: str | None = None,
    *,
    data: bytes | None = None,
    accept: str | None = None,
) -> urllib.request.Request:
    """A request from Python's side of a run (the model lookup, a metrics scrape, a cache
    reset) with the run's ``--header``s and, when given, its bearer token; a POST when
    ``data`` is given."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else None)
    if accept:
        req.add_header("Accept", accept)
    for h in headers:
        req.add_header(h.name, h.value)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    return req


def redact(message: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s and s in message:
            message = message.replace(s, REDACTED)
    return message


@dataclass(frozen=True)
class TlsConfig:
    """How ``https://`` servers are checked and how the client proves itself."""

    #: PEM bundle trusted besides the platform's roots.
    ca_file: Path | None = None
    #: Client certificate (PEM chain) and its key, for servers that require one (mTLS).
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Accept any server certificate.
    insecure: bool = False

    def check(self) -> None:
        """Every file readable and loadable, the key that of the certificate, the options
        consistent: one-line errors before any connection."""
        if self.insecure and self.ca_file:
            raise FineserveError("--insecure and --cacert exclude each other")
        if (self.cert_file is None) != (self.key_file is None):
            raise FineserveError("--cert and --key go together")
        for option, path in (
            ("--cacert", self.ca_file),
            ("--cert", self.cert_file),
            ("--key", self.key_file),
        ):
            if path is None:
                continue
            try:
                with open(path, "rb") as f:
                    head = f.read(1 << 20)
            except OSError as e:
                raise FineserveError(f"{option} {path}: {e.strerror or e}") from None
            if b"-----BEGIN " not in head:
                raise FineserveError(f"{option} {path}: not a PEM file")
        if self.cert_file is not None or self.ca_file is not None:
            self.ssl_context()  # a CA bundle that does not load, a key of another certificate

    def ssl_context(self) -> ssl.SSLContext:
        """The same checks for Python's side (``GET /v1/models``): platform roots plus
        the CA file, or none; the client certificate."""
        ctx = ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ca_file:
            try:
                ctx.load_verify_locations(cafile=str(self.ca_file))
            except (ssl.SSLError, OSError) as e:
                raise FineserveError(f"--cacert {self.ca_file}: {_ssl_reason(e)}") from None
        if self.cert_file and self.key_file:
            try:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
            except (ssl.SSLError, OSError) as e:
                reason = _ssl_reason(e)
                if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
                    reason = "the key does not match the certificate"
                raise FineserveError(
                    f"--cert {self.cert_file} with --key {self.key_file}: {reason}"
                ) from None
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def context_for(self, url: str) -> ssl.SSLContext | None:
        """The SSL context for ``url`` (None for plain http)."""
        return self.ssl_context() if url.startswith("https://") else None

    @property
    def description(self) -> str:
        parts = []
        if self.insecure:
            parts.append("certificates not verified (--insecure)")
        elif self.ca_file:
            parts.append(f"trusting {self.ca_file} besides the system's roots")
        if self.cert_file:
            parts.append(f"client certificate {self.cert_file}")
        return ", ".join(parts)


def _ssl_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def describe_ssl_error(e: BaseException) -> str:
    """Python's certificate errors in the engine's words (one line, the cause named)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        msg = (e.verify_message or e.reason or str(e)).lower()
        if "unable to get local issuer" in msg or "self-signed" in msg or "self signed" in msg:
            return (
                "certificate signed by an unknown issuer (pass the server's CA with --cacert, "
                "or --insecure)"
            )
        if "hostname mismatch" in msg or "ip address mismatch" in msg:
            return (
                f"certificate name mismatch: {e.verify_message} (connect by a name the "
                "certificate lists, or --insecure)"
            )
        if "expired" in msg:
            return "certificate expired"
        if "not yet valid" in msg:
            return "certificate not valid yet (check the clocks)"
        return f"bad certificate: {e.verify_message or e.reason}"
    if isinstance(e, (ssl.SSLEOFError, ConnectionResetError)):
        return (
            "the server closed the connection during the TLS exchange (does it require a "
            "client certificate? --cert/--key)"
        )
    if isinstance(e, ssl.SSLError):
        reason = (e.reason or str(e)).lower().replace("_", " ")
        if any(
            w in reason
            for w in ("certificate required", "handshake failure", "bad certificate", "unknown ca")
        ):
            return (
                f"handshake refused by the server ({e.reason}; does it require a client "
                "certificate? --cert/--key)"
            )
        return f"TLS error: {e.reason or e}"
    return str(e)
