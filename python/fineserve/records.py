"""The per-request record schema and its conversions, in one place.

A drained batch of records travels as one typed Arrow :class:`pyarrow.RecordBatch`
(:data:`RECORD_SCHEMA`'s engine columns plus the schedule's extra columns, joined):
from the engine (or a Ray worker) to the sink, and on to the results file unchanged. The
metrics read its numpy view (:class:`RecordColumns`, :func:`records_from_table`).
Extra columns whose names start with ``_`` are the metrics' own: they ride in the batch
but never reach a results file (:func:`file_batch`).
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from ._engine import ERROR_KINDS
from .ragged import offsets_from_counts, take_ragged

#: The engine's per-request integer columns (times, counts, usage, status).
RECORD_INT_COLUMNS = (
    "index",
    "scheduled_ns",
    "sent_ns",
    "first_byte_ns",
    "first_token_ns",
    "done_ns",
    "n_chunks",
    "completion_tokens",
    "prompt_tokens",
    "http_status",
    # Reasoning, answer and usage details (results files before them lack these).
    "first_answer_ns",
    "last_reasoning_ns",
    "reasoning_chunks",
    "reasoning_tokens",
    "cached_tokens",
    "usage_ignored",
    # ns waited for connection budget before the send (part of the dispatch lag).
    "conn_wait_ns",
    # Live conversation history: what a later turn was sent with (HISTORY_KINDS) and the
    # bytes of history spliced into its body (-1: none).
    "history_kind",
    "history_bytes",
)

#: ``history_kind`` values (``engine::HistoryKind``): what a later turn's body carried.
HISTORY_KINDS = {
    0: "none",
    1: "after_text_reply",
    2: "tool_result_after_tool_call",
    3: "after_reply_without_text",
    4: "after_tool_call_without_arguments",
    5: "after_truncated_reply",
}
#: Columns added after the first results files: what a file without them reads as.
RECORD_COLUMN_DEFAULTS = {
    "first_answer_ns": -1,
    "last_reasoning_ns": -1,
    "reasoning_chunks": 0,
    "reasoning_tokens": -1,
    "cached_tokens": -1,
    "usage_ignored": 0,
    "conn_wait_ns": 0,
    "history_kind": 0,
    "history_bytes": -1,
}

_DICT = pa.dictionary(pa.int32(), pa.string())

#: The engine's per-request columns as Arrow stores them (the schedule's extra columns go
#: between ``endpoint`` and ``chunk_ns``; a results file has them in this order).
RECORD_SCHEMA = pa.schema(
    [
        *(pa.field(c, pa.int64()) for c in RECORD_INT_COLUMNS),
        pa.field("error_kind", _DICT),
        pa.field("error_message", pa.string()),
        pa.field("endpoint", _DICT),
        pa.field("chunk_ns", pa.large_list(pa.int64())),
    ]
)
_ENGINE_NAMES = frozenset(RECORD_SCHEMA.names)


class RecordColumns(TypedDict):
    """The numpy view of a record batch, as the engine drains it and the metrics read it:
    one entry per request in each scalar column, the token-event times of row ``i`` in
    ``chunk_ns[chunk_offsets[i]:chunk_offsets[i + 1]]``, and the error message of row
    ``error_index[j]`` in ``error_message[j]`` (rows without one are absent)."""

    index: npt.NDArray[np.uint64]
    scheduled_ns: npt.NDArray[np.int64]
    sent_ns: npt.NDArray[np.int64]
    first_byte_ns: npt.NDArray[np.int64]
    first_token_ns: npt.NDArray[np.int64]
    done_ns: npt.NDArray[np.int64]
    n_chunks: npt.NDArray[Any]
    completion_tokens: npt.NDArray[np.int64]
    prompt_tokens: npt.NDArray[np.int64]
    http_status: npt.NDArray[Any]
    first_answer_ns: npt.NDArray[np.int64]
    last_reasoning_ns: npt.NDArray[np.int64]
    reasoning_chunks: npt.NDArray[Any]
    reasoning_tokens: npt.NDArray[np.int64]
    cached_tokens: npt.NDArray[np.int64]
    usage_ignored: npt.NDArray[Any]
    conn_wait_ns: npt.NDArray[np.int64]
    history_kind: npt.NDArray[Any]
    history_bytes: npt.NDArray[np.int64]
    error_kind: npt.NDArray[np.uint8]
    endpoint_idx: npt.NDArray[np.uint32]
    chunk_ns: npt.NDArray[np.int64]
    chunk_offsets: npt.NDArray[np.uint64]
    error_index: npt.NDArray[np.int64]
    error_message: list[str]


_SCALAR_COLUMNS = (*RECORD_INT_COLUMNS, "error_kind", "endpoint_idx")


def records_to_batch(
    columns: dict[str, Any], extra: dict[str, npt.NDArray[Any]], endpoints: list[str]
) -> pa.RecordBatch:
    """One typed batch from drained engine columns plus the extra columns of each row."""
    n = len(columns["index"])
    arrays: list[pa.Array] = [
        pa.array(_int_column(columns, c, n).astype(np.int64, copy=False))
        for c in RECORD_INT_COLUMNS
    ]
    kind = np.asarray(columns["error_kind"]).astype(np.int32)
    arrays.append(
        pa.DictionaryArray.from_arrays(pa.array(kind), pa.array(ERROR_KINDS, pa.string()))
    )
    messages: list[str | None] = [None] * n
    for row, msg in zip(np.asarray(columns["error_index"]).tolist(), columns["error_message"]):
        messages[int(row)] = msg
    arrays.append(pa.array(messages, pa.string()))
    ep = np.asarray(columns["endpoint_idx"]).astype(np.int32)
    arrays.append(pa.DictionaryArray.from_arrays(pa.array(ep), pa.array(endpoints, pa.string())))
    offsets = np.asarray(columns["chunk_offsets"]).astype(np.int64)
    arrays.append(
        pa.LargeListArray.from_arrays(
            pa.array(offsets), pa.array(np.asarray(columns["chunk_ns"]).astype(np.int64))
        )
    )
    return with_extra(pa.RecordBatch.from_arrays(arrays, schema=RECORD_SCHEMA), extra)


def with_extra(batch: pa.RecordBatch, extra: dict[str, npt.NDArray[Any]]) -> pa.RecordBatch:
    """``batch`` with the schedule's extra columns joined (before ``chunk_ns``, where a
    results file has them); the batch's own columns are not copied."""
    if not extra:
        return batch
    at = batch.schema.get_field_index("chunk_ns")
    names = list(batch.schema.names)
    arrays = list(batch.columns)
    for name, values in extra.items():
        v = np.asarray(values)
        arrays.insert(at, pa.array(v.astype(str) if v.dtype == object else v))
        names.insert(at, name)
        at += 1
    return pa.RecordBatch.from_arrays(arrays, names=names)


