"""Per-request results on disk, written as the run goes.

While a run is going, each drained batch of records is appended to a *journal*
(``<file>.journal``, an Arrow IPC stream: every batch is complete on disk once written,
and a reader keeps every whole batch of a file cut short by a crash). When the run ends —
normally, by Ctrl-C or by SIGTERM — the journal becomes the Parquet file, with the run's
metadata in its footer, and the journal is removed. So a crash loses nothing that had
finished and drained; ``fineserve report`` reads a leftover journal too.

Columns (times in ns from the run's start instant, -1 = never happened):
``index`` (position in the schedule), ``scheduled_ns``, ``sent_ns``, ``first_byte_ns``,
``first_token_ns``, ``done_ns``, ``n_chunks``, ``completion_tokens`` / ``prompt_tokens``
(server-reported usage, -1 = none), ``http_status`` (0 = none), ``error_kind`` (string,
``ok`` for success), ``error_message`` (null when none), ``endpoint``, ``input_len`` and
``output_len`` (requested), the schedule's labels when present (``class``, ``client_id``,
``session_id``, ``turn``) and ``chunk_ns`` (list: arrival of each streamed token event).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from ._engine import ERROR_KINDS
from .errors import FineserveError
from .runner import RECORD_INT_COLUMNS

METADATA_KEY = b"fineserve.run"
JOURNAL_SUFFIX = ".journal"


def machine_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (parsing, percentiles, files)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("numpy", "pyarrow", "scipy", "click", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def records_to_batch(
    columns: dict[str, Any], extra: dict[str, npt.NDArray[Any]], endpoints: list[str]
) -> pa.RecordBatch:
    """One Arrow batch from drained engine columns plus the chunk columns of each row."""
    n = len(columns["index"])
    arrays: dict[str, pa.Array] = {
        c: pa.array(np.asarray(columns[c]).astype(np.int64)) for c in RECORD_INT_COLUMNS
    }
    kind = np.asarray(columns["error_kind"]).astype(np.int32)
    arrays["error_kind"] = pa.DictionaryArray.from_arrays(
        pa.array(kind), pa.array(ERROR_KINDS, pa.string())
    )
    messages: list[str | None] = [None] * n
    for row, msg in zip(np.asarray(columns["error_index"]).tolist(), columns["error_message"]):
        messages[int(row)] = msg
    arrays["error_message"] = pa.array(messages, pa.string())
    ep = np.asarray(columns["endpoint_idx"]).astype(np.int32)
    arrays["endpoint"] = pa.DictionaryArray.from_arrays(
        pa.array(ep), pa.array(endpoints, pa.string())
    )
    for name, values in extra.items():
        if name.startswith("_"):  # the metrics' own columns
            continue
        v = np.asarray(values)
        arrays[name] = pa.array(v.astype(str) if v.dtype == object else v)
    offsets = np.asarray(columns["chunk_offsets"]).astype(np.int64)
    arrays["chunk_ns"] = pa.LargeListArray.from_arrays(
        pa.array(offsets), pa.array(np.asarray(columns["chunk_ns"]).astype(np.int64))
    )
    return pa.RecordBatch.from_pydict(arrays)


def records_from_table(
    data: pa.Table | pa.RecordBatch, endpoints: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inverse of :func:`records_to_batch`: engine columns (as ``Run.drain`` gives
    them) and the extra per-row columns, from a results file's table or a batch that
    travelled as Arrow (Ray workers). Error kinds are read by name (an unknown one as
    ``invalid_response``); ``endpoint_idx`` indexes ``endpoints`` when given (the run's
    list), else the endpoints in order of first appearance."""

    def column(name: str) -> pa.Array:
        c = data.column(name)
        return c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c

    def positions(name: str, names: list[str]) -> npt.NDArray[np.int64]:
        """Each row's position in ``names``, which grows by the names it lacks."""
        encoded = pc.dictionary_encode(column(name).cast(pa.string()))
        for v in encoded.dictionary.to_pylist():
            if v not in names:
                names.append(v)
        lut = np.array([names.index(v) for v in encoded.dictionary.to_pylist()], np.int64)
        return lut[encoded.indices.to_numpy(zero_copy_only=False)]

    cols: dict[str, Any] = {
        c: column(c).to_numpy(zero_copy_only=False).astype(np.int64) for c in RECORD_INT_COLUMNS
    }
    cols["index"] = cols["index"].astype(np.uint64)
    kind = positions("error_kind", list(ERROR_KINDS))
    kind[kind >= len(ERROR_KINDS)] = ERROR_KINDS.index("invalid_response")
    cols["error_kind"] = kind.astype(np.uint8)
    cols["endpoint_idx"] = positions("endpoint", list(endpoints or [])).astype(np.uint32)
    messages = column("error_message").to_pylist()
    rows = [i for i, m in enumerate(messages) if m is not None]
    cols["error_index"] = np.asarray(rows, np.int64)
    cols["error_message"] = [messages[i] for i in rows]
    chunks = column("chunk_ns")
    offsets = chunks.offsets.to_numpy().astype(np.int64) if len(chunks) else np.zeros(1, np.int64)
    # A slice's values start at offsets[0].
    cols["chunk_ns"] = chunks.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int64)
    cols["chunk_offsets"] = (offsets - offsets[0]).astype(np.uint64)
    known = {*RECORD_INT_COLUMNS, "error_kind", "endpoint", "error_message", "chunk_ns"}
    extra = {
        c: column(c).to_numpy(zero_copy_only=False) for c in data.schema.names if c not in known
    }
    return cols, extra


