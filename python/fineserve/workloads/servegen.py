"""ServeGen client composition (Alibaba ServeGen): a workload as the sum of clients.

A client pool is a directory of ``chunk-<i>-trace.csv`` (per window: start s, rate req/s,
IAT CV, pattern Gamma|Weibull, shape, scale) and ``chunk-<i>-dataset.json`` (per window
start, per field a PDF ``"{value: prob, ...}"``). Generation, per trace window:

- each active client's rate is its trace rate × ``rate_scale`` (chosen so that the
  aggregate mean rate *while some client is active* is ``request_rate`` when that is
  given: idle windows do not dilute it), so clients keep their shares of the aggregate;
- its arrivals are a renewal process with the window's pattern and shape; the scale is
  reset so the mean gap is exactly 1/rate (the fitted scale rounds slightly differently;
  keeping shape keeps the CV);
- lengths are drawn from the client's PDFs of the dataset window in force (the latest
  dataset window starting at or before the trace window): ``input_tokens`` (language
  pools) or ``text_tokens`` (multimodal pools), ``output_tokens``; ``reason_ratio``, when
  the client has it, rides along as a column;
- in multimodal pools (``image_count``/``image_tokens``, likewise audio and video), each
  request's item count per modality and each item's token budget, drawn from the same
  window's PDFs (as ServeGen's ``construct.py``): the token PDF conditioned on a
  positive budget, since an item exists only when its count says so.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError
from ..ragged import offsets_from_counts
from ..schedule import Schedule, merge_sorted


@dataclass
class Pdf:
    values: npt.NDArray[np.float64]
    cdf: npt.NDArray[np.float64]

    def sample(self, n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
        return self.values[np.searchsorted(self.cdf, rng.random(n) * float(self.cdf[-1]), "right")]

    def positive(self) -> Pdf | None:
        """The PDF conditioned on values >= 1 (None: no mass there)."""
        probs = np.diff(np.concatenate([[0.0], self.cdf]))
        keep = (self.values >= 1) & (probs > 0)
        if not keep.any():
            return None
        return Pdf(self.values[keep], np.cumsum(probs[keep]))

    @property
    def max_positive(self) -> float:
        probs = np.diff(np.concatenate([[0.0], self.cdf]))
        return float(self.values[probs > 0].max())


#: Multimodal pools' fields: per modality (count PDF, per-item token PDF).
MEDIA_FIELDS = {m: (f"{m}_count", f"{m}_tokens") for m in ("image", "audio", "video")}


@dataclass
class Client:
    client_id: int
    start_s: npt.NDArray[np.float64]
    rate: npt.NDArray[np.float64]
    cv: npt.NDArray[np.float64]
    pattern: list[str]
    shape: npt.NDArray[np.float64]
    dataset_starts: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    dataset: list[dict[str, Pdf | None]] = field(default_factory=list)

    def pdf_at(self, t_s: float, name: str) -> Pdf | None:
        """The field's PDF in force at ``t_s``; a window without data (empty PDF) falls back
        to the nearest earlier window with data, else the nearest later one."""
        if not self.dataset:  # no chunk-<i>-dataset.json: the defaults apply
            return None
        k = max(int(np.searchsorted(self.dataset_starts, t_s, side="right")) - 1, 0)
        order = list(range(k, -1, -1)) + list(range(k + 1, len(self.dataset)))
        for j in order:
            pdf = self.dataset[j].get(name)
            if pdf is not None:
                return pdf
        return None


@dataclass
class ClientPool:
    path: Path
    clients: list[Client]
    window_s: float

    def window_ends(self, c: Client) -> npt.NDArray[np.float64]:
        """Where each of the client's windows ends: at its next window, the last one
        ``window_s`` after its start (past that the client sends nothing)."""
        return np.append(c.start_s[1:], c.start_s[-1] + self.window_s)

    def mean_rate(self, start_s: float, end_s: float) -> float:
        """The aggregate rate averaged over the *active* time of [start_s, end_s): each
        window weighted by the time it overlaps the span (a span cutting a window in half
        gets half of it), divided by the time some client sends. A target rate then means
        the rate while traffic flows, not one diluted by idle hours (a pool that sleeps
        half the span would otherwise run twice as fast while awake)."""
        active = self.active_s(start_s, end_s)
        if not active > 0:
            return 0.0
        total = 0.0
        for c in self.clients:
            overlap = np.minimum(self.window_ends(c), end_s) - np.maximum(c.start_s, start_s)
            total += float(np.sum(c.rate * np.clip(overlap, 0.0, None)))
        return total / active

    def _active_intervals(self, start_s: float, end_s: float) -> list[tuple[float, float]]:
        """The union of every client's windows with traffic, clipped to [start_s, end_s)."""
        spans = sorted(
            (max(float(a), start_s), min(float(b), end_s))
            for c in self.clients
            for a, b, r in zip(c.start_s, self.window_ends(c), c.rate)
            if r > 0 and b > start_s and a < end_s
        )
        merged: list[tuple[float, float]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def active_s(self, start_s: float, end_s: float) -> float:
        """Seconds of [start_s, end_s) during which at least one client sends."""
        return sum(b - a for a, b in self._active_intervals(start_s, end_s))

    def first_active_s(self, start_s: float, end_s: float) -> float | None:
        """The first instant at or after ``start_s`` (before ``end_s``) with traffic."""
        spans = self._active_intervals(start_s, end_s)
        return spans[0][0] if spans else None

    def clients_without(self, *names: str) -> list[int]:
        """Clients with no PDF for any of ``names`` in any window (their lengths come from
        the defaults)."""
        return [
            c.client_id
            for c in self.clients
            if not any(d.get(n) is not None for d in c.dataset for n in names)
        ]

    @property
    def multimodal(self) -> bool:
        """Some client has a media count PDF (a ``multimodal/`` pool)."""
        return any(
            count in d
            for c in self.clients
            for d in c.dataset
            for count, _ in MEDIA_FIELDS.values()
        )

    @property
    def span_s(self) -> float:
        return max(float(c.start_s[-1]) for c in self.clients) + self.window_s


_CHUNK_RE = re.compile(r"chunk-(\d+)-trace\.csv$")


def load_client_pool(path: Path, clients: list[int] | None = None) -> ClientPool:
    path = Path(path)
    if not path.is_dir():
        raise FineserveError(f"ServeGen client pool not found (a directory): {path}")
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _CHUNK_RE.search(p.name)))
    if clients is not None:
        want = set(clients)
        found = [(i, p) for i, p in found if i in want]
        missing = want - {i for i, _ in found}
        if missing:
            raise FineserveError(f"{path}: no client(s) {sorted(missing)}")
    if not found:
        raise FineserveError(f"{path}: no chunk-<i>-trace.csv files (not a ServeGen pool)")
    loaded = [_load_client(i, p) for i, p in found]
    steps = [np.diff(c.start_s) for c in loaded if len(c.start_s) > 1]
    window_s = float(np.median(np.concatenate(steps))) if steps else 600.0
    return ClientPool(path, loaded, window_s)


