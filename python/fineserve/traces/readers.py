"""Trace readers: FineServe CSV, BurstGPT CSV, Mooncake/Qwen-Bailian JSONL, Azure LLM CSV.

All parse with pyarrow (columnar; no per-row Python except on the rare malformed line) and
hand back a :class:`~fineserve.traces.base.Trace`. The format is detected from the content
(header line or first JSON object); ``trace_format`` overrides.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError
from .base import (
    LATENCY_COLUMN,
    UNIT_NS,
    Trace,
    finish_trace,
    numeric,
    require_columns,
    to_ns,
)

FORMATS = ("fineserve", "burstgpt", "mooncake", "azure")

#: Each format's own column names and timestamp unit.
DEFAULTS: dict[str, dict[str, str]] = {
    "fineserve": {
        "timestamp": "timestamp",
        "input": "input_length",
        "output": "output_length",
        "unit": "us",  # FineServe's shipped CSVs, although its README says ms
    },
    "burstgpt": {
        "timestamp": "Timestamp",
        "input": "Request tokens",
        "output": "Response tokens",
        "unit": "s",
    },
    "mooncake": {
        "timestamp": "timestamp",
        "input": "input_length",
        "output": "output_length",
        "unit": "ms",
    },
    "azure": {
        "timestamp": "TIMESTAMP",
        "input": "ContextTokens",
        "output": "GeneratedTokens",
        "unit": "datetime",
    },
}


@dataclass
class TraceOptions:
    """User overrides; None means the format's default."""

    trace_format: str | None = None
    timestamp_column: str | None = None
    input_length_column: str | None = None
    output_length_column: str | None = None
    timestamp_unit: str | None = None
    burstgpt_model: str | None = None
    burstgpt_log_type: str | None = None
    #: Mooncake-format traces without conversation ids (``toolagent``): ``hash-prefix``
    #: links a request to the latest earlier one whose prompt blocks it extends.
    infer_turns: str | None = None


def detect_format(path: Path) -> str:
    """Guesses the format from the first line."""
    try:
        with path.open("rb") as f:
            head = f.readline(65_536).decode("utf-8", "replace").strip()
    except OSError as e:
        raise FineserveError(f"cannot read trace {path}: {e.strerror}") from None
    if not head:
        raise FineserveError(f"{path}: empty trace file")
    if head.startswith("{"):
        return "mooncake"
    cols = [c.strip().strip('"') for c in head.split(",")]
    if "TIMESTAMP" in cols and "ContextTokens" in cols:
        return "azure"
    if "Timestamp" in cols and "Request tokens" in cols:
        return "burstgpt"
    if "timestamp" in cols or "input_length" in cols:
        return "fineserve"
    raise FineserveError(
        f"{path}: cannot tell the trace format from its first line ({head[:80]!r}); "
        f"pass --trace-format ({', '.join(FORMATS)})"
    )


def load_trace(path: Path, options: TraceOptions | None = None) -> Trace:
    """Reads a trace file in any supported format."""
    options = options or TraceOptions()
    path = Path(path)
    if path.is_dir():
        raise FineserveError(f"{path} is a directory, not a trace file")
    if not path.is_file():
        raise FineserveError(f"trace file not found: {path}")
    fmt = options.trace_format or detect_format(path)
    if fmt not in FORMATS:
        raise FineserveError(f"unknown trace format {fmt!r}; choose from {', '.join(FORMATS)}")
    d = DEFAULTS[fmt]
    ts_col = options.timestamp_column or d["timestamp"]
    in_col = options.input_length_column or d["input"]
    out_col = options.output_length_column or d["output"]
    unit = options.timestamp_unit or d["unit"]
    if unit not in UNIT_NS and unit != "datetime":
        raise FineserveError(f"--timestamp-unit must be one of us, ms, s (got {unit!r})")
    if fmt == "mooncake":
        trace = _read_mooncake(path, ts_col, in_col, out_col, unit)
        if options.infer_turns == "hash-prefix":
            infer_turns_from_prefixes(trace)
        return trace
    if options.infer_turns:
        raise FineserveError("--infer-turns needs a Mooncake-format trace (with hash_ids)")
    return _read_csv_trace(path, fmt, ts_col, in_col, out_col, unit, options)


