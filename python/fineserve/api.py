"""OpenAI-compatible request bodies per backend.

Bodies are built from a JSON template per run, so each request costs one ``json.dumps``
of its prompt rather than of a whole dict.

The API follows the endpoint: a path ending in ``/chat/completions`` gets a chat body
(``messages``), anything else a completions body (``prompt``); backend
``openai-responses`` sends the Responses API's body (``input``: the prompt text, or a
conversation as a list of ``{"role", "content"}`` messages) to ``/v1/responses``, which
like the chat API applies the server's chat template. Forcing the output length to the
schedule's, per backend:

- ``vllm``, ``sglang``: ``max_tokens`` plus ``ignore_eos: true`` and ``min_tokens`` equal to
  ``max_tokens`` (both servers accept them on their OpenAI routes; ``min_tokens`` also holds
  the length against stop tokens other than EOS), so exactly ``max_tokens`` tokens come
  back;
- ``openai``, ``openai-chat``: only ``max_tokens`` (completions) or ``max_completion_tokens``
  (chat) — strict servers (OpenAI, ``transformers serve``) reject unknown fields such as
  ``ignore_eos`` with HTTP 4xx, so the output may end early at EOS;
- ``tgi``: ``max_tokens`` (TGI's OpenAI routes have no ignore-EOS switch; same caveat);
- ``openai-responses``: only ``max_output_tokens`` (OpenAI's Responses API rejects unknown
  fields). vLLM's ``/v1/responses`` (0.32) accepts ``ignore_eos`` but has no
  ``min_tokens``: against vLLM add ``--extra-request-body '{"ignore_eos": true}'`` for
  exact output lengths. Streams carry usage without ``stream_options``.
- ``anthropic-messages``: Anthropic's ``/v1/messages`` body (``messages``, ``max_tokens``);
  the API key goes in ``x-api-key`` with ``anthropic-version`` (``config.TargetConfig``).
``--disable-ignore-eos`` drops ``ignore_eos`` and ``min_tokens``; ``--extra-request-body``
adds anything else (and overrides these).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import FineserveError

BACKENDS = (
    "vllm",
    "sglang",
    "openai",
    "openai-chat",
    "openai-responses",
    "anthropic-messages",
    "tgi",
)

#: The default path per backend, appended to the base URL.
DEFAULT_ENDPOINT = {
    "vllm": "/v1/completions",
    "sglang": "/v1/completions",
    "openai": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
    "openai-responses": "/v1/responses",
    "anthropic-messages": "/v1/messages",
    "tgi": "/v1/chat/completions",
}

#: Anthropic's API version header, sent unless ``--header`` gives one.
ANTHROPIC_VERSION = "2023-06-01"

#: Backends whose OpenAI routes accept ``ignore_eos``.
IGNORE_EOS_BACKENDS = ("vllm", "sglang")

#: Where a body's media parts go while its JSON text is rendered (a NUL byte cannot
#: appear unescaped in JSON text, so the mark cannot collide with a prompt).
_MEDIA_MARK = "\x00media\x00"

#: Why a multimodal schedule cannot go to a completions (or Responses) endpoint.
MEDIA_NEEDS_CHAT = (
    "a multimodal schedule needs the chat completions API (--backend openai-chat, or "
    "--endpoint /v1/chat/completions): the completions and Responses APIs here carry text only"
)


def is_chat_endpoint(path: str) -> bool:
    """The server applies its chat template and takes a conversation as messages: the
    chat completions API, the Responses API and Anthropic's Messages API."""
    path = path.rstrip("/")
    return path.endswith(("/chat/completions", "/responses", "/messages"))


def history_api(backend: str, path: str, responses_history: str = "client") -> str:
    """How the engine splices live history into this run's bodies (``engine::HistoryApi``):
    ``completions``, ``chat``, ``responses``, ``responses-server`` or ``anthropic``."""
    if backend == "openai-responses":
        return "responses-server" if responses_history == "server" else "responses"
    if backend == "anthropic-messages":
        return "anthropic"
    return "chat" if is_chat_endpoint(path) else "completions"


#: Where the own text starts inside a user message, as rendered.
_USER_ITEM = '{"role":"user","content":'
_USER_ITEM_PARTS = '{"role":"user","content":[{"type":"text","text":'