def _load_client(i: int, trace_path: Path) -> Client:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = ["start_s", "rate", "cv", "pattern", "shape", "scale"]
    try:
        t = pacsv.read_csv(
            str(trace_path),
            read_options=pacsv.ReadOptions(column_names=names),
            convert_options=pacsv.ConvertOptions(
                column_types={
                    "start_s": pa.float64(),
                    "rate": pa.float64(),
                    "cv": pa.float64(),
                    "pattern": pa.string(),
                    "shape": pa.float64(),
                    "scale": pa.float64(),
                },
                strings_can_be_null=True,
            ),
        )
    except (OSError, pa.ArrowInvalid) as e:
        raise FineserveError(f"{trace_path}: not a ServeGen client trace ({e})") from None
    col = {n: t[n].to_numpy(zero_copy_only=False) for n in names}
    pattern = [p or "" for p in t["pattern"].to_pylist()]
    rate = np.nan_to_num(col["rate"].astype(np.float64))
    shape = np.nan_to_num(col["shape"].astype(np.float64))
    bad = [
        r
        for r in range(len(rate))
        if rate[r] > 0 and (pattern[r] not in ("Gamma", "Weibull") or not shape[r] > 0)
    ]
    if bad:
        raise FineserveError(
            f"{trace_path}:{bad[0] + 1}: active window needs pattern Gamma or Weibull and a "
            f"positive shape (got {pattern[bad[0]]!r}, {shape[bad[0]]})"
        )
    client = Client(i, col["start_s"].astype(np.float64), rate, col["cv"], pattern, shape)
    ds_path = trace_path.with_name(f"chunk-{i}-dataset.json")
    if ds_path.is_file():
        try:
            raw = json.loads(ds_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FineserveError(f"{ds_path}: cannot read ({e})") from None
        starts = sorted(raw, key=float)
        client.dataset_starts = np.array([float(s) for s in starts])
        client.dataset = [
            {field: _parse_pdf(ds_path, v) for field, v in raw[s].items()} for s in starts
        ]
        for start, window in zip(starts, client.dataset):
            for m, (count, tokens) in MEDIA_FIELDS.items():
                pc, pt = window.get(count), window.get(tokens)
                if (
                    pc is not None
                    and pc.max_positive >= 1
                    and (pt is None or pt.positive() is None)
                ):
                    raise FineserveError(
                        f"{ds_path}: window {start}: {count} has requests with {m}s but "
                        f"{tokens} has no positive budget"
                    )
    return client


def _parse_pdf(path: Path, text: Any) -> Pdf | None:
    """``"{value: prob, ...}"`` (ServeGen writes Python dict literals); ``"{}"`` = no data."""
    try:
        d = ast.literal_eval(text) if isinstance(text, str) else text
    except (ValueError, SyntaxError):
        raise FineserveError(f"{path}: a PDF is not a {{value: prob}} mapping") from None
    if not isinstance(d, dict):
        raise FineserveError(f"{path}: a PDF is not a {{value: prob}} mapping")
    if not d:
        return None
    items = sorted((float(k), float(v)) for k, v in d.items())
    values = np.array([k for k, _ in items])
    probs = np.clip(np.array([v for _, v in items]), 0, None)
    if probs.sum() <= 0:
        raise FineserveError(f"{path}: a PDF has no probability mass")
    return Pdf(values, np.cumsum(probs))


def servegen_chunks(
    pool: ClientPool,
    rng: np.random.Generator,
    *,
    request_rate: float | None = None,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    time_scale: float = 1.0,
    default_input_len: int = 1024,
    default_output_len: int = 128,
) -> Iterator[Schedule]:
    """One chunk per trace window (or the part of it inside the span), clients merged by
    time, with a ``client_id`` column."""
    end_s = pool.span_s if duration_s is None else start_s + duration_s
    if request_rate is not None:
        base = pool.mean_rate(start_s, end_s)
        if base <= 0:
            raise FineserveError("the client pool has no traffic in the chosen span")
        rate_scale = request_rate / base
    if not (rate_scale > 0 and math.isfinite(rate_scale)):
        raise FineserveError("the ServeGen rate scale must be > 0")
    # Segments between consecutive window boundaries of any client, so that a --start
    # inside a window, or clients on different grids, never run a window past its end.
    ends = {c.client_id: pool.window_ends(c) for c in pool.clients}
    marks = np.concatenate([c.start_s for c in pool.clients] + list(ends.values()))
    inner = marks[(marks > start_s) & (marks < end_s)]
    bounds = np.unique(np.concatenate([[start_s, end_s], inner]))
    for t, w_end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        parts = []
        for c in pool.clients:
            k = int(np.searchsorted(c.start_s, t, side="right")) - 1
            if k < 0 or c.rate[k] <= 0 or t >= ends[c.client_id][k]:
                continue
            rate = c.rate[k] * rate_scale
            arrivals = _renewal(t, w_end, rate, c.pattern[k], c.shape[k], rng)
            if not len(arrivals):
                continue
            part = _with_lengths(c, arrivals, t, rng, default_input_len, default_output_len)
            if pool.multimodal:
                part.lists = _media_lists(c, len(part), t, rng)
            parts.append(part)
        merged = merge_sorted(parts)
        if len(merged):
            offset_ns = round(start_s * 1e9 / time_scale)
            merged.t_ns = np.rint(merged.t_ns / time_scale).astype(np.int64) - offset_ns
            yield merged


def _renewal(
    a: float, b: float, rate: float, pattern: str, shape: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    if pattern == "Gamma":
        scale = 1.0 / (rate * shape)

        def draw(k: int) -> npt.NDArray[np.float64]:
            return rng.gamma(shape, scale, size=k)
    else:
        scale = 1.0 / (rate * math.gamma(1 + 1 / shape))

        def draw(k: int) -> npt.NDArray[np.float64]:
            return scale * rng.weibull(shape, size=k)

    # Start at a uniformly random phase of the first gap (stationary start).
    out = []
    t = a - float(draw(1)[0]) * rng.random()
    while True:
        k = int((b - t) * rate * 1.2 + 16)
        ts = t + np.cumsum(draw(k))
        out.append(ts[(ts >= a) & (ts < b)])
        t = float(ts[-1])
        if t >= b:
            break
    return np.concatenate(out)


def _media_lists(
    c: Client, n: int, window_start: float, rng: np.random.Generator
) -> dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """Per modality, each request's item count and each item's token budget."""
    out = {}
    for m, (count, tokens) in MEDIA_FIELDS.items():
        pc = c.pdf_at(window_start, count)
        counts = np.zeros(n, dtype=np.int64)
        values = np.zeros(0, dtype=np.int64)
        if pc is not None:
            counts = np.maximum(np.rint(pc.sample(n, rng)), 0).astype(np.int64)
            total = int(counts.sum())
            if total:
                pt = c.pdf_at(window_start, tokens)
                positive = pt.positive() if pt is not None else None
                if positive is None:  # another window's count PDF with this one's tokens
                    raise FineserveError(
                        f"client {c.client_id}: {count} at {window_start:g} s has {m}s but "
                        f"{tokens} has no positive budget"
                    )
                values = np.maximum(np.rint(positive.sample(total, rng)), 1).astype(np.int64)
        out[f"{m}_tokens"] = (values, offsets_from_counts(counts))
    return out


def _with_lengths(
    c: Client,
    arrivals_s: npt.NDArray[np.float64],
    window_start: float,
    rng: np.random.Generator,
    default_input_len: int,
    default_output_len: int,
) -> Schedule:
    n = len(arrivals_s)
    extra: dict[str, npt.NDArray[Any]] = {"client_id": np.full(n, c.client_id, np.int64)}
    # Language pools give input_tokens; multimodal pools give the text part as text_tokens.
    pin = c.pdf_at(window_start, "input_tokens") or c.pdf_at(window_start, "text_tokens")
    pout = c.pdf_at(window_start, "output_tokens")
    preason = c.pdf_at(window_start, "reason_ratio")
    inp = pin.sample(n, rng) if pin else np.full(n, default_input_len)
    out = pout.sample(n, rng) if pout else np.full(n, default_output_len)
    if preason is not None:
        extra["reason_ratio"] = preason.sample(n, rng)
    return Schedule(
        np.rint(arrivals_s * 1e9).astype(np.int64),
        np.maximum(np.rint(inp), 1).astype(np.int64),
        np.maximum(np.rint(out), 1).astype(np.int64),
        extra,
    )
