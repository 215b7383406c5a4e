"""Prompts with exactly the schedule's input length under a Hugging Face tokenizer.

FineServe adjusts each prompt to its target length by repeating or truncating source
tokens. Doing that per request (encode, cut, decode, re-encode) costs four tokenizer passes
per prompt; here the source text is tokenized *once* into a pool, and a prompt is a
substring of the pool text between two token boundaries, so building one costs a string
slice. Only cuts that the tokenizer cannot merge across are used ("safe" cuts: before a
token that starts with a space followed by a letter, after a non-space character), so a
prompt assembled from pool windows re-tokenizes to the same tokens.

Checking: re-encoding every prompt costs ~20× building it (66 M tokens: 57 s vs 1.9 s on
the 2-vCPU dev machine), so by default (``check="sample"``) a random sample of each chunk
(1 %, at least 256 prompts) is re-encoded. A prompt that differs is repaired (re-cut or
padded through the tokenizer) or, failing that, reported with its true length recorded;
and once any sampled prompt differs, every later prompt is checked (``check="all"`` does
that from the start). The mismatch rate is always reported.

- Unintended prefix sharing: each prompt starts with its own request tag (``#<hex id>``)
  and a window at its own offset, so a prefix cache sees only intended sharing.
- Intended sharing: requests with ``hash_ids`` (Mooncake / Qwen-Bailian) are built block
  by block: equal block ids give identical token blocks of ``block_size`` tokens, so a
  prefix cache sees the trace's sharing (a partial last block is its own window of its
  length: equal id and length, equal tokens). Each block opens with its id (``[id]``), so
  different ids never give equal blocks, however small the source text. Such prompts
  carry no request tag: their first block *is* their identity.
  Shared-prefix groups (``shared_prefix_groups`` × ``shared_prefix_len``): request i starts
  with group (i mod groups)'s prefix, then its own tag and text; a request shorter than
  the prefix is the prefix's start.
- ``--apply-chat-template``: the user message is sized so that the templated prompt (as a
  completions-API prompt) has exactly ``input_len`` tokens.
- Special tokens: a completions prompt's length counts the special tokens the tokenizer adds
  (Llama's BOS), since the server adds them too; a BOS the chat template writes is
  dropped, as FineServe does, so the prompt does not start with two.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FineserveError
from .synthetic import _VOCAB

#: Smallest pool, in tokens (windows start at distinct offsets of the pool).
MIN_POOL_TOKENS = 1 << 18
CHECK_MODES = ("sample", "all", "off")
#: What FineServe's Generator puts after --prompt-suffix, to end every prompt.
ASSISTANT_SUFFIX = "Assistant:"


def load_tokenizer(name_or_path: str) -> Any:
    """``transformers.AutoTokenizer`` from a local directory, or a hub name already in the
    local cache (never the network: a load generator may run where there is none)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise FineserveError("--tokenizer needs the transformers package") from None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise FineserveError(
                f"--tokenizer {name_or_path}: the directory has no tokenizer.json or "
                "tokenizer_config.json"
            )
    elif path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FineserveError(
            f"--tokenizer {name_or_path}: no such directory (pass a local tokenizer "
            "directory, or a Hugging Face name already in the local cache)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FineserveError(
            f"--tokenizer {name_or_path}: cannot load it offline ({first[:200]}); pass a "
            "local directory with tokenizer.json, or a name already in the Hugging Face cache"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise FineserveError(
            f"--tokenizer {name_or_path}: a fast (Rust) tokenizer is needed for offsets"
        )
    return tok


def tokenizer_fingerprint(tok: Any) -> str:
    """Identifies the tokenizer's behaviour (its serialized form), for the prompt cache."""
    try:
        raw = tok.backend_tokenizer.to_str()
    except Exception:  # any tokenizer without a serializable backend
        raw = f"{type(tok).__name__}:{getattr(tok, 'name_or_path', '')}:{len(tok)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _synthetic_text(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    pick = np.asarray(_VOCAB)[rng.integers(0, len(_VOCAB), size=words)]
    # Sentences, so the text looks like text to a tokenizer (punctuation, capitals).
    out = []
    for i, w in enumerate(pick.tolist()):
        out.append(w.capitalize() if i % 12 == 0 else w)
        if i % 12 == 11:
            out[-1] += "."
    return " " + " ".join(out)


@dataclass
class BuildReport:
    prompts: int = 0
    checked: int = 0
    repaired: int = 0
    mismatched: int = 0
    #: (request index, wanted, actual) of the first few mismatches.
    examples: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, other: BuildReport) -> None:
        self.prompts += other.prompts
        self.checked += other.checked
        self.repaired += other.repaired
        self.mismatched += other.mismatched
        self.examples = (self.examples + other.examples)[:5]

    def summary(self) -> str:
        rate = self.mismatched / self.checked if self.checked else 0.0
        text = (
            f"{self.prompts} prompts built to exact token lengths; {self.checked} re-encoded to "
            f"check, {self.repaired} repaired, {self.mismatched} still off ({100 * rate:.3f} %)"
        )
        if self.examples:
            text += "; e.g. " + ", ".join(f"#{i}: {w}→{a}" for i, w, a in self.examples[:3])
        return text


