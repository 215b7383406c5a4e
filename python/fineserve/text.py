"""Everything fineserve prints about a run, in one place: the data (metrics, schedule
summaries, per-worker figures) never carries display strings."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .console import one_line

if TYPE_CHECKING:
    from .compare import Comparison
    from .fit import FitResult
    from .sweep import SweepResult


def _node(worker: dict[str, Any]) -> str:
    """A worker's node as the table shows it: IP address, and pid where one host runs
    several (processes)."""
    ip = str(worker.get("node_ip") or "-")
    return f"{ip} pid {worker['pid']}" if worker.get("pid") else ip


def format_workers(rows: list[dict[str, Any]]) -> str:
    """The per-worker breakdown as a table, so an overloaded or dead worker stands out."""

    def num(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = (
        f"{'worker':>6} {'requests':>9} {'sent':>9} {'req/s':>9} {'lag p50 us':>11} "
        f"{'lag p99 us':>11} {'clock us':>14} {'start us':>9} {'node':>22}  outcomes"
    )
    title = f" {rows[0].get('kind', 'Ray workers') if rows else 'Workers'} "
    lines = ["{s:{c}^{n}}".format(s=title, n=len(head), c="="), head]
    for r in rows:
        clock = f"{r['clock_offset_us']:+.0f}±{r['clock_offset_uncertainty_us']:.0f}"
        outcomes = ", ".join(f"{k} {v}" for k, v in r["outcomes"].items())
        if r["died"]:
            outcomes += f"; DIED: {r['died']}"
        lines.append(
            f"{r['worker']:>6} {r['requests']:>9} {r['sent']:>9} "
            f"{num(r['achieved_rps'], '.0f'):>9} {num(r['lag_p50_us'], '.1f'):>11} "
            f"{num(r['lag_p99_us'], '.1f'):>11} {clock:>14} "
            f"{num(r['start_error_us'], '+.0f'):>9} {_node(r):>22}  {outcomes}"
        )
    return "\n".join(lines)


class _Table:
    """The summary's rows: a label padded to 40 columns, then the value."""

    def __init__(self, title: str) -> None:
        self.lines = ["{s:{c}^{n}}".format(s=f" {title} ", n=50, c="=")]

    def row(self, label: str, value: Any, fmt: str = "") -> None:
        text = format(value, fmt) if fmt else str(value)
        self.lines.append(f"{label:<40} {text:<10}")

    def section(self, title: str) -> None:
        self.lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))


def format_summary(m: dict[str, Any], header: dict[str, Any]) -> str:
    """FineServe's summary table (same labels and widths), then reasoning, dispatch
    fidelity, prompts, accounting and breakdowns."""
    t = _Table("Serving Benchmark Result")
    _summary_totals(t, m, header)
    _summary_latencies(t, m)
    _summary_reasoning(t, m)
    _summary_dispatch(t, m, header)
    _summary_prompts(t, m)
    _summary_steady(t, m)
    _summary_runs(t, m)
    _summary_server(t, m)
    _summary_accounting(t, m)
    _summary_footer(t, m)
    return "\n".join(t.lines)


