"""Micro-burst model: requests per occupied slot (default 1 ms).

The generator (``workloads.parametric``) makes one NB draw per slot that holds a Gamma
event and, by default, redraws zeros, so the count of an occupied slot follows the
*zero-truncated* NB. The data seen by the fit are exactly those counts (≥ 1), so the fit
estimates the parameters of that process:

- ``nb_moments``: FineServe's estimator — plain NB with mu = mean and alpha =
  (variance − mean) / mean² of the counts. Three KS figures are reported for it: against
  the zero-truncated NB the generator actually draws with those parameters (``ks_stat``),
  against the plain NB (``ks_stat_plain_nb``, whose mass at 0 the data cannot have), and
  scipy's continuous ``kstest`` convention (``ks_stat_scipy_convention``), which on integer
  data also counts every jump of the empirical CDF. FineServe's published 0.276 for
  Dense_lt10B is the last kind: counts with its published moments (mean 2.63, variance
  2.97), drawn from the zero-truncated NB that matches them, give scipy's D = 0.276 against
  its NB, while the true discrete distance is 0.081 and the zero-truncated fit's ~0
  (tests/test_fit.py reproduces this).
- ``zt_nb``: zero-truncated NB by maximum likelihood.
- ``zt_nb_mixture``: two zero-truncated NB components by maximum likelihood (a burst
  process often mixes lone requests with a heavy tail of fan-outs).

The model with the lowest BIC is chosen among the non-degenerate ones (a component at
the fit's bounds — alpha at its ceiling with a vanishing mean is the logarithmic-series
limit, not a law the data pin down); all candidates are reported. Everything runs on
the histogram of counts (a few dozen distinct values), so fitting costs nothing next to
finding the slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import optimize, special, stats

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

#: ``--bursts auto`` models micro-bursts when any of at least MIN_SLOTS occupied slots
#: holds more than one request (the zero-truncated law goes continuously to "always one").
MIN_SLOTS = 200
#: EM iterations of the mixture per starting split (the likelihood gains after ~40 are
#: below a unit in millions; each iteration is two bounded two-parameter fits).
EM_STEPS = 40
#: Lower bound of alpha in the fits: alpha → 0 is the (zero-truncated) Poisson limit.
MIN_ALPHA = 1e-6


def slot_counts(t_ns: IntArray, slot_ms: float = 1.0) -> tuple[IntArray, IntArray]:
    """(slot index, requests) of every occupied slot, for sorted request times."""
    slot_ns = slot_ms * 1e6
    if slot_ns.is_integer():
        slot = t_ns // int(slot_ns)  # exact integer arithmetic for whole-ns slots
    else:
        slot = np.floor(t_ns / slot_ns).astype(np.int64)
    if not len(slot):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = np.concatenate([[True], slot[1:] != slot[:-1]])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(slot)))
    return slot[starts].astype(np.int64), counts.astype(np.int64)


def best_slot_phase_ns(t_ns: IntArray, slot_ms: float = 1.0, candidates: int = 16) -> int:
    """The offset of the slot grid (0 ≤ φ < slot) that leaves the fewest occupied slots.

    A trace has no slot grid: a cluster of requests narrower than a slot straddles a grid
    line at an arbitrary phase and would count as two smaller bursts. The generator's
    bursts sit inside its grid, so fit and compare measure every workload at the phase
    that splits its clusters least, which makes counts independent of where time 0 is.
    """
    slot_ns = slot_ms * 1e6
    best, best_phase = None, 0
    for phase in np.arange(candidates) * (slot_ns / candidates):
        shifted = np.floor((t_ns + phase) / slot_ns)
        occupied = int(np.count_nonzero(np.diff(shifted))) + 1
        if best is None or occupied < best:
            best, best_phase = occupied, round(float(phase))
    return best_phase


def _nb_logpmf(k: FloatArray, mu: float, alpha: float) -> FloatArray:
    r = 1.0 / alpha
    logpmf: FloatArray = (  # scipy.special is untyped: its ufuncs give Any
        special.gammaln(k + r)
        - special.gammaln(r)
        - special.gammaln(k + 1)
        + r * math.log(r / (r + mu))
        + k * math.log(mu / (r + mu))
    )
    return logpmf


def _log_p0(mu: float, alpha: float) -> float:
    r = 1.0 / alpha
    return r * math.log(r / (r + mu))


def zt_nb_logpmf(k: FloatArray, mu: float, alpha: float) -> FloatArray:
    """log P(K = k | K ≥ 1) for K ~ NB(mu, alpha), k ≥ 1."""
    p0 = math.exp(_log_p0(mu, alpha))
    return _nb_logpmf(k, mu, alpha) - math.log1p(-min(p0, 1 - 1e-15))


@dataclass
class Component:
    weight: float
    mu: float
    alpha: float

    def as_dict(self) -> dict[str, float]:
        return {"weight": self.weight, "nb_mu": self.mu, "nb_alpha": self.alpha}


@dataclass
class Candidate:
    name: str
    components: list[Component]
    loglik: float
    bic: float
    ks: float
    #: KS against the plain (not truncated) NB, as a discrete sup distance.
    ks_plain: float = math.nan
    #: The same with scipy.stats.kstest's continuous convention (FineServe's number).
    ks_scipy: float = math.nan

    def pmf(self, k: FloatArray) -> FloatArray:
        return mixture_pmf(self.components, k)


@dataclass
class BurstFit:
    slot_ms: float
    num_samples: int
    mean: float
    variance: float
    multi_share: float
    max_count: int
    candidates: dict[str, Candidate] = field(default_factory=dict)
    chosen: str = ""
    ks_pvalue: float = math.nan
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]

    def to_json(self) -> dict[str, Any]:
        """FineServe's NB keys, plus the model and its components for fineserve."""
        best = self.best
        # FineServe's generator reads only nb_mu / nb_alpha: give it the best single NB.
        single = min(
            (c for c in self.candidates.values() if len(c.components) == 1),
            key=lambda c: c.bic,
        )
        return {
            "num_samples": self.num_samples,
            "mean": self.mean,
            "variance": self.variance,
            "nb_mu": single.components[0].mu,
            "nb_alpha": single.components[0].alpha,
            "ks_stat": best.ks,
            "ks_pvalue": self.ks_pvalue,
            "model": best.name,
            "components": [c.as_dict() for c in best.components],
            "slot_ms": self.slot_ms,
            "zero_handling": "truncate",
            # Tells the generator that the sibling gamma file was fitted on occupied
            # slots, so this burst layer belongs to the model whatever the class name.
            "event_process": "occupied_slots",
            "candidates": {
                n: {
                    "components": [x.as_dict() for x in c.components],
                    "loglik": c.loglik,
                    "bic": c.bic,
                    "ks_stat": c.ks,
                    "ks_stat_plain_nb": None if math.isnan(c.ks_plain) else c.ks_plain,
                    "ks_stat_scipy_convention": None if math.isnan(c.ks_scipy) else c.ks_scipy,
                }
                for n, c in self.candidates.items()
            },
        }


