"""The embedded mock in its own process, with its server-side logs reachable from a bench.

A real server runs apart from the load generator: it has its own descriptors (the hard
open-files limit is per process) and its own threads. ``fineserve mock`` does that but keeps
its logs to itself; this wrapper runs ``fineserve.MockServer`` in a child process that
answers three commands on stdin: ``take PATH`` (write the arrival instants and token
emission instants recorded since the last take to PATH as ``.npz``), ``stats`` and ``quit``.

Both logs use the mock's clock (ns since it started); benches compare differences within
one log (inter-arrival gaps, inter-token gaps), never instants across processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


class MockProcess:
    """``with MockProcess(ttft_ms=5, itl_ms=2) as mock: mock.base_url ...``"""

    def __init__(self, **options: Any) -> None:
        options.setdefault("record_arrivals", True)
        self._proc = subprocess.Popen(
            [sys.executable, __file__, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("port "):
            self._proc.kill()
            raise SystemExit(f"mock process did not start: {line.strip()!r}")
        self.port = int(line.split()[1])
        self.tls = bool(options.get("tls"))
        self.base_url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="fineserve-mock-")
        #: With ``tls=True``: the mock's CA (PEM), what a client passes as its CA file.
        self.ca_file: Path | None = None
        if self.tls:
            self.ca_file = Path(self._dir.name) / "ca.pem"
            self._ask(f"ca {self.ca_file}")

    def _ask(self, command: str) -> str:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._proc.stdout.readline().strip()

    def take(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Arrival instants (sorted) and token instants by ``user``, since the last take."""
        path = Path(self._dir.name) / "take.npz"
        self._ask(f"take {path}")
        with np.load(path) as z:
            arrivals = np.sort(z["arrivals_ns"])
            tokens = {k[2:]: z[k] for k in z.files if k.startswith("t:")}
        return arrivals, tokens

    def stats(self) -> dict[str, int]:
        return json.loads(self._ask("stats"))

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._ask("quit")
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self._dir.cleanup()

    def __enter__(self) -> MockProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(options: dict[str, Any]) -> None:
    from fineserve import MockServer

    with MockServer(**options) as mock:
        print(f"port {mock.port}", flush=True)
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "take":
                tokens = mock.take_token_times()
                np.savez(
                    arg,
                    arrivals_ns=mock.take_arrival_times(),
                    **{f"t:{k}": v for k, v in tokens.items()},
                )
                print("ok", flush=True)
            elif cmd == "ca":
                Path(arg).write_text(mock.ca_pem or "")
                print("ok", flush=True)
            elif cmd == "stats":
                print(json.dumps(mock.stats()), flush=True)
            else:
                print("bye", flush=True)
                return


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