def _summary_totals(t: _Table, m: dict[str, Any], header: dict[str, Any]) -> None:
    """The header and FineServe's totals and throughputs."""
    t.row("Backend:", header.get("backend"))
    t.row("Request generation mode:", header.get("mode"))
    rate = header.get("request_rate")
    if header.get("request_rate_is_mean"):
        rate = f"{rate:.2f} (mean)" if rate else "-"
    t.row("Traffic request rate:", rate)
    t.row("Max request concurrency:", header.get("max_concurrency") or "not set")
    t.row("Successful requests:", m["completed"])
    t.row("Failed requests:", m["failed"])
    t.row("Benchmark duration (s):", m["duration"], ".2f")
    t.row("Total input tokens:", m["total_input_tokens"])
    if "total_image_count" in m:  # a multimodal run: input tokens are its text part
        t.row("  of which text (budget):", m["total_text_tokens"])
        for kind in ("image", "audio", "video"):
            if m.get(f"total_{kind}_count"):
                t.row(
                    f"Total {kind} items / tokens:",
                    f"{m[f'total_{kind}_count']} / {m[f'total_{kind}_tokens']} "
                    f"({m[f'total_{kind}_bytes'] / 1e6:.1f} MB)",
                )
        if m.get("prompt_tokens_server_over_budget") is not None:
            t.row(
                "Server prompt tokens / text+media:",
                f"{m['prompt_tokens_server_over_budget']:.3f} "
                f"({m['mean_prompt_tokens_server_minus_budget']:+.1f} per request)",
            )
    t.row("Total generated tokens:", m["total_output_tokens"])
    t.row("Request throughput (req/s):", m["request_throughput"], ".2f")
    t.row("Input token throughput (tok/s):", m["input_throughput"], ".2f")
    t.row("Output token throughput (tok/s):", m["output_throughput"], ".2f")
    t.row("Total token throughput (tok/s):", m["total_token_throughput"], ".2f")
    if m.get("request_goodput") is not None:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in m["goodput_slos_ms"].items())
        t.row("Request goodput (req/s):", m["request_goodput"], ".2f")
        t.row("  good requests:", f"{m['good_requests']} ({slos})")
    t.row("Concurrency:", m["concurrency"], ".2f")
    t.row("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"], ".2f")
    t.row("Peak concurrent requests:", m["max_concurrent_requests"])


def _summary_latencies(t: _Table, m: dict[str, Any]) -> None:
    """E2E, TTFT, ITL and TPOT, and any requested percentiles."""
    t.section("End-to-End Latency")
    t.row("Mean E2E Latency (ms):", m["mean_e2e_latency_ms"], ".2f")
    t.row("Median E2E Latency (ms):", m["median_e2e_latency_ms"], ".2f")
    t.row("P99 E2E Latency (ms):", m["p99_e2e_latency_ms"], ".2f")
    t.section("Time to First Token")
    t.row("Mean TTFT (ms):", m["mean_ttft_ms"], ".2f")
    t.row("Median TTFT (ms):", m["median_ttft_ms"], ".2f")
    t.row("P99 TTFT (ms):", m["p99_ttft_ms"], ".2f")
    t.section("Inter-Token Latency")
    t.row("Mean ITL (ms):", m["mean_itl_ms"], ".2f")
    t.row("Median ITL (ms):", m["median_itl_ms"], ".2f")
    t.row("P95 ITL (ms):", m["p95_itl_ms"], ".2f")
    t.row("P99 ITL (ms):", m["p99_itl_ms"], ".2f")
    t.row("Max ITL (ms):", m["max_itl_ms"], ".2f")
    t.row("Mean TPOT (ms):", m["mean_tpot_ms"], ".2f")
    t.row("Median TPOT (ms):", m["median_tpot_ms"], ".2f")
    t.row("P99 TPOT (ms):", m["p99_tpot_ms"], ".2f")
    shown = {"p99_ttft_ms", "p99_tpot_ms", "p99_itl_ms", "p95_itl_ms", "p99_e2el_ms", "p99_ttfo_ms"}
    more = [
        k
        for k in m
        if k.startswith("p")
        and k.endswith("_ms")
        and k not in shown
        and k.split("_", 1)[1] in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "ttfo_ms")
        and k[1].isdigit()
    ]
    if more:
        t.section("Requested percentiles")
        for k in more:
            q, name = k[1:].split("_", 1)
            t.row(f"P{q} {name[:-3].upper()} (ms):", m[k], ".2f")


