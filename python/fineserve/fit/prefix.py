"""Prefix sharing fitted from a trace's ``hash_ids`` (Mooncake, Qwen-Bailian), written as
``Parametric/prefix/<name>_prefix.json``, and the sharer that gives generated schedules
block ids with the same structure.

What is measured, per request i of n_i blocks: h_i, the count of leading blocks an
unbounded prefix cache had seen (what ``prompts.prefix.PrefixHitCounter`` counts as hits);
and for requests with h_i > 0, the distance (in requests) back to the most recent request
that held that prefix — its parent (the previous turn of a conversation, an earlier
request with the same system prompt or document).

The model: the share f = h/n, as quantiles per bucket of n (long prompts are the
continued conversations, so the hit share rises with length and the token-weighted hit
rate depends on it), and the parent distance, as quantiles of its logarithm.

The sharer, vectorised per chunk: f from request i's bucket gives h_i = round(f·n_i); the
parent is the most recent request at or before i − d (d drawn) whose prompt has at least
h_i blocks (found through running "last index with ≥ T blocks" tables on a grid of T),
else the most recent such request, else the longest earlier prompt (h_i cut to its
length), else none (h_i = 0). Request i's first h_i block ids
are its parent's, the rest new; so exactly h_i blocks hit, and the theoretical hit rate
follows the trace's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError
from ..schedule import Schedule
from .process import quantile_draw, quantile_table

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FORMAT = "fineserve-prefix/1"
QUANTILES = 101
#: Buckets of prompt blocks (by the trace's quantiles of n) for the hit share.
N_BUCKETS = 8
#: The sharer keeps this many past requests as parent candidates.
HISTORY = 200_000


@dataclass
class PrefixModel:
    block_size: int
    #: Upper edges (blocks) of the n buckets; the last is +inf.
    n_edges: FloatArray
    #: (buckets, QUANTILES): quantiles of h/n per bucket.
    share_q: FloatArray
    #: Quantiles of log(parent distance in requests).
    log_distance_q: FloatArray
    #: The trace's own theoretical hit rate (token-weighted), for the record and checks.
    trace_hit_rate: float
    trace_requests: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "block_size": self.block_size,
            "n_bucket_upper_edges": [
                None if not math.isfinite(x) else float(x) for x in self.n_edges
            ],
            "hit_share_quantiles": [[round(float(x), 6) for x in q] for q in self.share_q],
            "log_parent_distance_quantiles": [round(float(x), 6) for x in self.log_distance_q],
            "trace_hit_rate_theoretical": self.trace_hit_rate,
            "trace_requests": self.trace_requests,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "") -> PrefixModel:
        where = source or "prefix model"
        if d.get("format") != FORMAT:
            raise FineserveError(f"{where}: not a {FORMAT} file (format {d.get('format')!r})")
        try:
            m = cls(
                block_size=int(d["block_size"]),
                n_edges=np.array(
                    [math.inf if x is None else float(x) for x in d["n_bucket_upper_edges"]]
                ),
                share_q=np.asarray(d["hit_share_quantiles"], dtype=np.float64),
                log_distance_q=np.asarray(d["log_parent_distance_quantiles"], dtype=np.float64),
                trace_hit_rate=float(d["trace_hit_rate_theoretical"]),
                trace_requests=int(d["trace_requests"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FineserveError(f"{where}: malformed prefix model ({e})") from None
        if (
            m.block_size < 1
            or m.share_q.ndim != 2
            or m.share_q.shape[0] != len(m.n_edges)
            or np.any(m.share_q < 0)
            or np.any(m.share_q > 1)
            or np.any(np.diff(m.share_q, axis=1) < 0)
            or len(m.log_distance_q) < 2
            or np.any(np.diff(m.log_distance_q) < 0)
        ):
            raise FineserveError(
                f"{where}: prefix model needs block_size >= 1 and rising quantiles (shares "
                "in [0, 1], one row per n bucket)"
            )
        return m


def prefix_hits(hash_ids: IntArray, hash_offsets: IntArray) -> tuple[IntArray, IntArray]:
    """(h, parent) per request: leading blocks seen before, and the index of the most
    recent earlier request holding block h−1 (−1 when h = 0)."""
    ids = hash_ids.tolist()
    offs = hash_offsets.tolist()
    n_req = len(offs) - 1
    h = np.zeros(n_req, dtype=np.int64)
    parent = np.full(n_req, -1, dtype=np.int64)
    last_holder: dict[int, int] = {}
    # A dict of block → last request: the set of seen blocks is its keys. A Python loop:
    # the work is per block and a trace has ~10⁷ at most; hash lookups are the cost.
    for i in range(n_req):
        blocks = ids[offs[i] : offs[i + 1]]
        k = 0
        while k < len(blocks) and blocks[k] in last_holder:
            k += 1
        if k:
            h[i] = k
            parent[i] = last_holder[blocks[k - 1]]
        for b in blocks:
            last_holder[b] = i
    return h, parent


def _quantiles(v: FloatArray) -> FloatArray:
    return quantile_table(v, QUANTILES, clip=False)


def fit_prefix(
    input_len: IntArray, hash_ids: IntArray, hash_offsets: IntArray, block_size: int
) -> PrefixModel:
    from ..prompts.prefix import PrefixHitCounter

    if block_size < 1:
        raise FineserveError("--prefix-block-size must be >= 1")
    n = np.diff(hash_offsets).astype(np.int64)
    h, parent = prefix_hits(hash_ids, hash_offsets)
    share = np.where(n > 0, h / np.maximum(n, 1), 0.0)
    edges = np.unique(np.quantile(n, np.linspace(0, 1, N_BUCKETS + 1)[1:-1]))
    edges = np.append(edges, math.inf)
    bucket = np.searchsorted(edges, n, side="left")
    pooled = _quantiles(share)
    rows = []
    for b in range(len(edges)):
        sel = bucket == b
        rows.append(_quantiles(share[sel]) if np.count_nonzero(sel) >= 20 else pooled)
    dist = (np.arange(len(n)) - parent)[h > 0]
    log_d = _quantiles(np.log(dist.astype(np.float64))) if len(dist) else np.zeros(QUANTILES)
    counter = PrefixHitCounter(block_size)
    counter.add(input_len, hash_ids, hash_offsets)
    return PrefixModel(
        block_size=block_size,
        n_edges=edges,
        share_q=np.stack(rows),
        log_distance_q=log_d,
        trace_hit_rate=counter.rate,
        trace_requests=len(n),
    )


class PrefixSharer:
    """Gives each chunk's requests block ids (see the module), parents chosen among the
    last HISTORY requests of the run. Ids start at ``id_base`` (classes of one run keep
    apart)."""

    def __init__(self, model: PrefixModel, rng: np.random.Generator, id_base: int = 0) -> None:
        self.model = model
        self.rng = rng
        self.n_hist = np.zeros(0, dtype=np.int64)  # blocks of past requests
        self.off_hist = np.zeros(1, dtype=np.int64)  # their offsets into ids_hist
        self.ids_hist = np.zeros(0, dtype=np.int64)
        self.next_id = id_base

    def assign(self, input_len: IntArray) -> tuple[IntArray, IntArray]:
        """(hash_ids, hash_offsets) for the next requests."""
        m = self.model
        n_new = np.maximum(-(-input_len // m.block_size), 1).astype(np.int64)
        k = len(n_new)
        past = len(self.n_hist)
        n_all = np.concatenate([self.n_hist, n_new])
        idx = past + np.arange(k)
        bucket = np.minimum(np.searchsorted(m.n_edges, n_new, side="left"), len(m.n_edges) - 1)
        u = self.rng.random(k)
        share = np.empty(k)
        for b in np.unique(bucket):
            sel = bucket == b
            share[sel] = quantile_draw(m.share_q[b], u[sel])
        h = np.minimum(np.rint(share * n_new).astype(np.int64), n_new)
        dist = np.maximum(
            np.rint(np.exp(quantile_draw(m.log_distance_q, self.rng.random(k)))), 1
        ).astype(np.int64)
        parent = self._parents(n_all, idx, h, dist)
        # No earlier prompt is long enough (early in a run, or a rare long prompt): share
        # what the longest earlier prompt has.
        lost = (h > 0) & (parent < 0) & (idx > 0)
        if lost.any():
            longest = np.maximum.accumulate(n_all)
            first_at = np.flatnonzero(np.diff(np.concatenate([[0], longest])) > 0)
            holder = first_at[np.searchsorted(first_at, idx[lost] - 1, side="right") - 1]
            parent[lost] = holder
            h[lost] = np.minimum(h[lost], n_all[holder])
        h = np.where(parent >= 0, h, 0)
        # Flat block table over history + new: a block copies its parent's block at the
        # same position while inside the shared prefix, else it is new.
        off_new = self.off_hist[-1] + np.concatenate([[0], np.cumsum(n_new)])
        total_new = int(off_new[-1] - off_new[0])
        owner = np.repeat(np.arange(k), n_new)
        pos = np.arange(total_new) - (off_new[owner] - off_new[0])
        shared = pos < h[owner]
        all_off = np.concatenate([self.off_hist[:-1], off_new])
        src_parent = all_off[np.maximum(parent[owner], 0)] + pos  # flat index in all
        ids_new = np.empty(total_new, dtype=np.int64)
        fresh = ~shared
        ids_new[fresh] = self.next_id + np.arange(int(fresh.sum()))
        self.next_id += int(fresh.sum())
        # Parents inside this chunk precede their children: resolve by copying in rounds
        # (each round settles one more generation of in-chunk ancestry).
        from_hist = shared & (parent[owner] < past)
        ids_new[from_hist] = self.ids_hist[src_parent[from_hist]]
        pending = shared & ~from_hist
        settled = ~pending
        local_src = src_parent - self.off_hist[-1]
        while pending.any():
            ready = pending & settled[np.where(pending, local_src, 0)]
            if not ready.any():
                raise AssertionError("prefix parents form a cycle")  # parents precede
            ids_new[ready] = ids_new[local_src[ready]]
            settled |= ready
            pending &= ~ready
        self._remember(n_new, ids_new)
        return ids_new, off_new - off_new[0]

    def _parents(self, n_all: IntArray, idx: IntArray, h: IntArray, dist: IntArray) -> IntArray:
        """Per new request: the most recent request at or before idx − dist with at least h
        blocks, else the most recent before idx with that many, else −1."""
        out = np.full(len(idx), -1, dtype=np.int64)
        want = h > 0
        if not want.any():
            return out
        positions = np.arange(len(n_all))
        # Thresholds a factor √2 apart: a parent is searched among prompts of at least
        # the threshold at or above h (close enough that a conversation's last turn, a
        # few blocks longer than the shared prefix, stays a candidate).
        thresholds = np.unique(np.floor(2 ** (np.arange(0, 49) / 2)).astype(np.int64))
        level = np.searchsorted(thresholds, h, side="left")
        for lv in np.unique(level[want]):
            t = thresholds[min(lv, len(thresholds) - 1)]
            # last index ≤ x holding ≥ t blocks (a running maximum of eligible indices)
            last_ok = np.maximum.accumulate(np.where(n_all >= t, positions, -1))
            sel = want & (level == lv)
            target = idx[sel] - dist[sel]
            near = np.where(target >= 0, last_ok[np.maximum(target, 0)], -1)
            fallback = np.where(idx[sel] > 0, last_ok[np.maximum(idx[sel] - 1, 0)], -1)
            chosen = np.where(near >= 0, near, fallback)
            out[sel] = np.where(chosen < idx[sel], chosen, -1)
        # Bucketed thresholds round h up, so the parent holds ≥ h blocks.
        return out

    def _remember(self, n_new: IntArray, ids_new: IntArray) -> None:
        self.n_hist = np.concatenate([self.n_hist, n_new])
        self.ids_hist = np.concatenate([self.ids_hist, ids_new])
        tail = self.off_hist[-1] + np.concatenate([[0], np.cumsum(n_new)])
        self.off_hist = np.concatenate([self.off_hist[:-1], tail])
        extra = len(self.n_hist) - HISTORY
        if extra > 0:
            cut = int(self.off_hist[extra])
            self.n_hist = self.n_hist[extra:]
            self.ids_hist = self.ids_hist[cut:]
            self.off_hist = self.off_hist[extra:] - cut


def fresh_blocks(
    input_len: IntArray, block_size: int, first_id: int
) -> tuple[IntArray, IntArray, int]:
    """Blocks that share nothing (a class without a prefix model in a run whose other
    classes have one): (hash_ids, hash_offsets, next free id)."""
    n = np.maximum(-(-input_len // block_size), 1).astype(np.int64)
    off = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    total = int(off[-1])
    return first_id + np.arange(total, dtype=np.int64), off, first_id + total


def with_blocks(
    chunks: Iterator[Schedule], sharer: PrefixSharer | None, block_size: int, id_base: int
) -> Iterator[Schedule]:
    """Chunks with ``hash_ids``: from the sharer, or fresh ones when there is none."""
    next_id = id_base
    for c in chunks:
        if sharer is not None:
            ids, off = sharer.assign(c.input_len)
        else:
            ids, off, next_id = fresh_blocks(c.input_len, block_size, next_id)
        c.hash_ids, c.hash_offsets = ids, off
        yield c
