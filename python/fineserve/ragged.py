"""Ragged columns: row r's values are ``values[offsets[r]:offsets[r+1]]`` (prefix blocks
per request, token-event times per record)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def offsets_from_counts(counts: npt.ArrayLike) -> npt.NDArray[np.int64]:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def take_ragged(
    values: npt.NDArray[Any], offsets: npt.ArrayLike, rows: npt.ArrayLike
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """The ragged rows ``rows`` (indices, any order), with their new offsets."""
    offsets = np.asarray(offsets, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    counts = np.diff(offsets)[rows]
    new_offsets = offsets_from_counts(counts)
    gather = np.repeat(offsets[:-1][rows] - new_offsets[:-1], counts) + np.arange(new_offsets[-1])
    return values[gather], new_offsets