@dataclass(frozen=True)
class TurnOffsets:
    """Byte offsets of one turn's body for the engine's live history (``engine::TurnText``):
    where the previous turn's history is spliced in, where the conversation's messages
    start, the own message, and the own text as a JSON string literal."""

    splice_at: int
    items_at: int
    item_at: int
    item_end: int
    text_at: int
    text_end: int

    def row(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.splice_at,
            self.items_at,
            self.item_at,
            self.item_end,
            self.text_at,
            self.text_end,
        )


_PROMPT = "__FINESERVE_PROMPT__"
_MESSAGES = "__FINESERVE_MESSAGES__"
_INPUT = "__FINESERVE_INPUT__"
_MAX_TOKENS = 987654321
_MIN_TOKENS = 987654322
#: The template's open slots, as they appear in its JSON text.
_SLOTS = {
    "prompt": f'"{_PROMPT}"',
    "messages": f'"{_MESSAGES}"',
    "input": f'"{_INPUT}"',
    "max": str(_MAX_TOKENS),
    "min": str(_MIN_TOKENS),
}

#: A chat conversation so far: (role, content) pairs, oldest first.
Messages = Sequence[tuple[str, str]]


def parse_extra_body(text: str | None) -> dict[str, Any]:
    """``--extra-request-body`` as a JSON object, or a one-line error."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FineserveError(f"--extra-request-body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise FineserveError("--extra-request-body must be a JSON object")
    return value


def _messages_json(prompt: str | Messages, media: str = "") -> str:
    """The messages; ``media`` (JSON text of content parts) joins the last message's text
    as a list of parts, text first."""
    if isinstance(prompt, str):  # the common case, without building dicts
        if media:
            return (
                f'[{{"role":"user","content":[{{"type":"text","text":{json.dumps(prompt)}}},'
                f"{media}]}}]"
            )
        return f'[{{"role":"user","content":{json.dumps(prompt)}}}]'
    if not media:
        return json.dumps(
            [{"role": role, "content": content} for role, content in prompt],
            separators=(",", ":"),
        )
    earlier = [
        json.dumps({"role": role, "content": content}, separators=(",", ":"))
        for role, content in prompt[:-1]
    ]
    role, content = prompt[-1]
    last = (
        f'{{"role":{json.dumps(role)},"content":[{{"type":"text","text":{json.dumps(content)}}},'
        f"{media}]}}"
    )
    return "[" + ",".join([*earlier, last]) + "]"


class BodyTemplate:
    """The request body of one run with the prompt and ``max_tokens`` left open."""

    def __init__(
        self,
        backend: str,
        model: str,
        *,
        stream: bool,
        ignore_eos: bool,
        extra: dict[str, Any] | None = None,
        chat: bool | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise FineserveError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if chat is None:
            chat = is_chat_endpoint(DEFAULT_ENDPOINT[backend])
        self.chat = chat
        body: dict[str, Any] = {"model": model}
        if backend == "anthropic-messages":
            body["messages"] = _MESSAGES
            body["max_tokens"] = _MAX_TOKENS
        elif backend == "openai-responses":
            body["input"] = _INPUT  # the text, or a conversation's messages
            body["max_output_tokens"] = _MAX_TOKENS
        elif chat:
            body["messages"] = _MESSAGES  # a list of messages, rendered whole
            # OpenAI's current name; vLLM, SGLang and TGI take max_tokens.
            key = "max_completion_tokens" if backend == "openai-chat" else "max_tokens"
            body[key] = _MAX_TOKENS
        else:
            body["prompt"] = _PROMPT
            body["max_tokens"] = _MAX_TOKENS
        body["temperature"] = 0.0
        body["stream"] = stream
        if stream and backend not in ("openai-responses", "anthropic-messages"):
            # Ask for server-side token counts in the last chunk (OpenAI/vLLM/SGLang).
            body["stream_options"] = {"include_usage": True}
        if ignore_eos and backend in IGNORE_EOS_BACKENDS:
            body["ignore_eos"] = True
            body["min_tokens"] = _MIN_TOKENS
        body.update(extra or {})
        text = json.dumps(body, separators=(",", ":"))
        prompt_slots = sum(text.count(_SLOTS[k]) for k in ("prompt", "messages", "input"))
        if prompt_slots != 1 or text.count(_SLOTS["max"]) != 1:
            raise FineserveError(
                "--extra-request-body must not replace the prompt, messages, input or max_tokens"
            )
        # The JSON text cut at its open slots: render joins the pieces with the values.
        found = sorted((text.index(v), k) for k, v in _SLOTS.items() if v in text)
        self._slots = [k for _, k in found]
        self._pieces: list[str] = []
        pos = 0
        for at, k in found:
            self._pieces.append(text[pos:at])
            pos = at + len(_SLOTS[k])
        self._pieces.append(text[pos:])

    def render(
        self,
        prompt: str | Messages,
        max_tokens: int,
        fields: str = "",
        media: Sequence[bytes] = (),
    ) -> bytes:
        """The body for one request. ``prompt`` is the text (the user message of a chat
        request), or for a chat request a whole conversation of (role, content) pairs.
        ``fields``: more members for this request only, as JSON text (``"a":1,"b":[2]``).
        ``media``: the content parts the user message carries after its text, as pieces
        of JSON text (joined once, here: they can be megabytes); chat completions only."""
        if not media:
            return self._render(prompt, max_tokens, fields).encode()
        if "messages" not in self._slots:
            raise FineserveError(MEDIA_NEEDS_CHAT)
        head, tail = (
            self._render(prompt, max_tokens, fields, _MEDIA_MARK)
            .encode()
            .split(_MEDIA_MARK.encode(), 1)
        )
        return b"".join((head, *media, tail))

    def render_turn(
        self,
        text: str,
        max_tokens: int,
        fields: str = "",
        media: Sequence[bytes] = (),
        *,
        server_history: bool = False,
    ) -> tuple[bytes, TurnOffsets]:
        """A conversation turn's body with only its own new ``text`` (as the user's
        message, or the prompt), and where its parts are: the engine splices the earlier
        turns and their actual replies in when the turn is released. ``server_history``:
        the Responses API's ``previous_response_id`` goes right after the body's ``{``."""
        slot = next(k for k in self._slots if k in ("prompt", "messages", "input"))
        if media and slot != "messages":
            raise FineserveError(MEDIA_NEEDS_CHAT)
        prompt: str | Messages = text if slot == "prompt" else [("user", text)]
        mark = _MEDIA_MARK if media else ""
        rendered, at = self._render_at(prompt, max_tokens, fields, mark)
        lit = len(json.dumps(text))
        if slot == "prompt":
            # Completions: the history continues the prompt string, inside its quotes.
            off = TurnOffsets(at + 1, at + 1, at + 1, at + lit - 1, at, at + lit)
        else:
            head = _USER_ITEM_PARTS if media else _USER_ITEM
            item_at = at + 1  # after the list's "["
            text_at = item_at + len(head)
            if media:
                # The own item ends after its media parts and the "]}" that close them.
                end = rendered.index(_MEDIA_MARK) + len(_MEDIA_MARK) + len("]}")
            else:
                end = rendered.index("]", text_at + lit)
            splice = 1 if server_history else item_at
            off = TurnOffsets(splice, item_at, item_at, end, text_at, text_at + lit)
        if not media:
            return rendered.encode(), off
        head_b, tail_b = rendered.encode().split(_MEDIA_MARK.encode(), 1)
        grown = sum(len(m) for m in media) - len(_MEDIA_MARK)
        off = dataclasses.replace(off, item_end=off.item_end + grown)
        return b"".join((head_b, *media, tail_b)), off

    def _render(self, prompt: str | Messages, max_tokens: int, fields: str, media: str = "") -> str:
        return self._render_at(prompt, max_tokens, fields, media)[0]

    def _render_at(
        self, prompt: str | Messages, max_tokens: int, fields: str, media: str = ""
    ) -> tuple[str, int]:
        """The body's JSON text and where its prompt/messages/input value starts."""
        out = [self._pieces[0]]
        at = -1
        for slot, piece in zip(self._slots, self._pieces[1:]):
            if slot in ("prompt", "messages", "input"):
                at = sum(len(x) for x in out)
            if slot == "prompt":
                text = prompt if isinstance(prompt, str) else "\n".join(c for _, c in prompt)
                out.append(json.dumps(text))
            elif slot == "messages":
                out.append(_messages_json(prompt, media))
            elif slot == "input":
                out.append(
                    json.dumps(prompt) if isinstance(prompt, str) else _messages_json(prompt)
                )
            else:  # max_tokens, and min_tokens equal to it
                out.append(str(max_tokens))
            out.append(piece)
        if fields:  # the body is a JSON object: its text ends with "}"
            out[-1] = out[-1][:-1] + "," + fields + "}"
        return "".join(out), at

    def render_all(self, prompts: Iterable[str], max_tokens: Iterable[int]) -> list[bytes]:
        return [self.render(p, int(m)) for p, m in zip(prompts, max_tokens)]
