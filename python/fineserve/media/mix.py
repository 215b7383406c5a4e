"""Media in the schedule: per request a list of token budgets per modality.

ServeGen's multimodal pools give them per client and window (``servegen.py``); any other
workload gets them from ``--mm-*-per-request`` and ``--mm-*-tokens``
(:class:`MediaSampler`). Either way a chunk carries the list columns ``image_tokens``,
``audio_tokens`` and ``video_tokens`` (one entry per item; empty when none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from ..config import MEDIA_MIX_OPTIONS, MediaMixConfig
from ..ragged import offsets_from_counts
from ..schedule import Ragged, Schedule
from .dist import IntDist, parse_int_dist

#: Modalities, in the order their parts go into a request.
MODALITIES = ("image", "audio", "video")


def list_column(modality: str) -> str:
    return f"{modality}_tokens"


class MediaSampler:
    """Draws each request's media: a count per modality, then a budget per item."""

    def __init__(self, cfg: MediaMixConfig) -> None:
        self.dists: dict[str, tuple[IntDist, IntDist]] = {}
        for m in MODALITIES:
            count, tokens = cfg.spec(m)
            if count is None:
                continue
            count_opt, tokens_opt = MEDIA_MIX_OPTIONS[m]
            self.dists[m] = (
                parse_int_dist(count, count_opt, floor=0),
                parse_int_dist(str(tokens), tokens_opt, floor=1),
            )

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, Ragged]:
        out: dict[str, Ragged] = {}
        for m in MODALITIES:
            if m in self.dists:
                count_dist, token_dist = self.dists[m]
                counts = count_dist.sample(n, rng)
                values = token_dist.sample(int(counts.sum()), rng)
            else:
                counts = np.zeros(n, dtype=np.int64)
                values = np.zeros(0, dtype=np.int64)
            out[list_column(m)] = (values.astype(np.int64), offsets_from_counts(counts))
        return out


def with_media(
    chunks: Iterator[Schedule], sampler: MediaSampler, rng: np.random.Generator
) -> Iterator[Schedule]:
    """The chunks with synthetic media lists added (their own random stream, so the
    arrivals and lengths are those of the same workload without media)."""
    for c in chunks:
        yield dataclasses.replace(c, lists=sampler.sample(len(c), rng))
