"""Think time of conversation turns (``--think-time``): how long after its previous turn
*ends* a later turn leaves (the engine releases it then; its record's scheduled time is
that release).

- ``gap`` (default): the trace's gap between the two turns' arrivals — without the
  original latencies an upper bound on the user's think time, as it includes the
  previous turn's own latency;
- ``gap-minus-latency``: that gap less the previous turn's latency recorded in the trace
  (a ``latency`` field, in the trace's time unit), floored at 0;
- ``fixed:S``: S seconds for every later turn;
- ``lognormal:MU,SIGMA``: exp(MU + SIGMA·N(0, 1)) seconds, drawn per turn from the run's
  seed (MU and SIGMA of the logarithm of seconds: ``lognormal:0.7,0.5`` has median 2 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ThinkTime:
    kind: str = "gap"
    seconds: float = 0.0
    mu: float = 0.0
    sigma: float = 0.0

    @classmethod
    def parse(cls, spec: str, option: str = "--think-time") -> ThinkTime:
        text = spec.strip()
        head, _, rest = text.partition(":")
        if head in ("gap", "gap-minus-latency") and not rest:
            return cls(head)
        try:
            if head == "fixed" and rest:
                s = float(rest)
                if math.isfinite(s) and s >= 0:
                    return cls("fixed", seconds=s)
            elif head == "lognormal" and rest:
                mu_s, sigma_s = rest.split(",")
                mu, sigma = float(mu_s), float(sigma_s)
                if math.isfinite(mu) and math.isfinite(sigma) and sigma >= 0:
                    return cls("lognormal", mu=mu, sigma=sigma)
        except ValueError:
            pass
        raise FineserveError(
            f"{option} {spec!r}: use gap, gap-minus-latency, fixed:SECONDS (>= 0) or "
            "lognormal:MU,SIGMA (of log seconds, SIGMA >= 0)"
        )

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed {self.seconds:g} s"
        if self.kind == "lognormal":
            return f"log-normal (median {math.exp(self.mu):.3g} s, sigma {self.sigma:g})"
        if self.kind == "gap-minus-latency":
            return "the trace's gap between turns less the previous turn's latency"
        return "the trace's gap between turns' arrivals"

    def think_ns(
        self,
        parent: IntArray,
        gap_ns: IntArray,
        latency_ns: IntArray | None,
        rng: np.random.Generator,
    ) -> tuple[IntArray, str]:
        """Think time per request (0 for first turns) and a one-line note."""
        later = parent >= 0
        n_later = int(np.count_nonzero(later))
        if self.kind == "gap":
            return gap_ns, f"think time: {self.describe()} ({n_later} later turns)"
        if self.kind == "fixed":
            out = np.where(later, round(self.seconds * 1e9), 0)
        elif self.kind == "lognormal":
            draw = np.exp(self.mu + self.sigma * rng.standard_normal(len(parent))) * 1e9
            out = np.where(later, np.rint(np.minimum(draw, 1e18)), 0)
        else:
            if latency_ns is None:
                raise FineserveError(
                    "--think-time gap-minus-latency: the trace records no latency (a "
                    "'latency' field per request, in its time unit)"
                )
            parent_latency = latency_ns[np.maximum(parent, 0)]
            known = later & (parent_latency >= 0)
            less = np.maximum(gap_ns - parent_latency, 0)
            out = np.where(known, less, np.where(later, gap_ns, 0))
            unknown = n_later - int(np.count_nonzero(known))
            note = f"think time: {self.describe()} ({n_later} later turns"
            if unknown:
                note += f"; {unknown} whose previous turn has no latency keep the whole gap"
            return out.astype(np.int64), note + ")"
        out = out.astype(np.int64)
        mean_s = float(out[later].mean()) / 1e9 if n_later else 0.0
        return out, f"think time: {self.describe()} ({n_later} later turns, mean {mean_s:.3g} s)"
