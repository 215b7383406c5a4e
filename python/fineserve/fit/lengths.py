"""Length model: the empirical joint histogram (what the generator samples from) and fitted
parametric laws with their KS distances (what a paper would quote):

- input: Pareto + LogNormal mixture (ServeGen's finding for prompt lengths);
- output: Exponential (ServeGen) and, for both, a Zipf law on 1..max (BurstGPT);
- the input/output correlation (Pearson on raw and log lengths, Spearman).

Fits run on the histogram of distinct lengths (``np.unique``), so their cost does not grow
with the number of requests beyond one sort.

Joint histogram: every integer up to ``EXACT_UPTO`` has its own bin, then log-spaced bins
with ``LOG_BINS_PER_DECADE`` per decade. The file also keeps each marginal's distinct
values with their counts; the generator draws a bin pair from the joint, then a value
inside each bin from that marginal, so both marginals are exact (real traces have spikes
at particular lengths that a uniform draw inside a bin would smear) and the dependence is
kept at bin resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import optimize, special, stats

from ..workloads.burstgpt import fit_zipf_mean_log

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

EXACT_UPTO = 64
LOG_BINS_PER_DECADE = 32


def length_bin_edges(max_len: int) -> IntArray:
    """Integer bin edges [e_i, e_{i+1}) covering 1..max_len."""
    exact = np.arange(1, EXACT_UPTO + 1)
    if max_len < EXACT_UPTO:
        return np.arange(1, max_len + 2, dtype=np.int64)
    decades = math.log10((max_len + 1) / EXACT_UPTO)
    n = max(1, math.ceil(decades * LOG_BINS_PER_DECADE))
    log_edges = np.unique(np.ceil(np.geomspace(EXACT_UPTO, max_len + 1, n + 1)).astype(np.int64))
    edges = np.unique(np.concatenate([exact, log_edges]))
    if edges[-1] < max_len + 1:
        edges = np.append(edges, max_len + 1)
    return edges.astype(np.int64)


@dataclass
class LengthFit:
    n: int
    input_edges: IntArray
    output_edges: IntArray
    #: Joint counts, shape (input bins, output bins), stored sparse as (i, j, count).
    joint: IntArray
    #: Distinct values and their counts, per marginal.
    input_values: tuple[IntArray, IntArray]
    output_values: tuple[IntArray, IntArray]
    params: dict[str, Any]
    ks: dict[str, float]
    correlation: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "num_samples": self.n,
            "input_bin_edges": self.input_edges.tolist(),
            "output_bin_edges": self.output_edges.tolist(),
            "joint_counts": self.joint.tolist(),
            "joint_format": "[input_bin, output_bin, count]; bin i covers [edges[i], edges[i+1])",
            "input_values": self.input_values[0].tolist(),
            "input_value_counts": self.input_values[1].tolist(),
            "output_values": self.output_values[0].tolist(),
            "output_value_counts": self.output_values[1].tolist(),
            "fitted": self.params,
            "ks_stat": self.ks,
            "correlation": self.correlation,
        }


def _ks_integer(values: FloatArray, freq: FloatArray, cdf: FloatArray) -> float:
    """KS distance of integer data (distinct ``values`` with ``freq``) to a model whose
    CDF at each value is ``cdf`` (continuous models are evaluated at value + 0.5)."""
    ecdf = np.cumsum(freq) / freq.sum()
    below = np.concatenate([[0.0], ecdf[:-1]])
    return float(
        np.max(np.maximum(np.abs(ecdf - cdf), np.abs(below - np.concatenate([[0.0], cdf[:-1]]))))
    )


def fit_pareto_lognormal(values: FloatArray, freq: FloatArray) -> tuple[dict[str, float], float]:
    """MLE of w·Pareto(x_m, a) + (1 − w)·LogNormal(mu, sigma); x_m = smallest length."""
    x_m = float(values[0])
    logv = np.log(values)
    mean_log = float(np.dot(freq, logv) / freq.sum())
    sd_log = float(np.sqrt(np.dot(freq, (logv - mean_log) ** 2) / freq.sum())) or 1.0

    def unpack(p: FloatArray) -> tuple[float, float, float, float]:
        # Clipped so that the optimiser cannot walk into overflow or a degenerate weight.
        w = float(np.clip(special.expit(p[0]), 1e-6, 1 - 1e-6))
        return w, math.exp(np.clip(p[1], -6, 4)), float(p[2]), math.exp(np.clip(p[3], -6, 3))

    def nll(p: FloatArray) -> float:
        w, a, mu, sigma = unpack(p)
        pareto = np.log(a) + a * math.log(x_m) - (a + 1) * logv
        lognorm = (
            -logv - math.log(sigma * math.sqrt(2 * math.pi)) - (logv - mu) ** 2 / (2 * sigma**2)
        )
        ll = np.logaddexp(math.log(w) + pareto, math.log1p(-w) + lognorm)
        return -float(np.dot(freq, ll))

    best = None
    for w0, a0 in ((0.2, 1.0), (0.5, 2.0), (0.05, 0.5)):
        x0 = np.array([special.logit(w0), math.log(a0), mean_log, math.log(sd_log)])
        res = optimize.minimize(nll, x0, method="Nelder-Mead", options={"maxiter": 3000})
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None
    w, a, mu, sigma = unpack(best.x)
    x = values + 0.5
    cdf = w * np.clip(1 - (x_m / x) ** a, 0, 1) + (1 - w) * stats.norm.cdf((np.log(x) - mu) / sigma)
    params = {
        "weight_pareto": w,
        "pareto_xm": x_m,
        "pareto_a": a,
        "lognorm_mu": mu,
        "lognorm_sigma": sigma,
    }
    return params, _ks_integer(values, freq, cdf)


def _zipf_ks(values: FloatArray, freq: FloatArray, a: float, max_value: int) -> float:
    k = np.arange(1, max_value + 1, dtype=np.float64)
    cdf_all = np.cumsum(k**-a)
    cdf_all /= cdf_all[-1]
    return _ks_integer(values, freq, cdf_all[values.astype(np.int64) - 1])


def fit_lengths(input_len: IntArray, output_len: IntArray) -> LengthFit:
    n = len(input_len)
    in_edges = length_bin_edges(int(input_len.max()))
    out_edges = length_bin_edges(int(output_len.max()))
    bi = np.searchsorted(in_edges, input_len, side="right") - 1
    bo = np.searchsorted(out_edges, output_len, side="right") - 1
    key = bi.astype(np.int64) * (len(out_edges) - 1) + bo
    uk, cnt = np.unique(key, return_counts=True)
    joint = np.stack([uk // (len(out_edges) - 1), uk % (len(out_edges) - 1), cnt], axis=1)

    params: dict[str, Any] = {}
    ks: dict[str, float] = {}
    iv, ifreq = np.unique(input_len, return_counts=True)
    ov, ofreq = np.unique(output_len, return_counts=True)
    ivf, ifq = iv.astype(np.float64), ifreq.astype(np.float64)
    ovf, ofq = ov.astype(np.float64), ofreq.astype(np.float64)

    params["input_pareto_lognormal"], ks["input_pareto_lognormal"] = fit_pareto_lognormal(ivf, ifq)
    mean_out = float(np.dot(ovf, ofq) / ofq.sum())
    params["output_exponential"] = {"mean": mean_out}
    ks["output_exponential"] = _ks_integer(ovf, ofq, 1 - np.exp(-(ovf + 0.5) / mean_out))
    for name, vals, fq, top in (
        ("input_zipf", ivf, ifq, int(iv[-1])),
        ("output_zipf", ovf, ofq, int(ov[-1])),
    ):
        a = fit_zipf_mean_log(float(np.dot(fq, np.log(vals)) / fq.sum()), top)
        params[name] = {"a": a, "max": top}
        ks[name] = _zipf_ks(vals, fq, a, top)

    inf, outf = input_len.astype(np.float64), output_len.astype(np.float64)
    corr = {
        "pearson": _pearson(inf, outf),
        "pearson_log": _pearson(np.log(inf), np.log(outf)),
        "spearman": _pearson(_ranks(input_len, iv, ifreq), _ranks(output_len, ov, ofreq)),
    }
    return LengthFit(
        n,
        in_edges,
        out_edges,
        joint.astype(np.int64),
        (iv.astype(np.int64), ifreq.astype(np.int64)),
        (ov.astype(np.int64), ofreq.astype(np.int64)),
        params,
        ks,
        corr,
    )


def _pearson(x: FloatArray, y: FloatArray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    return float(np.dot(xc, yc)) / den if den > 0 else math.nan


def _ranks(x: IntArray, values: IntArray, freq: IntArray) -> FloatArray:
    """Average ranks (ties share their mean rank) from the distinct values we already
    have, instead of a second full sort."""
    last = np.cumsum(freq).astype(np.float64)
    avg = last - (freq - 1) / 2.0
    return avg[np.searchsorted(values, x)]