class TokenPool:
    """Source text tokenized once, with the positions where a prompt may be cut."""

    def __init__(
        self, tokenizer: Any, text: str, min_tokens: int, cache_dir: Path | None = None
    ) -> None:
        if not text.strip():
            raise FineserveError("the prompt source text is empty")
        probe = tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
        per_char = max(len(probe), 1) / min(len(text), 200_000)
        copies = max(2, int(np.ceil(min_tokens / max(per_char * len(text), 1))) + 1)
        self.text = text * copies
        key = hashlib.sha256(
            f"{tokenizer_fingerprint(tokenizer)}|{copies}|".encode() + text.encode()
        ).hexdigest()[:24]
        cached = self._load(cache_dir, key)
        if cached is not None:
            self.ids, offsets = cached
            self.cached = True
        else:
            enc = tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
            self.ids = np.asarray(enc["input_ids"], dtype=np.int64)
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            self.cached = False
            self._save(cache_dir, key, offsets)
        self.char_start = np.append(offsets[:, 0], len(self.text))
        n = len(self.ids)
        chars = np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32)
        space = np.uint32(ord(" "))
        c = self.char_start[:n]
        nxt = chars[np.minimum(c + 1, len(chars) - 1)]
        prev = chars[np.maximum(c - 1, 0)]
        is_letter = ((nxt | 0x20) >= ord("a")) & ((nxt | 0x20) <= ord("z"))
        prev_ws = np.isin(prev, [ord(" "), ord("\n"), ord("\t"), ord("\r")])
        # A token must also start exactly where the previous one ended (no byte split).
        aligned = np.append([True], offsets[1:, 0] == offsets[:-1, 1])
        self.safe = np.append((chars[c] == space) & is_letter & ~prev_ws & aligned & (c > 0), True)
        self.safe_pos = np.flatnonzero(self.safe[:-1])
        if len(self.safe_pos) < 16:
            raise FineserveError(
                "the prompt source has too few word boundaries for this tokenizer to cut at"
            )
        self.n = n

    @staticmethod
    def _load(cache_dir: Path | None, key: str) -> tuple[Any, Any] | None:
        if cache_dir is None:
            return None
        path = cache_dir / f"pool-{key}.npz"
        try:
            with np.load(path) as z:
                return z["ids"], z["offsets"]
        except (OSError, KeyError, ValueError):
            return None

    def _save(self, cache_dir: Path | None, key: str, offsets: npt.NDArray[np.int64]) -> None:
        if cache_dir is None:
            return
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_dir / f"pool-{key}.tmp.npz"
            np.savez(tmp, ids=self.ids, offsets=offsets)
            tmp.replace(cache_dir / f"pool-{key}.npz")  # atomic: no half-written cache
        except OSError:
            pass  # a cache that cannot be written only costs time

    def window(self, start_hint: int, length: int) -> tuple[int, int]:
        """(first token, end token) of a window of exactly ``length`` tokens starting at a
        safe cut at or after ``start_hint`` and ending at a safe cut."""
        if length <= 0:
            return 0, 0
        if length >= self.n - 1:
            raise FineserveError(f"internal: window of {length} tokens exceeds the pool")
        k = int(np.searchsorted(self.safe_pos, start_hint % (self.n - length)))
        tries = 0
        while True:
            if k >= len(self.safe_pos) or self.safe_pos[k] + length > self.n:
                k = 0
            s = int(self.safe_pos[k])
            if self.safe[s + length]:
                return s, s + length
            k += 1
            tries += 1
            if tries > 4096:  # no safe end at this length nearby: accept an unsafe end
                return s, s + length

    def text_of(self, s: int, e: int) -> str:
        return self.text[self.char_start[s] : self.char_start[e]]


