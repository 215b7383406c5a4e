"""Finding the target server and checking it speaks the OpenAI API before a run."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from urllib.parse import urlsplit

from .console import note, one_line
from .errors import ServerUnreachable
from .transport import Header, TlsConfig, describe_ssl_error, redact, server_request


def base_url_from(base_url: str | None, host: str | None, port: int | None) -> str | None:
    """``--base-url`` or ``--host/--port`` as ``http://host:port`` (no trailing slash). A
    base URL ending in ``/v1`` (the OpenAI SDK's habit) loses it, with a notice: the API
    paths (``/v1/models``, the ``--endpoint``) are added to the base."""
    if base_url:
        if not base_url.startswith(("http://", "https://")):
            base_url = "http://" + base_url
        base_url = base_url.rstrip("/")
        if base_url.endswith("/v1"):
            trimmed = base_url[: -len("/v1")]
            note(
                f"--base-url {base_url}: using {trimmed} (paths such as /v1/completions are "
                "added to the base URL)"
            )
            base_url = trimmed
        return base_url
    if host is None and port is None:
        return None
    return f"http://{host or '127.0.0.1'}:{port or 8000}"


def fetch_models(
    base_url: str,
    timeout_s: float = 5.0,
    api_key: str | None = None,
    *,
    headers: Sequence[Header] = (),
    tls: TlsConfig | None = None,
) -> list[str]:
    """Model ids from ``GET /v1/models`` (with the run's headers and TLS settings); raises
    :class:`ServerUnreachable` with one line, with no secret in it."""
    secrets = [api_key or ""] + [h.value for h in headers if h.secret]
    try:
        return _fetch_models(base_url, timeout_s, api_key, headers, tls)
    except ServerUnreachable as e:
        raise ServerUnreachable(redact(e.message, secrets)) from None


def _fetch_models(
    base_url: str,
    timeout_s: float,
    api_key: str | None,
    headers: Sequence[Header],
    tls: TlsConfig | None,
) -> list[str]:
    url = f"{base_url}/v1/models"
    req = server_request(url, headers, api_key)
    context = (tls or TlsConfig()).context_for(url)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
            raw = resp.read(1 << 20)
    except urllib.error.HTTPError as e:
        try:
            body = e.read(2048).decode("utf-8", "replace")
        except OSError:
            body = ""
        hint = (
            "check the base URL (scheme, host, port and any path prefix of a gateway)"
            if e.code == 404
            else "pass --model to skip the model lookup"
        )
        raise ServerUnreachable(
            f"GET {url} answered HTTP {e.code}"
            + (f" ({one_line(body, limit=160)})" if body.strip() else "")
            + f"; {hint}"
        ) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ssl.SSLError) or (
            isinstance(reason, ConnectionResetError) and url.startswith("https://")
        ):
            why = f"TLS handshake failed: {describe_ssl_error(reason)}"
        elif isinstance(reason, ConnectionRefusedError):
            why = "connection refused (is the server running? check --base-url/--host/--port)"
        elif isinstance(reason, socket.timeout):
            why = f"no answer within {timeout_s:g}s"
        else:
            why = str(reason)
        raise ServerUnreachable(f"cannot reach {base_url}: {why}") from None
    except (TimeoutError, socket.timeout):
        raise ServerUnreachable(
            f"cannot reach {base_url}: no answer within {timeout_s:g}s"
        ) from None
    except ssl.SSLError as e:
        # TLS 1.3: a server refuses a client certificate (or its absence) after the
        # client's handshake is done, so the refusal arrives on the first read.
        raise ServerUnreachable(
            f"cannot reach {base_url}: TLS handshake failed: {describe_ssl_error(e)}"
        ) from None
    except (ConnectionError, OSError) as e:
        raise ServerUnreachable(f"cannot reach {base_url}: {e}") from None
    try:
        data = json.loads(raw)
        ids = [m["id"] for m in data["data"]]
    except (ValueError, KeyError, TypeError):
        raise ServerUnreachable(
            f"{base_url} is not an OpenAI-compatible server: GET /v1/models did not return a "
            "model list"
        ) from None
    return [str(i) for i in ids]


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ServerUnreachable(f"{url}: only http:// and https:// URLs are supported")