def _summary_reasoning(t: _Table, m: dict[str, Any]) -> None:
    """TTFO and the reasoning phase, when the run had any."""
    if m.get("total_reasoning_tokens") or (
        m.get("mean_ttfo_ms") and abs(m["mean_ttfo_ms"] - m["mean_ttft_ms"]) > 1e-6
    ):
        t.section("Reasoning and answer")
        t.row("Mean TTFO, first answer token (ms):", m["mean_ttfo_ms"], ".2f")
        t.row("Median TTFO (ms):", m["median_ttfo_ms"], ".2f")
        t.row("P99 TTFO (ms):", m["p99_ttfo_ms"], ".2f")
        share = f"{100 * m['reasoning_token_share']:.2f}"
        if m.get("reasoning_token_share_scheduled") is not None:
            share += f" (scheduled {100 * m['reasoning_token_share_scheduled']:.2f})"
        t.row("Reasoning tokens:", m["total_reasoning_tokens"])
        t.row("Reasoning share of output (%):", share)
        t.row("Mean reasoning time (ms):", m["mean_reasoning_time_ms"], ".2f")
        t.row("P99 reasoning time (ms):", m["p99_reasoning_time_ms"], ".2f")
        t.row("Mean ITL, reasoning / answer (ms):",
            f"{m['mean_reasoning_itl_ms']:.2f} / {m['mean_answer_itl_ms']:.2f}")  # fmt: skip
        t.row("P99 ITL, reasoning / answer (ms):",
            f"{m['p99_reasoning_itl_ms']:.2f} / {m['p99_answer_itl_ms']:.2f}")  # fmt: skip
        t.row("Mean answer TPOT (ms):", m["mean_answer_tpot_ms"], ".2f")


def _summary_dispatch(t: _Table, m: dict[str, Any], header: dict[str, Any]) -> None:
    """Latency from the scheduled send, and how well the schedule was kept."""
    t.section("From scheduled send")
    t.row("Mean TTFT from scheduled (ms):", m["mean_ttft_from_scheduled_ms"], ".2f")
    t.row("P99 TTFT from scheduled (ms):", m["p99_ttft_from_scheduled_ms"], ".2f")
    t.row("Mean E2E from scheduled (ms):", m["mean_e2el_from_scheduled_ms"], ".2f")
    t.row("P99 E2E from scheduled (ms):", m["p99_e2el_from_scheduled_ms"], ".2f")
    t.section("Dispatch (sent - scheduled)")
    t.row("P50 dispatch lag (us):", m["p50_dispatch_lag_us"], ".1f")
    t.row("P99 dispatch lag (us):", m["p99_dispatch_lag_us"], ".1f")
    t.row("Max dispatch lag (us):", m["max_dispatch_lag_us"], ".1f")
    t.row("Sent in scheduled ms (%):", 100 * m["sent_in_scheduled_ms_fraction"], ".2f")
    burst, lanes = header.get("max_burst_per_ms") or 0, header.get("lanes")
    if m["sent_in_scheduled_ms_fraction"] < 0.95 and burst > 1 and lanes:
        # A burst leaves one request after another on each lane: say so, or 40 % looks
        # like a broken engine on a first run of 100 requests at once.
        t.lines.append(
            f"  (up to {burst} requests were due in one ms, sent by {lanes} lane"
            f"{'s' if lanes > 1 else ''}: a burst takes ~{burst // lanes} sends per lane; "
            "--lanes adds senders)"
        )
    if m.get("token_time_source"):
        t.row(
            "Token times stamped by:",
            f"{m['token_time_source']} ({100 * m['kernel_stamped_token_fraction']:.1f}% kernel)",
        )
    if "client_saturated" in m:
        t.row(
            "Client saturated:",
            "yes (see the warning above)" if m["client_saturated"] else "no",
        )
        if m.get("connection_waits"):
            t.row(
                "  waited for a connection:",
                f"{m['connection_waits']} (mean {m['connection_wait_mean_us']:.0f} us, "
                f"p99 over sent {m.get('pool_wait_p99_us', 0):.0f} us, "
                f"{m['pool_exhausted_seconds']} s exhausted)",
            )
    if m.get("burst_sent_in_slot_fraction") is not None:
        t.row(
            "Burst members in their slot (%):",
            f"{100 * m['burst_sent_in_slot_fraction']:.2f} (of {m['burst_members_sent']})",
        )
    if m.get("sustained_fraction") is not None:
        t.row(
            "Offered / sustained rate (req/s):",
            f"{m['offered_request_rate']:.2f} / {m['sustained_request_rate']:.2f}",
        )
    t.row("Arrivals/s vs schedule, error (%):", 100 * m.get("arrival_rate_error", 0.0), ".2f")


