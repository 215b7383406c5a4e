"""What every trace reader returns, and the row checks they share."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError
from ..ragged import take_ragged

UNIT_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
#: The extra column a reader fills with each request's recorded latency (ns; −1 unknown).
LATENCY_COLUMN = "trace_latency_ns"

#: The longest prompt or answer accepted anywhere, in tokens: trace rows past it are
#: skipped and counted, options past it are refused.
MAX_TOKENS_PER_REQUEST = 10_000_000


@dataclass
class Trace:
    """Requests of a trace that passed the checks, in arrival order.

    ``t_ns`` is relative to the first kept request. ``skipped`` counts dropped rows by
    reason; ``notes`` are things worth telling the user (e.g. rows re-sorted).
    """

    path: Path
    format: str
    t_ns: npt.NDArray[np.int64]
    input_len: npt.NDArray[np.int64]
    output_len: npt.NDArray[np.int64]
    extra: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    hash_ids: npt.NDArray[np.int64] | None = None
    hash_offsets: npt.NDArray[np.int64] | None = None
    rows_read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    #: Absolute time of the first kept request in the trace's own clock (ns), if known.
    origin_ns: int = 0

    def __len__(self) -> int:
        return len(self.t_ns)

    @property
    def span_s(self) -> float:
        return float(self.t_ns[-1]) / 1e9 if len(self.t_ns) else 0.0

    def skip_summary(self) -> str:
        if not self.skipped:
            return f"{self.path.name}: {len(self)} requests, no rows skipped"
        parts = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return (
            f"{self.path.name}: {len(self)} of {self.rows_read} rows used; "
            f"skipped {sum(self.skipped.values())} ({parts})"
        )


def finish_trace(
    path: Path,
    fmt: str,
    t_ns: npt.NDArray[np.float64],
    input_len: npt.NDArray[np.float64],
    output_len: npt.NDArray[np.float64],
    *,
    rows_read: int,
    skipped: Counter[str],
    extra: dict[str, npt.NDArray[Any]] | None = None,
    hash_ids: npt.NDArray[np.int64] | None = None,
    hash_offsets: npt.NDArray[np.int64] | None = None,
    unit: str = "",
) -> Trace:
    """Drops invalid rows (counting why), sorts by time, makes times relative.

    ``t_ns`` / lengths may hold NaN for missing or unparsable values.
    """
    extra = dict(extra or {})
    t = np.asarray(t_ns, dtype=np.float64)
    inp = np.asarray(input_len, dtype=np.float64)
    outp = np.asarray(output_len, dtype=np.float64)
    keep = np.ones(len(t), dtype=bool)

    def drop(mask: npt.NDArray[np.bool_], why: str) -> None:
        nonlocal keep
        hit = mask & keep
        if hit.any():
            skipped[why] += int(hit.sum())
            keep &= ~hit

    drop(~np.isfinite(t), "missing or invalid timestamp")
    drop(np.isfinite(t) & (t < 0), "negative timestamp")
    drop(~np.isfinite(inp), "missing or invalid input length")
    drop(np.isfinite(inp) & (inp < 1), "input length < 1")
    drop(~np.isfinite(outp), "missing or invalid output length")
    drop(np.isfinite(outp) & (outp < 1), "output length < 1")
    drop(np.isfinite(inp) & (inp > MAX_TOKENS_PER_REQUEST), "input length > 10M tokens")
    drop(np.isfinite(outp) & (outp > MAX_TOKENS_PER_REQUEST), "output length > 10M tokens")

    rows = np.flatnonzero(keep)
    notes: list[str] = []
    t_kept = t[rows]
    if len(t_kept) > 1 and np.any(np.diff(t_kept) < 0):
        order = np.argsort(t_kept, kind="stable")
        notes.append(f"timestamps out of order in {path.name}: sorted {len(order)} rows")
        rows = rows[order]
        t_kept = t_kept[order]
    origin = float(t_kept[0]) if len(t_kept) else 0.0
    if len(t_kept) and t_kept[-1] - origin > 2.0**62:
        years = (t_kept[-1] - origin) / 1e9 / 86_400 / 365
        raise FineserveError(
            f"{path}: timestamps span {years:.3g} years read as {unit or 'given'}: "
            "implausible; is --timestamp-unit right?"
        )
    rel = np.rint(t_kept - origin).astype(np.int64)

    h_ids = h_off = None
    if hash_ids is not None and hash_offsets is not None:
        h_ids, h_off = take_ragged(hash_ids, hash_offsets, rows)

    trace = Trace(
        path=path,
        format=fmt,
        t_ns=rel,
        input_len=np.rint(inp[rows]).astype(np.int64),
        output_len=np.rint(outp[rows]).astype(np.int64),
        extra={k: np.asarray(v)[rows] for k, v in extra.items()},
        hash_ids=h_ids,
        hash_offsets=h_off,
        rows_read=rows_read,
        skipped=skipped,
        notes=notes,
        origin_ns=int(origin),
    )
    if not len(trace):
        reasons = trace.skip_summary()
        raise FineserveError(f"no usable requests: {reasons}")
    if unit:
        _check_span(trace, unit)
    return trace


def _check_span(trace: Trace, unit: str) -> None:
    """Warns when the span is implausible for the unit (e.g. µs data read as ms)."""
    span_s = trace.span_s
    if span_s > 60 * 86_400:
        trace.notes.append(
            f"{trace.path.name} spans {span_s / 86_400:.0f} days with timestamps in {unit}: "
            "implausible for a serving trace; is --timestamp-unit right?"
        )
    elif len(trace) >= 1000 and span_s < 1.0:
        trace.notes.append(
            f"{trace.path.name}: {len(trace)} requests within {span_s * 1e3:.3f} ms with "
            f"timestamps in {unit}: implausible; is --timestamp-unit right?"
        )


def to_ns(values: npt.NDArray[np.float64], unit: str) -> npt.NDArray[np.float64]:
    """Times in ``unit`` as float ns; values too large for a float become inf (and are
    then skipped as invalid timestamps) without a warning."""
    with np.errstate(over="ignore", invalid="ignore"):
        return values * UNIT_NS[unit]


def numeric(arr: Any) -> npt.NDArray[np.float64]:
    """A pyarrow column (any type) as float64, NaN where missing or not a number."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        return np.asarray(arr.cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)
    if pa.types.is_null(arr.type) or pa.types.is_nested(arr.type):
        return np.full(len(arr), np.nan)  # lists, objects: not a number in any row
    try:
        text = pc.utf8_trim_whitespace(arr.cast(pa.string()))
    except pa.ArrowNotImplementedError:
        return np.full(len(arr), np.nan)
    ok = pc.match_substring_regex(text, r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    ok = pc.fill_null(ok, False)
    out = np.full(len(arr), np.nan)
    mask = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
    if mask.any():
        vals = pc.filter(text, ok).cast(pa.float64())
        out[mask] = vals.to_numpy(zero_copy_only=False)
    return out


def require_columns(path: Path, names: list[str], wanted: dict[str, str]) -> None:
    """``wanted`` maps option name → column name; one line naming what is missing."""
    missing = [f"{col!r} ({opt})" for opt, col in wanted.items() if col not in names]
    if missing:
        raise FineserveError(
            f"{path}: missing column {', '.join(missing)}; columns are {', '.join(names)}"
        )
