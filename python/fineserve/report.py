"""``fineserve report``: a self-contained HTML report (and PNGs) from results files.

Every figure is recomputed from the per-request Parquet (``blast --save-requests``), with
the same code as the live summary (:class:`~fineserve.metrics.MetricsAccumulator`), so
the report and the printed table agree. One file: the run's panels. Several files: the
runs side by side (overlaid CDFs, arrivals, windows, and a table of key figures).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from . import plotting
from .errors import FineserveError
from .metrics import BREAKDOWNS, MetricsAccumulator
from .metrics.fidelity import SLOT_NS, slot_sizes
from .metrics.serving import itl_ns, reasoning_tokens
from .metrics.steady import RequestTimes, ab_verdicts, steady_metrics, steady_window
from .records import records_from_table
from .results import read_requests, read_server_metrics

#: Panels of a single-run report, in order (file stem → title).
PANELS = {
    "latency_cdfs": "Latency CDFs",
    "latency_over_time": "TTFT, ITL and E2E over the run",
    "arrivals": "Achieved vs scheduled arrivals",
    "in_flight": "Requests in flight",
    "burst_fidelity": "Dispatch lag and micro-burst fidelity",
    "windows": "Instantaneous metrics per window",
    "breakdown": "Breakdown by class, endpoint, model, data-parallel rank, image count, turn "
    "and outcome",
    "reasoning": "Reasoning and answer: TTFT vs TTFO, reasoning share per request",
    "server": "The server beside the client: send rate, micro-bursts, TTFT and server gauges",
    "server_queue": "TTFT by server queue depth, and the queue after the largest bursts",
}
#: Panels drawn only when the runs have what they show.
OPTIONAL_PANELS = ("reasoning", "server", "server_queue")


@dataclass
class Run:
    name: str
    table: pa.Table
    meta: dict[str, Any]
    columns: Mapping[str, Any]
    metrics: dict[str, Any]
    #: ``RUN.server-metrics.parquet`` beside the results, when the run scraped servers.
    server: pa.Table | None = None
    #: What steady state and the A/B verdicts need of each request.
    times: RequestTimes | None = None

    def col(self, name: str) -> npt.NDArray[Any]:
        return np.asarray(self.columns[name])

    def server_series(self, names: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
        """Per page, the first of ``names`` it has, summed over label sets at each
        sample: (t in s from the start, value)."""
        if self.server is None or self.server.num_rows == 0:
            return {}
        out: dict[str, tuple[Any, Any]] = {}
        name_col = np.asarray(self.server["name"].to_pylist(), dtype=object)
        page_col = np.asarray(self.server["endpoint"].to_pylist(), dtype=object)
        t_col = self.server["t_ns"].to_numpy()
        v_col = self.server["value"].to_numpy()
        for page in dict.fromkeys(page_col.tolist()):
            for n in names:
                rows = (name_col == n) & (page_col == page)
                if rows.any():
                    t, inverse = np.unique(t_col[rows], return_inverse=True)
                    v = np.bincount(inverse.reshape(-1), weights=v_col[rows])
                    out[str(page)] = (t / 1e9, v)
                    break
        return out


def load_run(path: Path, window_s: float | None = None) -> Run:
    """A results file and its metrics, recomputed. ``window_s`` defaults to the run's own
    ``--metrics-window`` (10 s when it had none), so the report's windows are the run's."""
    table, meta = read_requests(path)
    if table.num_rows == 0:
        raise FineserveError(f"{path}: no request records")
    cols, _ = records_from_table(table)
    options = meta.get("options") or {}
    slos = options.get("slos") or {}
    if window_s is None:
        window_s = float(options.get("metrics_window") or 10.0)
    labels = {
        name: np.asarray(table[name].to_pylist(), dtype=object)
        for name in BREAKDOWNS
        if name in table.column_names
    }
    acc = MetricsAccumulator(slos=slos, window_s=window_s, groups=BREAKDOWNS)
    if meta.get("stopped_at_ns") is not None:
        acc.stopped(int(meta["stopped_at_ns"]))
    ratio = (
        table["reason_ratio"].to_numpy(zero_copy_only=False)
        if "reason_ratio" in table.column_names
        else None
    )
    acc.add(cols, table["input_len"].to_numpy(), labels, reason_ratio=ratio)
    metrics = acc.result(
        percentile_metrics=tuple(
            options.get("percentile_metrics_list") or ("ttft", "tpot", "itl", "e2el")
        ),
        metric_percentiles=tuple(options.get("metric_percentiles_list") or (99,)),
    )
    name = Path(path).name
    times = RequestTimes()
    times.add(cols)
    window = steady_window(times)
    if window is not None:
        metrics["steady_state"] = window
        metrics.update(steady_metrics(times, window))
    try:
        server = read_server_metrics(Path(path))
    except FineserveError as e:
        from .console import warn

        warn(f"{e.message}; the server panels are left out")
        server = None
    return Run(name, table, meta, cols, metrics, server, times)


def _ok(r: Run) -> npt.NDArray[np.bool_]:
    ok: npt.NDArray[np.bool_] = r.col("error_kind") == 0  # a comparison of NDArray[Any] is Any
    return ok


def _latencies(r: Run) -> dict[str, npt.NDArray[np.float64]]:
    ok = _ok(r)
    sent, first, done = r.col("sent_ns"), r.col("first_token_ns"), r.col("done_ns")
    tokens = np.where(
        r.col("completion_tokens") >= 0, r.col("completion_tokens"), r.col("n_chunks")
    )
    has_first = ok & (first >= 0)
    multi = has_first & (tokens > 1)
    return {
        "TTFT": (first - sent)[has_first] / 1e6,
        "TPOT": ((done - first)[multi] / (tokens[multi] - 1)) / 1e6,
        "ITL": itl_ns(r.col("chunk_ns"), r.col("chunk_offsets"), ok) / 1e6,
        "E2E": (done - sent)[ok] / 1e6,
    }


def latency_axis_scale(values: list[npt.NDArray[np.float64]]) -> str:
    """ "log" when the values span more than a decade, else "linear": a log axis over a
    narrow range (TPOT 5.0-5.3 ms) gets no tick labels at all."""
    pooled = np.concatenate([v[v > 0] for v in values]) if values else np.zeros(0)
    if len(pooled) < 2:
        return "linear"
    lo, hi = np.percentile(pooled, [0.5, 99.5])
    return "log" if lo > 0 and hi / lo > 10 else "linear"


def panel_latency_cdfs(runs: list[Run]) -> bytes:
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plotting.figure(1, 4, (16, 3.6))
    names = ("TTFT", "TPOT", "ITL", "E2E")
    per_metric: dict[str, list[npt.NDArray[np.float64]]] = {n: [] for n in names}
    for r in runs:
        for (name, v), a in zip(_latencies(r).items(), ax[0]):
            plotting.cdf(a, v, label=r.name)
            per_metric[name].append(v)
    for a, name in zip(ax[0], names):
        a.set(title=f"{name} CDF", xlabel="ms", ylim=(0, 1))
        scale = latency_axis_scale(per_metric[name])
        a.set_xscale(scale)
        if scale == "linear":
            # Plain numbers on the ticks, not an offset ("+5" under 0.01 0.02 ...).
            a.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        a.grid(alpha=0.3)
    plotting.legend(ax[0, 0])
    fig.tight_layout()
    return plotting.png_bytes(fig)


def panel_latency_over_time(runs: list[Run]) -> bytes:
    fig, ax = plotting.figure(1, 3, (16, 3.6))
    for r in runs:
        ok = _ok(r)
        sent_s = r.col("sent_ns") / 1e9
        first, done, sent = r.col("first_token_ns"), r.col("done_ns"), r.col("sent_ns")
        has_first = ok & (first >= 0)
        pick = _subsample(np.flatnonzero(has_first), 4000)
        ax[0, 0].scatter(sent_s[pick], (first - sent)[pick] / 1e6, s=2, alpha=0.5, label=r.name)
        pick = _subsample(np.flatnonzero(ok), 4000)
        ax[0, 2].scatter(sent_s[pick], (done - sent)[pick] / 1e6, s=2, alpha=0.5, label=r.name)
        w = r.metrics.get("windows") or []
        t = [x["start_s"] for x in w]
        ax[0, 1].plot(t, [x["mean_itl_ms"] for x in w], label=f"{r.name} mean")
        ax[0, 1].plot(t, [x["p99_itl_ms"] for x in w], "--", label=f"{r.name} p99")
    ax[0, 0].set(title="TTFT by send time", xlabel="s", ylabel="ms", yscale="log")
    ax[0, 1].set(title="ITL per window", xlabel="s", ylabel="ms")
    ax[0, 2].set(title="E2E by send time", xlabel="s", ylabel="ms", yscale="log")
    for a in ax[0]:
        a.grid(alpha=0.3)
    plotting.legend(ax[0, 1])
    fig.tight_layout()
    return plotting.png_bytes(fig)


def _subsample(idx: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.int64]:
    if len(idx) <= n:
        return idx
    return idx[np.linspace(0, len(idx) - 1, n).astype(np.int64)]


def panel_arrivals(runs: list[Run]) -> bytes:
    fig, ax = plotting.figure(1, 2, (16, 3.6))
    for r in runs:
        sched = np.asarray(r.metrics["scheduled_per_second"])
        sent = np.asarray(r.metrics["sent_per_second"])
        x = np.arange(len(sched))
        ax[0, 0].step(x, sched, where="post", label=f"{r.name} scheduled")
        ax[0, 0].step(np.arange(len(sent)), sent, where="post", label=f"{r.name} sent", alpha=0.8)
        n = min(len(sched), len(sent))
        ax[0, 1].plot(x[:n], sent[:n] - sched[:n], label=r.name)
    ax[0, 0].set(title="requests per second", xlabel="s", ylabel="requests")
    ax[0, 1].set(title="sent − scheduled, per second", xlabel="s", ylabel="requests")
    for a in ax[0]:
        a.grid(alpha=0.3)
        plotting.legend(a)
    fig.tight_layout()
    return plotting.png_bytes(fig)


def in_flight_series(r: Run, step_s: float = 0.1) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Requests in flight (sent, not yet finished), sampled every ``step_s``."""
    sent = r.col("sent_ns")
    done = r.col("done_ns")
    started = sent[sent >= 0]
    ended = np.where(done >= 0, done, np.iinfo(np.int64).max)[sent >= 0]
    end = int(max(started.max(initial=0), done.max(initial=0)))
    t = np.arange(0, end + int(step_s * 1e9), int(step_s * 1e9))
    count = np.searchsorted(np.sort(started), t, side="right") - np.searchsorted(
        np.sort(ended), t, side="right"
    )
    return t / 1e9, count


