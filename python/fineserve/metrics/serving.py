"""FineServe/vLLM serving metrics from per-request records.

Definitions (those of FineServe's Generator and vLLM's benchmark, so numbers compare):
- TTFT = first token-bearing event − send; E2E = end of response − send.
- ITL = gaps between successive token-bearing events of a request (per chunk, pooled over
  requests); TPOT = (E2E − TTFT) / (output tokens − 1) for requests with > 1 token.
- Output tokens: the server's ``usage.completion_tokens`` when reported, otherwise the number
  of token-bearing events (FineServe falls back to the *requested* length, which hides
  short answers).
- Only successful requests enter latency and token figures; duration runs from the start
  instant to the last response end; concurrency = Σ E2E / duration.
- Dispatch lag = actual send − scheduled send, for every request that was sent.
- Coordinated omission: TTFT and E2E are also measured from the *scheduled* send time
  (``*_from_scheduled``), which adds client and queueing delay (e.g. ``--max-concurrency``
  waits) that send-time latencies hide.
- Goodput (vLLM's definition): successful requests meeting every given SLO (TTFT, TPOT,
  E2E in ms; TPOT of a one-token request is 0) per second of duration.
- Arrival fidelity: per second of the schedule, requests scheduled vs actually sent;
  ``arrival_rate_error`` = Σ|sent − scheduled| / Σ scheduled over those seconds.
  ``sent_in_scheduled_ms_fraction`` covers every sent request;
  ``burst_sent_in_slot_fraction`` only micro-burst members (requests sharing their 1 ms
  slot with another), see :class:`~.fidelity.BurstFidelity`.
- Offered vs sustained rate (:class:`~.fidelity.SustainedRate`): whether the server kept
  up with the schedule, which a short overloaded run can hide from the latency SLOs.
- vLLM's peak figures: ``max_output_tokens_per_s`` is the most token events of
  successful requests in one second of the run; ``max_concurrent_requests`` the most
  successful requests active in one second (both over whole seconds from the start).
- Reasoning and answers (reasoning models, tool calls): TTFT stays the first token of any
  kind (vLLM's definition); TTFO = first *answer* token (content or tool call) − send, as
  GuideLLM and AIPerf define it; a request whose stream carried only reasoning has no TTFO.
  Reasoning tokens are the server's ``completion_tokens_details.reasoning_tokens`` when it
  reports a positive count, else the count of reasoning events (vLLM 0.32 reports 0 while
  streaming reasoning); ``reasoning_token_share`` is their share of
  output tokens. Reasoning time = last reasoning event − first token. ITL and TPOT are also
  split by phase: a gap belongs to the reasoning phase when the event that ends it comes no
  later than the request's last reasoning event, to the answer phase otherwise (the switch
  counts as answer); answer TPOT = (end − first answer token) / (answer tokens − 1).
- Measured prefix-cache hits: Σ ``prompt_tokens_details.cached_tokens`` / Σ prompt tokens over
  successful requests whose server reported them (vLLM with
  ``--enable-prompt-tokens-details``), beside the schedule's theoretical rate.
- Percentiles come from log-bucketed histograms (within 0.05 % of numpy's), so that runs of
  any length summarise in bounded memory; means, standard deviations and counts are exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .._engine import ERROR_KINDS
from ..records import HISTORY_KINDS
from .fidelity import BurstFidelity, SustainedRate
from .histogram import LogHistogram
from .windows import WindowStats, add_counts

#: Labels the metrics are broken down by, where the records have them: the schedule's
#: class, the endpoint, the model (class models, LoRA adapters), the data-parallel rank,
#: and a conversation's turn number (TTFT and measured cached tokens by turn).
BREAKDOWNS = ("class", "endpoint", "model", "dp_rank", "image_count", "turn")

#: Turn numbers from this one on share a breakdown group ("8+").
TURN_GROUPS = 8


def turn_groups(turn: npt.ArrayLike) -> npt.NDArray[Any]:
    """Turn numbers (from 1) as breakdown labels: "1" … "7", then "8+"."""
    t = np.asarray(turn).astype(np.int64)
    out = np.array([str(x) for x in np.clip(t, 1, TURN_GROUPS).tolist()], dtype=object)
    out[t >= TURN_GROUPS] = f"{TURN_GROUPS}+"
    return out


_NS_PER_MS = 1e6


def _stats(h: LogHistogram, prefix: str, extra: tuple[int, ...] = ()) -> dict[str, float]:
    out = {
        f"mean_{prefix}_ms": h.mean / _NS_PER_MS,
        f"median_{prefix}_ms": h.percentile(50) / _NS_PER_MS,
        f"std_{prefix}_ms": h.std / _NS_PER_MS,
        f"p99_{prefix}_ms": h.percentile(99) / _NS_PER_MS,
    }
    for p in extra:
        out[f"p{p}_{prefix}_ms"] = h.percentile(p) / _NS_PER_MS
    return out


def itl_ns(
    chunk_ns: npt.NDArray[np.int64],
    chunk_offsets: npt.NDArray[np.uint64],
    include: npt.NDArray[np.bool_],
) -> npt.NDArray[np.int64]:
    """Gaps between successive events of the same request, for requests in ``include``."""
    return itl_with_times(chunk_ns, chunk_offsets, include)[0]


def _column(columns: Mapping[str, Any], name: str, fill: int, n: int) -> npt.NDArray[np.int64]:
    """A record column as int64, or ``fill`` for records from before it existed."""
    if name in columns:
        return np.asarray(columns[name]).astype(np.int64)
    return np.full(n, fill, dtype=np.int64)


def reasoning_tokens(
    reported: npt.NDArray[np.int64], events: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Each request's reasoning tokens: the server's count when it reports a positive one,
    else the reasoning events counted (vLLM 0.32 reports ``reasoning_tokens: 0`` in usage
    while every token of a deepseek_r1 stream is reasoning)."""
    return np.where(reported > 0, reported, events)


