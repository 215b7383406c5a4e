"""Request lengths: vLLM-style uniform ranges, (input, output) pairs sampled from a CSV, or a
joint histogram fitted by ``fineserve fit``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError

Lengths = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


def random_lengths(
    n: int, mean_len: int, range_ratio: float, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Uniform integer lengths in [mean·(1−r), mean·(1+r)], at least 1 (vLLM's
    ``--random-range-ratio`` convention)."""
    if mean_len < 1:
        raise FineserveError(f"random lengths must be >= 1, got {mean_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise FineserveError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean_len * (1 - range_ratio)))
    high = max(low, math.ceil(mean_len * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n, dtype=np.int64)


class LengthSampler:
    """Draws (input, output) lengths for generated requests."""

    def sample(self, n: int, rng: np.random.Generator) -> Lengths:
        raise NotImplementedError


class RandomLengths(LengthSampler):
    def __init__(self, input_len: int, output_len: int, range_ratio: float) -> None:
        random_lengths(1, input_len, range_ratio, np.random.default_rng(0))  # validates
        random_lengths(1, output_len, range_ratio, np.random.default_rng(0))
        self.input_len, self.output_len, self.range_ratio = input_len, output_len, range_ratio

    def sample(self, n: int, rng: np.random.Generator) -> Lengths:
        return (
            random_lengths(n, self.input_len, self.range_ratio, rng),
            random_lengths(n, self.output_len, self.range_ratio, rng),
        )


class EmpiricalLengths(LengthSampler):
    """(input, output) pairs drawn with replacement from observed requests, so their
    joint distribution (and correlation) is kept."""

    def __init__(self, input_len: npt.NDArray[np.int64], output_len: npt.NDArray[np.int64]):
        if not len(input_len):
            raise FineserveError("no request lengths to sample from")
        self.input_len = np.asarray(input_len, dtype=np.int64)
        self.output_len = np.asarray(output_len, dtype=np.int64)

    @classmethod
    def from_csv(
        cls, path: Path, input_column: str = "input_length", output_column: str = "output_length"
    ) -> tuple[EmpiricalLengths, str]:
        """Reads a lengths CSV (e.g. FineServe's replay CSVs); returns the sampler and a
        one-line summary of rows used/skipped."""
        from ..traces.base import numeric, require_columns
        from ..traces.readers import read_csv_strings

        path = Path(path)
        if not path.is_file():
            raise FineserveError(f"--request-lengths-csv: file not found: {path}")
        table, bad = read_csv_strings(path)
        require_columns(
            path,
            table.column_names,
            {"--input-length-column": input_column, "--output-length-column": output_column},
        )
        inp, out = numeric(table[input_column]), numeric(table[output_column])
        ok = np.isfinite(inp) & np.isfinite(out) & (inp >= 1) & (out >= 1)
        skipped = int((~ok).sum()) + bad
        if not ok.any():
            raise FineserveError(f"{path}: no row has valid input and output lengths")
        summary = f"{path.name}: {int(ok.sum())} length pairs" + (
            f", skipped {skipped} rows with missing, malformed or < 1 lengths" if skipped else ""
        )
        sampler = cls(np.rint(inp[ok]).astype(np.int64), np.rint(out[ok]).astype(np.int64))
        return sampler, summary

    def sample(self, n: int, rng: np.random.Generator) -> Lengths:
        idx = rng.integers(0, len(self.input_len), size=n)
        return self.input_len[idx], self.output_len[idx]


class HistogramLengths(LengthSampler):
    """(input, output) pairs from a length file written by ``fineserve fit``: a bin pair
    is drawn from the joint histogram, then a value inside each bin from that marginal's
    distinct-value counts (so the marginals are exact and the dependence is kept at bin
    resolution; see ``fit.lengths``)."""

    def __init__(
        self,
        input_edges: npt.NDArray[np.int64],
        output_edges: npt.NDArray[np.int64],
        joint: npt.NDArray[np.int64],
        input_values: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
        output_values: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
        source: str = "",
    ) -> None:
        self.bin_in, self.bin_out = joint[:, 0], joint[:, 1]
        self.cdf = np.cumsum(joint[:, 2].astype(np.float64))
        self.inp = _BinnedValues(input_edges, *input_values)
        self.out = _BinnedValues(output_edges, *output_values)
        self.source = source

    @classmethod
    def from_json(cls, path: Path) -> HistogramLengths:
        import json

        path = Path(path)
        try:
            d = json.loads(path.read_text())
            edges_in = np.asarray(d["input_bin_edges"], dtype=np.int64)
            edges_out = np.asarray(d["output_bin_edges"], dtype=np.int64)
            joint = np.asarray(d["joint_counts"], dtype=np.int64).reshape(-1, 3)
            values_in = (
                np.asarray(d["input_values"], dtype=np.int64),
                np.asarray(d["input_value_counts"], dtype=np.int64),
            )
            values_out = (
                np.asarray(d["output_values"], dtype=np.int64),
                np.asarray(d["output_value_counts"], dtype=np.int64),
            )
        except OSError as e:
            raise FineserveError(f"cannot read lengths file {path}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError):
            raise FineserveError(
                f"{path}: not a fineserve lengths file (bin edges, joint_counts, values)"
            ) from None
        ok = (
            len(joint)
            and np.all((joint[:, 0] >= 0) & (joint[:, 0] < len(edges_in) - 1))
            and np.all((joint[:, 1] >= 0) & (joint[:, 1] < len(edges_out) - 1))
            and np.all(joint[:, 2] >= 0)
            and joint[:, 2].sum() > 0
        )
        if not ok:
            raise FineserveError(f"{path}: invalid joint length histogram")
        try:
            inp = _BinnedValues(edges_in, *values_in)
            out = _BinnedValues(edges_out, *values_out)
            # Every bin the joint can pick must hold some value of its marginal.
            if np.any(inp.mass[joint[:, 0]] == 0) or np.any(out.mass[joint[:, 1]] == 0):
                raise ValueError
        except ValueError:
            raise FineserveError(
                f"{path}: length values do not match the histogram's bins"
            ) from None
        return cls(edges_in, edges_out, joint, values_in, values_out, source=str(path))

    def sample(self, n: int, rng: np.random.Generator) -> Lengths:
        pick = np.searchsorted(self.cdf, rng.random(n) * self.cdf[-1], side="right")
        pick = np.minimum(pick, len(self.cdf) - 1)
        return self.inp.draw(self.bin_in[pick], rng), self.out.draw(self.bin_out[pick], rng)


class _BinnedValues:
    """Distinct values with counts, grouped by bin: draws a value inside a given bin."""

    def __init__(
        self,
        edges: npt.NDArray[np.int64],
        values: npt.NDArray[np.int64],
        counts: npt.NDArray[np.int64],
    ) -> None:
        if (
            len(edges) < 2
            or len(values) != len(counts)
            or not len(values)
            or np.any(np.diff(edges) <= 0)
            or np.any(np.diff(values) <= 0)
            or values[0] < max(1, edges[0])
            or values[-1] >= edges[-1]
            or np.any(counts < 0)
        ):
            raise ValueError("bad binned values")
        self.values = values
        self.cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
        first = np.searchsorted(values, edges)  # value index where each bin starts
        self.lo_c = self.cum[first[:-1]]
        self.mass = self.cum[first[1:]] - self.lo_c

    def draw(self, bins: npt.NDArray[np.int64], rng: np.random.Generator) -> Any:
        x = self.lo_c[bins] + rng.random(len(bins)) * self.mass[bins]
        idx = np.searchsorted(self.cum, x, side="right") - 1
        return self.values[np.clip(idx, 0, len(self.values) - 1)]