def _summary_prompts(t: _Table, m: dict[str, Any]) -> None:
    """Prefix-cache hit rates and the prompt-length check."""
    measured = m.get("prefix_hit_rate_measured")
    if m.get("prefix_hit_rate_theoretical") or m.get("prompt_check") or measured is not None:
        t.section("Prompts")
    if m.get("prefix_hit_rate_theoretical"):
        t.row("Prefix-cache hit rate, theor. (%):", 100 * m["prefix_hit_rate_theoretical"], ".2f")
    if measured is not None:
        t.row("Prefix-cache hit rate, measured (%):", 100 * measured, ".2f")
    if m.get("prompt_check"):
        pc = m["prompt_check"]
        t.row("Prompts checked / off:", f"{pc['checked']} / {pc['mismatched']}")


def _summary_steady(t: _Table, m: dict[str, Any]) -> None:
    """The steady-state window and the headline latencies over it."""
    w = m.get("steady_state")
    if not w:
        return
    t.section("Steady state")
    t.row("Window (s):", f"{w['start_s']:.2f} - {w['end_s']:.2f}")
    t.row("Requests sent in it:", m.get("steady_requests"))
    for key, label in (
        ("steady_request_throughput", "Request throughput (req/s):"),
        ("steady_median_ttft_ms", "Median TTFT (ms):"),
        ("steady_p99_ttft_ms", "P99 TTFT (ms):"),
        ("steady_median_tpot_ms", "Median TPOT (ms):"),
        ("steady_p99_e2e_latency_ms", "P99 E2E Latency (ms):"),
    ):
        if m.get(key) is not None:
            t.row(label, m[key], ".2f")


def _summary_runs(t: _Table, m: dict[str, Any]) -> None:
    """``--num-runs``: each headline figure's mean ± the half-width of its 95% interval."""
    n = m.get("num_runs") or 1
    if n < 2:
        return
    from .metrics.steady import HEADLINE

    t.section(f"Across {n} runs (mean ± 95% CI)")
    for key in HEADLINE:
        ci = m.get(f"ci95_{key}")
        if ci is None:
            continue
        half = (ci[1] - ci[0]) / 2
        cv = m.get(f"cv_{key}")
        label = key.replace("_ms", " (ms)").replace("_", " ")
        t.row(f"{label}:", f"{m[key]:.2f} ± {half:.2f}" + (f" (CV {cv:.1%})" if cv else ""))


def _summary_server(t: _Table, m: dict[str, Any]) -> None:
    """The scraped servers (``--server-metrics``): scrapes, and for the vLLM, SGLang or
    TGI names a page has, queue, running, KV usage, prefix cache, preemptions and the
    server's TTFT beside the client's."""
    from .metrics.scrape import curated

    pages = m.get("server_metrics")
    if not pages:
        return
    t.section("Server metrics")
    for page, summary in pages.items():
        ok = summary["scrapes"] - summary["failed"]
        line = f"{ok}/{summary['scrapes']} ok"
        if summary.get("slow"):
            line += f", {summary['slow']} slow"
        if summary.get("first_error"):
            line += f" ({summary['first_error']})"
        t.row(f"{_short(page)}:", line)
        c = curated(summary)
        for key, label in (("running", "  running"), ("waiting", "  waiting")):
            if key in c:
                t.row(f"{label} (peak / mean):", f"{c[key]['max']:g} / {c[key]['mean']:.2f}")
        if "kv_usage" in c:
            kv = c["kv_usage"]
            t.row(
                "  KV-cache usage (p99 / max, %):", f"{100 * kv['p99']:.1f} / {100 * kv['max']:.1f}"
            )
        if "prefix_hit_rate" in c:
            t.row("  Prefix-cache hit rate, server (%):", 100 * c["prefix_hit_rate"], ".2f")
        if "preemptions" in c:
            t.row("  Preemptions:", f"{c['preemptions']:g}")
        if "generation_tokens" in c:
            t.row("  Generated tokens, server:", f"{c['generation_tokens']:g}")
        if "ttft_s" in c:
            ttft = c["ttft_s"]
            t.row(
                "  Server TTFT (p50 / p99 ms):",
                f"{1e3 * (ttft.get('p50') or 0):.2f} / {1e3 * (ttft.get('p99') or 0):.2f}",
            )
    if any("ttft_s" in curated(s) for s in pages.values()):
        t.row("Client TTFT (p50 / p99 ms):", f"{m['median_ttft_ms']:.2f} / {m['p99_ttft_ms']:.2f}")