def mixture_pmf(components: list[Component], k: FloatArray) -> FloatArray:
    """Zero-truncated pmf of a mixture of NB components at k ≥ 1."""
    out = np.zeros(len(k))
    for c in components:
        out += c.weight * np.exp(zt_nb_logpmf(k, c.mu, c.alpha))
    return out


def zt_mixture_cdf(components: list[Component]) -> FloatArray:
    """CDF at 1, 2, … of the zero-truncated NB mixture (weights normalised) until it
    reaches 1 − 1e-12 (table capped at 2^22 entries: the rest of the mass, if any, goes to
    the last). Samplers draw from it by inverse CDF, never by redrawing zeros (which takes
    ~1/P(K > 0) draws: ~17,800 per slot for a component with mean 6e-5)."""
    total = sum(c.weight for c in components)
    mean = 0.0
    for c in components:
        p0 = math.exp(_log_p0(c.mu, c.alpha))
        mean += c.weight / total * (c.mu / max(1.0 - p0, 1e-300) if p0 < 1 - 1e-15 else 1.0)
    top = max(64, int(20 * mean))
    while True:
        cdf = np.cumsum(mixture_pmf(components, np.arange(1, top + 1, dtype=np.float64)))
        cdf /= total
        if cdf[-1] >= 1 - 1e-12 or top >= 1 << 22:
            break
        top *= 4
    out: FloatArray = cdf / cdf[-1]
    return out