def read_csv_strings(path: Path) -> tuple[Any, int]:
    """The whole CSV as strings (conversion is checked per column), and the number of
    malformed lines (wrong field count) skipped."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    bad = 0

    def on_invalid(row: Any) -> str:
        nonlocal bad
        bad += 1
        return "skip"

    try:
        with path.open("rb") as f:
            header = f.readline().decode("utf-8", "replace").strip().split(",")
        names = [h.strip().strip('"') for h in header]
        table = pacsv.read_csv(
            str(path),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=True
            ),
        )
    except (OSError, pa.ArrowInvalid) as e:
        raise FineserveError(f"{path}: cannot parse as CSV: {e}") from None
    return table, bad


def _require_trace_columns(
    path: Path, names: list[str], ts_col: str, in_col: str, out_col: str
) -> None:
    require_columns(
        path,
        names,
        {
            "--timestamp-column": ts_col,
            "--input-length-column": in_col,
            "--output-length-column": out_col,
        },
    )


def _read_csv_trace(
    path: Path,
    fmt: str,
    ts_col: str,
    in_col: str,
    out_col: str,
    unit: str,
    options: TraceOptions,
) -> Trace:
    import pyarrow.compute as pc

    table, bad = read_csv_strings(path)
    names = table.column_names
    _require_trace_columns(path, names, ts_col, in_col, out_col)
    skipped: Counter[str] = Counter()
    if bad:
        skipped["malformed line"] = bad
    rows_read = table.num_rows + bad
    if fmt == "burstgpt":
        for opt, col, want in (
            ("--burstgpt-model", "Model", options.burstgpt_model),
            ("--burstgpt-log-type", "Log Type", options.burstgpt_log_type),
        ):
            if want is None:
                continue
            if col not in names:
                raise FineserveError(f"{path}: {opt} needs a {col!r} column")
            mask = pc.fill_null(pc.equal(table[col], want), False)
            n_out = table.num_rows - int(pc.sum(mask).as_py() or 0)
            if n_out:
                skipped[f"filtered out by {opt} {want}"] += n_out
            table = table.filter(mask)
    ts = table[ts_col]
    if unit == "datetime":
        t_ns = _datetime_ns(ts)
    else:
        t_ns = to_ns(numeric(ts), unit)
    inp, outp = numeric(table[in_col]), numeric(table[out_col])
    if fmt == "burstgpt":
        failed = np.isfinite(outp) & (outp == 0)
        if failed.any():
            skipped["failed request in trace (0 response tokens)"] += int(failed.sum())
            t_ns, inp, outp = t_ns[~failed], inp[~failed], outp[~failed]
    return finish_trace(
        path,
        fmt,
        t_ns,
        inp,
        outp,
        rows_read=rows_read,
        skipped=skipped,
        unit="" if unit == "datetime" else unit,
    )


def _datetime_ns(col: Any) -> Any:
    """Wall-clock strings (Azure: 7 fractional digits) to ns; NaN where unparsable."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.utf8_trim_whitespace(col.cast(pa.string()))
    # Azure writes 100 ns ticks (7 digits); pad/cut to 9 so strptime's %f reads ns.
    parts = pc.split_pattern(text, ".", max_splits=1)
    secs = pc.list_element(parts, 0)
    frac = pc.fill_null(pc.list_element(pc.list_slice(parts, 1, 2), 0), "0")
    frac = pc.utf8_slice_codeunits(pc.utf8_rpad(frac, 9, "0"), 0, 9)
    ok = pc.fill_null(pc.match_substring_regex(frac, r"^\d{9}$"), False)
    stamp = pc.strptime(secs, format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True)
    ok = pc.and_(ok, pc.is_valid(stamp))
    valid = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
    out = np.full(len(valid), np.nan)
    if valid.any():
        # Integer ns first: epoch ns do not fit float64's 53-bit mantissa.
        sec = pc.filter(stamp, ok).cast(pa.int64()).to_numpy()
        ns = sec * 1_000_000_000 + pc.filter(frac, ok).cast(pa.int64()).to_numpy()
        out[valid] = (ns - ns.min()).astype(np.float64)
    return out