#: Columns every results file has (what the metrics and the report read).
REQUIRED_COLUMNS = (
    *RECORD_INT_COLUMNS,
    "error_kind",
    "error_message",
    "endpoint",
    "input_len",
    "chunk_ns",
)

#: Rows per Parquet row group of a results file.
PARQUET_ROW_GROUP = 65_536


class RequestsWriter:
    """Appends record batches to the journal; ``close`` turns it into the Parquet file."""

    def __init__(self, path: Path, run_meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.journal = self.path.with_name(self.path.name + JOURNAL_SUFFIX)
        self.meta = dict(run_meta)
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None
        self._sink: Any = None
        self.rows = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Fail now, not after an hour of load, if the destination is not writable.
            self.journal.touch()
        except OSError as e:
            raise FineserveError(f"cannot write {self.journal}: {e.strerror}") from None

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if self._writer is None:
            self._schema = batch.schema.with_metadata(
                {METADATA_KEY: json.dumps({**self.meta, "complete": False}).encode()}
            )
            self._sink = pa.OSFile(str(self.journal), "wb")
            self._writer = ipc.new_stream(self._sink, self._schema)
        assert self._schema is not None
        if batch.schema.names != self._schema.names:
            raise FineserveError("internal: record batch columns changed during the run")
        self._writer.write_batch(
            batch.cast(self._schema) if batch.schema != self._schema else batch
        )
        self._sink.flush()
        self.rows += batch.num_rows

    def add_meta(self, meta: dict[str, Any]) -> None:
        """Adds to the run's metadata now, so that a journal cut short by a crash has it
        too (e.g. the schedule digest, known once the whole schedule was generated): an
        empty batch carries the metadata so far, and the reader takes the last one."""
        self.meta.update(meta)
        if self._writer is not None and self._schema is not None:
            empty = pa.RecordBatch.from_pylist([], schema=self._schema)
            self._writer.write_batch(
                empty, custom_metadata={METADATA_KEY: json.dumps(self.meta).encode()}
            )
            self._sink.flush()

    def close(self, final_meta: dict[str, Any]) -> Path:
        """Writes the Parquet file (rows in schedule order) and removes the journal.

        The journal is memory-mapped, not read: its batches stay in the page cache, and
        only the sort order (8 bytes a row) and one row group at a time are built, so a
        run of tens of millions of requests does not need its results in memory."""
        meta = {**self.meta, **final_meta, "complete": True, "rows": self.rows}
        metadata = {METADATA_KEY: json.dumps(meta).encode()}
        try:
            if self._writer is None:
                pq.write_table(pa.table({}).replace_schema_metadata(metadata), self.path)
            else:
                self._writer.close()
                self._sink.close()
                with pa.memory_map(str(self.journal), "r") as source:
                    table = ipc.open_stream(source).read_all()
                    order = np.argsort(table["index"].to_numpy(zero_copy_only=False), kind="stable")
                    schema = table.schema.with_metadata(metadata)
                    with pq.ParquetWriter(self.path, schema, compression="zstd") as out:
                        for lo in range(0, len(order), PARQUET_ROW_GROUP):
                            part = table.take(order[lo : lo + PARQUET_ROW_GROUP])
                            out.write_table(part.replace_schema_metadata(metadata))
                    del table
        except OSError as e:
            raise FineserveError(f"cannot write {self.path}: {e.strerror}") from None
        self.journal.unlink(missing_ok=True)
        return self.path


def read_journal(path: Path) -> tuple[pa.Table, bool]:
    """Every whole batch of a journal; the flag says whether it ended cleanly."""
    batches = []
    clean = True
    schema = None
    later_meta = None
    try:
        with pa.OSFile(str(path), "rb") as f:
            reader = ipc.open_stream(f)
            schema = reader.schema
            while True:
                try:
                    batch, custom = reader.read_next_batch_with_custom_metadata()
                except StopIteration:
                    break
                if custom is not None and METADATA_KEY in custom:
                    later_meta = custom[METADATA_KEY]
                if batch.num_rows:
                    batches.append(batch)
    except (pa.ArrowInvalid, OSError):
        clean = False
    if schema is None:
        return pa.table({}), False
    if later_meta is not None:  # metadata added during the run (RequestsWriter.add_meta)
        schema = schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: later_meta})
    return pa.Table.from_batches(batches, schema=schema), clean


