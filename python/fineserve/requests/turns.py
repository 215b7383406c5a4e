"""Conversation turns: a later turn's prompt carries the conversation so far."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ..prompts import SyntheticPromptBuilder, TokenizedPromptBuilder
from ..schedule import Schedule


def extend_turns(
    builder: SyntheticPromptBuilder | TokenizedPromptBuilder,
    base: int,
    c: Schedule,
    prompts: list[Any],
    actual_len: npt.NDArray[np.int64],
    history: dict[int, list[Any]],
    *,
    chat: bool = False,
) -> None:
    """A turn's prompt is its previous turn's prompt, an answer of that turn's output
    length, and new text up to its own input length, so a prefix cache sees the
    conversation. A turn shorter than its history keeps its own prompt. With ``chat``
    the prompt becomes the conversation's messages: the earlier turns, the stand-in
    answer as the assistant's message, then this turn's text as the user's."""
    parent = c.extra["parent"]
    followers = c.extra["followers"]
    for i in range(len(c)):
        p = int(parent[i])
        if p >= 0 and p in history:
            earlier, tokens, answer, _ = entry = history[p]
            new = int(actual_len[i]) - tokens - answer
            if new > 0 and builder.extends_turns:
                if chat:
                    said, own = builder.continuation_parts(base + i, answer, new)
                    if isinstance(earlier, str):
                        earlier = [("user", earlier)]
                    prompts[i] = [*earlier, ("assistant", said), ("user", own)]
                else:
                    prompts[i] = earlier + builder.continuation(base + i, answer, new)
            entry[3] -= 1
            if entry[3] <= 0:
                del history[p]
        if followers[i] > 0:
            history[base + i] = [
                prompts[i],
                int(actual_len[i]),
                int(c.output_len[i]),
                int(followers[i]),
            ]
