"""The schedule: what to send and when, as columns.

``t_ns`` is the absolute send offset from the run's start instant (never a relative sleep,
which drifts); ``input_len``/``output_len`` are token counts. Optional columns ride along in
``extra``: ``class`` (str), ``client_id``, ``session_id``, ``turn`` (int64),
``reason_ratio`` (float64), conversation turns (``parent``: the schedule index of the turn
a request follows, -1 for none; ``think_ns``: how long after that turn ends it leaves;
``followers``: how many later requests follow it; ``tool_ns``: the delay instead of
``think_ns`` when the previous turn's reply was a tool call), and prefix blocks as ``hash_ids`` with
``hash_offsets`` (request i's block ids are ``hash_ids[hash_offsets[i]:hash_offsets[i+1]]``).
Multimodal requests carry list columns in ``lists`` (:data:`LIST_COLUMNS`): per request one
token budget per image, audio clip or video, as (values, offsets) like ``hash_ids``; an
empty list when it has none. ``input_len`` is then the text part alone.

Long schedules travel as an iterator of chunks (consecutive pieces of one schedule, send
offsets continuing across chunks), so nothing holds a whole day of requests at once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import FineserveError
from .ragged import offsets_from_counts, take_ragged

#: Per-request optional columns and their dtypes.
EXTRA_COLUMNS: dict[str, str] = {
    "class": "str",
    "client_id": "int64",
    "session_id": "int64",
    "turn": "int64",
    "reason_ratio": "float64",
    "parent": "int64",
    "think_ns": "int64",
    "followers": "int64",
    "tool_ns": "int64",
}

#: Per-request list columns (one entry per media item: its token budget).
LIST_COLUMNS = ("image_tokens", "audio_tokens", "video_tokens")

#: A list column: row i's values are ``values[offsets[i]:offsets[i+1]]``.
Ragged = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


@dataclass
class Schedule:
    t_ns: npt.NDArray[np.int64]
    input_len: npt.NDArray[np.int64]
    output_len: npt.NDArray[np.int64]
    extra: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    hash_ids: npt.NDArray[np.int64] | None = None
    hash_offsets: npt.NDArray[np.int64] | None = None
    #: Media token budgets per item (:data:`LIST_COLUMNS`); absent for text-only schedules.
    lists: dict[str, Ragged] = field(default_factory=dict)
    #: Off only for an intermediate that is re-ordered right after (see merge_sorted).
    check_order: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.t_ns = np.asarray(self.t_ns, dtype=np.int64)
        self.input_len = np.asarray(self.input_len, dtype=np.int64)
        self.output_len = np.asarray(self.output_len, dtype=np.int64)
        n = len(self.t_ns)
        if len(self.input_len) != n or len(self.output_len) != n:
            raise FineserveError("schedule columns have different lengths")
        for name, col in self.extra.items():
            if name not in EXTRA_COLUMNS:
                raise FineserveError(f"unknown schedule column {name!r}")
            if len(col) != n:
                raise FineserveError(f"schedule column {name!r} has a different length")
        if (self.hash_ids is None) != (self.hash_offsets is None):
            raise FineserveError("hash_ids and hash_offsets go together")
        if self.hash_offsets is not None and len(self.hash_offsets) != n + 1:
            raise FineserveError("hash_offsets must have one entry more than the schedule")
        for name, (values, offsets) in self.lists.items():
            if name not in LIST_COLUMNS:
                raise FineserveError(f"unknown schedule list column {name!r}")
            if len(offsets) != n + 1 or (n and int(offsets[-1]) != len(values)):
                raise FineserveError(f"schedule list column {name!r} has a different length")
        if n and np.any(self.t_ns < 0):
            raise FineserveError("schedule send times must be non-negative")
        if n and self.check_order and np.any(np.diff(self.t_ns) < 0):
            raise FineserveError("schedule send times must be non-negative and sorted")
        if n and (np.any(self.input_len < 1) or np.any(self.output_len < 1)):
            raise FineserveError("schedule lengths must be >= 1 token")

    def __len__(self) -> int:
        return len(self.t_ns)

    @property
    def span_s(self) -> float:
        return float(self.t_ns[-1]) / 1e9 if len(self) else 0.0

    def peak_in_window(self, window_ns: int) -> int:
        """Most requests scheduled within any window of ``window_ns`` (sizes the pool)."""
        if not len(self):
            return 0
        ends = np.searchsorted(self.t_ns, self.t_ns + window_ns, side="left")
        return int(np.max(ends - np.arange(len(self))))

    def take(self, rows: npt.NDArray[Any]) -> Schedule:
        """The requests at ``rows`` (a sorted index array or boolean mask)."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        hash_ids = hash_offsets = None
        if self.hash_ids is not None and self.hash_offsets is not None:
            hash_ids, hash_offsets = take_ragged(self.hash_ids, self.hash_offsets, idx)
        return Schedule(
            self.t_ns[idx],
            self.input_len[idx],
            self.output_len[idx],
            {k: v[idx] for k, v in self.extra.items()},
            hash_ids,
            hash_offsets,
            {k: take_ragged(v, off, idx) for k, (v, off) in self.lists.items()},
        )

    def media_counts(self, name: str) -> npt.NDArray[np.int64]:
        """Items per request in list column ``name`` (zeros when the schedule has none)."""
        if name not in self.lists:
            return np.zeros(len(self), dtype=np.int64)
        return np.diff(self.lists[name][1]).astype(np.int64)

    def media_sums(self, name: str) -> npt.NDArray[np.int64]:
        """Token budget per request over the items of list column ``name``."""
        if name not in self.lists:
            return np.zeros(len(self), dtype=np.int64)
        values, offsets = self.lists[name]
        cums = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
        sums: npt.NDArray[np.int64] = (cums[offsets[1:]] - cums[offsets[:-1]]).astype(np.int64)
        return sums


