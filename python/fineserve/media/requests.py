"""A multimodal schedule's media as chat content parts, sized to their token budgets.

Per request, each image becomes an ``image_url`` part (a ``data:`` URI, or a URL under
``--mm-url-base``) whose pixel size the model family's processor turns into the item's
budget (:mod:`.budget`); each audio clip an ``input_audio`` part (WAV); each video a
``video_url`` part of JPEG frames (``data:video/jpeg``, as vLLM reads). Alongside go the
columns the records keep: per modality the item count, the tokens sent (the family's
count of what was actually sent) and the tokens scheduled, and the encoded bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..config import MediaConfig
from ..console import note
from ..errors import FineserveError
from ..schedule import Schedule
from .budget import (
    AUDIO_SAMPLE_RATE,
    ImageRule,
    ImageSize,
    ProcessorRule,
    VideoSize,
    audio_samples_for,
    image_rule,
    infer_family,
    video_size_for,
)
from .encode import Encoded, MediaEncoder

#: Record columns a multimodal run adds (int64 each).
MEDIA_RECORD_COLUMNS = (
    "image_count",
    "image_tokens",
    "image_tokens_scheduled",
    "image_bytes",
    "audio_count",
    "audio_tokens",
    "audio_tokens_scheduled",
    "audio_bytes",
    "video_count",
    "video_tokens",
    "video_tokens_scheduled",
    "video_bytes",
)
#: Earlier images kept per size for --mm-reuse to repeat.
_REUSE_POOL = 1024


def resolve_image_rule(cfg: MediaConfig, tokenizer: str | None, *, quiet: bool) -> ImageRule:
    """The family whose processor sizes the images: ``--mm-processor``, else
    ``--mm-model-family``, else the one ``--tokenizer``'s config names, else qwen2-vl
    (said in a note, as every default that changes the sizes)."""
    if cfg.processor is not None:
        return ProcessorRule(cfg.processor)
    if cfg.model_family is not None:
        return image_rule(cfg.model_family)
    inferred = infer_family(tokenizer)
    if inferred is not None:
        if not quiet:
            note(f"multimodal: images sized for {inferred} (from {tokenizer}'s config.json)")
        return image_rule(inferred)
    if not quiet:
        note(
            "multimodal: images sized for qwen2-vl's processor (28×28 px per token); "
            "--mm-model-family or --mm-processor to size for another model"
        )
    return image_rule("qwen2-vl")


@dataclass
class MediaChunk:
    """A chunk's media: per request the JSON text of its content parts, comma-separated,
    in pieces (empty for none), and the record columns (:data:`MEDIA_RECORD_COLUMNS`)."""

    parts: list[list[bytes]]
    columns: dict[str, npt.NDArray[np.int64]] = field(default_factory=dict)


class MediaRequests:
    """Turns the media lists of schedule chunks into content parts, in order."""

    def __init__(self, cfg: MediaConfig, rule: ImageRule, seed: int) -> None:
        self.cfg = cfg
        self.rule = rule
        self.encoder = MediaEncoder(image_format=cfg.image_format, content=cfg.content, seed=seed)
        self._sizes: dict[int, ImageSize] = {}
        self._video_sizes: dict[int, VideoSize] = {}
        # Tags: a per-run nonce (a server's cache outlives runs) and a running number.
        self._nonce = os.urandom(6)
        self._serial = 0
        self._rng = np.random.default_rng([seed, 0x7265])
        self._earlier: dict[tuple[int, int], list[bytes]] = {}
        self._written: set[str] = set()
        self.images = self.reused = self.off_budget = 0
        self.max_deviation = 0
        if cfg.url_base is not None:
            self.media_dir = cfg.media_dir or Path("fineserve-media")
            try:
                self.media_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise FineserveError(f"--mm-dir {self.media_dir}: {e.strerror or e}") from None

    def size_for(self, budget: int) -> ImageSize:
        size = self._sizes.get(budget)
        if size is None:
            size = self._sizes[budget] = self.rule.size_for(budget)
        return size

    def _tag(self, key: tuple[int, int]) -> tuple[bytes, bool]:
        earlier = self._earlier.setdefault(key, [])
        if self.cfg.reuse > 0 and earlier and self._rng.random() < self.cfg.reuse:
            return earlier[int(self._rng.integers(len(earlier)))], True
        self._serial += 1
        tag = self._nonce + self._serial.to_bytes(10, "little")
        if len(earlier) < _REUSE_POOL:
            earlier.append(tag)
        return tag, False

    def _url(self, media: Encoded, tag: bytes, ext: str) -> bytes:
        """The URL (JSON-quoted) a file written under ``--mm-url-base`` has."""
        name = f"{tag.hex()}.{ext}"
        if name not in self._written:
            path = self.media_dir / name
            try:
                path.write_bytes(media.raw())
            except OSError as e:
                raise FineserveError(f"cannot write {path}: {e.strerror or e}") from None
            self._written.add(name)
        assert self.cfg.url_base is not None
        return json.dumps(f"{self.cfg.url_base.rstrip('/')}/{name}").encode()

    def build(self, c: Schedule) -> MediaChunk:
        n = len(c)
        if self.cfg.url_base is not None and c.media_counts("video_tokens").any():
            raise FineserveError(
                "--mm-url-base: videos go as data: URIs of JPEG frames only (no video file "
                "is written); leave --mm-url-base out for a schedule with videos"
            )
        cols = {name: np.zeros(n, dtype=np.int64) for name in MEDIA_RECORD_COLUMNS}
        parts: list[list[bytes]] = [[] for _ in range(n)]
        self._images(c, parts, cols)
        self._audio(c, parts, cols)
        self._videos(c, parts, cols)
        return MediaChunk(parts, cols)

    @staticmethod
    def _items(c: Schedule, column: str) -> Iterator[tuple[int, int]]:
        """(request, budget) of each item in list column ``column``, in order."""
        values, offsets = c.lists[column]
        rows = np.repeat(np.arange(len(c)), np.diff(offsets))
        yield from zip(rows.tolist(), values[offsets[0] : offsets[-1]].tolist())

    @staticmethod
    def _add(pieces: list[bytes], *part: bytes) -> None:
        """Appends one content part's pieces (a comma first when it is not the first).
        base64 text and MIME types need no JSON escaping, and escaping megabytes would
        cost milliseconds an image, so the pieces go in as they are."""
        if pieces:
            pieces.append(b",")
        pieces.extend(part)

    def _images(
        self, c: Schedule, parts: list[list[bytes]], cols: dict[str, npt.NDArray[np.int64]]
    ) -> None:
        if "image_tokens" not in c.lists:
            return
        ext = "png" if self.cfg.image_format == "png" else "jpg"
        data_head = b'{"type":"image_url","image_url":{"url":"data:' + self.encoder.mime.encode()
        for i, budget in self._items(c, "image_tokens"):
            size = self.size_for(budget)
            tag, reused = self._tag((size.width, size.height))
            media = self.encoder.image(size.width, size.height, tag)
            if self.cfg.url_base is None:
                self._add(parts[i], data_head, b";base64,", *media.pieces, b'"}}')
            else:
                url = self._url(media, tag, ext)
                self._add(parts[i], b'{"type":"image_url","image_url":{"url":', url, b"}}")
            cols["image_tokens"][i] += size.tokens
            cols["image_tokens_scheduled"][i] += budget
            cols["image_bytes"][i] += media.nbytes
            deviation = abs(size.tokens - budget)
            self.max_deviation = max(self.max_deviation, deviation)
            self.off_budget += deviation > max(1, 0.02 * budget)
            self.images += 1
            self.reused += reused
        cols["image_count"][:] = c.media_counts("image_tokens")

    def _audio(
        self, c: Schedule, parts: list[list[bytes]], cols: dict[str, npt.NDArray[np.int64]]
    ) -> None:
        if "audio_tokens" not in c.lists:
            return
        for i, budget in self._items(c, "audio_tokens"):
            samples, tokens = audio_samples_for(budget)
            tag, _ = self._tag((samples, 0))
            media = self.encoder.wav(samples, tag, AUDIO_SAMPLE_RATE)
            if self.cfg.url_base is not None:
                url = self._url(media, tag, "wav")
                self._add(parts[i], b'{"type":"audio_url","audio_url":{"url":', url, b"}}")
            else:
                self._add(
                    parts[i],
                    b'{"type":"input_audio","input_audio":{"data":"',
                    *media.pieces,
                    b'","format":"wav"}}',
                )
            cols["audio_tokens"][i] += tokens
            cols["audio_tokens_scheduled"][i] += budget
            cols["audio_bytes"][i] += media.nbytes
        cols["audio_count"][:] = c.media_counts("audio_tokens")

    def _videos(
        self, c: Schedule, parts: list[list[bytes]], cols: dict[str, npt.NDArray[np.int64]]
    ) -> None:
        if "video_tokens" not in c.lists:
            return
        for i, budget in self._items(c, "video_tokens"):
            size = self._video_sizes.get(budget)
            if size is None:
                size = self._video_sizes[budget] = video_size_for(budget)
            tag, _ = self._tag((size.width, -size.height))
            media = self.encoder.video(size.frames, size.width, size.height, tag)
            self._add(
                parts[i],
                b'{"type":"video_url","video_url":{"url":"data:video/jpeg;base64,',
                *media.pieces,
                b'"}}',
            )
            cols["video_tokens"][i] += size.tokens
            cols["video_tokens_scheduled"][i] += budget
            cols["video_bytes"][i] += media.nbytes
        cols["video_count"][:] = c.media_counts("video_tokens")

    def summary(self) -> dict[str, object]:
        """What the run's media were: for the results' JSON."""
        return {
            "image_family": self.rule.name,
            "image_format": self.cfg.image_format,
            "image_content": self.cfg.content,
            "images_encoded": self.images,
            "images_reused": self.reused,
            "image_bases_built": self.encoder.bases_built,
            "images_off_budget": self.off_budget,
            "image_max_token_deviation": self.max_deviation,
            "media_url_base": self.cfg.url_base,
        }