def discrete_ks(values: IntArray, freq: IntArray, pmf_at: FloatArray) -> float:
    """sup_k |ECDF(k) − CDF(k)| over integers from 1 to max(values), with the model pmf
    given at 1..max(values)."""
    top = len(pmf_at)
    emp = np.zeros(top)
    emp[values - 1] = freq
    ecdf = np.cumsum(emp) / freq.sum()
    cdf = np.cumsum(pmf_at)
    return float(np.max(np.abs(ecdf - cdf)))


def _fit_zt_nb(
    values: FloatArray, freq: FloatArray, start: tuple[float, float], *, polish: bool = True
) -> tuple[float, float, float]:
    """Weighted ZTNB MLE on (log mu, log alpha), bounded so that a degenerate component
    cannot run off to infinity. ``polish`` adds a Nelder-Mead pass (the final fits; EM's
    inner steps only need to raise the likelihood)."""

    def nll(p: FloatArray) -> float:
        mu, alpha = math.exp(p[0]), MIN_ALPHA + math.exp(p[1])
        return -float(np.dot(freq, zt_nb_logpmf(values, mu, alpha)))

    x0 = np.log([min(max(start[0], 1e-3), 1e3), min(max(start[1], 1e-4), 1e2)])
    bounds = [(math.log(1e-6), math.log(1e4)), (math.log(MIN_ALPHA), math.log(1e3))]
    res = optimize.minimize(nll, x0, method="L-BFGS-B", bounds=bounds)
    if not polish:
        return math.exp(res.x[0]), MIN_ALPHA + math.exp(res.x[1]), -float(res.fun)
    res = optimize.minimize(
        nll, res.x, method="Nelder-Mead", bounds=bounds, options={"xatol": 1e-7, "fatol": 1e-9}
    )
    return math.exp(res.x[0]), MIN_ALPHA + math.exp(res.x[1]), -float(res.fun)


def _fit_mixture(values: FloatArray, freq: FloatArray) -> tuple[list[Component], float]:
    """Two ZTNB components by EM on the histogram (each M-step is a weighted two-parameter
    fit, which keeps the likelihood rising where a joint five-parameter search stalls).
    Started from a split at each small count, the best end point is kept."""
    n = freq.sum()
    best: tuple[list[Component], float] | None = None
    for split in (1, 2, 3):
        low = values <= split
        if low.all() or not low.any():
            continue
        comps = []
        for part in (low, ~low):
            m = float(np.dot(values[part], freq[part]) / freq[part].sum())
            v = float(np.dot((values[part] - m) ** 2, freq[part]) / freq[part].sum())
            comps.append(
                Component(
                    float(freq[part].sum() / n), max(m - 0.9, 1e-2), max((v - m) / m**2, 0.05)
                )
            )
        ll_prev = -math.inf
        for _ in range(EM_STEPS):
            dens = np.stack([c.weight * np.exp(zt_nb_logpmf(values, c.mu, c.alpha)) for c in comps])
            total = np.maximum(dens.sum(axis=0), 1e-300)
            ll = float(np.dot(freq, np.log(total)))
            resp = dens / total
            new = []
            for c, r in zip(comps, resp):
                wf = freq * r
                mu, alpha, _ = _fit_zt_nb(values, wf, (c.mu, c.alpha), polish=False)
                new.append(Component(float(wf.sum() / n), mu, alpha))
            comps = new
            if ll - ll_prev < 1e-7 * abs(ll):
                break
            ll_prev = ll
        ll = float(np.dot(freq, np.log(np.maximum(mixture_pmf(comps, values), 1e-300))))
        if best is None or ll > best[1]:
            best = (comps, ll)
    assert best is not None
    return best