def _short(url: str) -> str:
    """A page's URL without its scheme (the summary's labels are 40 columns)."""
    return url.split("://", 1)[-1]


def _summary_accounting(t: _Table, m: dict[str, Any]) -> None:
    """Every scheduled request, by outcome; breakdowns with two values or more."""
    t.section("Accounting")
    t.row("Scheduled:", m["scheduled"])
    t.row("Sent:", m["sent"])
    t.row("  succeeded:", m["completed"])
    t.row("  failed:", m["failed"])
    for name, count in m["errors_by_kind"].items():
        if name != "not_sent":
            t.row(f"    {name}:", count)
    t.row("Not sent:", m["not_sent"])
    if m.get("early_stop"):
        stop = m["early_stop"]
        t.row("Stopped early at (s):", f"{stop['at_s']:.2f} ({stop['reason']})")
    if m.get("not_reached"):
        t.row("Not reached (stopped):", m["not_reached"])
    if m.get("live_history_turns"):
        t.row("Later turns (live history):", sum(m["live_history_turns"].values()))
        for kind, count in m["live_history_turns"].items():
            t.row(f"  {kind.replace('_', ' ')}:", count)
    for group, values in m.get("breakdown", {}).items():
        if len(values) < 2:
            continue
        t.section(f"By {group}")
        for value, sub in values.items():
            hit = sub.get("prefix_hit_rate_measured")
            t.row(
                f"  {value[:22]}:",
                f"{sub['completed']} ok, {sub['failed']} failed, "
                f"TTFT p99 {sub['p99_ttft_ms']:.1f} ms, TPOT p99 {sub['p99_tpot_ms']:.1f} ms"
                + (f", cache hits {100 * hit:.1f}%" if hit is not None else ""),
            )


def _summary_footer(t: _Table, m: dict[str, Any]) -> None:
    """The first error of each kind, and notices."""
    t.lines.append("=" * 50)
    for name, msg in m["first_error_by_kind"].items():
        t.lines.append(f"first {name} error: {one_line(msg, limit=200)}")
    if m.get("usage_ignored"):
        t.lines.append(
            f"note: {m['usage_ignored']} responses carried usage fields of unexpected types "
            "(ignored; token counts fell back to counted events)"
        )


def format_schedule_summary(s: dict[str, Any], info: dict[str, Any]) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Schedule ", n=50, c="=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40} {value}")

    row("Mode:", info.get("mode"))
    row("Requests:", s["requests"])
    row("Span (s):", f"{s['span_s']:.3f}")
    row("Mean rate (req/s):", f"{s['mean_rate_rps']:.2f}")
    media = [m for m in ("image", "audio", "video") if f"total_{m}_items" in s]
    row("Total input tokens:" if not media else "Total text tokens:", s["total_input_tokens"])
    for m in media:
        row(f"Total {m} items / tokens:", f"{s[f'total_{m}_items']} / {s[f'total_{m}_tokens']}")
    row("Total output tokens:", s["total_output_tokens"])
    windows = s["windows"]
    if windows:
        rates = np.array([w["rate_rps"] for w in windows])
        cvs = np.array([w["iat_cv"] for w in windows])
        row("Windows (300 s):", len(windows))
        row(
            "  rate min/median/max (req/s):",
            f"{rates.min():.2f} / {np.median(rates):.2f} / {rates.max():.2f}",
        )
        row("  IAT CV min/median/max:", f"{cvs.min():.2f} / {np.median(cvs):.2f} / {cvs.max():.2f}")
    row(f"Occupied {s['slot_ms']:g} ms slots:", s["occupied_slots"])
    row("  mean requests per occupied slot:", f"{s['mean_per_occupied_slot']:.3f}")
    row("  max requests in one slot:", s["max_per_slot"])
    row("  requests in multi-request slots (%):", f"{100 * s['fraction_in_bursts']:.2f}")
    if s.get("prefix_hit_rate_theoretical") is not None:
        row(
            "Prefix-cache hit rate, theoretical (%):",
            f"{100 * s['prefix_hit_rate_theoretical']:.2f}",
        )
    row("Digest (t, input, output):", s["digest"])
    lines.append("=" * 50)
    return "\n".join(lines)


