"""Prompt source datasets (``--dataset-path``): their texts become the pool that prompts
are cut from (``prompts.tokenized``), so prompts read like the dataset's.

Formats, detected from the content:
- ShareGPT JSON: a list of ``{"conversations" | "conversation": [{"from", "value"}, ...]}``;
  the first human turn of each conversation is a prompt.
- FineServe's pre-saved JSON: a list of ``{"input_text", "output_length"}``.
- JSONL: one object per line with ``prompt``, ``text`` or ``input_text`` (or a bare string).
Entries without usable text are skipped and counted. Entries may carry their output length
(``output_length``, ``output_len`` or ``max_tokens``), which ``--dataset-output-len`` uses.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import FineserveError

_TEXT_KEYS = ("prompt", "text", "input_text", "question", "content")
_OUTPUT_KEYS = ("output_length", "output_len", "max_tokens")


def _output_len(obj: Any) -> int:
    """The entry's output length in tokens, or -1 when it has none usable."""
    if isinstance(obj, dict):
        for key in _OUTPUT_KEYS:
            v = obj.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < 10_000_000:
                return int(v)
    return -1


def _first_human(conv: Any) -> str | None:
    if not isinstance(conv, list):
        return None
    for turn in conv:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
            value = turn.get("value")
            return value if isinstance(value, str) else None
    return None


def _from_obj(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        return None
    for key in ("conversations", "conversation"):
        if key in obj:
            return _first_human(obj[key])
    for key in _TEXT_KEYS:
        text = obj.get(key)
        if isinstance(text, str):
            return text
    return None


def load_prompt_texts(path: Path) -> tuple[list[str], str]:
    """The dataset's prompt texts and a one-line summary (kept / skipped by reason)."""
    texts, _, summary = load_prompt_dataset(path)
    return texts, summary


def _entries(raw: str, path: Path, skipped: Counter[str]) -> tuple[Iterable[Any], str]:
    """A dataset's entries and its format: a JSON array; one JSON object (maybe
    pretty-printed; ``{"data": [...]}`` and the like give their first list of entries, else
    the object is the one entry); else JSONL, read lazily, malformed lines counted in
    ``skipped`` as they are reached (so its reasons keep the order they first occur in)."""
    stripped = raw.lstrip()
    whole: Any = None
    if stripped.startswith("{"):
        try:
            whole = json.loads(raw)
        except json.JSONDecodeError:
            whole = None
    if isinstance(whole, dict):
        lists = [v for v in whole.values() if isinstance(v, list)]
        return (lists[0] if lists and not _from_obj(whole) else [whole]), "JSON"
    if stripped.startswith("["):
        try:
            return json.loads(raw), "JSON"
        except json.JSONDecodeError as e:
            raise FineserveError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return _jsonl_entries(raw, skipped), "JSONL"


def _jsonl_entries(raw: str, skipped: Counter[str]) -> Iterator[Any]:
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            skipped["malformed line"] += 1
            continue
        yield obj


def load_prompt_dataset(path: Path) -> tuple[list[str], list[int], str]:
    """The dataset's prompt texts, each entry's output length (-1: none), and a one-line
    summary (kept / skipped by reason)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise FineserveError(f"--dataset-path {path}: {e.strerror}") from None
    skipped: Counter[str] = Counter()
    texts: list[str] = []
    outputs: list[int] = []
    entries, fmt = _entries(raw, path, skipped)
    for obj in entries:
        t = _from_obj(obj)
        if t and t.strip():
            texts.append(t)
            outputs.append(_output_len(obj))
        else:
            skipped["no prompt text"] += 1
    if not texts:
        raise FineserveError(
            f"{path}: no prompt text found ({fmt}; expected ShareGPT conversations, "
            "input_text, or prompt/text fields)"
        )
    summary = f"{path.name}: {len(texts)} prompts ({fmt})"
    with_output = sum(1 for x in outputs if x > 0)
    if with_output:
        summary += f", {with_output} with an output length"
    if skipped:
        summary += "; skipped " + ", ".join(f"{n} {why}" for why, n in skipped.items())
    return texts, outputs, summary
