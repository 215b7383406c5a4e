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
``session_id``, ``turn``) and ``chunk_ns`` (list: arrival of each streamed token event, of
any kind: reasoning, answer or tool call).

Reasoning and usage details: ``first_answer_ns`` (first answer event, content or tool call;
-1 = none, e.g. a stream of reasoning only), ``last_reasoning_ns`` (-1 = no reasoning),
``reasoning_chunks`` (reasoning events; with reasoning first, the first that many of
``chunk_ns``), ``reasoning_tokens`` / ``cached_tokens`` (the server's
``completion_tokens_details.reasoning_tokens`` / ``prompt_tokens_details.cached_tokens``,
-1 = not reported) and ``usage_ignored`` (1: a usage value of an unexpected type was
ignored). Files written before these columns read as if nothing was reported.

Conversations with live history: ``history_kind`` (what a later turn carried,
``records.HISTORY_KINDS``: 0 none, 1 after a text reply, 2 a tool result after a tool call,
3 after a reply without answer text, 4 after a tool call without arguments, 5 after a
truncated reply) and ``history_bytes`` (the history spliced into its body; -1: none).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from .console import note, warn
from .errors import FineserveError
from .records import (
    RECORD_COLUMN_DEFAULTS,
    RECORD_INT_COLUMNS,
    empty_records,
    file_batch,
    records_to_batch,
)

if TYPE_CHECKING:
    from .config import BlastConfig

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


#: Columns every results file has (what the metrics and the report read).
REQUIRED_COLUMNS = (
    *(c for c in RECORD_INT_COLUMNS if c not in RECORD_COLUMN_DEFAULTS),
    "error_kind",
    "error_message",
    "endpoint",
    "input_len",
    "chunk_ns",
)

#: Rows per Parquet row group of a results file.
PARQUET_ROW_GROUP = 65_536


def sibling_path(requests_path: Path, tag: str) -> Path:
    """``RUN<tag>.parquet`` beside ``RUN.parquet``."""
    p = Path(requests_path)
    stem = p.name[: -len(".parquet")] if p.name.endswith(".parquet") else p.name
    return p.with_name(f"{stem}{tag}.parquet")


def server_metrics_path(requests_path: Path) -> Path:
    """``RUN.server-metrics.parquet`` beside ``RUN.parquet`` (``--server-metrics``)."""
    return sibling_path(requests_path, ".server-metrics")


def read_server_metrics(requests_path: Path) -> pa.Table | None:
    """The scraped samples beside a results file (its Parquet, or the journal a crash
    left); None when the run scraped nothing."""
    path = server_metrics_path(requests_path)
    journal = path.with_name(path.name + JOURNAL_SUFFIX)
    try:
        if path.is_file():
            return pq.read_table(path)
        if journal.is_file():
            table, _ = read_journal(journal)
            return table.sort_by("t_ns") if table.num_rows else table
    except (pa.ArrowInvalid, OSError) as e:
        raise FineserveError(f"{path}: not a server-metrics file ({e})") from None
    return None