def file_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` without the metrics' own columns (names starting with ``_``)."""
    internal = [c for c in batch.schema.names if c.startswith("_")]
    return batch.drop_columns(internal) if internal else batch


def records_from_table(
    data: pa.Table | pa.RecordBatch, endpoints: list[str] | None = None
) -> tuple[RecordColumns, dict[str, Any]]:
    """The numpy view of a record batch or a results file's table: engine columns (as
    ``Run.drain`` gives them; integer columns without a copy where Arrow allows) and the
    extra per-row columns. Error kinds are read by name (an unknown one as
    ``invalid_response``); ``endpoint_idx`` indexes ``endpoints`` when given (the run's
    list), else the endpoints in order of first appearance. Columns a file written before
    them lacks read as :data:`RECORD_COLUMN_DEFAULTS`."""

    def column(name: str) -> pa.Array:
        c = data.column(name)
        return c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c

    def positions(name: str, names: list[str]) -> npt.NDArray[np.int64]:
        """Each row's position in ``names``, which grows by the names it lacks."""
        col = column(name)
        if pa.types.is_dictionary(col.type) and not col.null_count:
            if col.dictionary.to_pylist() == names:  # as built for this run: no lookup
                same: npt.NDArray[np.int64] = col.indices.to_numpy().astype(np.int64)
                return same
        encoded = pc.dictionary_encode(col.cast(pa.string()))
        for v in encoded.dictionary.to_pylist():
            if v not in names:
                names.append(v)
        lut = np.array([names.index(v) for v in encoded.dictionary.to_pylist()], np.int64)
        idx = encoded.indices.to_numpy(zero_copy_only=False)  # pyarrow is untyped: Any
        rows: npt.NDArray[np.int64] = lut[idx]
        return rows

    present = set(data.schema.names)
    ints: dict[str, Any] = {
        c: column(c).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        if c in present
        else np.full(data.num_rows, RECORD_COLUMN_DEFAULTS[c], np.int64)
        for c in RECORD_INT_COLUMNS
    }
    ints["index"] = ints["index"].astype(np.uint64)
    kind = positions("error_kind", list(ERROR_KINDS))
    kind[kind >= len(ERROR_KINDS)] = ERROR_KINDS.index("invalid_response")
    messages = column("error_message").to_pylist()
    rows = [i for i, m in enumerate(messages) if m is not None]
    chunks = column("chunk_ns")
    offsets = chunks.offsets.to_numpy().astype(np.int64) if len(chunks) else np.zeros(1, np.int64)
    cols: RecordColumns = {
        **ints,  # type: ignore[typeddict-item]
        "error_kind": kind.astype(np.uint8),
        "endpoint_idx": positions("endpoint", list(endpoints or [])).astype(np.uint32),
        "error_index": np.asarray(rows, np.int64),
        "error_message": [messages[i] for i in rows],
        # A slice's values start at offsets[0].
        "chunk_ns": chunks.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int64, copy=False),
        "chunk_offsets": (offsets - offsets[0]).astype(np.uint64),
    }
    extra = {
        c: column(c).to_numpy(zero_copy_only=False)
        for c in data.schema.names
        if c not in _ENGINE_NAMES
    }
    return cols, extra


def _int_column(columns: dict[str, Any], name: str, n: int) -> npt.NDArray[Any]:
    """An engine column; one added later may be missing from hand-built columns."""
    if name in columns:
        return np.asarray(columns[name])
    return np.full(n, RECORD_COLUMN_DEFAULTS[name], np.int64)


def concat_record_batches(batches: list[dict[str, Any]], *, sort: bool) -> dict[str, Any]:
    """One column dict from drained batches (row-aligned chunk and error columns kept
    consistent); ``sort`` orders rows by schedule index."""
    if not batches:
        return dict(empty_records())
    out: dict[str, Any] = {
        c: np.concatenate([np.asarray(b[c]) for b in batches]) for c in _SCALAR_COLUMNS
    }
    counts = np.concatenate([np.diff(np.asarray(b["chunk_offsets"], np.int64)) for b in batches])
    chunk_ns = np.concatenate([np.asarray(b["chunk_ns"]) for b in batches])
    messages: dict[int, str] = {}
    row0 = 0
    for b in batches:
        for r, m in zip(np.asarray(b["error_index"]).tolist(), b["error_message"]):
            messages[row0 + r] = m
        row0 += len(b["index"])
    offsets = offsets_from_counts(counts)
    order = np.argsort(out["index"], kind="stable") if sort else np.arange(row0)
    if sort:
        for c in _SCALAR_COLUMNS:
            out[c] = out[c][order]
        chunk_ns, offsets = take_ragged(chunk_ns, offsets, order)
    out["chunk_ns"] = chunk_ns
    out["chunk_offsets"] = offsets.astype(np.uint64)
    position = np.empty(row0, dtype=np.int64)
    position[order] = np.arange(row0)
    rows = sorted((int(position[r]), m) for r, m in messages.items())
    out["error_index"] = np.array([r for r, _ in rows], dtype=np.int64)
    out["error_message"] = [m for _, m in rows]
    return out


def empty_records() -> RecordColumns:
    """The engine columns of no request."""
    z = np.zeros(0, np.int64)
    return {
        **{c: z for c in RECORD_INT_COLUMNS},  # type: ignore[typeddict-item]
        "index": np.zeros(0, np.uint64),
        "error_kind": np.zeros(0, np.uint8),
        "endpoint_idx": np.zeros(0, np.uint32),
        "chunk_ns": z,
        "chunk_offsets": np.zeros(1, np.uint64),
        "error_index": z,
        "error_message": [],
    }


def unsent_records(
    index: npt.NDArray[Any],
    scheduled_ns: npt.NDArray[np.int64],
    endpoint_idx: npt.NDArray[Any],
    error_kind: npt.NDArray[Any],
    messages: list[str],
) -> dict[str, Any]:
    """Record columns, as the engine drains them, for requests that have no engine record
    (never fed, or lost with a worker): no timestamps, a failure kind and a reason each."""
    n = len(index)
    never = np.full(n, -1, dtype=np.int64)
    return {
        "index": np.asarray(index, dtype=np.uint64),
        "scheduled_ns": np.asarray(scheduled_ns, dtype=np.int64),
        "sent_ns": never,
        "first_byte_ns": never,
        "first_token_ns": never,
        "done_ns": never,
        "n_chunks": np.zeros(n, dtype=np.uint32),
        "completion_tokens": never,
        "prompt_tokens": never,
        "http_status": np.zeros(n, dtype=np.uint16),
        "error_kind": np.asarray(error_kind, dtype=np.uint8),
        "endpoint_idx": np.asarray(endpoint_idx, dtype=np.uint32),
        "first_answer_ns": never,
        "last_reasoning_ns": never,
        "reasoning_chunks": np.zeros(n, dtype=np.uint32),
        "reasoning_tokens": never,
        "cached_tokens": never,
        "usage_ignored": np.zeros(n, dtype=np.uint8),
        "conn_wait_ns": np.zeros(n, dtype=np.int64),
        "history_kind": np.zeros(n, dtype=np.uint8),
        "history_bytes": np.full(n, -1, dtype=np.int64),
        "chunk_ns": np.zeros(0, dtype=np.int64),
        "chunk_offsets": np.zeros(n + 1, dtype=np.uint64),
        "error_index": np.arange(n, dtype=np.int64),
        "error_message": messages,
    }
