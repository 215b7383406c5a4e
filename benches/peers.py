"""Peer load generators for the benches, each driven the way its users drive it.

- ``aiohttp_open_loop``: the Python baseline, written the way FineServe's Generator (and
  vLLM's ``benchmark_serving``) dispatch: one coroutine per request, ``asyncio.sleep`` to
  the scheduled offset, ``perf_counter`` stamps, an ``aiohttp`` session.
- ``oha_run``: oha (Rust, tokio + hyper) at a fixed query rate, ``-q``; HTTP only, it has
  no per-token timing and records no send instants.
- ``guidellm_run``: GuideLLM's ``constant`` profile (its open-loop mode).

Peers that record no send instants are measured at the server: the mock logs when each
completion request arrived (``record_arrivals``), and ``server_pacing`` compares those
instants with the schedule. The same measure is taken for fineserve and the baseline, so
the four are compared on one ruler. None of the peers is a project dependency:
``benches/setup_peers.sh`` installs them under ``benches/.peers/``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PEERS = Path(__file__).resolve().parent / ".peers"
OHA = PEERS / "oha" / "bin" / "oha"
GUIDELLM = PEERS / "guidellm" / "bin" / "guidellm"


def server_pacing(arrivals_ns: np.ndarray, t_ns: np.ndarray) -> dict[str, Any]:
    """How closely the arrivals seen by the server follow the schedule.

    The k-th arrival is matched with the k-th scheduled offset (both sorted); its lag is
    ``arrival - offset`` less the smallest such difference over the run, which removes the
    unknown clock offset and the constant loopback latency. A client that keeps its
    schedule gives lags near 0; one that falls behind gives growing lags.
    """
    a = np.sort(np.asarray(arrivals_ns, np.int64))
    t = np.sort(np.asarray(t_ns, np.int64))
    n = min(len(a), len(t))
    out: dict[str, Any] = {"scheduled": len(t), "arrived": len(a)}
    if n < 2:
        return out | {"server_lag_p99_us": float("inf"), "achieved_rps": 0.0}
    d = (a[:n] - t[:n]).astype(np.float64)
    lag_us = (d - d.min()) / 1e3
    span_s = (a[n - 1] - a[0]) / 1e9
    return out | {
        "server_lag_p50_us": float(np.percentile(lag_us, 50)),
        "server_lag_p99_us": float(np.percentile(lag_us, 99)),
        "server_lag_max_us": float(lag_us.max()),
        "achieved_rps": (len(a) - 1) / span_s if span_s > 0 else 0.0,
        "server_same_ms": _same_ms_share(a[:n] - int(d.min()), t[:n]),
    }


def _same_ms_share(a: np.ndarray, t: np.ndarray) -> float:
    return float((a // 1_000_000 == t // 1_000_000).mean())


# --- Python asyncio + aiohttp baseline -------------------------------------------------


async def _aiohttp_open_loop(
    url: str, t_s: np.ndarray, payload: bytes, timeout_s: float
) -> tuple[np.ndarray, np.ndarray]:
    import aiohttp

    n = len(t_s)
    sent = np.full(n, -1.0)
    ok = np.zeros(n, bool)
    conn = aiohttp.TCPConnector(limit=0)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as session:

        async def one(i: int, start: float) -> None:
            delay = start + t_s[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[i] = time.perf_counter() - start
            try:
                async with session.post(url, data=payload, headers=headers) as resp:
                    async for _line in resp.content:  # SSE, one line at a time
                        pass
                    ok[i] = resp.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass

        start = time.perf_counter() + 0.2
        await asyncio.gather(*(one(i, start) for i in range(n)))
    return sent, ok


def aiohttp_open_loop(
    url: str, t_ns: np.ndarray, payload: bytes, timeout_s: float = 60.0
) -> tuple[np.ndarray, np.ndarray]:
    """Client-side send offsets (ns from the intended start, -1 = never sent) and ok."""
    sent_s, ok = asyncio.run(_aiohttp_open_loop(url, t_ns / 1e9, payload, timeout_s))
    return np.where(sent_s >= 0, (sent_s * 1e9).astype(np.int64), -1), ok


def have_aiohttp() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


# --- oha -------------------------------------------------------------------------------


def have_oha() -> bool:
    return OHA.is_file() or shutil.which("oha") is not None


def oha_run(
    url: str, rate: float, n: int, payload: bytes, conns: int | None = None
) -> dict[str, Any]:
    """n requests at ``rate`` req/s over ``conns`` connections; oha's own summary
    (success rate, req/s)."""
    exe = str(OHA) if OHA.is_file() else "oha"
    # Enough connections that the rate, not the connection count, paces oha: each request
    # holds one for the mock's TTFT plus the stream (~6 ms).
    conns = conns or int(min(max(64, rate * 0.02), 4000))
    with tempfile.NamedTemporaryFile(suffix=".json") as body:
        body.write(payload)
        body.flush()
        args = f"--no-tui --output-format json -n {n} -q {rate} -c {conns} -m POST"
        args += f" -T application/json -D {body.name} {url}"
        proc = subprocess.run(
            [exe, *args.split()],
            capture_output=True,
            text=True,
            timeout=max(60.0, 3 * n / rate),
        )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["oha failed"]}
    summary = json.loads(proc.stdout)["summary"]
    status = json.loads(proc.stdout).get("statusCodeDistribution", {})
    return {
        "connections": conns,
        "oha_rps": summary.get("requestsPerSec"),
        "oha_success_rate": summary.get("successRate"),
        "ok": int(status.get("200", 0)),
    }


# --- GuideLLM --------------------------------------------------------------------------


def have_guidellm() -> bool:
    return GUIDELLM.is_file()


def guidellm_run(
    base_url: str, rate: float, seconds: float, tokenizer: str | Path
) -> dict[str, Any]:
    """GuideLLM's constant-rate profile for ``seconds`` (synthetic 32-token prompts, 16
    output tokens, its default chat endpoint); its JSON report."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "guidellm.json"
        args = [
            "run",
            "--backend", f"kind=openai_http,target={base_url}",
            "--profile", f"kind=constant,rate={rate}",
            "--constraint", f"kind=max_duration,seconds={seconds}",
            "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--output", f"kind=json,path={out}",
            "--disable-console-interactive",
        ]  # fmt: skip
        proc = subprocess.run(
            [str(GUIDELLM), *args],
            capture_output=True,
            text=True,
            timeout=seconds * 10 + 180,
            cwd=d,
        )
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            return {"error": tail or ["guidellm failed"]}
        return {"report": json.loads(out.read_text())}