#: A component is degenerate when its alpha is this close to the ceiling or its mean is
#: below this (with the mixture's weight, such a component holds no data).
DEGENERATE_ALPHA = 0.99 * 1e3
DEGENERATE_MU = 1e-4


def degenerate(components: list[Component]) -> bool:
    return any(c.alpha >= DEGENERATE_ALPHA or c.mu <= DEGENERATE_MU for c in components)


def choose_candidate(candidates: dict[str, Candidate]) -> tuple[str, str]:
    """The lowest BIC among the non-degenerate candidates (the lowest overall when all
    are), and a note when a degenerate one had the lowest."""
    best = min(candidates.values(), key=lambda c: c.bic)
    sound = [c for c in candidates.values() if not degenerate(c.components)]
    if not degenerate(best.components) or not sound:
        return best.name, ""
    fallback = min(sound, key=lambda c: c.bic)
    return fallback.name, (
        f"burst fit: {best.name} has a component at the fit's bounds (alpha "
        f"{max(x.alpha for x in best.components):.3g}, mu "
        f"{min(x.mu for x in best.components):.3g}); using {fallback.name} "
        f"(BIC {fallback.bic - best.bic:+.1f})"
    )


def fit_bursts(counts: IntArray, slot_ms: float = 1.0) -> BurstFit:
    """Fits the candidates to counts per occupied slot (all ≥ 1)."""
    values, freq = np.unique(counts, return_counts=True)
    n = int(freq.sum())
    mean = float(counts.mean())
    var = float(counts.var())
    fit = BurstFit(
        slot_ms=slot_ms,
        num_samples=n,
        mean=mean,
        variance=var,
        multi_share=float((counts > 1).mean()),
        max_count=int(values[-1]),
    )
    v = values.astype(np.float64)
    f = freq.astype(np.float64)
    ks_grid = np.arange(1, int(values[-1]) + 1, dtype=np.float64)

    def add(name: str, comps: list[Component], ll: float, n_params: int) -> Candidate:
        cand = Candidate(
            name,
            comps,
            ll,
            n_params * math.log(n) - 2 * ll,
            discrete_ks(values, freq, mixture_pmf(comps, ks_grid)),
        )
        fit.candidates[name] = cand
        return cand

    # FineServe's moment estimator; undefined when the counts are not over-dispersed.
    if var > mean:
        mu_m, alpha_m = mean, (var - mean) / mean**2
        comps = [Component(1.0, mu_m, alpha_m)]
        cand = add("nb_moments", comps, float(np.dot(f, zt_nb_logpmf(v, mu_m, alpha_m))), 2)
        plain = np.cumsum(np.exp(_nb_logpmf(np.arange(0, values[-1] + 1.0), mu_m, alpha_m)))
        emp = np.zeros(int(values[-1]) + 1)
        emp[values] = freq
        ecdf = np.cumsum(emp) / n
        cand.ks_plain = float(np.max(np.abs(ecdf - plain)))
        # scipy's kstest on integer data: at each observed value v, both |ECDF(v) − F(v)|
        # and |F(v) − ECDF(v−)| (the left limit), i.e. the jumps count as distance.
        below = np.concatenate([[0.0], ecdf[:-1]])
        cand.ks_scipy = float(
            max(np.max(np.abs(ecdf - plain)[values]), np.max(np.abs(plain - below)[values]))
        )
    start = (max(mean - 1, 1e-2), max((var - mean) / mean**2, 0.1))
    mu_z, alpha_z, ll_z = _fit_zt_nb(v, f, start)
    add("zt_nb", [Component(1.0, mu_z, alpha_z)], ll_z, 2)
    if len(values) >= 3:
        comps, ll_mix = _fit_mixture(v, f)
        add("zt_nb_mixture", comps, ll_mix, 5)
    fit.chosen, note = choose_candidate(fit.candidates)
    if note:
        fit.notes.append(note)
    # Conservative for discrete data (the KS null distribution assumes a continuous CDF).
    fit.ks_pvalue = float(stats.kstwo.sf(fit.best.ks, n))
    return fit
