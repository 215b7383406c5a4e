"""Request lengths: vLLM-style uniform ranges, or (input, output) pairs sampled from a CSV."""

from __future__ import annotations

import math
from pathlib import Path

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