def format_comparison(c: Comparison) -> str:
    head = f"{'metric':<28} {'real':>12} {'generated':>12} {'KS':>7} {'W/mean':>8}  check"
    lines = [
        f"Compare {c.real.name} (real) with {c.generated.name} (generated); windows "
        f"{c.window_s:g} s, slots {c.slot_ms:g} ms; real clock: {c.resolution.describe()}",
        head,
        "-" * len(head),
    ]

    def f(x: float, digits: int = 3) -> str:
        if not math.isfinite(x):
            return "-"
        if abs(x) >= 1000:
            return f"{x:.0f}"
        return f"{x:.{digits}f}"

    for r in c.rows:
        check = ""
        if r.ok is not None:
            check = f"{'ok  ' if r.ok else 'FAIL'} {r.check} {f(r.value)} <= {f(r.threshold)}"
        elif r.check in ("score", "diff"):
            check = f"{r.check} {f(r.value)}"
        lines.append(
            f"{r.metric:<28} {f(r.real):>12} {f(r.generated):>12} {f(r.ks):>7} "
            f"{f(r.wasserstein):>8}  {check}"
        )
    lines += [f"note: {n}" for n in c.notes]
    if any(r.ok is not None for r in c.rows):
        lines.append("verdict: " + ("all checks pass" if c.passed else "some checks FAIL"))
    return "\n".join(lines)


