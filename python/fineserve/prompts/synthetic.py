"""Deterministic synthetic prompts for when no tokenizer is given.

Each prompt is ``input_len`` space-separated words: a request-unique opening word (so no
two prompts share a prefix and a prefix cache sees only intended sharing), then words from
a fixed pool of common lowercase English words. Each such word is one token for the
common BPE tokenizers (Llama, GPT, Qwen), so lengths are approximate: typically exact to
within a few tokens, never checked. The embedded mock counts words, so against it they are
exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_VOCAB = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their can has more when will "
    "would who so no time about other into year some could them then than these may only "
    "first new two like now its our over also after most made many such even well way work "
    "back just any where much through long down should great must each part world life good "
    "state right same under very high own last still every place while might small old day "
    "people between house end know because take number set both three hand home point water "
    "little power open large thing found few general system again group school form order"
).split()


class SyntheticPromptBuilder:
    """Builds prompts by slicing one pooled text, so each prompt costs one string copy.
    Prefix sharing is kept at word level: equal ``hash_ids`` give identical blocks of
    ``block_size`` words, and shared-prefix groups share their first words."""

    exact = False
    extends_turns = True

    def continuation(self, index: int, answer_tokens: int, new_tokens: int) -> str:
        """Words to append to a previous turn's prompt: an answer, then the new turn."""
        answer, own = self.continuation_parts(index, answer_tokens, new_tokens)
        return " " + f"{answer} {own}".strip()

    def continuation_parts(
        self, index: int, answer_tokens: int, new_tokens: int
    ) -> tuple[str, str]:
        """The stand-in answer to the previous turn, and the new turn's own words."""
        answer = self._slice(((index * 31) % self._pool_words), answer_tokens)
        return answer.strip(), self.build(index, new_tokens)

    def __init__(
        self,
        seed: int,
        pool_words: int = 1 << 16,
        *,
        block_size: int = 512,
        shared_prefix_groups: int = 0,
        shared_prefix_len: int = 0,
    ) -> None:
        self.block_size = block_size
        self.groups, self.prefix_len = shared_prefix_groups, shared_prefix_len
        rng = np.random.default_rng(seed)
        words = np.asarray(_VOCAB)[rng.integers(0, len(_VOCAB), size=pool_words)]
        # Pool twice over so any window of up to pool_words words is one contiguous slice.
        text_words = np.concatenate([words, words]).tolist()
        lengths = np.fromiter((len(w) + 1 for w in text_words), dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self._text = " ".join(text_words) + " "
        self._pool_words = pool_words

    def build(self, index: int, input_len: int) -> str:
        """The prompt of request ``index``: exactly ``input_len`` words."""
        if input_len <= 0:
            return ""
        rest = input_len - 1
        if rest > self._pool_words:
            reps, rem = divmod(rest, self._pool_words)
            body = self._slice(0, self._pool_words) * reps + self._slice(0, rem)
        else:
            offset = (index * 7919) % self._pool_words
            body = self._slice(offset, rest)
        return (f"r{index:x} " + body).rstrip()

    def build_chunk(
        self, base_index: int, schedule: Any, *, record: bool = True
    ) -> tuple[list[str], Any]:
        """Prompts of a schedule chunk; lengths are approximate, so returned unchanged."""
        lens = schedule.input_len.tolist()
        if schedule.hash_ids is not None:
            ids, offs = schedule.hash_ids.tolist(), schedule.hash_offsets.tolist()
            prompts = []
            for i, n in enumerate(lens):
                parts, left = [], n
                for b in ids[offs[i] : offs[i + 1]]:
                    take = min(self.block_size, left)
                    if take <= 0:
                        break
                    # The block's id is its first word: pool offsets repeat, ids do not.
                    parts.append(f"b{b:x} " + self._slice((b * 7919) % self._pool_words, take - 1))
                    left -= take
                if left > 0:
                    parts.append(self._slice(((base_index + i) * 104729) % self._pool_words, left))
                prompts.append("".join(parts).rstrip())
            return prompts, schedule.input_len
        if self.groups > 0 and self.prefix_len > 0:
            prompts = []
            for i, n in enumerate(lens):
                idx = base_index + i
                shared = min(self.prefix_len, n)
                head = self._slice(((idx % self.groups) * 7919) % self._pool_words, shared)
                tail = self.build(idx, n - shared) if n > shared else ""
                prompts.append((head + tail).rstrip())
            return prompts, schedule.input_len
        return [self.build(base_index + i, n) for i, n in enumerate(lens)], schedule.input_len

    def _slice(self, start: int, count: int) -> str:
        if count <= 0:
            return ""
        return self._text[self._starts[start] : self._starts[start + count] - 1] + " "