class RequestsWriter:
    """Appends record batches to the journal; ``close`` turns it into the Parquet file.

    A failing disk never costs the run: if a journal write fails (a full disk, a lost
    mount, no descriptor left) the journal goes on in the temporary directory, and if that
    fails too the records stop being written (counted in ``dropped``); ``close`` writes the
    Parquet from every journal's whole batches, in the temporary directory if the asked-for
    place cannot take it. Each of these says so in one line; none raises, so the summary
    and ``--output-file`` still come."""

    def __init__(
        self,
        path: Path,
        run_meta: dict[str, Any],
        *,
        what: str = "request records",
        sort_column: str = "index",
    ) -> None:
        self.path = Path(path)
        #: What the rows are, in messages; the column the Parquet is sorted by.
        self.what = what
        self.sort_column = sort_column
        self.journal = self.path.with_name(self.path.name + JOURNAL_SUFFIX)
        self.meta = dict(run_meta)
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None
        self._sink: Any = None
        self._journals: list[Path] = [self.journal]
        #: Where the Parquet file ended up (None until closed, or if it could not be made).
        self.final_path: Path | None = None
        self.rows = 0
        self.dropped = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Opened now, not at the first batch: fail before an hour of load if the place
            # is not writable, and hold the descriptor before the run needs them all.
            self._sink = pa.OSFile(str(self.journal), "wb")
        except OSError as e:
            raise FineserveError(f"cannot write {self.journal}: {_why(e)}") from None
        # Exercise the Arrow paths the first batch takes (IPC writer, dictionaries, list
        # arrays) before the run: their lazy initialisation must not meet a descriptor
        # shortage mid-run.
        probe = records_to_batch(dict(empty_records()), {}, [""])
        with ipc.new_stream(pa.BufferOutputStream(), probe.schema) as w:
            w.write_batch(probe)

    def write(self, batch: pa.RecordBatch) -> None:
        """Appends a record batch (the metrics' own ``_`` columns left out)."""
        batch = file_batch(batch)
        if batch.num_rows == 0:
            return
        # The current journal, then (once) the one it moves to; else the rows are dropped.
        for moved in (False, True):
            if self._sink is None:
                break
            try:
                self._append(batch)
                return
            except OSError as e:
                if moved:
                    self._give_up(e)
                else:
                    self._move_journal(e)
        self.dropped += batch.num_rows

    def _append(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            if self._schema is None:
                self._schema = batch.schema.with_metadata(
                    {METADATA_KEY: json.dumps({**self.meta, "complete": False}).encode()}
                )
            self._writer = ipc.new_stream(self._sink, self._schema)
        assert self._schema is not None
        if batch.schema.names != self._schema.names:
            raise FineserveError("internal: record batch columns changed during the run")
        self._writer.write_batch(
            batch.cast(self._schema) if batch.schema != self._schema else batch
        )
        self._sink.flush()
        self.rows += batch.num_rows

    def _close_sink(self) -> None:
        for closer in (self._writer, self._sink):
            try:
                if closer is not None:
                    closer.close()
            except (OSError, pa.ArrowException):
                pass  # the journal's whole batches are read back; a torn tail is skipped
        self._writer = None
        self._sink = None

    def _move_journal(self, e: OSError) -> None:
        """The current journal cannot take more: continue in the temporary directory."""
        failed = self._journals[-1]
        self._close_sink()
        fallback = _fallback_path(self.journal)
        if fallback in self._journals:
            self._give_up(e)
            return
        try:
            self._sink = pa.OSFile(str(fallback), "wb")
        except OSError as e2:
            warn(f"cannot write {failed}: {_why(e)}")
            self._give_up(e2)
            return
        self._journals.append(fallback)
        warn(
            f"cannot write {failed}: {_why(e)}; the run goes on, {self.what} continue in "
            f"{fallback} ({self.rows} written so far stay in {failed})"
        )

    def _give_up(self, e: OSError) -> None:
        self._close_sink()
        warn(
            f"{self.what} are no longer written ({_why(e)}): the run goes on, the "
            f"summary and --output-file are unaffected; {self.rows} records kept in "
            + ", ".join(str(j) for j in self._journals)
        )

    def add_meta(self, meta: dict[str, Any]) -> None:
        """Adds to the run's metadata now, so that a journal cut short by a crash has it
        too (e.g. the schedule digest, known once the whole schedule was generated): an
        empty batch carries the metadata so far, and the reader takes the last one."""
        self.meta.update(meta)
        if self._writer is not None and self._schema is not None:
            empty = pa.RecordBatch.from_pylist([], schema=self._schema)
            try:
                self._writer.write_batch(
                    empty, custom_metadata={METADATA_KEY: json.dumps(self.meta).encode()}
                )
                self._sink.flush()
            except OSError as e:
                self._move_journal(e)

    def close(self, final_meta: dict[str, Any]) -> Path | None:
        """Writes the Parquet file (rows in schedule order) and removes the journal(s);
        returns where it went, or None (said in one line) if nowhere could take it.

        The journal is memory-mapped, not read: its batches stay in the page cache, and
        only the sort order (8 bytes a row) and one row group at a time are built, so a
        run of tens of millions of requests does not need its results in memory."""
        meta = {**self.meta, **final_meta, "complete": True, "rows": self.rows}
        if self.dropped:
            meta["dropped_rows"] = self.dropped
        metadata = {METADATA_KEY: json.dumps(meta).encode()}
        moved = len(self._journals) > 1
        self._close_sink()
        for target in (self.path, _fallback_path(self.path)):
            try:
                self._write_parquet(target, metadata)
            except (OSError, pa.ArrowException) as e:
                _remove_quietly(target)
                warn(f"cannot write {target}: {_why(e)}")
                continue
            if target != self.path:
                warn(f"{self.what} written to {target} instead of {self.path}")
            elif moved:
                note(f"{self.what} joined from {len(self._journals)} journals")
            for j in self._journals:
                _remove_quietly(j)
            self.final_path = target
            return target
        warn(
            f"{self.what} not joined into Parquet; whole batches remain in "
            + ", ".join(str(j) for j in self._journals)
            + " (`fineserve report` reads a journal)"
        )
        return None

    def _write_parquet(self, target: Path, metadata: dict[bytes, bytes]) -> None:
        if self._schema is None:
            pq.write_table(pa.table({}).replace_schema_metadata(metadata), target)
            return
        if self.rows == 0:  # journals that never took a batch: the columns alone
            pq.write_table(self._schema.empty_table().replace_schema_metadata(metadata), target)
            return
        if len(self._journals) == 1:
            with pa.memory_map(str(self._journals[0]), "r") as source:
                table = ipc.open_stream(source).read_all()
                _sorted_parquet(table, target, metadata, self.sort_column)
                del table
            return
        parts = [read_journal(j)[0] for j in self._journals]
        table = pa.concat_tables([p for p in parts if p.num_columns], promote_options="none")
        _sorted_parquet(table, target, metadata, self.sort_column)


def _sorted_parquet(
    table: pa.Table, target: Path, metadata: dict[bytes, bytes], column: str = "index"
) -> None:
    order = np.argsort(table[column].to_numpy(zero_copy_only=False), kind="stable")
    schema = table.schema.with_metadata(metadata)
    with pq.ParquetWriter(target, schema, compression="zstd") as out:
        for lo in range(0, len(order), PARQUET_ROW_GROUP):
            part = table.take(order[lo : lo + PARQUET_ROW_GROUP])
            out.write_table(part.replace_schema_metadata(metadata))


def _fallback_path(path: Path) -> Path:
    """The same file name in the temporary directory (tagged with this process)."""
    return Path(tempfile.gettempdir()) / f"fineserve-{os.getpid()}-{path.name}"


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _why(e: BaseException) -> str:
    """The OS's words for an I/O error (Arrow's own errors carry them as "[errno N]")."""
    found = re.search(r"\[errno (\d+)\]", str(e))
    if found:  # Arrow's message, with the OS's words after it
        return os.strerror(int(found.group(1)))
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return (str(e).splitlines() or [type(e).__name__])[0]


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


def run_meta(
    cfg: BlastConfig, urls: list[str], model: str, workload_info: dict[str, Any]
) -> dict[str, Any]:
    """The run's metadata in a results file's footer: what ran, where, with what."""
    from . import __version__
    from .transport import redact

    m = cfg.metrics
    secrets = [cfg.target.api_key or ""] + [h.value for h in cfg.target.headers if h.secret]
    return {
        "fineserve_version": __version__,
        # Secrets given on the command line (a credential --header) never reach the file.
        "command": redact(shlex.join(["fineserve", *sys.argv[1:]]), secrets),
        # The configuration too: the command line is the process's, which is not this
        # command's when fineserve runs inside another program (tests, scripts).
        "config": cfg.to_json(),
        # What `fineserve report` reads back to recompute the run's own figures.
        "options": {
            "slos": dict(m.slos),
            "metrics_window": m.window_s,
            "percentile_metrics_list": list(m.percentile_metrics),
            "metric_percentiles_list": list(m.metric_percentiles),
            "num_prompts": cfg.workload.num_prompts,
        },
        "seed": cfg.workload.seed,
        "endpoint": urls[0],
        "endpoints": urls,
        "model": model,
        "backend": cfg.target.backend,
        "workload": workload_info,
        "machine": machine_info(),
        "versions": library_versions(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def result_json(
    cfg: BlastConfig,
    m: dict[str, Any],
    header: dict[str, Any],
    model: str,
    url: str,
    partial: bool,
) -> dict[str, Any]:
    """The result JSON: FineServe's and vLLM's keys, then every metric."""
    from . import __version__

    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "fineserve_version": __version__,
        "backend": cfg.target.backend,
        "mode": header.get("mode", cfg.workload.mode),
        "endpoint": url,
        "model_id": model,
        # --class-model: the model each class's requests asked for (model_id is the rest's).
        "class_models": header.get("class_models") or {},
        # null without --tokenizer: prompts were synthetic words, no tokenizer was used.
        "tokenizer_id": cfg.prompts.tokenizer,
        "num_prompts": m["scheduled"],
        # A number, as vLLM writes it ("inf" for no pacing); outside Poisson mode the
        # schedule's mean rate.
        "request_rate": (
            header["request_rate"]
            if header.get("mode") == "poisson"
            else m.get("offered_request_rate")
        ),
        "burstiness": cfg.workload.burstiness,
        "max_concurrency": cfg.engine.max_concurrency,
        "seed": cfg.workload.seed,
        "partial": partial,
        # The engines the schedule was split over (--processes, --ray --workers).
        "engine_processes": cfg.scale_out.processes,
        "ray_workers": cfg.scale_out.workers if cfg.scale_out.address else 0,
        "lanes_per_engine": header.get("lanes"),
    }
    result.update(m)
    return result


def write_result(path: Path, result: dict[str, Any]) -> None:
    """The result JSON to ``path`` (``.jsonl``: one line appended, as FineServe)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".jsonl":
            with path.open("a") as f:
                f.write(json.dumps(result) + "\n")
        else:
            path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise FineserveError(f"cannot write {path}: {e.strerror}") from None