def format_fit_summary(r: FitResult) -> str:
    from .fit import fit_summary

    s = fit_summary(r)
    w = s["windows"]
    lines = [
        f"Fit of {r.source} as '{r.name}': {r.n_requests} requests over {r.span_s:.1f} s",
        f"  arrivals   {w['count']} windows of {r.window_s:g} s; best model per window: "
        + ", ".join(f"{m} {c}" for m, c in w["models"].items()),
    ]
    if w["ks_gamma_median"] is not None:
        lines.append(
            f"             Gamma KS per window: median {w['ks_gamma_median']:.3f}, "
            f"p90 {w['ks_gamma_p90']:.3f}; all gaps through their window's CDF: "
            f"{w['ks_all_gaps']:.3f} (Gamma), {w['ks_all_gaps_chosen_model']:.3f} (best model)"
        )
    m = s["arrival_model"]
    mem = m["memory"]
    lines += [
        f"  clock      {r.resolution.describe()}",
        f"  model      slot process in {m['slot_ms']:g} ms slots ({m['placement']}): "
        f"{m['events']} occupied slots in {m['busy_windows']} busy windows; gap laws: "
        + ", ".join(f"{k} {c}" for k, c in m["gap_laws"].items() if c)
        + f"; memory {mem['chosen']}"
        + (
            " (by trial generations against the trace's requests/s autocorrelation)"
            if mem["trial_acf_errors"]
            else ""
        ),
    ]
    if r.prefix is not None:
        lines.append(
            f"  prefix     hash_ids blocks of {r.prefix.block_size} tokens: theoretical hit rate "
            f"{100 * r.prefix.trace_hit_rate:.2f} %; generated schedules share blocks the "
            "same way (hit share by prompt length, parent distance)"
        )
    lines.append(f"  bursts     {r.burst_decision}")
    if r.bursts is not None:
        b = r.bursts
        lines.append(
            f"             {b.num_samples} slots, mean {b.mean:.3f}, variance {b.variance:.3f}, "
            f"max {b.max_count}; chosen: {b.chosen} (KS {b.best.ks:.4f})"
        )
        for c in b.candidates.values():
            params = "; ".join(
                f"w={x.weight:.3f} mu={x.mu:.4g} alpha={x.alpha:.4g}" for x in c.components
            )
            plain = (
                ""
                if math.isnan(c.ks_plain)
                else f", as plain NB {c.ks_plain:.4f} (scipy kstest convention {c.ks_scipy:.4f})"
            )
            lines.append(
                f"               {c.name:<14} KS {c.ks:.4f}{plain}, BIC {c.bic:.1f}  [{params}]"
            )
        if "nb_moments" not in b.candidates:
            lines.append(
                "               nb_moments     undefined: variance <= mean (FineServe's estimator "
                "needs over-dispersed counts)"
            )
    ln = r.lengths
    pl = ln.params["input_pareto_lognormal"]
    lines += [
        f"  lengths    input: Pareto+LogNormal (w={pl['weight_pareto']:.3f}, "
        f"a={pl['pareto_a']:.3g}, mu={pl['lognorm_mu']:.3f}, sigma={pl['lognorm_sigma']:.3f}) KS "
        f"{ln.ks['input_pareto_lognormal']:.3f}; Zipf a={ln.params['input_zipf']['a']:.3f} KS "
        f"{ln.ks['input_zipf']:.3f}",
        f"             output: Exponential mean {ln.params['output_exponential']['mean']:.1f} KS "
        f"{ln.ks['output_exponential']:.3f}; Zipf a={ln.params['output_zipf']['a']:.3f} KS "
        f"{ln.ks['output_zipf']:.3f}",
        f"             correlation: Pearson {ln.correlation['pearson']:.3f}, on logs "
        f"{ln.correlation['pearson_log']:.3f}, Spearman {ln.correlation['spearman']:.3f}; the "
        "generator samples the joint histogram, which keeps it",
    ]
    lines += [f"  note       {n}" for n in r.notes]
    for kind, p in r.files.items():
        lines.append(f"  wrote      {kind}: {p}")
    return "\n".join(lines)


def format_sweep(r: SweepResult, target_load: float | None = None) -> str:
    head = (
        f"{r.unit:>12} {'offered rps':>12} {'sustained':>10} {'ok':>6} {'failed':>6} "
        + " ".join(f"{s.key:>16}" for s in r.slos)
        + "  verdict"
    )
    lines = [
        "Capacity sweep: "
        + "; ".join(str(s) for s in r.slos)
        + f"; failures <= {100 * r.max_failure_rate:g}%"
        + (f"; sustained >= {100 * r.min_sustained:g}% of offered" if r.min_sustained else ""),
        head,
        "-" * len(head),
    ]
    for p in sorted(r.probes, key=lambda p: p.load):
        m = p.metrics
        cells = " ".join(f"{m.get(s.key, float('nan')):16.2f}" for s in r.slos)
        offered, sustained = m.get("offered_request_rate"), m.get("sustained_request_rate")
        lines.append(
            f"{p.load:12.3f} {offered or math.nan:12.2f} {sustained or math.nan:10.2f} "
            f"{m['completed']:6d} "
            f"{m['failed']:6d} {cells}  {'PASS' if p.passed else 'fail: ' + p.why}"
        )
    best = r.best
    if best is None:
        lines.append("no probed load meets the SLOs")
    else:
        lines.append(
            f"highest load meeting the SLOs: {best.load:.3f} ({r.unit}), "
            f"{best.metrics.get('sustained_request_rate') or math.nan:.2f} req/s sustained"
        )
        if target_load is not None:
            n = r.instances_for(target_load)
            lines.append(
                f"instances needed for a total load of {target_load:g}: {n} "
                f"(each carrying {best.sustained_load(r.unit):.3f} {r.unit}, as sustained)"
            )
    return "\n".join(lines)