def itl_by_phase(
    chunk_ns: npt.NDArray[np.int64],
    chunk_offsets: npt.NDArray[np.uint64],
    include: npt.NDArray[np.bool_],
    last_reasoning_ns: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """ITL gaps of the ``include``d requests split into (reasoning, answer) phases: a gap
    is reasoning when the event ending it is no later than its request's last reasoning
    event (-1: none, so every gap is answer)."""
    counts = np.diff(chunk_offsets).astype(np.int64)
    if len(chunk_ns) < 2:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    owner = np.repeat(np.arange(len(counts)), counts)
    keep = (owner[:-1] == owner[1:]) & include[owner[:-1]]
    gaps = np.diff(chunk_ns)[keep]
    end = chunk_ns[1:][keep]
    reasoning = end <= last_reasoning_ns[owner[1:][keep]]
    return gaps[reasoning], gaps[~reasoning]


def itl_with_times(
    chunk_ns: npt.NDArray[np.int64],
    chunk_offsets: npt.NDArray[np.uint64],
    include: npt.NDArray[np.bool_],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """ITL gaps and the arrival time of the event that ends each gap."""
    counts = np.diff(chunk_offsets).astype(np.int64)
    if len(chunk_ns) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    same = owner[:-1] == owner[1:]
    keep = same & include[owner[:-1]]
    return np.diff(chunk_ns)[keep], chunk_ns[1:][keep]


#: vLLM's ``--goodput`` SLO names, plus ttfo (time to first answer token).
SLO_METRICS = ("ttft", "tpot", "e2el", "ttfo")


def parse_goodput(items: tuple[str, ...] | list[str]) -> dict[str, float]:
    """``("ttft:200", "e2el:5000")`` → {"ttft": 200.0, ...} in ms (vLLM's syntax)."""
    from ..errors import FineserveError

    slos: dict[str, float] = {}
    for item in items:
        for part in item.replace(",", " ").split():
            name, _, value = part.partition(":")
            if name not in SLO_METRICS:
                raise FineserveError(
                    f"--goodput {part!r}: metric must be one of {', '.join(SLO_METRICS)}"
                )
            try:
                ms = float(value)
            except ValueError:
                raise FineserveError(f"--goodput {part!r}: expected NAME:MILLISECONDS") from None
            if not ms > 0:
                raise FineserveError(f"--goodput {part!r}: the SLO must be > 0 ms")
            slos[name] = ms
    return slos


class MetricsAccumulator:
    """Serving metrics over record batches of any number and size, in bounded memory.

    Latency distributions are :class:`LogHistogram` s (percentiles within 0.05 %, mean and
    std exact), so a run of any duration can be summarised as its records drain.
    ``groups`` names label columns (e.g. ``class``, ``endpoint``) to break metrics down by.
    """

    def __init__(
        self,
        *,
        slos: dict[str, float] | None = None,
        window_s: float | None = 10.0,
        groups: tuple[str, ...] = (),
        whole_run: bool = True,
    ) -> None:
        self.e2e = LogHistogram()
        self.ttft = LogHistogram()
        self.tpot = LogHistogram()
        self.itl = LogHistogram()
        self.lag = LogHistogram()
        self.ttft_sched = LogHistogram()
        self.e2e_sched = LogHistogram()
        self.ttfo = LogHistogram()
        self.reasoning_time = LogHistogram()
        self.reasoning_itl = LogHistogram()
        self.answer_itl = LogHistogram()
        self.answer_tpot = LogHistogram()
        self.total_reasoning = self.reasoning_requests = 0
        self.cached_tokens = self.cached_prompt_tokens = self.cached_reported = 0
        self.usage_ignored = 0
        #: Multimodal runs: media totals over completed requests, and the server's prompt
        #: tokens against text + media budget where it reported them (None: text only).
        self.media: dict[str, int] | None = None
        #: Σ reason_ratio × output tokens and Σ output tokens of requests that carry a
        #: scheduled reasoning ratio (ServeGen's reasoning pools).
        self.scheduled_reasoning = 0.0
        self.scheduled_reasoning_of = 0
        self.scheduled = self.completed = self.failed = self.not_sent = 0
        self.total_input = self.total_output = self.server_reported = 0
        self.in_scheduled_ms = 0
        # Slot membership and the schedule's span belong to the whole run, not to a
        # breakdown group (``whole_run`` False).
        self.bursts = BurstFidelity() if whole_run else None
        self.sustained = SustainedRate() if whole_run else None
        # Token events and requests started/ended per second, for vLLM's peak figures.
        self.tokens_per_s = np.zeros(0, np.int64)
        self.starts_per_s = np.zeros(0, np.int64)
        self.ends_after_per_s = np.zeros(0, np.int64)
        self.good = 0
        self.slos = dict(slos or {})
        self.last_end_ns = 0
        self.errors_by_kind: Counter[str] = Counter()
        #: Live history: later turns by what they carried (``records.HISTORY_KINDS``).
        self.history_kinds: Counter[str] = Counter()
        self.first_error_by_kind: dict[str, str] = {}
        self.scheduled_per_s = np.zeros(0, np.int64)
        self.sent_per_s = np.zeros(0, np.int64)
        self.windows = WindowStats(window_s) if window_s else None
        self.group_names = groups
        self.groups: dict[tuple[str, str], MetricsAccumulator] = {}
        #: Where a stopped run stopped (ns from its start): requests scheduled after it
        #: were never due, so they count apart (``not_reached``), not as not sent.
        self.stop_ns: int | None = None
        self.not_reached = 0

    def stopped(self, at_ns: int) -> None:
        """The run was stopped at ``at_ns``: later batches' unsent requests scheduled after
        that instant are not reached, and stay out of the schedule's figures."""
        self.stop_ns = int(at_ns)

    def add(
        self,
        columns: Mapping[str, Any],
        input_len: npt.ArrayLike,
        labels: dict[str, npt.NDArray[Any]] | None = None,
        burst_slots: tuple[npt.NDArray[Any], npt.NDArray[np.bool_]] | None = None,
        reason_ratio: npt.NDArray[np.float64] | None = None,
    ) -> None:
        """Adds one batch of records; ``input_len``, ``labels`` and ``burst_slots`` are
        aligned with the batch's rows (``labels`` feeds the breakdowns named by
        ``groups``; ``burst_slots`` is each row's slot size within its schedule chunk and
        whether the slot is at the chunk's edge, see :func:`~.fidelity.slot_sizes`;
        without it the batch is taken as the whole schedule)."""
        if self.stop_ns is not None:
            late = (np.asarray(columns["sent_ns"]) < 0) & (
                np.asarray(columns["scheduled_ns"]).astype(np.int64) > self.stop_ns
            )
            if late.any():
                self.not_reached += int(late.sum())
                keep = np.flatnonzero(~late)
                columns = take_record_rows(columns, keep)
                input_len = np.asarray(input_len)[keep]
                labels = {k: np.asarray(v)[keep] for k, v in (labels or {}).items()}
                if burst_slots is not None:
                    burst_slots = (burst_slots[0][keep], burst_slots[1][keep])
                if reason_ratio is not None:
                    reason_ratio = np.asarray(reason_ratio)[keep]
                if not len(keep):
                    return
        kind = np.asarray(columns["error_kind"])
        sched = np.asarray(columns["scheduled_ns"]).astype(np.int64)
        sent = np.asarray(columns["sent_ns"]).astype(np.int64)
        first = np.asarray(columns["first_token_ns"]).astype(np.int64)
        done = np.asarray(columns["done_ns"]).astype(np.int64)
        n_chunks = np.asarray(columns["n_chunks"]).astype(np.int64)
        reported = np.asarray(columns["completion_tokens"]).astype(np.int64)
        ok = kind == 0
        was_sent = sent >= 0

        out_tokens = np.where(reported >= 0, reported, n_chunks)
        ends = np.concatenate([done[done >= 0], sent[was_sent]])
        if len(ends):
            self.last_end_ns = max(self.last_end_ns, int(ends.max()))
        ok_first = ok & (first >= 0)
        ttft = first[ok_first] - sent[ok_first]
        self.ttft.add(ttft)
        self.e2e.add(done[ok] - sent[ok])
        self.ttft_sched.add(first[ok_first] - sched[ok_first])
        self.e2e_sched.add(done[ok] - sched[ok])
        multi = ok_first & (out_tokens > 1)
        self.tpot.add((done[multi] - first[multi]) / (out_tokens[multi] - 1))
        itl, itl_at = itl_with_times(
            np.asarray(columns["chunk_ns"]).astype(np.int64),
            np.asarray(columns["chunk_offsets"]),
            ok,
        )
        self.itl.add(itl)
        self.lag.add(sent[was_sent] - sched[was_sent])
        self.in_scheduled_ms += int(
            np.sum(sent[was_sent] // 1_000_000 == sched[was_sent] // 1_000_000)
        )
        if self.bursts is not None:
            self.bursts.add(sched, sent, *(burst_slots or ()))
        if self.sustained is not None:
            self.sustained.add(sched, done[ok])
        self._add_peaks(ok, sent, done, columns)
        if self.slos:
            self.good += self._count_good(ok, sent, first, done, out_tokens, columns)
        self.scheduled_per_s = add_counts(self.scheduled_per_s, sched // 1_000_000_000)
        self.sent_per_s = add_counts(self.sent_per_s, sent[was_sent] // 1_000_000_000)
        if self.windows is not None:
            self.windows.add(sent, done, ok, out_tokens, ttft, first[ok_first], itl, itl_at)
        self._add_reasoning(columns, ok, sent, first, done, out_tokens, reason_ratio)

        self.scheduled += len(kind)
        self.completed += int(ok.sum())
        self.not_sent += int((~was_sent).sum())
        self.failed += int((was_sent & ~ok).sum())
        self.total_input += int(np.sum(np.asarray(input_len)[ok]))
        self.total_output += int(np.sum(out_tokens[ok]))
        self.server_reported += int(np.sum((reported >= 0) & ok))
        self.errors_by_kind.update(ERROR_KINDS[k] for k in kind[~ok])
        for row, msg in zip(columns["error_index"], columns["error_message"]):
            self.first_error_by_kind.setdefault(ERROR_KINDS[kind[int(row)]], msg)
        self._add_history(_column(columns, "history_kind", 0, len(kind)))
        if self.group_names and labels:
            if "turn" in labels:
                labels = {**labels, "turn": turn_groups(labels["turn"])}
            self._add_groups(columns, np.asarray(input_len), labels, reason_ratio)

    def _add_history(self, history: npt.NDArray[np.int64]) -> None:
        """Live history: later turns by what they carried."""
        if history.any():
            kinds, counts = np.unique(history[history > 0], return_counts=True)
            for k, c in zip(kinds.tolist(), counts.tolist()):
                self.history_kinds[HISTORY_KINDS.get(k, str(k))] += c

    def _add_reasoning(
        self,
        columns: Mapping[str, Any],
        ok: npt.NDArray[np.bool_],
        sent: npt.NDArray[np.int64],
        first: npt.NDArray[np.int64],
        done: npt.NDArray[np.int64],
        out_tokens: npt.NDArray[np.int64],
        reason_ratio: npt.NDArray[np.float64] | None,
    ) -> None:
        """TTFO, reasoning tokens and time, phase ITL/TPOT, measured cache hits."""
        n = len(ok)
        answer = _column(columns, "first_answer_ns", -1, n)
        last_reasoning = _column(columns, "last_reasoning_ns", -1, n)
        reasoning = reasoning_tokens(
            _column(columns, "reasoning_tokens", -1, n), _column(columns, "reasoning_chunks", 0, n)
        )
        has_answer = ok & (answer >= 0)
        self.ttfo.add(answer[has_answer] - sent[has_answer])
        reasoned = ok & (last_reasoning >= 0) & (first >= 0)
        self.reasoning_time.add(last_reasoning[reasoned] - first[reasoned])
        self.total_reasoning += int(reasoning[ok].sum())
        self.reasoning_requests += int((ok & (reasoning > 0)).sum())
        r_gaps, a_gaps = itl_by_phase(
            np.asarray(columns["chunk_ns"]).astype(np.int64),
            np.asarray(columns["chunk_offsets"]),
            ok,
            last_reasoning,
        )
        self.reasoning_itl.add(r_gaps)
        self.answer_itl.add(a_gaps)
        answer_tokens = out_tokens - np.where(reasoning > 0, reasoning, 0)
        multi = has_answer & (answer_tokens > 1)
        self.answer_tpot.add((done[multi] - answer[multi]) / (answer_tokens[multi] - 1))
        cached = _column(columns, "cached_tokens", -1, n)
        prompt = np.asarray(columns["prompt_tokens"]).astype(np.int64)
        reported = ok & (cached >= 0) & (prompt > 0)
        self.cached_tokens += int(cached[reported].sum())
        self.cached_prompt_tokens += int(prompt[reported].sum())
        self.cached_reported += int(reported.sum())
        self.usage_ignored += int((_column(columns, "usage_ignored", 0, n) > 0).sum())
        if reason_ratio is not None:
            ratio = np.asarray(reason_ratio, dtype=np.float64)
            with_ratio = ok & np.isfinite(ratio)
            self.scheduled_reasoning += float(np.sum(ratio[with_ratio] * out_tokens[with_ratio]))
            self.scheduled_reasoning_of += int(out_tokens[with_ratio].sum())

    def _add_peaks(
        self,
        ok: npt.NDArray[np.bool_],
        sent: npt.NDArray[np.int64],
        done: npt.NDArray[np.int64],
        columns: Mapping[str, Any],
    ) -> None:
        offsets = np.asarray(columns["chunk_offsets"]).astype(np.int64)
        owner_ok = np.repeat(ok, np.diff(offsets))
        chunk_ns = np.asarray(columns["chunk_ns"]).astype(np.int64)
        self.tokens_per_s = add_counts(self.tokens_per_s, chunk_ns[owner_ok] // 1_000_000_000)
        self.starts_per_s = add_counts(self.starts_per_s, sent[ok] // 1_000_000_000)
        self.ends_after_per_s = add_counts(self.ends_after_per_s, done[ok] // 1_000_000_000 + 1)

    def _reasoning_result(self) -> dict[str, Any]:
        m: dict[str, Any] = {}
        m.update(_stats(self.ttfo, "ttfo"))
        m["total_reasoning_tokens"] = self.total_reasoning
        m["mean_reasoning_tokens"] = (
            self.total_reasoning / self.completed if self.completed else 0.0
        )
        m["reasoning_requests"] = self.reasoning_requests
        m["reasoning_token_share"] = (
            self.total_reasoning / self.total_output if self.total_output else 0.0
        )
        m["reasoning_token_share_scheduled"] = (
            self.scheduled_reasoning / self.scheduled_reasoning_of
            if self.scheduled_reasoning_of
            else None
        )
        m.update(_stats(self.reasoning_time, "reasoning_time"))
        m.update(_stats(self.reasoning_itl, "reasoning_itl"))
        m.update(_stats(self.answer_itl, "answer_itl"))
        m.update(_stats(self.answer_tpot, "answer_tpot"))
        m["cached_tokens"] = self.cached_tokens
        m["prefix_hit_rate_measured"] = (
            self.cached_tokens / self.cached_prompt_tokens if self.cached_reported else None
        )
        m["usage_ignored"] = self.usage_ignored
        if self.history_kinds:
            m["live_history_turns"] = dict(sorted(self.history_kinds.items()))
        return m

    def _peaks(self) -> dict[str, Any]:
        ends = np.pad(
            self.ends_after_per_s,
            (0, max(0, len(self.starts_per_s) + 1 - len(self.ends_after_per_s))),
        )
        starts = np.pad(self.starts_per_s, (0, len(ends) - len(self.starts_per_s)))
        # A request is active in every second from its start's to its end's, inclusive.
        active = np.cumsum(starts - ends)
        return {
            "max_output_tokens_per_s": float(self.tokens_per_s.max(initial=0)),
            "max_concurrent_requests": int(active.max(initial=0)),
        }

    def _count_good(
        self,
        ok: npt.NDArray[np.bool_],
        sent: npt.NDArray[np.int64],
        first: npt.NDArray[np.int64],
        done: npt.NDArray[np.int64],
        out_tokens: npt.NDArray[np.int64],
        columns: Mapping[str, Any],
    ) -> int:
        good = ok.copy()
        if "ttft" in self.slos:
            good &= (first >= 0) & ((first - sent) <= self.slos["ttft"] * _NS_PER_MS)
        if "e2el" in self.slos:
            good &= (done - sent) <= self.slos["e2el"] * _NS_PER_MS
        if "ttfo" in self.slos:
            answer = _column(columns, "first_answer_ns", -1, len(ok))
            good &= (answer >= 0) & ((answer - sent) <= self.slos["ttfo"] * _NS_PER_MS)
        if "tpot" in self.slos:
            with np.errstate(divide="ignore", invalid="ignore"):
                tpot = np.where(out_tokens > 1, (done - first) / np.maximum(out_tokens - 1, 1), 0.0)
            good &= tpot <= self.slos["tpot"] * _NS_PER_MS
        return int(good.sum())

    def add_media(self, columns: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
        """Media totals of a batch's completed requests (``extra``: the media record
        columns, :data:`~fineserve.media.requests.MEDIA_RECORD_COLUMNS`)."""
        if self.media is None:
            self.media = {}
        ok = np.asarray(columns["error_kind"]) == 0
        for m in ("image", "audio", "video"):
            for col, key in (
                (f"{m}_count", f"total_{m}_count"),
                (f"{m}_tokens", f"total_{m}_tokens"),
                (f"{m}_tokens_scheduled", f"total_{m}_tokens_scheduled"),
                (f"{m}_bytes", f"total_{m}_bytes"),
            ):
                if col in extra:
                    self.media[key] = self.media.get(key, 0) + int(np.asarray(extra[col])[ok].sum())
        prompt = np.asarray(columns["prompt_tokens"]).astype(np.int64)
        rep = ok & (prompt >= 0)
        budget = np.asarray(extra["input_len"]).astype(np.int64)
        for col in ("image_tokens", "audio_tokens", "video_tokens"):
            if col in extra:
                budget = budget + np.asarray(extra[col]).astype(np.int64)
        self.media["prompt_tokens_reported_requests"] = self.media.get(
            "prompt_tokens_reported_requests", 0
        ) + int(rep.sum())
        self.media["prompt_tokens_server"] = self.media.get("prompt_tokens_server", 0) + int(
            prompt[rep].sum()
        )
        self.media["prompt_tokens_budget"] = self.media.get("prompt_tokens_budget", 0) + int(
            budget[rep].sum()
        )

    def _media_result(self) -> dict[str, Any]:
        if self.media is None:
            return {}
        m: dict[str, Any] = dict(self.media)
        m["total_text_tokens"] = self.total_input
        server, budget = m["prompt_tokens_server"], m["prompt_tokens_budget"]
        # > 1: the server counts more than text + media budget (chat template tokens,
        # vision start/end markers); per request the difference is the mean of that.
        m["prompt_tokens_server_over_budget"] = server / budget if budget else None
        n = m["prompt_tokens_reported_requests"]
        m["mean_prompt_tokens_server_minus_budget"] = (server - budget) / n if n else None
        return m

    def _add_groups(
        self,
        columns: Mapping[str, Any],
        input_len: npt.NDArray[Any],
        labels: dict[str, Any],
        reason_ratio: npt.NDArray[np.float64] | None,
    ) -> None:
        for name in self.group_names:
            if name not in labels:
                continue
            values = np.asarray(labels[name])
            for v in np.unique(values):
                rows = np.flatnonzero(values == v)
                sub = take_record_rows(columns, rows)
                key = (name, str(v))
                acc = self.groups.get(key)
                if acc is None:
                    acc = self.groups[key] = MetricsAccumulator(
                        slos=self.slos, window_s=None, whole_run=False
                    )
                acc.add(
                    sub,
                    input_len[rows],
                    reason_ratio=None if reason_ratio is None else np.asarray(reason_ratio)[rows],
                )

    def result(
        self,
        lag_percentiles: tuple[float, ...] = (50, 99, 99.9),
        *,
        percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el"),
        metric_percentiles: tuple[float, ...] = (99,),
    ) -> dict[str, Any]:
        """The FineServe metric set (and vLLM's keys) plus accounting, failures, dispatch
        fidelity, coordinated-omission latencies, goodput, windows and breakdowns.
        ``percentile_metrics`` × ``metric_percentiles`` add ``p<q>_<metric>_ms`` keys
        (vLLM's ``--percentile-metrics`` / ``--metric-percentiles``)."""
        duration_s = self.last_end_ns / 1e9
        dur = duration_s if duration_s > 0 else float("nan")

        def per_s(x: float) -> float:
            return float(x / dur) if dur == dur else 0.0

        m: dict[str, Any] = {
            "duration": duration_s,
            "completed": self.completed,
            "failed": self.failed,
            "scheduled": self.scheduled,
            "sent": self.completed + self.failed,
            "not_sent": self.not_sent,
            "not_reached": self.not_reached,
            "total_input_tokens": self.total_input,
            "total_output_tokens": self.total_output,
            "total_output_tokens_retokenized": None,
            "output_tokens_server_reported": self.server_reported,
            "request_throughput": per_s(self.completed),
            "input_throughput": per_s(self.total_input),
            "output_throughput": per_s(self.total_output),
            "total_token_throughput": per_s(self.total_input + self.total_output),
        }
        e2e = _stats(self.e2e, "e2e_latency")
        m.update(e2e)
        m.update({k.replace("e2e_latency", "e2el"): v for k, v in e2e.items()})  # vLLM's names
        m.update(_stats(self.ttft, "ttft"))
        m.update(_stats(self.tpot, "tpot"))
        m.update(_stats(self.itl, "itl", extra=(95,)))
        hist = {
            "ttft": self.ttft,
            "tpot": self.tpot,
            "itl": self.itl,
            "e2el": self.e2e,
            "ttfo": self.ttfo,
        }
        for name in percentile_metrics:
            for q in metric_percentiles:
                # vLLM's key: p99.9_ttft_ms keeps the dot.
                m[f"p{q:g}_{name}_ms"] = hist[name].percentile(q) / _NS_PER_MS
        m["max_itl_ms"] = self.itl.max / _NS_PER_MS if self.itl.count else 0.0
        m["concurrency"] = per_s(self.e2e.mean * self.e2e.count / 1e9)
        m.update(_stats(self.ttft_sched, "ttft_from_scheduled"))
        m.update(_stats(self.e2e_sched, "e2el_from_scheduled"))
        m.update(self._peaks())
        m.update(self._reasoning_result())
        m.update(self._media_result())
        # vLLM writes request_goodput: null when no --goodput was given.
        m["request_goodput"] = per_s(self.good) if self.slos else None
        if self.slos:
            m["goodput_slos_ms"] = dict(self.slos)
            m["good_requests"] = self.good
        for p in lag_percentiles:
            m[f"p{p:g}_dispatch_lag_us"] = self.lag.percentile(p) / 1e3  # p99.9_…, as vLLM
        m["max_dispatch_lag_us"] = self.lag.max / 1e3 if self.lag.count else 0.0
        m["mean_dispatch_lag_us"] = self.lag.mean / 1e3
        m["sent_in_scheduled_ms_fraction"] = (
            self.in_scheduled_ms / self.lag.count if self.lag.count else 0.0
        )
        if self.bursts is not None:
            m.update(self.bursts.result())
        if self.sustained is not None:
            m.update(self.sustained.result(self.scheduled, self.e2e_sched.percentile(50)))
            offered, sustained = m["offered_request_rate"], m["sustained_request_rate"]
            m["sustained_fraction"] = sustained / offered if offered else None
        n = max(len(self.scheduled_per_s), len(self.sent_per_s))
        sched_s = np.pad(self.scheduled_per_s, (0, n - len(self.scheduled_per_s)))
        sent_s = np.pad(self.sent_per_s, (0, n - len(self.sent_per_s)))
        m["arrival_rate_error"] = (
            float(np.abs(sent_s - sched_s).sum() / sched_s.sum()) if sched_s.sum() else 0.0
        )
        m["scheduled_per_second"] = sched_s.tolist()
        m["sent_per_second"] = sent_s.tolist()
        m["errors_by_kind"] = dict(sorted(self.errors_by_kind.items()))
        m["first_error_by_kind"] = dict(self.first_error_by_kind)
        if self.windows is not None:
            m["window_s"] = self.windows.window_s
            m["windows"] = self.windows.rows(end_ns=self.last_end_ns)
        if self.groups:
            m["breakdown"] = self._breakdown(
                per_s, lag_percentiles, percentile_metrics, metric_percentiles
            )
        return m

    def _breakdown(
        self,
        per_s: Any,
        lag_percentiles: tuple[float, ...],
        percentile_metrics: tuple[str, ...],
        metric_percentiles: tuple[float, ...],
    ) -> dict[str, dict[str, Any]]:
        """Each group's metrics; its throughputs over the run's duration, so that they add
        up to the run's."""
        breakdown: dict[str, dict[str, Any]] = {}
        for (name, value), acc in sorted(self.groups.items()):
            sub = acc.result(
                lag_percentiles,
                percentile_metrics=percentile_metrics,
                metric_percentiles=metric_percentiles,
            )
            counts = {
                "request_throughput": sub["completed"],
                "output_throughput": sub["total_output_tokens"],
                "request_goodput": sub.get("good_requests", 0),
            }
            for key, count in counts.items():
                if sub.get(key) is not None:
                    sub[key] = per_s(count)
            for key in ("scheduled_per_second", "sent_per_second", "first_error_by_kind"):
                sub.pop(key, None)
            breakdown.setdefault(name, {})[value] = sub
        return breakdown


def take_record_rows(columns: Mapping[str, Any], rows: npt.NDArray[np.int64]) -> dict[str, Any]:
    """The record columns of ``rows`` (per-row columns, token times and error messages)."""
    from ..ragged import take_ragged

    per_row = (
        c
        for c, v in columns.items()
        if c not in ("chunk_ns", "chunk_offsets", "error_index", "error_message")
        and isinstance(v, np.ndarray)
        and v.ndim == 1
        and len(v) == len(columns["error_kind"])
    )
    sub: dict[str, Any] = {c: np.asarray(columns[c])[rows] for c in per_row}
    offsets = np.asarray(columns["chunk_offsets"]).astype(np.int64)
    chunk_ns = np.asarray(columns["chunk_ns"]).astype(np.int64)
    sub["chunk_ns"], sub_off = take_ragged(chunk_ns, offsets, rows)
    sub["chunk_offsets"] = sub_off.astype(np.uint64)
    position = {int(r): i for i, r in enumerate(rows)}
    keep = [
        (position[int(r)], m)
        for r, m in zip(
            np.asarray(columns["error_index"]).astype(np.int64), columns["error_message"]
        )
        if int(r) in position
    ]
    sub["error_index"] = np.array([k for k, _ in keep], dtype=np.int64)
    sub["error_message"] = [m for _, m in keep]
    return sub


def compute_metrics(
    columns: Mapping[str, Any],
    input_len: npt.ArrayLike,
    *,
    lag_percentiles: tuple[float, ...] = (50, 99, 99.9),
    slos: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Metrics of one batch of records (e.g. a whole short run)."""
    acc = MetricsAccumulator(slos=slos)
    acc.add(columns, input_len)
    return acc.result(lag_percentiles)