def _read_mooncake(path: Path, ts_col: str, in_col: str, out_col: str, unit: str) -> Trace:
    """Mooncake/Qwen-Bailian JSONL: ``timestamp`` (ms), lengths, ``hash_ids`` (512-token
    prompt blocks), for Bailian ``chat_id``/``parent_chat_id``/``turn``, and an optional
    ``latency`` (same unit as the timestamps)."""
    import pyarrow as pa
    import pyarrow.json as pajson

    skipped: Counter[str] = Counter()
    try:
        table = pajson.read_json(str(path))
        rows_read = table.num_rows
    except pa.ArrowInvalid:
        # pyarrow rejects the whole file on one bad line; only then parse line by line so
        # that malformed lines are counted and the rest is kept.
        table, rows_read, bad = _read_jsonl_lenient(path, (ts_col, in_col, out_col))
        skipped["malformed line"] += bad
    except OSError as e:
        raise FineserveError(f"cannot read trace {path}: {e.strerror}") from None
    names = table.column_names
    _require_trace_columns(path, names, ts_col, in_col, out_col)
    t_ns = to_ns(numeric(table[ts_col]), unit)
    extra: dict[str, Any] = {}
    for src in ("chat_id", "parent_chat_id", "turn"):
        dst = src
        if src in names:
            v = numeric(table[src])
            extra[dst] = np.where(np.isfinite(v), v, -1).astype(np.int64)
    if "latency" in names:
        # A request's recorded latency, in the trace's time unit, for --think-time
        # gap-minus-latency (−1 where missing).
        lat = to_ns(numeric(table["latency"]), unit)
        extra[LATENCY_COLUMN] = np.where(np.isfinite(lat) & (lat >= 0), lat, -1).astype(np.int64)
    hash_ids = hash_offsets = None
    if "hash_ids" in names:
        col = table["hash_ids"].combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            col = pc_fill_empty_lists(col)
            hash_offsets = col.offsets.to_numpy().astype(np.int64)
            hash_ids = col.values.cast(pa.int64()).to_numpy(zero_copy_only=False)
            hash_ids = hash_ids[hash_offsets[0] : hash_offsets[-1]]
            hash_offsets = hash_offsets - hash_offsets[0]
    trace = finish_trace(
        path,
        "mooncake",
        t_ns,
        numeric(table[in_col]),
        numeric(table[out_col]),
        rows_read=rows_read,
        skipped=skipped,
        extra=extra,
        hash_ids=hash_ids,
        hash_offsets=hash_offsets,
        unit=unit,
    )
    link_turns(trace)
    return trace


def link_turns(trace: Trace) -> None:
    """Bailian conversations: ``chat_id``/``parent_chat_id`` become ``parent`` (the row of
    the previous turn, -1 for a first turn), ``think_ns`` (the trace's gap between the two
    turns' arrivals: without the original latencies, an upper bound on the user's think
    time, used as the delay after the previous turn *ends*), ``followers`` and
    ``session_id`` (the chat id of the conversation's first turn). A turn whose parent is
    not in the trace (or was skipped) starts its own conversation; they are counted."""
    chat = trace.extra.pop("chat_id", None)
    parent_chat = trace.extra.pop("parent_chat_id", None)
    if chat is None:
        return
    if parent_chat is None or not np.any(parent_chat >= 0):
        trace.extra["session_id"] = chat
        return
    order = np.argsort(chat, kind="stable")
    pos = np.searchsorted(chat[order], parent_chat)
    pos = np.minimum(pos, len(chat) - 1)
    found = (parent_chat >= 0) & (chat[order][pos] == parent_chat)
    parent = np.where(found, order[pos], -1).astype(np.int64)
    # A parent that is the turn itself or comes after it (a cycle, clock skew, bad rows)
    # cannot be waited for.
    late = found & (parent >= np.arange(len(parent)))
    parent[late] = -1
    if late.any():
        trace.notes.append(
            f"{int(late.sum())} turns whose previous turn is themselves or comes after them "
            "in the trace (a cycle or clock skew) start their own conversation"
        )
    orphans = int(np.sum((parent_chat >= 0) & ~found))
    if orphans:
        trace.notes.append(
            f"{orphans} turns whose previous turn is not in the trace start their own conversation"
        )
    _set_turns(trace, parent, chat)