def detailed_lists(table: pa.Table) -> dict[str, list[Any]]:
    """vLLM's ``--save-detailed`` per-request lists, in request order: ``input_lens``,
    ``output_lens`` (tokens received), ``ttfts`` (s, from send; 0 when none), ``itls``
    (s, gaps between token chunks), ``errors`` ('' when ok, else "kind: message")."""
    t = table.sort_by("index") if table.num_rows else table
    kind = t["error_kind"].to_pylist()
    message = t["error_message"].to_pylist()
    sent = np.asarray(t["sent_ns"].to_numpy(zero_copy_only=False), dtype=np.int64)
    first = np.asarray(t["first_token_ns"].to_numpy(zero_copy_only=False), dtype=np.int64)
    ok = (np.asarray(kind, dtype=object) == "ok") & (first >= 0) & (sent >= 0)
    ttfts = np.where(ok, (first - sent) / 1e9, 0.0)
    itls = [
        (np.diff(np.asarray(c, dtype=np.int64)) / 1e9).tolist() if good and c else []
        for c, good in zip(t["chunk_ns"].to_pylist(), ok.tolist())
    ]
    return {
        "input_lens": t["input_len"].to_pylist(),
        "output_lens": [n if good else 0 for n, good in zip(t["n_chunks"].to_pylist(), ok)],
        "ttfts": ttfts.tolist(),
        "itls": itls,
        "errors": [
            "" if k == "ok" else f"{k}: {m or ''}".rstrip(": ") for k, m in zip(kind, message)
        ],
    }


def read_requests(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """A results Parquet (or a journal left by a crash) and its run metadata."""
    path = Path(path)
    if not path.is_file():
        journal = path.with_name(path.name + JOURNAL_SUFFIX)
        if journal.is_file():
            path = journal
        else:
            raise FineserveError(f"file not found: {path}")
    if path.name.endswith(JOURNAL_SUFFIX):
        table, clean = read_journal(path)
        meta = _meta(table.schema)
        meta["complete"] = False
        meta["journal_clean"] = clean
    else:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise FineserveError(f"{path}: not a fineserve results file ({e})") from None
        meta = _meta(table.schema)
    # A run that wrote no record has no columns at all; anything else needs them all.
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if table.num_columns and missing:
        raise FineserveError(
            f"{path}: not a fineserve results file (no {', '.join(missing)} column"
            f"{'s' if len(missing) > 1 else ''})"
        )
    if path.name.endswith(JOURNAL_SUFFIX) and table.num_rows:
        table = table.sort_by("index")
    return table, meta


def _meta(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        out = json.loads(raw)
        return out if isinstance(out, dict) else {}
    except json.JSONDecodeError:
        return {}
