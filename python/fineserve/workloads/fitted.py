"""The generator of ``fineserve fit``'s slot-process model (``fit.process``): per window,
exactly the fitted number of occupied slots between the window's first and last event
slots, their gaps drawn from the window's law with the fitted memory and calibrated to the
window's CV, requests per slot from the window's count law, placed inside the slot as the
trace placed them.

Calibration: the drawn gaps y (in slots, in their memory's order) become whole slots
D = ⌈y⌉ ≥ 1 below the draw's 90th percentile y_q (the body: most gaps, what a KS sees,
kept as the law made it) and D = ⌈y_q·(1 + κ(e^{β·log(y/y_q)} − 1))⌉ above it (the tail:
what makes a CV; narrowed to the top 3, 1, 0.3 % when a high CV needs a few very long
gaps). κ makes ΣD the window's length — so the window holds exactly its fitted
number of events, no two in one slot — and β makes the CV of D the window's. The map is
monotone, so the order the memory gave is kept.

Extension past the file: windows repeat cyclically with their event counts jittered
(``repeat_jitter``), or each extra window copies a window drawn at random
(``model_sample``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import signal, special

from ..errors import FineserveError
from ..fit.bursts import Component, zt_mixture_cdf
from ..fit.process import PLACEMENT_BUCKETS, SMALL_GAPS, ArrivalModel, quantile_draw
from ..schedule import Schedule
from .lengths import LengthSampler

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Iterations of the calibrations' bisections.
CV_STEPS = 30
TOTAL_STEPS = 14
#: Gaps above this quantile of a window's draw are its tail (stretched to fit the window
#: and its CV), tried in turn until the CV is reached; a window needs MIN_TAIL_GAPS gaps.
TAIL_QUANTILES = (0.9, 0.97, 0.99, 0.997)
MIN_TAIL_GAPS = 10
#: How far the tail map may leave the CV before the whole-sample map is tried.
CV_SLACK = 0.02


def _cv(v: npt.NDArray[np.floating[Any]] | IntArray) -> float:
    m = float(v.mean())
    return float(v.std() / m) if m > 0 else 0.0


def calibrate_gaps(y: FloatArray, total_slots: int, cv_target: float) -> IntArray:
    """Integer gaps ≥ 1 from positive ``y`` (order kept) summing to ``total_slots`` (the
    stretch from the window's first event to its last) with
    CV ≈ ``cv_target`` (NaN: no CV target). See the module: the body (below a quantile of
    the draw, TAIL_QUANTILES in turn) is kept, the tail stretched and bent; where no tail
    can reach the CV, or the body alone is too long for the window, every gap is mapped
    by a power instead, whichever lands nearer the CV."""
    m = len(y)
    if total_slots <= m:
        return np.ones(m, dtype=np.int64)
    if m == 1:
        return np.array([total_slots], dtype=np.int64)
    candidates: list[IntArray] = []
    if m >= MIN_TAIL_GAPS:
        # A higher CV needs its excess in fewer, longer gaps: the tail is narrowed until
        # the CV is reached (a window whose CV is made by two gaps of minutes).
        for level in TAIL_QUANTILES:
            out = _tail_mapped(y, level, total_slots, cv_target)
            if out is None:
                continue
            if not math.isfinite(cv_target) or abs(_cv(out) - cv_target) <= CV_SLACK * cv_target:
                return out
            candidates.append(out)
    if not candidates or (
        # A body that alone is more variable than the window (gaps of a few slots) leaves
        # no tail able to reach the CV: the whole-sample map may do better.
        _cv(candidates[0]) > cv_target
    ):
        candidates.append(_exact_total(_scaled(y, total_slots, cv_target), total_slots))
    if not math.isfinite(cv_target):
        return candidates[0]
    return min(candidates, key=lambda d: abs(_cv(d) - cv_target))


def _tail_mapped(
    y: FloatArray, level: float, total_slots: int, cv_target: float
) -> IntArray | None:
    """The gaps with the body (below the ``level`` quantile) kept and the tail stretched
    (``_stretch_tail``); None when the body alone leaves the tail no room."""
    m = len(y)
    y_q = float(np.quantile(y, level))
    tail = y > y_q
    body = np.maximum(np.ceil(y[~tail]), 1).astype(np.int64)
    room = total_slots - int(body.sum())
    n_tail = int(tail.sum())
    if not n_tail or room <= n_tail * math.ceil(y_q) + n_tail:
        return None
    out = np.empty(m, dtype=np.int64)
    out[~tail] = body
    out[tail] = _stretch_tail(np.log(y[tail] / y_q), y_q, room, m, total_slots, cv_target, body)
    return _exact_total(out, total_slots)


def _stretch_tail(
    u: FloatArray,
    y_q: float,
    room: int,
    m: int,
    total_slots: int,
    cv_target: float,
    body: IntArray,
) -> IntArray:
    """Tail gaps y_q·(1 + κ(e^{βu} − 1)) (u = log(y/y_q) > 0): for each β, κ makes them
    fill ``room``; β is bisected so the CV of all gaps is the target."""
    n_t = len(u)
    excess = room - n_t * y_q  # > 0, checked by the caller

    def tail(beta: float) -> FloatArray:
        grow = np.expm1(beta * u)
        kappa = excess / (y_q * float(grow.sum()))
        out: FloatArray = y_q * (1 + kappa * grow)
        return out

    beta = 1.0
    if math.isfinite(cv_target) and cv_target > 0:
        mean = total_slots / m
        want_sq = m * mean * mean * (1 + cv_target * cv_target) - float(
            np.square(body, dtype=np.float64).sum()
        )
        lo, hi = math.log(1e-3), math.log(30.0)
        for _ in range(CV_STEPS):
            mid = (lo + hi) / 2
            t = tail(math.exp(mid))
            if float(np.dot(t, t)) < want_sq:
                lo = mid
            else:
                hi = mid
        beta = math.exp((lo + hi) / 2)
    return np.maximum(np.ceil(tail(beta)), 1).astype(np.int64)


def _scaled(y: FloatArray, total_slots: int, cv_target: float = math.nan) -> IntArray:
    """max(1, ⌈a·y^b⌉) (log y centred): b by bisection for the CV (when given), then the
    largest a (to the steps' precision) whose sum ≤ total."""
    logy = np.log(y)
    logy = logy - logy.mean()
    b = 1.0
    if math.isfinite(cv_target) and cv_target > 0 and len(y) >= 3 and np.ptp(logy) > 0:
        lo, hi = math.log(0.02), math.log(20.0)
        for _ in range(CV_STEPS):
            mid = (lo + hi) / 2
            if _cv(_fill(np.exp(math.exp(mid) * logy), total_slots)) < cv_target:
                lo = mid
            else:
                hi = mid
        b = math.exp((lo + hi) / 2)
    return _fill(np.exp(b * logy), total_slots)


def _fill(y: FloatArray, total_slots: int) -> IntArray:
    m = len(y)
    sy = float(y.sum())
    lo = (total_slots - m) / sy  # Σ⌈a y⌉ ≤ Σ(a y + 1) = total
    hi = total_slots / sy  # Σ⌈a y⌉ ≥ a Σ y = total
    for _ in range(TOTAL_STEPS):
        mid = (lo + hi) / 2
        if int(np.maximum(np.ceil(mid * y), 1).sum()) <= total_slots:
            lo = mid
        else:
            hi = mid
    return np.maximum(np.ceil(lo * y), 1).astype(np.int64)


def _exact_total(d: IntArray, total_slots: int) -> IntArray:
    """Gaps changed so they sum to ``total_slots``: a shortfall goes to the longest gap; a
    surplus (rounding up every tail gap adds ~½ slot each) is taken from all gaps in
    proportion to their length above 1, the remainder from the longest."""
    diff = total_slots - int(d.sum())
    if diff >= 0:
        d[int(np.argmax(d))] += diff
        return d
    room = d - 1
    total_room = int(room.sum())
    if total_room <= 0:
        return d
    need = min(-diff, total_room)
    cut = (room * (need / total_room)).astype(np.int64)
    d -= cut
    left = need - int(cut.sum())
    if left > 0:
        order = np.argsort(-(d - 1), kind="stable")[:left]
        d[order] -= 1
    return d


class _CountLaw:
    """Requests per occupied slot: the zero-truncated NB mixture with its components'
    means scaled so the mixture's mean is a window's; sampled by inverse CDF."""

    def __init__(self, components: list[tuple[float, float, float]]) -> None:
        w = np.array([c[0] for c in components], dtype=np.float64)
        self.weights = w / w.sum() if len(w) else w
        self.mu = np.array([c[1] for c in components], dtype=np.float64)
        self.alpha = np.array([c[2] for c in components], dtype=np.float64)
        self._cache: dict[float, FloatArray] = {}

    def _mean(self, scale: float) -> float:
        total = 0.0
        for w, mu, a in zip(self.weights, self.mu, self.alpha):
            m = mu * scale
            r = 1.0 / a
            p0 = math.exp(r * math.log(r / (r + m)))
            total += w * m / max(1 - p0, 1e-300) if p0 < 1 - 1e-15 else w * 1.0
        return total

    def cdf_for_mean(self, mean: float) -> FloatArray:
        key = round(mean, 6)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        lo, hi = math.log(1e-9), math.log(1e9)
        for _ in range(80):
            mid = (lo + hi) / 2
            if self._mean(math.exp(mid)) < mean:
                lo = mid
            else:
                hi = mid
        scale = math.exp((lo + hi) / 2)
        cdf = self.cdf_for_scale(scale)
        if len(self._cache) < 4096:
            self._cache[key] = cdf
        return cdf

    def cdf_for_scale(self, scale: float) -> FloatArray:
        """CDF at 1, 2, … of the mixture with its means scaled by ``scale``."""
        return zt_mixture_cdf(
            [Component(w, mu * scale, a) for w, mu, a in zip(self.weights, self.mu, self.alpha)]
        )

    def draw(self, n: int, mean: float, rng: np.random.Generator) -> IntArray:
        if not len(self.weights) or mean <= 1 + 1e-9:
            return np.ones(n, dtype=np.int64)
        cdf = self.cdf_for_mean(mean)
        return (np.searchsorted(cdf, rng.random(n), side="right") + 1).astype(np.int64)


class _WindowCountLaws:
    """Windows' own zero-truncated NB laws, their CDF tables cached."""

    def __init__(self) -> None:
        self._cache: dict[tuple[float, float], FloatArray] = {}

    def draw(self, law: tuple[float, float], n: int, rng: np.random.Generator) -> IntArray:
        cdf = self._cache.get(law)
        if cdf is None:
            cdf = _CountLaw([(1.0, law[0], law[1])]).cdf_for_scale(1.0)
            if len(self._cache) < 4096:
                self._cache[law] = cdf
        return (np.searchsorted(cdf, rng.random(n), side="right") + 1).astype(np.int64)


def _match_total(counts: IntArray, total: int, rng: np.random.Generator) -> None:
    """Counts changed in place so they sum to the window's request count: the missing
    requests join random slots, the surplus leave random multi-request slots (a window's
    count is then as fitted, its slots' law barely moved)."""
    diff = total - int(counts.sum())
    if diff > 0:
        np.add.at(counts, rng.integers(len(counts), size=diff), 1)
    while diff < 0:
        multi = np.flatnonzero(counts > 1)
        if not len(multi):
            return
        take = rng.choice(multi, size=min(-diff, len(multi)), replace=False)
        counts[take] -= 1
        diff += len(take)


def _quantile_draw(q: FloatArray, n: int, rng: np.random.Generator) -> FloatArray:
    return quantile_draw(q, rng.random(n))


class _Memory:
    """The order of a window's gaps, continued across windows: each gap's class (a band
    of ranks, ``fit.process.CLASS_EDGES``) from the fitted Markov chain, and within a
    class the latent √w·AR1(ρ) + √(1−w)·noise."""

    def __init__(self, model: ArrivalModel, rng: np.random.Generator) -> None:
        self.w, self.rho, self.rng = model.memory_weight, model.memory_rho, rng
        self.state = float(rng.standard_normal())
        self.transition = model.class_transition
        self.cls = 0
        if self.transition is not None:
            self.cum = np.cumsum(self.transition, axis=1)
            self.cum[:, -1] = 1.0

    def keys(self, m: int) -> FloatArray:
        """Sort keys of m gaps: class + a level in [0, 1) inside the class."""
        if self.w > 0:
            e = self.rng.standard_normal(m)
            innov = self.rng.standard_normal(m)
            s, _ = signal.lfilter(
                [math.sqrt(1 - self.rho**2)], [1.0, -self.rho], innov, zi=[self.rho * self.state]
            )
            self.state = float(s[-1])
            inside: FloatArray = special.ndtr(math.sqrt(self.w) * s + math.sqrt(1 - self.w) * e)
        else:
            inside = self.rng.random(m)
        inside = np.minimum(inside, 1 - 1e-12)
        if self.transition is None:
            return inside
        return self._classes(m) + inside

    def _classes(self, m: int) -> FloatArray:
        """m steps of the chain from the current class, vectorised: step t's map
        f_t(s) = next class from s for uniform u_t; prefix compositions by doubling
        (Hillis–Steele), so the cost is m·k·log m gathers rather than m Python steps."""
        k = self.cum.shape[0]
        u = self.rng.random(m)
        # int8 maps (k ≤ 8 classes): the doubling's gathers move an eighth of the bytes.
        f = np.minimum((u[:, None, None] >= self.cum[None, :, :]).sum(axis=2), k - 1)
        f = f.astype(np.int8)
        d = 1
        while d < m:
            f[d:] = np.take_along_axis(f[d:], f[:-d], axis=1)
            d *= 2
        path = f[:, self.cls]
        self.cls = int(path[-1])
        out: FloatArray = path.astype(np.float64)
        return out


def _draw_gaps(
    small_pmf: list[float],
    comps: list[tuple[float, float, float]],
    m: int,
    memory: _Memory | None,
    rng: np.random.Generator,
    gamma: tuple[float, float] | None = None,
) -> FloatArray:
    """m gaps (slots, continuous: ⌈y⌉ is the gap) from a window's law, in the memory's
    order: small gaps d − U from their probabilities, longer ones from the log-normal
    mixture conditioned on exceeding SMALL_GAPS."""
    p_small = np.asarray(small_pmf, dtype=np.float64)
    p_small_total = float(p_small.sum())
    is_small = rng.random(m) < p_small_total if comps else np.ones(m, dtype=bool)
    y = np.empty(m)
    n_small = int(is_small.sum())
    if n_small:
        cdf = np.cumsum(p_small) / max(p_small_total, 1e-300)
        d = np.searchsorted(cdf, rng.random(n_small), side="right") + 1
        y[is_small] = np.minimum(d, SMALL_GAPS) - rng.random(n_small) * (1 - 1e-9)
    n_long = m - n_small
    if n_long:
        y[~is_small] = _long_gaps(comps, n_long, rng, gamma)
    if memory is None:
        return y
    out = np.empty(m)
    out[np.argsort(memory.keys(m))] = np.sort(y)
    return out


def _long_gaps(
    comps: list[tuple[float, float, float]],
    n: int,
    rng: np.random.Generator,
    gamma: tuple[float, float] | None = None,
) -> FloatArray:
    """n draws of the mixture above SMALL_GAPS slots (redrawing those below: the law was
    fitted on such gaps, so few are; a stubborn remainder sits just above)."""
    w = np.array([c[0] for c in comps])
    mu_all = np.array([c[1] for c in comps])
    sig_all = np.array([c[2] for c in comps])
    out = np.full(n, math.nan)
    todo = np.arange(n)
    for _ in range(20):
        if gamma is not None:
            v = rng.gamma(gamma[0], gamma[1], len(todo))
        else:
            which = rng.choice(len(comps), size=len(todo), p=w / w.sum())
            v = np.exp(mu_all[which] + sig_all[which] * rng.standard_normal(len(todo)))
        ok = v > SMALL_GAPS
        out[todo[ok]] = v[ok]
        todo = todo[~ok]
        if not len(todo):
            break
    out[todo] = SMALL_GAPS + rng.random(len(todo))
    return out


def _place(
    counts: IntArray,
    model: ArrivalModel,
    rng: np.random.Generator,
    dequantize: bool,
) -> FloatArray:
    """Offsets (slot units, in [0, 1)) of every request, slot by slot: the first from its
    bucket's quantiles, each later one a step (``fit.process``): a stick-breaking
    fraction, 1 − o_j = (1 − o_0)·Π(1 − f_i) (a cumulative sum of logs within each slot),
    or an absolute step (members that would spill are drawn closer)."""
    n = int(counts.sum())
    owner = np.repeat(np.arange(len(counts)), counts)
    if dequantize:
        return np.sort(owner + rng.random(n)) - owner
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    first = np.empty(len(counts))
    first_bucket = np.searchsorted(PLACEMENT_BUCKETS, counts, side="right") - 1
    for b in np.unique(first_bucket):
        sel = first_bucket == b
        first[sel] = _quantile_draw(model.first_offset_q[b], int(sel.sum()), rng)
    remaining = np.repeat(counts, counts) - (np.arange(n) - starts[owner])
    step_bucket = np.searchsorted(PLACEMENT_BUCKETS, remaining, side="right") - 1
    step = np.zeros(n)
    member = np.ones(n, dtype=bool)
    member[starts] = False
    for b in np.unique(step_bucket[member]):
        sel = member & (step_bucket == b)
        step[sel] = _quantile_draw(model.member_fraction_q[b], int(sel.sum()), rng)
    f0 = first[owner]
    if model.step_kind == "fraction":
        log_left = np.log1p(-np.minimum(step, 1.0 - 1e-12))
        cum = np.cumsum(log_left)
        within = cum - np.repeat(cum[starts], counts)  # Σ log(1 − f) since the first
        off = 1.0 - (1.0 - f0) * np.exp(within)
    else:
        cum = np.cumsum(step)
        off = f0 + cum - np.repeat(cum[starts], counts)
        last = off[starts + counts - 1]
        over = np.repeat(last >= 1.0, counts)
        if over.any():
            # Members that would spill out of their slot are drawn closer, keeping order.
            span = np.repeat(last - first, counts)
            room = (1.0 - 1e-9) - f0
            off = np.where(over, f0 + (off - f0) * room / np.maximum(span, 1e-300), off)
    clipped: FloatArray = np.clip(off, 0.0, 1.0 - 1e-9)
    return clipped


def fitted_chunks(
    model: ArrivalModel,
    lengths: LengthSampler,
    rng: np.random.Generator,
    *,
    time_scale: float = 1.0,
    duration_s: float | None = None,
    extension_mode: str = "repeat_jitter",
    jitter_ratio: float = 0.05,
    dequantize: bool = False,
) -> Iterator[Schedule]:
    """One chunk per window; ``duration_s`` in trace time (default: the model's span)."""
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise FineserveError("--time-scale must be a positive number")
    if extension_mode not in ("repeat_jitter", "model_sample"):
        raise FineserveError("--parametric-extension-mode must be repeat_jitter or model_sample")
    w = model.windows
    n_win = len(w)
    cycle_ms = float(w.end_ms[-1] - w.start_ms[0])
    span_ms = cycle_ms if duration_s is None else duration_s * 1e3
    if not span_ms > 0:
        raise FineserveError("--duration must be > 0")
    slot_ms = model.slot_ms
    slot_ns = slot_ms * 1e6
    memory = (
        _Memory(model, rng)
        if model.memory_weight > 0 or model.class_transition is not None
        else None
    )
    counts_law = _CountLaw(model.count_components)
    own_laws = _WindowCountLaws()
    k = 0
    while True:
        idx = k % n_win
        if k >= n_win and extension_mode == "model_sample":
            idx = int(rng.integers(n_win))
        start_ms = float(w.start_ms[k % n_win]) + (k // n_win) * cycle_ms
        if start_ms >= span_ms:
            return
        k += 1
        n_ev = int(w.n_events[idx])
        mean_count = float(w.n_requests[idx]) / n_ev if n_ev else 1.0
        if k > n_win and extension_mode == "repeat_jitter" and jitter_ratio > 0 and n_ev:
            n_ev = max(
                0, round(n_ev * (1 + float(np.clip(rng.standard_normal(), -3, 3)) * jitter_ratio))
            )
        first = int(w.first_event_slot[idx])
        stretch = int(w.last_event_slot[idx]) - first  # slots between first and last event
        n_ev = min(n_ev, stretch + 1)
        if n_ev <= 0:
            continue
        first_slot = round(start_ms / slot_ms) + first
        if n_ev == 1:
            ev_slot = np.array([first_slot], dtype=np.int64)
        else:
            y = _draw_gaps(w.small_pmf[idx], w.mixtures[idx], n_ev - 1, memory, rng, w.gamma[idx])
            d = calibrate_gaps(y, stretch, float(w.event_gap_cv[idx]))
            ev_slot = first_slot + np.concatenate([[0], np.cumsum(d)])
        own = w.count_law[idx] if w.count_law else None
        if own is not None:
            counts = own_laws.draw(own, n_ev, rng)
        else:
            counts = counts_law.draw(n_ev, mean_count, rng)
        if k <= n_win:
            _match_total(counts, int(w.n_requests[idx]), rng)
        off = _place(counts, model, rng, dequantize)
        slot_of = np.repeat(ev_slot, counts)
        t_ns = slot_of * slot_ns + np.floor(off * slot_ns)
        keep = t_ns < span_ms * 1e6
        t_ns = t_ns[keep]
        if not len(t_ns):
            continue
        t_out = np.rint(t_ns / time_scale).astype(np.int64)
        inp, out = lengths.sample(len(t_out), rng)
        yield Schedule(t_out, inp, out)