def _mix(x: int) -> int:
    """splitmix64: spreads request indices and block ids over the pool."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class TokenizedPromptBuilder:
    """Builds prompts of exact token length; see the module docstring."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        source_text: str | None = None,
        seed: int = 0,
        max_input_len: int = 4096,
        block_size: int = 512,
        apply_chat_template: bool = False,
        prompt_suffix: str = "",
        shared_prefix_groups: int = 0,
        shared_prefix_len: int = 0,
        cache_dir: Path | None = None,
        check: str = "sample",
        count_special_tokens: bool = True,
    ) -> None:
        if block_size < 1:
            raise FineserveError("--prefix-block-size must be >= 1")
        self.tok = tokenizer
        self.seed = seed
        # A server tokenizes a completions prompt *with* the tokenizer's special tokens
        # (Llama's BOS), so they count towards the input length; a chat prompt is the
        # user message, wrapped by the server's template, so they do not.
        self.special_len = (
            int(tokenizer.num_special_tokens_to_add(pair=False)) if count_special_tokens else 0
        )
        self.block_size = block_size
        # FineServe's --prompt-suffix: the suffix, then "Assistant:" to end the prompt.
        self.suffix = prompt_suffix + ASSISTANT_SUFFIX if prompt_suffix else ""
        self.suffix_len = (
            len(tokenizer(self.suffix, add_special_tokens=False)["input_ids"]) if self.suffix else 0
        )
        self.groups, self.prefix_len = shared_prefix_groups, shared_prefix_len
        text = source_text if source_text else _synthetic_text(seed, 200_000)
        self._text, self._cache_dir = text, cache_dir
        self.pool = TokenPool(tokenizer, text, self._pool_need(max_input_len), cache_dir)
        self.check_all = False
        self._tag_len_of_block: dict[int, int] = {}
        if check not in CHECK_MODES:
            raise FineserveError(f"--prompt-check must be one of {', '.join(CHECK_MODES)}")
        self.check = check
        self.report = BuildReport()
        self.template: tuple[str, str] | None = None
        self.template_len = 0
        if apply_chat_template:
            self._prepare_template()
        source_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.fingerprint = hashlib.sha256(
            f"{tokenizer_fingerprint(tokenizer)}|{source_hash}|{seed}|{block_size}|"
            f"{apply_chat_template}|{prompt_suffix}|{shared_prefix_groups}|{shared_prefix_len}".encode()
        ).hexdigest()[:16]

    exact = True

    @property
    def extends_turns(self) -> bool:
        """Turns extend their history unless a chat template wraps every prompt."""
        return self.template is None

    def continuation(self, index: int, answer_tokens: int, new_tokens: int) -> str:
        """Text of exactly ``answer_tokens + new_tokens`` tokens to append to a previous
        turn's prompt: an answer, then the new turn's own tag and text."""
        return "".join(self.continuation_parts(index, answer_tokens, new_tokens))

    def continuation_parts(
        self, index: int, answer_tokens: int, new_tokens: int
    ) -> tuple[str, str]:
        """The stand-in answer to the previous turn, and the new turn's own tag and text."""
        s, e = self.pool.window(_mix(index * 31 + 7), answer_tokens) if answer_tokens else (0, 0)
        tag = self._tag(index)
        tag_len = len(self.tok(tag, add_special_tokens=False)["input_ids"])
        if new_tokens > tag_len:
            ts, te = self.pool.window(_mix(index + 12345), new_tokens - tag_len)
            own = tag + self.pool.text_of(ts, te)
        else:
            ts, te = self.pool.window(_mix(index + 12345), new_tokens)
            own = self.pool.text_of(ts, te)
        return self.pool.text_of(s, e), own

    def build_chunk(
        self, base_index: int, schedule: Any, *, record: bool = True
    ) -> tuple[list[str], Any]:
        """Prompts of a schedule chunk and their checked token counts (``record``: count
        them in the run's report; off for warm-up prompts)."""
        prompts, actual, report = self.build(
            base_index,
            schedule.input_len,
            schedule.hash_ids,
            schedule.hash_offsets,
        )
        if record:
            self.report.add(report)
        return prompts, actual

    def _prepare_template(self) -> None:
        if not getattr(self.tok, "chat_template", None):
            raise FineserveError("--apply-chat-template: the tokenizer has no chat template")
        marker = "\x00FINESERVE\x00"
        rendered = self.tok.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        if marker not in rendered:
            raise FineserveError("--apply-chat-template: the template drops the user message")
        head, tail = rendered.split(marker, 1)
        bos = getattr(self.tok, "bos_token", None)
        if self.special_len and bos and head.startswith(bos):
            # The template writes BOS and the server's tokenizer adds it again: FineServe
            # strips the template's, so the prompt starts with one.
            head = head[len(bos) :]
        self.template = (head, tail)
        self.template_len = len(self.tok(head + tail, add_special_tokens=False)["input_ids"])

    def _tag(self, index: int) -> str:
        return f"#{index:x}:"

    def _pool_need(self, max_len: int) -> int:
        return max(MIN_POOL_TOKENS, 2 * (max_len + self.block_size) + 1024)

    def _ensure_pool(self, max_len: int) -> None:
        """A longer prompt than the pool was sized for (a streamed schedule shows its
        lengths chunk by chunk): the pool is re-made, larger (and cached)."""
        if self._pool_need(max_len) > self.pool.n:
            self.pool = TokenPool(self.tok, self._text, self._pool_need(max_len), self._cache_dir)

    def build(
        self,
        base_index: int,
        input_len: npt.NDArray[np.int64],
        hash_ids: npt.NDArray[np.int64] | None = None,
        hash_offsets: npt.NDArray[np.int64] | None = None,
        *,
        check: str | None = None,
    ) -> tuple[list[str], npt.NDArray[np.int64], BuildReport]:
        """Prompts for requests ``base_index + i``; returns them, their token counts as
        checked (the target unless a mismatch survived), and a report. ``check`` defaults
        to the builder's."""
        n = len(input_len)
        if n:
            self._ensure_pool(int(np.max(input_len)))
        overhead = self.template_len + self.suffix_len + self.special_len
        tags = [self._tag(base_index + i) for i in range(n)]
        tag_lens = [len(x) for x in self.tok(tags, add_special_tokens=False)["input_ids"]]
        prompts: list[str] = []
        must_check: list[int] = []
        for i in range(n):
            idx = base_index + i
            body_len = int(input_len[i]) - overhead
            if hash_ids is not None and hash_offsets is not None:
                blocks = hash_ids[hash_offsets[i] : hash_offsets[i + 1]]
                body = self._blocks(blocks, body_len, idx)
            elif self.groups > 0 and self.prefix_len > 0:
                g = idx % self.groups
                s, e = self.pool.window(_mix(self.seed * 1_000_003 + g), self.prefix_len)
                shared = min(self.prefix_len, body_len)
                if shared < self.prefix_len:
                    # A prompt shorter than the prefix is the prefix's start; that cut is
                    # not a safe one, so this prompt is always checked.
                    must_check.append(i)
                rest = body_len - shared
                tail = ""
                if rest > 0:
                    tag = tags[i] if rest > tag_lens[i] else ""
                    ts, te = self.pool.window(_mix(idx + 17), rest - (tag_lens[i] if tag else 0))
                    tail = tag + self.pool.text_of(ts, te)
                body = self.pool.text_of(s, s + shared) + tail
            else:
                if body_len > tag_lens[i]:
                    s, e = self.pool.window(_mix(self.seed * 7919 + idx), body_len - tag_lens[i])
                    body = tags[i] + self.pool.text_of(s, e)
                else:
                    s, e = self.pool.window(_mix(idx), max(body_len, 1))
                    body = self.pool.text_of(s, e)
            prompts.append(self._wrap(body))
        report = BuildReport(prompts=n)
        actual = np.asarray(input_len, dtype=np.int64).copy()
        check = check or self.check
        if check not in CHECK_MODES:
            raise FineserveError(f"--prompt-check must be one of {', '.join(CHECK_MODES)}")
        if n and check != "off":
            rows = np.arange(n)
            if check == "sample" and not self.check_all:
                k = min(n, max(256, n // 100))
                rng = np.random.default_rng(base_index + self.seed)
                rows = np.union1d(
                    rng.choice(n, size=k, replace=False), np.asarray(must_check, dtype=np.int64)
                )
            self._verify(prompts, actual, rows, base_index, report)
            if report.repaired or report.mismatched:
                if len(rows) < n:  # a sampled prompt was off: check the rest as well
                    unchecked = np.setdiff1d(np.arange(n, dtype=np.int64), rows)
                    self._verify(prompts, actual, unchecked, base_index, report)
                self.check_all = True
        return prompts, actual, report

    def _block_tag_lens(self, ids: list[int]) -> dict[int, int]:
        """Token counts of the block tags of ``ids`` (memoized: block ids recur)."""
        new = [b for b in set(ids) if b not in self._tag_len_of_block]
        if new:
            enc = self.tok([self._block_tag(b) for b in new], add_special_tokens=False)
            self._tag_len_of_block.update(zip(new, (len(x) for x in enc["input_ids"])))
        return self._tag_len_of_block

    @staticmethod
    def _block_tag(block_id: int) -> str:
        # A leading space: right after the previous block's last token ("." for one) a bare
        # "[" would merge with it (".[" is one token in common BPEs), so the block boundary
        # would drift by a token and a prefix cache would miss a block the trace shares.
        return f" [{block_id}]"

    def _blocks(self, blocks: npt.NDArray[np.int64], body_len: int, idx: int) -> str:
        if not len(blocks):
            s, e = self.pool.window(_mix(idx), max(body_len, 1))
            return self.pool.text_of(s, e)
        parts = []
        left = body_len
        ids = blocks.tolist()
        tag_lens = self._block_tag_lens(ids)
        for b in ids:
            if left <= 0:
                break
            take = min(self.block_size, left)
            # Each block opens with its id: windows of the pool may repeat (a small dataset
            # is the pool many times over), and two ids whose blocks matched would give a
            # prefix cache hits the trace does not have.
            if take > tag_lens[b]:
                tag, window_len = self._block_tag(b), take - tag_lens[b]
            else:
                tag, window_len = "", take
            s, e = self.pool.window(_mix(int(b) * 2 + 1) ^ self.seed, window_len)
            parts.append(tag + self.pool.text_of(s, e))
            left -= take
        if left > 0:  # more tokens than blocks cover: a request-unique tail
            s, e = self.pool.window(_mix(idx + 99991), left)
            parts.append(self.pool.text_of(s, e))
        return "".join(parts)

    def _wrap(self, body: str) -> str:
        text = body + self.suffix
        if self.template is not None:
            head, tail = self.template
            # The body starts with a space (a safe cut); after the template's newline it
            # would be a separate whitespace token, so it is dropped and counted back.
            return head + text + tail
        return text

    def _verify(
        self,
        prompts: list[str],
        actual: npt.NDArray[np.int64],
        rows: npt.NDArray[np.int64],
        base: int,
        report: BuildReport,
    ) -> None:
        lens = self._lengths([prompts[i] for i in rows.tolist()]) + self.special_len
        report.checked += len(rows)
        bad = rows[lens != actual[rows]]
        for i in bad.tolist():
            want = int(actual[i])
            fixed = self._repair(prompts[i], want - self.special_len)
            if fixed is not None:
                prompts[i] = fixed
                report.repaired += 1
            else:
                got = int(self._lengths([prompts[i]])[0]) + self.special_len
                actual[i] = got
                report.mismatched += 1
                if len(report.examples) < 5:
                    report.examples.append((base + i, want, got))

    def _lengths(self, prompts: Sequence[str]) -> npt.NDArray[np.int64]:
        ids = self.tok(list(prompts), add_special_tokens=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(prompts))

    def _repair(self, prompt: str, want: int) -> str | None:
        """Cut or pad through the tokenizer itself (slow, for the rare prompt whose pieces
        merged differently): up to three rounds."""
        text = prompt
        for _ in range(3):
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) == want:
                return text
            if len(ids) > want:
                text = self.tok.decode(ids[:want])
            else:
                s, e = self.pool.window(_mix(len(text)), want - len(ids))
                text = text + self.pool.text_of(s, e)
        return text if len(self.tok(text, add_special_tokens=False)["input_ids"]) == want else None


def source_text_from(texts: Sequence[str]) -> str:
    """One pool text from dataset prompts: each starts a new paragraph with a space, so
    cuts fall inside sentences as in real prompts."""
    return "".join(" " + t.strip().replace("\r", "") + "\n" for t in texts if t and t.strip())


def prompt_cache_dir() -> Path:
    return Path(os.environ.get("FINESERVE_CACHE", Path.home() / ".cache" / "fineserve")) / "prompts"
