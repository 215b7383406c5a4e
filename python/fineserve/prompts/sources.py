"""Prompt source datasets (``--dataset-path``): their texts become the pool that prompts
are cut from (``prompts.tokenized``), so prompts read like the dataset's.

Formats, detected from the content:
- ShareGPT JSON: a list of ``{"conversations" | "conversation": [{"from", "value"}, ...]}``;
  the first human turn of each conversation is a prompt.
- FineServe's pre-saved JSON: a list of ``{"input_text", "output_length"}``.
- JSONL: one object per line with ``prompt``, ``text`` or ``input_text`` (or a bare string).
Entries without usable text are skipped and counted.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import FineserveError

_TEXT_KEYS = ("prompt", "text", "input_text", "question", "content")


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
        if isinstance(obj.get(key), str):
            return obj[key]
    return None


def load_prompt_texts(path: Path) -> tuple[list[str], str]:
    """The dataset's prompt texts and a one-line summary (kept / skipped by reason)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise FineserveError(f"--dataset-path {path}: {e.strerror}") from None
    skipped: Counter[str] = Counter()
    texts: list[str] = []
    stripped = raw.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise FineserveError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        fmt = "JSON"
        for obj in data:
            t = _from_obj(obj)
            if t and t.strip():
                texts.append(t)
            else:
                skipped["no prompt text"] += 1
    else:
        fmt = "JSONL"
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skipped["malformed line"] += 1
                continue
            t = _from_obj(obj)
            if t and t.strip():
                texts.append(t)
            else:
                skipped["no prompt text"] += 1
    if not texts:
        raise FineserveError(
            f"{path}: no prompt text found ({fmt}; expected ShareGPT conversations, "
            "input_text, or prompt/text fields)"
        )
    summary = f"{path.name}: {len(texts)} prompts ({fmt})"
    if skipped:
        summary += "; skipped " + ", ".join(f"{n} {why}" for why, n in skipped.items())
    return texts, summary
