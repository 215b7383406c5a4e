"""Theoretical prefix-cache hit rate of a schedule: the share of prompt tokens that an
unbounded prefix cache could serve from earlier requests.

With ``hash_ids`` (Mooncake / Qwen-Bailian), block j of a request hits when the same block
id was seen before *and* every earlier block of the request hit (a prefix cache reuses a
prefix, not isolated blocks). Block tokens are ``block_size``, the last block what is left
of the request's input length.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class PrefixHitCounter:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.seen: set[int] = set()
        self.hit_tokens = 0
        self.total_tokens = 0

    def add(
        self,
        input_len: npt.NDArray[np.int64],
        hash_ids: npt.NDArray[np.int64],
        hash_offsets: npt.NDArray[np.int64],
    ) -> None:
        ids = hash_ids.tolist()
        offs = hash_offsets.tolist()
        bs = self.block_size
        for i, n in enumerate(input_len.tolist()):
            self.total_tokens += n
            left = n
            prefix_hit = True
            for b in ids[offs[i] : offs[i + 1]]:
                if left <= 0:
                    break
                take = min(bs, left)
                if prefix_hit and b in self.seen:
                    self.hit_tokens += take
                else:
                    prefix_hit = False
                self.seen.add(b)
                left -= take

    def add_plain(self, input_len: npt.NDArray[np.int64]) -> None:
        """Requests without blocks: nothing to share."""
        self.total_tokens += int(np.sum(input_len))

    def add_shared(
        self, base_index: int, input_len: npt.NDArray[np.int64], groups: int, prefix_len: int
    ) -> None:
        """Synthetic shared-prefix mode: request i uses group (i mod groups)'s prefix, which
        every request after the first of its group could reuse."""
        n = len(input_len)
        self.total_tokens += int(np.sum(input_len))
        later = base_index + np.arange(n) >= groups
        self.hit_tokens += int(np.minimum(input_len, prefix_len)[later].sum())

    @property
    def rate(self) -> float:
        return self.hit_tokens / self.total_tokens if self.total_tokens else 0.0