def _set_turns(trace: Trace, parent: npt.NDArray[np.int64], session: npt.NDArray[np.int64]) -> None:
    """The conversation columns from each row's parent row (earlier, or -1): think time
    as the gap between arrivals, followers, the first turn's ``session`` id, and the turn
    number (from 1) where the trace has none."""
    think = np.where(parent >= 0, trace.t_ns - trace.t_ns[np.maximum(parent, 0)], 0)
    session = session.copy()
    turn = np.ones(len(parent), dtype=np.int64)
    for i in np.flatnonzero(parent >= 0).tolist():  # parents come first: one pass
        session[i] = session[parent[i]]
        turn[i] = turn[parent[i]] + 1
    trace.extra.update(
        parent=parent,
        think_ns=think.astype(np.int64),
        followers=np.bincount(parent[parent >= 0], minlength=len(parent)).astype(np.int64),
        session_id=session,
    )
    trace.extra.setdefault("turn", turn)


def infer_turns_from_prefixes(trace: Trace) -> None:
    """``--infer-turns hash-prefix``: a request whose prompt blocks start with all but the
    last block of an earlier request's (that last one is partial, so it changes as the
    conversation grows) is taken as that request's next turn: the latest such earlier
    request with the longest match (at least one full block). Agent traces (Mooncake's
    ``toolagent``) have no conversation ids; this is a heuristic, and says how many
    requests it linked."""
    if "parent" in trace.extra:
        trace.notes.append("--infer-turns has no effect: the trace has conversation ids")
        return
    if trace.hash_ids is None or trace.hash_offsets is None:
        raise FineserveError("--infer-turns hash-prefix needs hash_ids in the trace")
    ids, off = trace.hash_ids, trace.hash_offsets
    n = len(trace.t_ns)
    parent = np.full(n, -1, dtype=np.int64)
    # Prefix (all blocks but the last) of each earlier request → latest such request.
    latest: dict[tuple[int, ...], int] = {}
    for i in range(n):
        blocks = tuple(ids[off[i] : off[i + 1]].tolist())
        for k in range(len(blocks), 0, -1):
            j = latest.get(blocks[:k])
            if j is not None:
                parent[i] = j
                break
        if len(blocks) >= 2:
            latest[blocks[:-1]] = i
    linked = int(np.count_nonzero(parent >= 0))
    trace.notes.append(
        f"--infer-turns hash-prefix: {linked} of {n} requests extend an earlier request's "
        f"prompt blocks and follow it as later turns ({n - linked} conversations)"
    )
    _set_turns(trace, parent, np.arange(n, dtype=np.int64))


def pc_fill_empty_lists(col: Any) -> Any:
    """Null lists become empty lists, so offsets describe every row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if col.null_count:
        empty = pa.scalar([], type=col.type)
        col = pc.if_else(pc.is_null(col), empty, col)
    return col


def _read_jsonl_lenient(path: Path, numeric: tuple[str, ...] = ()) -> tuple[Any, int, int]:
    """Every JSON-object line; other lines are counted. A ``numeric`` field that holds no
    number becomes null, so the row checks count it (instead of one string failing the
    whole column)."""
    import pyarrow as pa

    good: list[dict[str, Any]] = []
    bad = rows = 0
    try:
        # Binary lines: JSON Lines ends a line at "\n" only; text mode's universal newlines
        # would also split at a lone "\r" and count one malformed line as two.
        with path.open("rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace")
                if not line.strip():
                    continue
                rows += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if not isinstance(obj, dict):
                    bad += 1
                    continue
                for k in numeric:
                    v = obj.get(k)
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                        obj[k] = None
                if "hash_ids" in obj and not (
                    isinstance(obj["hash_ids"], list)
                    and all(isinstance(h, int) for h in obj["hash_ids"])
                ):
                    obj["hash_ids"] = None
                good.append(obj)
    except OSError as e:
        raise FineserveError(f"cannot read trace {path}: {e.strerror}") from None
    if not good:
        raise FineserveError(f"{path}: no valid JSON object on any of {rows} lines")
    try:
        table = pa.Table.from_pylist(good)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise FineserveError(f"{path}: inconsistent JSON objects: {e}") from None
    return table, rows, bad