def empty_schedule() -> Schedule:
    z = np.zeros(0, dtype=np.int64)
    return Schedule(z, z, z)


def concat(parts: list[Schedule], *, check_order: bool = True) -> Schedule:
    """Schedules whose times follow each other, as one (extra columns must agree)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_schedule()
    if len(parts) == 1:
        return parts[0]
    names = set(parts[0].extra)
    if any(set(p.extra) != names for p in parts):
        raise FineserveError("cannot join schedules with different optional columns")
    list_names = set(parts[0].lists)
    if any(set(p.lists) != list_names for p in parts):
        raise FineserveError("cannot join schedules with different media columns")
    blocks = [
        (p.hash_ids, p.hash_offsets)
        for p in parts
        if p.hash_ids is not None and p.hash_offsets is not None
    ]
    if blocks and len(blocks) != len(parts):
        raise FineserveError("cannot join schedules with and without prefix blocks")
    hash_ids = hash_offsets = None
    if blocks:
        hash_ids = np.concatenate([ids for ids, _ in blocks])
        hash_offsets = offsets_from_counts(np.concatenate([np.diff(off) for _, off in blocks]))
    return Schedule(
        np.concatenate([p.t_ns for p in parts]),
        np.concatenate([p.input_len for p in parts]),
        np.concatenate([p.output_len for p in parts]),
        {k: np.concatenate([p.extra[k] for p in parts]) for k in names},
        hash_ids,
        hash_offsets,
        {
            k: (
                np.concatenate([p.lists[k][0] for p in parts]).astype(np.int64),
                offsets_from_counts(np.concatenate([np.diff(p.lists[k][1]) for p in parts])),
            )
            for k in list_names
        },
        check_order=check_order,
    )


def merge_sorted(parts: list[Schedule]) -> Schedule:
    """Interleaves schedules by send time (stable: ties keep part order)."""
    joined = concat(parts, check_order=False)
    if len(parts) <= 1:
        return concat(parts)
    return joined.take(np.argsort(joined.t_ns, kind="stable"))


class ScheduleDigest:
    """Digest of (send time, input length, output length) in schedule order; one hash per
    column, so it does not depend on how the schedule was chunked. ``generate`` prints it
    and ``blast`` records it, so a run can be matched to the schedule it sent."""

    def __init__(self) -> None:
        self._hashes = (hashlib.sha256(), hashlib.sha256(), hashlib.sha256())

    def add(self, s: Schedule) -> None:
        for h, col in zip(self._hashes, (s.t_ns, s.input_len, s.output_len)):
            h.update(np.ascontiguousarray(col, dtype="<i8").tobytes())

    def hexdigest(self) -> str:
        return hashlib.sha256(b"".join(h.digest() for h in self._hashes)).hexdigest()[:16]


@dataclass
class ScheduleStats:
    """Streaming summary of a schedule: count, span, per-window rate and IAT CV, bursts."""

    window_s: float = 300.0
    slot_ns: int = 1_000_000
    n: int = 0
    last_t_ns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    #: Per list column: (items, token budget) summed.
    media: dict[str, list[int]] = field(default_factory=dict)
    _win_n: dict[int, int] = field(default_factory=dict)
    _win_sum: dict[int, float] = field(default_factory=dict)
    _win_sq: dict[int, float] = field(default_factory=dict)
    _prev_t: int | None = None
    slot_counts: dict[int, int] = field(default_factory=dict)
    _open_slot: int = -1
    _open_count: int = 0
    _digest: ScheduleDigest = field(default_factory=lambda: ScheduleDigest())
    #: Tokens per hash_ids block, for the theoretical prefix-hit rate.
    block_size: int = 512
    _prefix: Any = None

    def add(self, s: Schedule) -> None:
        if not len(s):
            return
        t = s.t_ns
        self.n += len(s)
        self.last_t_ns = int(t[-1])
        self.input_tokens += int(s.input_len.sum())
        self.output_tokens += int(s.output_len.sum())
        for name, (values, offsets) in s.lists.items():
            items_tokens = self.media.setdefault(name, [0, 0])
            items_tokens[0] += int(offsets[-1] - offsets[0])
            items_tokens[1] += int(values.sum())
        self._digest.add(s)
        if s.hash_ids is not None and s.hash_offsets is not None:
            from .prompts.prefix import PrefixHitCounter

            if self._prefix is None:
                self._prefix = PrefixHitCounter(self.block_size)
            self._prefix.add(s.input_len, s.hash_ids, s.hash_offsets)
        prev = t[0] if self._prev_t is None else self._prev_t
        gaps = np.diff(np.concatenate([[prev], t])).astype(np.float64)
        if self._prev_t is None:
            gaps = gaps[1:]
            wt = t[1:]
        else:
            wt = t
        self._prev_t = int(t[-1])
        win = (wt // int(self.window_s * 1e9)).astype(np.int64)
        for w, cnt, sm, sq in _group_sums(win, gaps):
            self._win_n[w] = self._win_n.get(w, 0) + cnt
            self._win_sum[w] = self._win_sum.get(w, 0.0) + sm
            self._win_sq[w] = self._win_sq.get(w, 0.0) + sq
        slots = t // self.slot_ns
        uniq, counts = np.unique(slots, return_counts=True)
        if uniq[0] == self._open_slot:
            counts[0] += self._open_count
        elif self._open_count:
            self.slot_counts[self._open_count] = self.slot_counts.get(self._open_count, 0) + 1
        for c in counts[:-1]:
            self.slot_counts[int(c)] = self.slot_counts.get(int(c), 0) + 1
        self._open_slot, self._open_count = int(uniq[-1]), int(counts[-1])

    def finish(self) -> dict[str, Any]:
        if self._open_count:
            self.slot_counts[self._open_count] = self.slot_counts.get(self._open_count, 0) + 1
            self._open_count = 0
        span_s = self.last_t_ns / 1e9
        windows = []
        for w in sorted(self._win_n):
            k = self._win_n[w]
            mean = self._win_sum[w] / k
            var = max(self._win_sq[w] / k - mean * mean, 0.0)
            windows.append(
                {
                    "window": w,
                    "start_s": w * self.window_s,
                    "requests": k,
                    "rate_rps": k / self.window_s,
                    "iat_cv": float(np.sqrt(var) / mean) if mean > 0 else 0.0,
                }
            )
        occupied = sum(self.slot_counts.values())
        in_bursts = sum(c * m for c, m in self.slot_counts.items() if c > 1)
        return {
            "requests": self.n,
            "span_s": span_s,
            "mean_rate_rps": self.n / span_s if span_s > 0 else float("inf"),
            "total_input_tokens": self.input_tokens,
            "total_output_tokens": self.output_tokens,
            "windows": windows,
            "occupied_slots": occupied,
            "mean_per_occupied_slot": self.n / occupied if occupied else 0.0,
            "max_per_slot": max(self.slot_counts, default=0),
            "fraction_in_bursts": in_bursts / self.n if self.n else 0.0,
            "slot_ms": self.slot_ns / 1e6,
            "digest": self._digest.hexdigest(),
            "prefix_hit_rate_theoretical": self._prefix.rate if self._prefix else None,
            **{
                f"total_{name.removesuffix('_tokens')}_{what}": v
                for name, (items, tokens) in sorted(self.media.items())
                for what, v in (("items", items), ("tokens", tokens))
            },
        }


def _group_sums(
    keys: npt.NDArray[np.int64], values: npt.NDArray[np.float64]
) -> Iterator[tuple[int, int, float, float]]:
    if not len(keys):
        return
    uniq, start = np.unique(keys, return_index=True)
    counts = np.diff(np.append(start, len(keys)))
    sums = np.add.reduceat(values, start)
    sqs = np.add.reduceat(values * values, start)
    for k, c, s, q in zip(uniq, counts, sums, sqs):
        yield int(k), int(c), float(s), float(q)


# ---------------------------------------------------------------- Parquet round trip

_META_KEY = b"fineserve.schedule"


def write_schedule(
    path: Path, chunks: Iterable[Schedule], metadata: dict[str, Any]
) -> dict[str, Any]:
    """Streams chunks into a Parquet file (one row group per chunk); returns the summary."""
    import pyarrow.parquet as pq

    stats = ScheduleStats()
    writer: pq.ParquetWriter | None = None
    try:
        for c in chunks:
            if not len(c):
                continue
            table = _to_arrow(c)
            if writer is None:
                schema = table.schema.with_metadata({_META_KEY: json.dumps(metadata)})
                writer = pq.ParquetWriter(str(path), schema, compression="zstd")
            writer.write_table(table.cast(writer.schema))
            stats.add(c)
        if writer is None:
            raise FineserveError("the schedule is empty: nothing to write")
    except OSError as e:
        raise FineserveError(f"cannot write {path}: {e}") from None
    finally:
        if writer is not None:
            writer.close()
    return stats.finish()


def _to_arrow(s: Schedule) -> Any:
    import pyarrow as pa

    cols: dict[str, Any] = {
        "t_ns": pa.array(s.t_ns),
        "input_len": pa.array(s.input_len),
        "output_len": pa.array(s.output_len),
    }
    for name, col in s.extra.items():
        cols[name] = pa.array(col.astype(str) if EXTRA_COLUMNS[name] == "str" else col)
    if s.hash_ids is not None and s.hash_offsets is not None:
        cols["hash_ids"] = pa.ListArray.from_arrays(
            pa.array(s.hash_offsets.astype(np.int32)), pa.array(s.hash_ids)
        )
    for name, (values, offsets) in s.lists.items():
        cols[name] = pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64())
        )
    return pa.table(cols)


@dataclass(frozen=True)
class ScheduleSlice:
    """What of a written schedule to send: ``start_s <= t < start_s + duration_s`` (the
    schedule's own seconds), at most ``max_requests``, sent at ``(t - start_s) /
    time_scale``."""

    start_s: float = 0.0
    duration_s: float | None = None
    max_requests: int | None = None
    time_scale: float = 1.0

    @property
    def whole(self) -> bool:
        return (
            self.start_s == 0
            and self.duration_s is None
            and self.max_requests is None
            and self.time_scale == 1
        )


@dataclass
class ScheduleFile:
    """A written schedule opened for sending: its chunks (the slice asked for), the send
    instant of each of their requests, and the metadata ``generate`` wrote."""

    chunks: Iterator[Schedule]
    #: Send offsets of the slice's requests (ns, time-scaled): what the plan counts.
    send_ns: npt.NDArray[np.int64]
    meta: dict[str, Any]


def read_schedule(
    path: Path, chunk_rows: int = 65_536, part: ScheduleSlice | None = None
) -> tuple[Iterator[Schedule], int, dict[str, Any]]:
    """Opens a schedule written by :func:`write_schedule`: (chunks, rows, metadata); with
    ``part``, only that slice, time-scaled, conversation links renumbered into it."""
    if part is None or part.whole:  # no pass over the send times needed
        pf, meta = _open_parquet(path)
        return _chunks(pf, chunk_rows), pf.metadata.num_rows, meta
    f = open_schedule(path, part, chunk_rows)
    return f.chunks, len(f.send_ns), f.meta


def open_schedule(
    path: Path, part: ScheduleSlice | None = None, chunk_rows: int = 65_536
) -> ScheduleFile:
    """The schedule at ``path``, or the ``part`` of it, with its send times: one pass over
    the send-time column alone (8 bytes a row) finds the slice's rows and gives the plan
    its figures."""
    import pyarrow.parquet as pq

    part = part or ScheduleSlice()
    if not (part.time_scale > 0 and np.isfinite(part.time_scale)):
        raise FineserveError(f"--time-scale must be a positive number, got {part.time_scale}")
    pf, meta = _open_parquet(path)
    t_ns = pq.read_table(str(path), columns=["t_ns"])["t_ns"].to_numpy()
    start_ns = round(part.start_s * 1e9)
    lo = int(np.searchsorted(t_ns, start_ns, side="left"))
    hi = len(t_ns)
    if part.duration_s is not None:
        hi = int(np.searchsorted(t_ns, start_ns + round(part.duration_s * 1e9), side="left"))
    if part.max_requests is not None:
        hi = min(hi, lo + part.max_requests)
    if hi <= lo and not part.whole:  # a whole empty schedule is the caller's to refuse
        span = float(t_ns[-1]) / 1e9 if len(t_ns) else 0.0
        raise FineserveError(
            f"{path}: no request in --start {part.start_s:g} s"
            + (f" --duration {part.duration_s:g} s" if part.duration_s is not None else "")
            + f" (the schedule spans {span:.1f} s)"
        )
    send_ns = np.rint((t_ns[lo:hi] - start_ns) / part.time_scale).astype(np.int64)
    if part.whole:
        return ScheduleFile(_chunks(pf, chunk_rows), send_ns, meta)
    followers = None
    if "parent" in pf.schema_arrow.names:
        # Links into the slice only: a turn whose parent is cut off starts a conversation,
        # and followers are recounted (one beyond the slice would wait forever).
        parent = pq.read_table(str(path), columns=["parent"])["parent"].to_numpy()[lo:hi]
        kids = parent[parent >= lo] - lo
        followers = np.bincount(kids, minlength=hi - lo).astype(np.int64)
    chunks = _sliced(_chunks(pf, chunk_rows), lo, hi, start_ns, part.time_scale, followers)
    return ScheduleFile(chunks, send_ns, meta)


def _open_parquet(path: Path) -> tuple[Any, dict[str, Any]]:
    """The schedule's Parquet file (checked to be one) and its metadata."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except (OSError, ValueError) as e:
        raise FineserveError(f"{path}: not a readable Parquet schedule ({e})") from None
    missing = {"t_ns", "input_len", "output_len"} - set(pf.schema_arrow.names)
    if missing:
        raise FineserveError(f"{path}: not a fineserve schedule (missing {sorted(missing)})")
    raw = (pf.schema_arrow.metadata or {}).get(_META_KEY)
    return pf, (json.loads(raw) if raw else {})


def _chunks(pf: Any, chunk_rows: int) -> Iterator[Schedule]:
    for batch in pf.iter_batches(batch_size=chunk_rows):
        yield _from_arrow(batch)


def _sliced(
    chunks: Iterator[Schedule],
    lo: int,
    hi: int,
    start_ns: int,
    time_scale: float,
    followers: npt.NDArray[np.int64] | None,
) -> Iterator[Schedule]:
    """Rows [lo, hi) of the schedule's chunks, time-shifted and scaled; conversation
    columns renumbered into the slice (``followers`` precomputed over it)."""
    row = 0
    for c in chunks:
        first = row
        row += len(c)
        a, b = max(lo - first, 0), min(hi - first, len(c))
        if b > a:
            part = c.take(np.arange(a, b))
            part.t_ns = np.rint((part.t_ns - start_ns) / time_scale).astype(np.int64)
            if followers is not None:
                parent = part.extra["parent"]
                inside = parent >= lo
                part.extra["parent"] = np.where(inside, parent - lo, -1).astype(np.int64)
                for delay in ("think_ns", "tool_ns"):
                    if delay in part.extra:
                        scaled = np.where(inside, np.rint(part.extra[delay] / time_scale), 0)
                        part.extra[delay] = scaled.astype(np.int64)
                part.extra["followers"] = followers[first + a - lo : first + b - lo]
            yield part
        if row >= hi:
            return


def _from_arrow(batch: Any) -> Schedule:
    names = batch.schema.names
    col = {n: batch.column(n) for n in names}
    extra = {}
    for name, kind in EXTRA_COLUMNS.items():
        if name in col:
            a = col[name].to_numpy(zero_copy_only=False)
            extra[name] = a.astype(object) if kind == "str" else a
    hash_ids = hash_offsets = None
    if "hash_ids" in col:
        lst = col["hash_ids"]
        hash_offsets = lst.offsets.to_numpy().astype(np.int64)
        hash_ids = lst.values.to_numpy().astype(np.int64)[hash_offsets[0] : hash_offsets[-1]]
        hash_offsets = hash_offsets - hash_offsets[0]
    lists = {}
    for name in LIST_COLUMNS:
        if name in col:
            lst = col[name]
            offsets = lst.offsets.to_numpy().astype(np.int64)
            values = lst.values.to_numpy().astype(np.int64)[offsets[0] : offsets[-1]]
            lists[name] = (values, offsets - offsets[0])
    return Schedule(
        col["t_ns"].to_numpy(),
        col["input_len"].to_numpy(),
        col["output_len"].to_numpy(),
        extra,
        hash_ids,
        hash_offsets,
        lists,
    )
