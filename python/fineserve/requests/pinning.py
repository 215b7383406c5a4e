"""Per-request pins beyond the endpoint: the session header, the data-parallel rank and
the LoRA adapter of each request, drawn from the schedule so a seeded run repeats them.

A conversation keeps its adapter and (``by-session``) its rank on every turn; ServeGen
clients count as sessions when the schedule has no conversations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..config import PinConfig
from ..errors import FineserveError
from ..schedule import Schedule


def lora_weights(spec: str, n: int) -> npt.NDArray[np.float64]:
    """``uniform``, ``zipf:S`` (adapter k has weight 1/k^S, k from 1) or
    ``weights:w1,w2,…`` (one per adapter) as probabilities."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    w: npt.NDArray[np.float64]
    if kind == "uniform" and not arg:
        w = np.ones(n)
    elif kind == "zipf":
        try:
            s = float(arg)
        except ValueError:
            s = float("nan")
        if not (np.isfinite(s) and s >= 0):
            raise FineserveError(f"--lora-distribution {spec!r}: expected zipf:S with S >= 0")
        w = np.asarray(1.0 / np.arange(1, n + 1) ** s, dtype=np.float64)
    elif kind == "weights":
        try:
            w = np.array([float(x) for x in arg.split(",")])
        except ValueError:
            w = np.array([])
        if len(w) != n or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise FineserveError(
                f"--lora-distribution {spec!r}: expected weights:w1,...,w{n}, one non-negative "
                f"weight per adapter ({n}), not all zero"
            )
    else:
        raise FineserveError(
            f"--lora-distribution {spec!r}: expected uniform, zipf:S or weights:w1,w2,..."
        )
    return np.asarray(w / w.sum(), dtype=np.float64)


def _unit_hash(keys: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.float64]:
    """A uniform draw in [0, 1) per key, fixed by (seed, key): splitmix64's finalizer, so a
    key draws the same wherever it appears (every turn of a conversation, every chunk)."""
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & (2**64 - 1))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    out: npt.NDArray[np.float64] = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return out


def session_keys(c: Schedule) -> npt.NDArray[np.int64] | None:
    """Each request's session: its conversation, else its ServeGen client; None when the
    schedule has neither."""
    for name in ("session_id", "client_id"):
        col = c.extra.get(name)
        if col is not None:
            return np.asarray(col, dtype=np.int64)
    return None


@dataclass
class RequestPins:
    """One chunk's pins: models (None: not chosen here), per-request header columns in
    :attr:`PinConfig.request_headers` order, and label columns for the breakdowns."""

    models: npt.NDArray[Any] | None
    header_values: tuple[npt.NDArray[np.int64], ...]
    labels: dict[str, npt.NDArray[Any]]


@dataclass
class Pinner:
    """Draws each chunk's pins; chunks must come in schedule order (``by-class`` numbers
    classes in order of first appearance)."""

    cfg: PinConfig
    seed: int
    _weights: npt.NDArray[np.float64] | None = None
    _class_rank: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cfg.lora_modules:
            self._weights = lora_weights(self.cfg.lora_distribution, len(self.cfg.lora_modules))

    @property
    def active(self) -> bool:
        c = self.cfg
        return bool(c.session_header or c.dp_ranks or c.lora_modules)

    def check(self, first: Schedule) -> None:
        """Refuses, in one line, a policy the workload cannot follow."""
        c = self.cfg
        if c.dp_ranks and c.dp_rank_policy == "by-session" and session_keys(first) is None:
            raise FineserveError(
                "--dp-rank-policy by-session needs a workload with sessions (conversations, "
                "or ServeGen clients)"
            )
        if c.dp_ranks and c.dp_rank_policy == "by-class" and "class" not in first.extra:
            raise FineserveError(
                "--dp-rank-policy by-class needs a workload with classes (--mode mix, "
                "ServeGen pools, class-labelled traces)"
            )
        if c.session_header and session_keys(first) is None:
            raise FineserveError(
                f"--session-header {c.session_header}: the workload has no sessions "
                "(conversations, or ServeGen clients)"
            )

    def pins(self, base: int, c: Schedule) -> RequestPins:
        n = len(c)
        index = base + np.arange(n, dtype=np.int64)
        keys = session_keys(c)
        headers: list[npt.NDArray[np.int64]] = []
        labels: dict[str, npt.NDArray[Any]] = {}
        cfg = self.cfg
        if cfg.session_header:
            headers.append(keys if keys is not None else np.full(n, -1, np.int64))
        if cfg.dp_ranks:
            rank = self._ranks(index, c, keys)
            headers.append(rank)
            labels["dp_rank"] = rank
        models = None
        if self._weights is not None:
            # Sticky per session: every turn of a conversation draws the same adapter.
            u = _unit_hash(keys if keys is not None else index, self.seed)
            pick = np.searchsorted(np.cumsum(self._weights), u, side="right")
            pick = np.minimum(pick, len(self._weights) - 1)
            models = np.asarray(self.cfg.lora_modules, dtype=object)[pick]
        return RequestPins(models, tuple(headers), labels)

    def _ranks(
        self, index: npt.NDArray[np.int64], c: Schedule, keys: npt.NDArray[np.int64] | None
    ) -> npt.NDArray[np.int64]:
        n_ranks = int(self.cfg.dp_ranks or 1)
        policy = self.cfg.dp_rank_policy
        if policy == "by-session" and keys is not None:
            # Hashed, as a session-affine router does: ids are often strided (one per
            # turn), and id % ranks would then pile every session on one rank.
            return np.minimum((_unit_hash(keys, 0) * n_ranks).astype(np.int64), n_ranks - 1)
        if policy == "by-class" and "class" in c.extra:
            names, first, inverse = np.unique(
                np.asarray(c.extra["class"]).astype(str), return_index=True, return_inverse=True
            )
            for k in np.argsort(first, kind="stable").tolist():  # in order of appearance
                self._class_rank.setdefault(str(names[k]), len(self._class_rank) % n_ranks)
            ranks = np.array([self._class_rank[str(x)] for x in names.tolist()], dtype=np.int64)
            return ranks[inverse.reshape(-1)]
        return np.asarray(index % n_ranks, dtype=np.int64)