def panel_in_flight(runs: list[Run]) -> bytes:
    fig, ax = plotting.figure(1, 1, (16, 3.2))
    for r in runs:
        t, c = in_flight_series(r)
        line = ax[0, 0].plot(t, c, label=r.name)[0]
        w = r.metrics.get("steady_state")
        if w:  # the steady-state window, shaded in the run's colour
            ax[0, 0].axvspan(
                w["start_s"], w["end_s"], color=line.get_color(), alpha=0.12,
                label=f"{r.name} steady state",
            )  # fmt: skip
    ax[0, 0].set(title="requests in flight (shaded: steady state)", xlabel="s", ylabel="requests")
    ax[0, 0].grid(alpha=0.3)
    plotting.legend(ax[0, 0])
    fig.tight_layout()
    return plotting.png_bytes(fig)


def slot_fidelity(r: Run, slot_ns: int = 1_000_000) -> dict[str, Any]:
    """Requests per occupied slot as scheduled and as sent, and (from the run's metrics)
    the share of micro-burst members sent inside their scheduled slot."""
    sched = r.col("scheduled_ns")
    sent = r.col("sent_ns")
    _, sched_counts = np.unique(sched // slot_ns, return_counts=True)
    _, sent_counts = np.unique(sent[sent >= 0] // slot_ns, return_counts=True)
    return {
        "in_slot": r.metrics.get("burst_sent_in_slot_fraction"),
        "members": r.metrics.get("burst_members_sent", 0),
        "scheduled": sched_counts,
        "sent": sent_counts,
    }


def panel_burst_fidelity(runs: list[Run]) -> bytes:
    fig, ax = plotting.figure(1, 2, (16, 3.6))
    for r in runs:
        sent, sched = r.col("sent_ns"), r.col("scheduled_ns")
        lag_us = (sent - sched)[sent >= 0] / 1e3
        plotting.cdf(ax[0, 0], np.maximum(lag_us, 0.01), label=r.name)
        f = slot_fidelity(r)
        top = int(max(f["scheduled"].max(initial=1), f["sent"].max(initial=1)))
        k = np.arange(1, top + 1)
        for key, style in (("scheduled", "o-"), ("sent", "x--")):
            pmf = np.bincount(f[key], minlength=top + 1)[1:] / max(len(f[key]), 1)
            label = f"{r.name} {key}"
            if key == "sent" and f["in_slot"] is not None:
                label += f" ({100 * f['in_slot']:.2f} % of {f['members']} burst members in slot)"
            ax[0, 1].plot(k, pmf, style, label=label)
    ax[0, 0].set(title="dispatch lag CDF (sent − scheduled)", xlabel="µs", xscale="log")
    ax[0, 1].set(title="requests per occupied 1 ms slot", xlabel="requests", yscale="log")
    for a in ax[0]:
        a.grid(alpha=0.3)
        plotting.legend(a)
    fig.tight_layout()
    return plotting.png_bytes(fig)


def panel_windows(runs: list[Run]) -> bytes:
    fig, ax = plotting.figure(1, 4, (16, 3.6))
    for r in runs:
        w = r.metrics.get("windows") or []
        t = [x["start_s"] for x in w]
        ax[0, 0].plot(t, [x["completed_rps"] for x in w], label=r.name)
        ax[0, 1].plot(t, [100 * x["failure_rate"] for x in w], label=r.name)
        ax[0, 2].plot(t, [x["output_tokens_per_s"] for x in w], label=r.name)
        ax[0, 3].plot(t, [x["itl_jitter_ms"] for x in w], label=r.name)
    for a, title in zip(
        ax[0], ("completed req/s", "failure rate (%)", "output tokens/s", "ITL jitter (std, ms)")
    ):
        a.set(title=title, xlabel="s")
        a.grid(alpha=0.3)
    plotting.legend(ax[0, 0])
    fig.tight_layout()
    return plotting.png_bytes(fig)


def compared_groups(r: Run) -> dict[str, float]:
    """p99 TTFT of each breakdown value, for the breakdowns with at least two values (one
    class or one endpoint compares nothing)."""
    return {
        f"{g}={v}": sub["p99_ttft_ms"]
        for g, values in r.metrics.get("breakdown", {}).items()
        if len(values) >= 2
        for v, sub in values.items()
    }


def panel_breakdown(runs: list[Run]) -> bytes:
    with_groups = any(compared_groups(r) for r in runs)
    fig, ax = plotting.figure(1, 2 if with_groups else 1, (16 if with_groups else 10, 3.6))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        kinds = r.metrics["errors_by_kind"]
        labels = ["ok", *kinds]
        counts = [r.metrics["completed"], *kinds.values()]
        x = np.arange(len(labels))
        ax[0, 0].bar(x + i * width, counts, width, label=r.name)
        ax[0, 0].set_xticks(x + width * (len(runs) - 1) / 2, labels, fontsize=8)
        groups = compared_groups(r)
        if with_groups:
            xs = np.arange(len(groups))
            ax[0, 1].bar(xs + i * width, list(groups.values()), width, label=r.name)
            ax[0, 1].set_xticks(
                xs + width * (len(runs) - 1) / 2, [g[:24] for g in groups], fontsize=7
            )
    ax[0, 0].set(title="requests by outcome", yscale="log")
    if with_groups:
        ax[0, 1].set(title="p99 TTFT by class / endpoint / model / image count / turn (ms)")
    for a in ax[0]:
        plotting.legend(a)
    fig.tight_layout()
    return plotting.png_bytes(fig)


def panel_reasoning(runs: list[Run]) -> bytes | None:
    """TTFT and TTFO CDFs, and each request's reasoning share of its output; None when no
    run has reasoning or an answer that started after its first token."""
    shown = []
    for r in runs:
        ok = _ok(r)
        first, answer, sent = r.col("first_token_ns"), r.col("first_answer_ns"), r.col("sent_ns")
        tokens = np.where(
            r.col("completion_tokens") >= 0, r.col("completion_tokens"), r.col("n_chunks")
        )
        reasoning = reasoning_tokens(r.col("reasoning_tokens"), r.col("reasoning_chunks"))
        if not (ok & ((reasoning > 0) | ((answer >= 0) & (answer > first)))).any():
            continue
        shown.append((r, ok, first, answer, sent, tokens, reasoning))
    if not shown:
        return None
    fig, ax = plotting.figure(1, 2, (16, 3.6))
    for r, ok, first, answer, sent, tokens, reasoning in shown:
        plotting.cdf(ax[0, 0], ((first - sent)[ok & (first >= 0)]) / 1e6, label=f"{r.name} TTFT")
        has = ok & (answer >= 0)
        plotting.cdf(ax[0, 0], ((answer - sent)[has]) / 1e6, label=f"{r.name} TTFO")
        share = reasoning[ok & (tokens > 0)] / tokens[ok & (tokens > 0)]
        ax[0, 1].hist(np.clip(share, 0, 1), bins=20, range=(0, 1), alpha=0.6, label=r.name)
    ax[0, 0].set(title="first token vs first answer token", xlabel="ms", ylim=(0, 1))
    ax[0, 1].set(
        title="reasoning share of each request's output", xlabel="share", ylabel="requests"
    )
    for a in ax[0]:
        a.grid(alpha=0.3)
        plotting.legend(a)
    fig.tight_layout()
    return plotting.png_bytes(fig)


def _per_second(t_ns: npt.NDArray[np.int64]) -> tuple[Any, Any]:
    sec = (t_ns[t_ns >= 0] // 1_000_000_000).astype(np.int64)
    counts = np.bincount(sec) if len(sec) else np.zeros(0)
    return np.arange(len(counts)), counts


def panel_server(runs: list[Run]) -> bytes | None:
    """Send rate and burst members per second, TTFT per second (p50, p99), and the
    servers' running / waiting / KV-usage gauges, on one time axis; None without
    scraped metrics."""
    from .metrics.scrape import STATE_GAUGES

    shown = [r for r in runs if r.server is not None and r.server.num_rows]
    if not shown:
        return None
    fig, ax = plotting.figure(4, 1, (16, 11))
    for r in shown:
        sched, sent = r.col("scheduled_ns"), r.col("sent_ns")
        x, n = _per_second(sent)
        ax[0, 0].plot(x, n, label=f"{r.name} sent/s")
        # Micro-burst members: requests that share their scheduled 1 ms slot.
        x, b = _per_second(sent[(slot_sizes(sched)[0] >= 2) & (sent >= 0)])
        ax[0, 0].plot(x, b, ls="--", label=f"{r.name} burst members/s")
        ok = _ok(r) & (r.col("first_token_ns") >= 0)
        ttft = (r.col("first_token_ns") - sent)[ok] / 1e6
        sec = (sent[ok] // 1_000_000_000).astype(np.int64)
        if len(sec):
            xs = np.unique(sec)
            p50 = [np.percentile(ttft[sec == s], 50) for s in xs]
            p99 = [np.percentile(ttft[sec == s], 99) for s in xs]
            ax[1, 0].plot(xs, p50, label=f"{r.name} TTFT p50")
            ax[1, 0].plot(xs, p99, ls="--", label=f"{r.name} TTFT p99")
        for key, row in (("running", 2), ("waiting", 2), ("kv_usage", 3)):
            for page, (t, v) in r.server_series(STATE_GAUGES[key]).items():
                ls = ":" if key == "waiting" else "-"
                ax[row, 0].plot(t, v, ls=ls, label=f"{r.name} {page} {key}")
    ax[0, 0].set(title="requests sent per second, and micro-burst members", ylabel="requests")
    ax[1, 0].set(title="TTFT by send second", ylabel="ms")
    ax[2, 0].set(title="server: running (solid) and waiting (dotted)", ylabel="requests")
    ax[3, 0].set(title="server: KV-cache usage", ylabel="fraction", xlabel="s from start")
    for a in ax[:, 0]:
        a.grid(alpha=0.3)
        plotting.legend(a)
    fig.tight_layout()
    return plotting.png_bytes(fig)


def panel_server_queue(runs: list[Run]) -> bytes | None:
    """TTFT percentiles by the server's queue depth at each request's send, and the
    waiting queue from 1 s before to 5 s after each of the five largest bursts."""
    from .metrics.scrape import STATE_GAUGES

    shown = [r for r in runs if "srv_waiting" in r.table.column_names]
    if not shown:
        return None
    fig, ax = plotting.figure(1, 2, (16, 3.8))
    for r in shown:
        depth = np.asarray(r.table["srv_waiting"].to_pylist(), dtype=float)
        ok = _ok(r) & (r.col("first_token_ns") >= 0) & np.isfinite(depth)
        ttft = (r.col("first_token_ns") - r.col("sent_ns"))[ok] / 1e6
        d = depth[ok]
        if len(d):
            edges = np.unique(np.quantile(d, np.linspace(0, 1, 9)))
            bins = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, max(len(edges) - 2, 0))
            xs, p50, p99 = [], [], []
            for k in np.unique(bins):
                sel = ttft[bins == k]
                xs.append(float(np.median(d[bins == k])))
                p50.append(np.percentile(sel, 50))
                p99.append(np.percentile(sel, 99))
            ax[0, 0].plot(xs, p50, marker="o", label=f"{r.name} p50")
            ax[0, 0].plot(xs, p99, marker="o", ls="--", label=f"{r.name} p99")
        series = r.server_series(STATE_GAUGES["waiting"])
        if not series:
            continue
        sched = r.col("scheduled_ns")
        slots, counts = np.unique(sched // SLOT_NS, return_counts=True)
        for k in np.argsort(counts)[::-1][:5]:
            if counts[k] < 2:
                break
            at_s = slots[k] * SLOT_NS / 1e9
            for page, (t, v) in series.items():
                near = (t >= at_s - 1) & (t <= at_s + 5)
                ax[0, 1].plot(
                    t[near] - at_s, v[near], label=f"{r.name} burst of {counts[k]} ({page})"
                )
    ax[0, 0].set(title="TTFT by server queue depth at send", xlabel="waiting requests", ylabel="ms")
    ax[0, 1].set(title="waiting queue around the largest bursts", xlabel="s from the burst")
    for a in ax[0]:
        a.grid(alpha=0.3)
        plotting.legend(a)
    fig.tight_layout()
    return plotting.png_bytes(fig)


_PANEL_FUNCS = {
    "latency_cdfs": panel_latency_cdfs,
    "latency_over_time": panel_latency_over_time,
    "arrivals": panel_arrivals,
    "in_flight": panel_in_flight,
    "burst_fidelity": panel_burst_fidelity,
    "windows": panel_windows,
    "breakdown": panel_breakdown,
    "reasoning": panel_reasoning,
    "server": panel_server,
    "server_queue": panel_server_queue,
}

_KEY_FIGURES = (
    ("scheduled", "requests scheduled", "d"),
    ("completed", "succeeded", "d"),
    ("failed", "failed", "d"),
    ("not_sent", "not sent", "d"),
    ("duration", "duration (s)", ".2f"),
    ("request_throughput", "request throughput (req/s)", ".2f"),
    ("request_goodput", "request goodput (req/s)", ".2f"),
    ("output_throughput", "output tokens/s", ".1f"),
    ("median_ttft_ms", "median TTFT (ms)", ".2f"),
    ("p99_ttft_ms", "p99 TTFT (ms)", ".2f"),
    ("p99_ttft_from_scheduled_ms", "p99 TTFT from scheduled (ms)", ".2f"),
    ("p99_ttfo_ms", "p99 TTFO, first answer token (ms)", ".2f"),
    ("reasoning_token_share", "reasoning share of output tokens", ".4f"),
    ("prefix_hit_rate_measured", "prefix-cache hit rate, measured", ".4f"),
    ("median_tpot_ms", "median TPOT (ms)", ".2f"),
    ("p99_tpot_ms", "p99 TPOT (ms)", ".2f"),
    ("p99_itl_ms", "p99 ITL (ms)", ".2f"),
    ("p99_e2el_ms", "p99 E2E (ms)", ".2f"),
    ("p99_dispatch_lag_us", "p99 dispatch lag (µs)", ".1f"),
    ("sent_in_scheduled_ms_fraction", "sent in scheduled ms", ".4f"),
    ("burst_sent_in_slot_fraction", "burst members sent in their slot", ".4f"),
    ("sustained_fraction", "sustained / offered rate", ".4f"),
    ("arrival_rate_error", "arrivals/s error vs schedule", ".4f"),
)


def run_series(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by series: ``X-run1.parquet``, ``X-run2.parquet``, ... (``--num-runs``)
    are one series ``X``; any other file is a series of its own."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        m = re.match(r"^(.*)-run\d+\.parquet$", r.name)
        groups.setdefault(m.group(1) if m else r.name, []).append(r)
    return groups


def verdicts(runs: list[Run]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Each series after the first against the first: (A, B, per-figure verdicts)."""
    groups = [
        (name, [r.times for r in rs if r.times is not None])
        for name, rs in run_series(runs).items()
    ]
    out: list[tuple[str, str, list[dict[str, Any]]]] = []
    if len(groups) < 2 or not groups[0][1]:
        return out
    a_name, a_times = groups[0]
    for b_name, b_times in groups[1:]:
        if b_times:
            out.append((a_name, b_name, ab_verdicts(a_times, b_times)))
    return out


def format_verdicts(found: list[tuple[str, str, list[dict[str, Any]]]]) -> str:
    """The verdicts as text: one line per figure."""
    lines = []
    for a, b, rows in found:
        lines.append(f"{b} vs {a} (B - A, 95% bootstrap interval over requests):")
        for r in rows:
            lo, hi = r["ci95"]
            verdict = "significant" if r["significant"] else "not significant"
            line = (
                f"  {r['label']:<20} {r['a']:>10.2f} -> {r['b']:>10.2f}  "
                f"{r['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]  {verdict}"
            )
            if "runs_ci95" in r:
                rlo, rhi = r["runs_ci95"]
                rv = "significant" if r["runs_significant"] else "not significant"
                line += f"; over runs [{rlo:+.2f}, {rhi:+.2f}] {rv}"
            lines.append(line)
    return "\n".join(lines)


def _verdict_html(found: list[tuple[str, str, list[dict[str, Any]]]]) -> str:
    parts = []
    for a, b, rows in found:
        body = "".join(
            f"<tr><th>{html.escape(r['label'])}</th><td>{r['a']:.2f}</td><td>{r['b']:.2f}</td>"
            f"<td>{r['diff']:+.2f}</td><td>[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]</td>"
            f"<td>{'<b>significant</b>' if r['significant'] else 'not significant'}</td>"
            + (
                f"<td>[{r['runs_ci95'][0]:+.2f}, {r['runs_ci95'][1]:+.2f}] "
                f"{'<b>significant</b>' if r['runs_significant'] else 'not significant'}</td>"
                if "runs_ci95" in r
                else "<td>-</td>"
            )
            + "</tr>"
            for r in rows
        )
        parts.append(
            f"<h2>{html.escape(b)} vs {html.escape(a)}</h2><p>B − A with a 95% bootstrap "
            "interval over requests (and, with several runs a side, Welch's t over runs)</p>"
            "<table><tr><th></th><th>A</th><th>B</th><th>B − A</th><th>95% interval</th>"
            f"<th>verdict</th><th>over runs</th></tr>{body}</table>"
        )
    return "".join(parts)


def _table(runs: list[Run]) -> str:
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    rows = []
    for key, label, fmt in _KEY_FIGURES:
        cells = []
        for r in runs:
            v = r.metrics.get(key)
            cells.append(
                "<td>-</td>"
                if v is None or (isinstance(v, float) and math.isnan(v))
                else f"<td>{format(v, fmt)}</td>"
            )
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1500px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;
text-align:right}th{background:#f4f4f4}img{max-width:100%;display:block;margin:.5em 0 2em}
.meta{color:#555;font-size:90%}"""


def render_report(
    paths: list[Path], out: Path, *, window_s: float | None = None
) -> dict[str, Path]:
    """Writes ``out`` (HTML, PNGs embedded) and one PNG per panel next to it
    (``<out stem>_<panel>.png``); returns the PNG paths by panel."""
    if not paths:
        raise FineserveError("report: give at least one results file")
    runs = [load_run(p, window_s) for p in paths]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same file names from different directories
        for i, r in enumerate(runs):
            r.name = f"{i + 1}: {r.name}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FineserveError(f"cannot create {out.parent}: {e.strerror}") from None
    pngs: dict[str, Path] = {}
    sections = []
    for key, title in PANELS.items():
        data = _PANEL_FUNCS[key](runs)
        if data is None:
            continue
        png_path = out.with_name(f"{out.stem}_{key}.png")
        try:
            png_path.write_bytes(data)
        except OSError as e:
            raise FineserveError(f"cannot write {png_path}: {e.strerror}") from None
        pngs[key] = png_path
        b64 = base64.b64encode(data).decode()
        sections.append(
            f'<h2>{html.escape(title)}</h2><img id="{key}" alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{b64}">'
        )
    metas = []
    for r in runs:
        m = r.meta
        bits = [
            f"<b>{html.escape(r.name)}</b>",
            html.escape(str(m.get("command", ""))),
            f"seed {m.get('seed')}",
            f"schedule digest {m.get('schedule_digest', '-')}",
            f"fineserve {m.get('fineserve_version', '?')}",
            ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()),
            html.escape(str((m.get("machine") or {}).get("hostname", ""))),
        ]
        if m.get("partial") or not m.get("complete", True):
            bits.append("<b>partial run</b>")
        metas.append("<p class=meta>" + " · ".join(b for b in bits if b) + "</p>")
    title = "fineserve report: " + ", ".join(r.name for r in runs)
    found = verdicts(runs)
    if found:
        from .console import out as print_out

        print_out(format_verdicts(found))
    doc = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(metas)}"
        f"<h2>Key figures</h2>{_table(runs)}{_verdict_html(found)}{''.join(sections)}"
        "</body></html>"
    )
    try:
        out.write_text(doc)
    except OSError as e:
        raise FineserveError(f"cannot write {out}: {e.strerror}") from None
    return pngs
