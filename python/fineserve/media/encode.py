"""Fast, distinct media files: PNG and JPEG images, WAV audio.

Every image gets distinct pixels (its tag, 16 bytes, written into its first row) so a
server's multimodal cache never hits by accident. Encoding a megapixel PNG from scratch
costs tens of milliseconds; here only the tagged first row is compressed per image. The
rest of the image (a gradient or noise "base", one per size) is compressed once, as a
raw deflate stream of its own, and spliced after the first row's stream:

- the first row's deflate data ends with a full flush (byte-aligned, not final), so the
  base's stream can follow it inside one zlib stream (the base never refers back into
  the first row: it was compressed alone);
- the zlib trailer's Adler-32 over all rows combines the first row's checksum with the
  base's precomputed one (``adler32_combine``, as zlib's own; Python's zlib module does
  not expose it);
- the base travels in an IDAT chunk of its own whose CRC is precomputed, and a ``tEXt``
  chunk of 0–2 padding bytes aligns that chunk to a multiple of 3 bytes in the file, so
  its base64 text is precomputed too.

A PNG decoder sees an ordinary file: signature, IHDR, tEXt, IDAT × 3, IEND. We write the
PNG container by hand (with the stdlib's zlib) because no image library can splice a
cached compressed body; JPEG (images and video frames) goes through Pillow each time
(slower: it says so).
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ADLER_BASE = 65521
#: Bytes of the per-image tag.
TAG_BYTES = 16


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """The Adler-32 of A+B from those of A and B and B's length (zlib's algorithm)."""
    rem = len2 % _ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % _ADLER_BASE
    sum1 += (adler2 & 0xFFFF) + _ADLER_BASE - 1
    sum2 += ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + _ADLER_BASE - rem
    if sum1 >= _ADLER_BASE:
        sum1 -= _ADLER_BASE
    if sum1 >= _ADLER_BASE:
        sum1 -= _ADLER_BASE
    if sum2 >= (_ADLER_BASE << 1):
        sum2 -= _ADLER_BASE << 1
    if sum2 >= _ADLER_BASE:
        sum2 -= _ADLER_BASE
    return sum1 | (sum2 << 16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def base_pixels(width: int, height: int, content: str, seed: int) -> np.ndarray:
    """The shared body of every image of one size: ``gradient`` (compresses to a few
    percent: small bodies) or ``noise`` (incompressible: bodies as large as raw pixels)."""
    if content == "noise":
        rng = np.random.default_rng([seed, width, height])
        return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    y = np.arange(height, dtype=np.uint32)[:, None]
    x = np.arange(width, dtype=np.uint32)[None, :]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    img[..., 1] = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    img[..., 2] = ((x + y + seed) % 256).astype(np.uint8)
    return img


@dataclass(frozen=True)
class Encoded:
    """A media file as base64 text in pieces (joined only once, into the request body: a
    noise image is megabytes, and every copy of it costs), and its size in bytes."""

    pieces: tuple[bytes, ...]
    nbytes: int

    def text(self) -> str:
        return b"".join(self.pieces).decode("ascii")

    def raw(self) -> bytes:
        return base64.b64decode(b"".join(self.pieces))


@dataclass
class _PngBase:
    width: int
    height: int
    first_row: bytes  # the untagged first row, filter byte included
    head: bytes  # signature + IHDR
    body_chunk: bytes  # IDAT with rows 1.. as raw deflate (CRC included)
    body_b64_aligned: bytes  # base64 of body_chunk[:len - len % 3]
    body_tail: bytes  # body_chunk's last len % 3 bytes
    body_adler: int
    body_len: int  # uncompressed bytes of rows 1..


@dataclass
class _JpegBase:
    pixels: np.ndarray


class MediaEncoder:
    """Encodes tagged images (PNG or JPEG) and WAV clips, keeping one base per size
    (least recently used dropped past ``max_bases``)."""

    def __init__(
        self, *, image_format: str = "png", content: str = "gradient", seed: int = 0
    ) -> None:
        if image_format not in ("png", "jpeg"):
            raise ValueError(image_format)
        if content not in ("gradient", "noise"):
            raise ValueError(content)
        self.image_format = image_format
        self.content = content
        self.seed = seed
        self.max_bases = 64
        #: Per (width, height, format): a PNG base, or the pixels JPEG frames are made from.
        self._bases: OrderedDict[tuple[int, int, str], _PngBase | _JpegBase] = OrderedDict()
        self.bases_built = 0

    @property
    def mime(self) -> str:
        return "image/png" if self.image_format == "png" else "image/jpeg"

    def _base(self, width: int, height: int, fmt: str) -> _PngBase | _JpegBase:
        key = (width, height, fmt)
        found = self._bases.get(key)
        if found is not None:
            self._bases.move_to_end(key)
            return found
        pixels = base_pixels(width, height, self.content, self.seed)
        built: _PngBase | _JpegBase
        if fmt == "jpeg":
            built = _JpegBase(pixels)
        else:
            built = self._png_base(pixels)
        self.bases_built += 1
        self._bases[key] = built
        while len(self._bases) > self.max_bases:
            self._bases.popitem(last=False)
        return built

    def _png_base(self, pixels: np.ndarray) -> _PngBase:
        height, width = pixels.shape[:2]
        flat = pixels.reshape(height, 3 * width)
        rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)
        rows[:, 1:] = flat
        if self.content != "noise":
            # PNG filter 2 ("Up": each byte less the byte above) on rows 1..: a gradient
            # becomes a few constants and compresses ~100×. Decoded rows then carry the
            # tagged first row's difference down its columns: still distinct pixels.
            rows[1:, 0] = 2
            rows[1:, 1:] = flat[1:] - flat[:-1]
        raw = rows.tobytes()
        stride = 1 + 3 * width
        first_row, rest = raw[:stride], raw[stride:]
        level = 1 if self.content == "noise" else 6
        comp = zlib.compressobj(level, zlib.DEFLATED, -15)
        body = comp.compress(rest) + comp.flush(zlib.Z_FINISH)
        body_chunk = _chunk(b"IDAT", body)
        cut = len(body_chunk) - len(body_chunk) % 3
        head = _PNG_SIGNATURE + _chunk(
            b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        )
        return _PngBase(
            width,
            height,
            first_row,
            head,
            body_chunk,
            base64.b64encode(body_chunk[:cut]),
            body_chunk[cut:],
            zlib.adler32(rest),
            len(rest),
        )

    def image(self, width: int, height: int, tag: bytes) -> Encoded:
        """The image of this size carrying ``tag`` (its first pixels)."""
        base = self._base(width, height, self.image_format)
        if isinstance(base, _JpegBase):
            return self._jpeg(base, tag)
        row = bytearray(base.first_row)
        n = min(len(tag), len(row) - 1)
        row[1 : 1 + n] = tag[:n]
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        first = comp.compress(bytes(row)) + comp.flush(zlib.Z_FULL_FLUSH)
        adler = adler32_combine(zlib.adler32(bytes(row)), base.body_adler, base.body_len)
        idat1 = _chunk(b"IDAT", b"\x78\x01" + first)
        # tEXt padding so that everything before the base's IDAT is a multiple of 3 bytes.
        fixed = len(base.head) + len(idat1) + 12 + len(b"fineserve\x00")
        pad = (-fixed) % 3
        text = _chunk(b"tEXt", b"fineserve\x00" + b"." * pad)
        prefix = base.head + text + idat1
        suffix = base.body_tail + _chunk(b"IDAT", struct.pack(">I", adler)) + _chunk(b"IEND", b"")
        size = len(prefix) + len(base.body_chunk) + len(suffix) - len(base.body_tail)
        pieces = (base64.b64encode(prefix), base.body_b64_aligned, base64.b64encode(suffix))
        return Encoded(pieces, size)

    def _jpeg(self, base: _JpegBase, tag: bytes) -> Encoded:
        from PIL import Image

        pixels = base.pixels.copy()
        # JPEG is lossy: the tag goes in as 8×8 blocks (one per bit), which survive it.
        bits = np.unpackbits(np.frombuffer(tag, dtype=np.uint8))
        h, w = pixels.shape[:2]
        per_row = max(w // 8, 1)
        for k, bit in enumerate(bits[: per_row * max(h // 8, 1)]):
            r, c = divmod(k, per_row)
            pixels[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 255 if bit else 0
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        return Encoded((base64.b64encode(data),), len(data))

    def video(self, frames: int, width: int, height: int, tag: bytes) -> Encoded:
        """A video as ``frames`` JPEG frames of this size (each tagged with the video's tag
        and its index), as vLLM's ``data:video/jpeg`` payload: the frames' base64 texts
        joined by commas."""
        base = self._base(width, height, "jpeg")
        assert isinstance(base, _JpegBase)
        pieces: list[bytes] = []
        total = 0
        for k in range(frames):
            frame = self._jpeg(base, tag[:-2] + k.to_bytes(2, "little"))
            pieces.extend((b",", *frame.pieces) if k else frame.pieces)
            total += frame.nbytes
        return Encoded(tuple(pieces), total)

    @staticmethod
    def wav(n_samples: int, tag: bytes, sample_rate: int) -> Encoded:
        """A 16-bit mono WAV of ``n_samples``: a quiet tone, its first samples the tag."""
        t = np.arange(n_samples, dtype=np.float64)
        pcm = (2000 * np.sin(2 * np.pi * 440.0 * t / sample_rate)).astype("<i2")
        k = min(len(tag) // 2, n_samples)
        pcm[:k] = np.frombuffer(tag[: 2 * k], dtype="<i2")
        data = pcm.tobytes()
        header = (
            b"RIFF"
            + struct.pack("<I", 36 + len(data))
            + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
            + b"data"
            + struct.pack("<I", len(data))
        )
        out = header + data
        return Encoded((base64.b64encode(out),), len(out))
