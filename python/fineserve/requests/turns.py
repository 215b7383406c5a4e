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


class LiveTurns:
    """Each conversation turn's own new text under live history: the engine splices the
    earlier turns and the replies they actually received in front of it when the turn is
    released (``engine::history``), so the text here is only what the user adds.

    A later turn's new text is sized so that its whole prompt still equals the trace's
    ``input_len`` when the earlier turns' replies are as long as the trace says (vLLM and
    SGLang with ignore_eos return exactly that many tokens): new = input_len − previous
    input_len − previous output_len. Chat templates add a few tokens per message, and a
    reply re-tokenized inside the history may differ by a token or two at its edges.
    Where the history alone is already that long, the turn carries the history and one
    token of new text (its prompt is longer than the trace's); :attr:`history_longer`
    counts them."""

    def __init__(self) -> None:
        #: Turns that later turns follow: index → [input_len, output_len, followers left].
        self._open: dict[int, list[int]] = {}
        self.history_longer = 0
        self.later_turns = 0

    def own_texts(
        self,
        builder: SyntheticPromptBuilder | TokenizedPromptBuilder,
        base: int,
        c: Schedule,
        prompts: list[Any],
        input_len: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.int64]:
        """Replaces later turns' prompts by their own new text, in place; returns the rows
        that are conversation turns (a first turn with followers, or a later turn)."""
        parent = c.extra["parent"]
        followers = c.extra["followers"]
        rows = np.flatnonzero((parent >= 0) | (followers > 0))
        for i in rows.tolist():
            p = int(parent[i])
            entry = self._open.get(p) if p >= 0 else None
            if entry is not None:
                self.later_turns += 1
                new = int(input_len[i]) - entry[0] - entry[1]
                if new <= 0:
                    self.history_longer += 1
                    new = 1
                if builder.extends_turns:
                    prompts[i] = builder.continuation_parts(base + i, 0, new)[1]
                entry[2] -= 1
                if entry[2] <= 0:
                    del self._open[p]
            if not isinstance(prompts[i], str):
                prompts[i] = "\n".join(content for _, content in prompts[i])
            if followers[i] > 0:
                self._open[base + i] = [int(input_len[i]), int(c.output_len[i]), int(followers[i])]
        return rows

    def note(self) -> str | None:
        """One line on what live history could not size as the trace says."""
        if not self.history_longer:
            return None
        return (
            f"live history: {self.history_longer} of {self.later_turns} later turns had a "
            "history (earlier turns and their replies) already as long as the trace's input "
            "length; they carried it with one token of new text"
        )
