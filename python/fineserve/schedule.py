"""The schedule: what to send and when, as columns.

``t_ns`` is the absolute send offset from the run's start instant (never a relative sleep,
which drifts); ``input_len``/``output_len`` are token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import FineserveError


@dataclass(frozen=True)
class Schedule:
    t_ns: npt.NDArray[np.int64]
    input_len: npt.NDArray[np.int64]
    output_len: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        n = len(self.t_ns)
        if len(self.input_len) != n or len(self.output_len) != n:
            raise FineserveError("schedule columns have different lengths")
        if n and (np.any(self.t_ns < 0) or np.any(np.diff(self.t_ns) < 0)):
            raise FineserveError("schedule send times must be non-negative and sorted")
        if n and (np.any(self.input_len < 1) or np.any(self.output_len < 1)):
            raise FineserveError("schedule lengths must be >= 1 token")

    def __len__(self) -> int:
        return len(self.t_ns)

    @property
    def span_s(self) -> float:
        return float(self.t_ns[-1]) / 1e9 if len(self) else 0.0

    def peak_in_window(self, window_ns: int) -> int:
        """Most requests scheduled within any window of ``window_ns`` (sizes the pool)."""
        if not len(self):
            return 0
        ends = np.searchsorted(self.t_ns, self.t_ns + window_ns, side="left")
        return int(np.max(ends - np.arange(len(self))))
