"""Media sized to a token budget: which image (or audio clip) a model's processor turns into
exactly the scheduled number of tokens.

Each family states its processor's counting rule, ``tokens(width, height)``, and the
search for a size that meets a budget. The rules follow the models' published processors
(Hugging Face ``transformers`` and vLLM):

- ``qwen2-vl`` (Qwen2-VL, Qwen2.5-VL): ``smart_resize`` rounds each side to a multiple of
  28 px (14 px patches merged 2×2) within [min_pixels, max_pixels]; one token per 28×28.
- ``qwen3-vl``: the same with 16 px patches, so 32×32 px per token.
- ``llava-1.5``: every image is resized to 336×336: always 576 tokens.
- ``llava-next`` (LLaVA-1.6 "anyres"): a 336 px base view (576) plus the unpadded features
  of the best-fitting grid of 336 px tiles, plus one newline token per feature row.
- ``internvl`` (InternVL 2/2.5/3): 448 px tiles, 256 tokens each, the grid closest to the
  image's aspect ratio with at most 12 tiles, plus a thumbnail tile when there are several.

A budget no size can meet exactly gets the nearest representable count; callers record
the deviation. Videos (Qwen2-VL's video processor) are JPEG frames: two frames a temporal
patch, each frame 128–768 grid tokens, at most 32 frames (vLLM's default cap). Audio
(``whisper-25hz``: Qwen2-Audio, Qwen2.5-Omni's audio tower): 16 kHz samples, 160-sample
mel frames, two stride-2 stages: one token per 40 ms.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from ..errors import FineserveError

#: Image families with a built-in rule, and the ``model_type`` values that select them.
IMAGE_FAMILIES = ("qwen2-vl", "qwen3-vl", "llava-1.5", "llava-next", "internvl")
_MODEL_TYPES = {
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2-vl",
    "qwen2_5_omni": "qwen2-vl",
    "qwen3_vl": "qwen3-vl",
    "qwen3_vl_moe": "qwen3-vl",
    "llava": "llava-1.5",
    "llava_next": "llava-next",
    "internvl": "internvl",
    "internvl_chat": "internvl",
}


@dataclass(frozen=True)
class ImageSize:
    """An image's pixel size and the tokens the family's processor makes of it."""

    width: int
    height: int
    tokens: int


class ImageRule(Protocol):
    @property
    def name(self) -> str: ...

    def tokens(self, width: int, height: int) -> int: ...

    def size_for(self, budget: int) -> ImageSize: ...


# ------------------------------------------------------------------------ Qwen-VL family


@dataclass(frozen=True)
class QwenVLRule:
    """Qwen2-VL's ``smart_resize``: sides rounded to ``factor`` px, the area kept within
    [min_pixels, max_pixels]; tokens = (h / factor) × (w / factor)."""

    name: str
    factor: int
    min_pixels: int
    max_pixels: int
    #: smart_resize refuses images more elongated than this.
    max_aspect: float = 200.0

    def resized(self, width: int, height: int) -> tuple[int, int]:
        f = self.factor
        if max(height, width) / min(height, width) > self.max_aspect:
            raise FineserveError(
                f"{self.name}: aspect ratio above {self.max_aspect:g} ({width}×{height})"
            )
        h = max(f, round(height / f) * f)
        w = max(f, round(width / f) * f)
        if h * w > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            h = max(f, math.floor(height / beta / f) * f)
            w = max(f, math.floor(width / beta / f) * f)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / f) * f
            w = math.ceil(width * beta / f) * f
        return w, h

    def tokens(self, width: int, height: int) -> int:
        w, h = self.resized(width, height)
        return (w // self.factor) * (h // self.factor)

    @property
    def token_range(self) -> tuple[int, int]:
        per = self.factor * self.factor
        return math.ceil(self.min_pixels / per), self.max_pixels // per

    def size_for(self, budget: int) -> ImageSize:
        """The most nearly square grid of ``a × b`` tokens (``a <= b``) with ``a·b`` the
        budget, or the nearest count that has one; sides at whole multiples of the
        factor, so the processor resizes nothing."""
        lo, hi = self.token_range
        target = min(max(budget, lo), hi)
        for delta in range(0, hi):
            for t in (target - delta, target + delta) if delta else (target,):
                if lo <= t <= hi:
                    grid = self._grid(t)
                    if grid is not None:
                        a, b = grid
                        return ImageSize(b * self.factor, a * self.factor, t)
        raise FineserveError(f"{self.name}: no image size for {budget} tokens")

    def _grid(self, t: int) -> tuple[int, int] | None:
        for a in range(math.isqrt(t), 0, -1):
            if t % a == 0:
                b = t // a
                return (a, b) if b / a <= self.max_aspect else None
        return None


QWEN2_VL = QwenVLRule("qwen2-vl", 28, 56 * 56, 28 * 28 * 16384)
QWEN3_VL = QwenVLRule("qwen3-vl", 32, 65536, 16777216)


# ------------------------------------------------------------------------ LLaVA-1.5


@dataclass(frozen=True)
class FixedRule:
    """Every image becomes the same number of tokens (resized to one square)."""

    name: str
    side: int
    fixed_tokens: int

    def tokens(self, width: int, height: int) -> int:
        return self.fixed_tokens

    def size_for(self, budget: int) -> ImageSize:
        return ImageSize(self.side, self.side, self.fixed_tokens)


LLAVA_15 = FixedRule("llava-1.5", 336, 576)


# ------------------------------------------------------------------------ tiled families


class _CandidateRule:
    """A rule without a closed-form inverse: the budget's size is the nearest among a
    fixed set of candidate sizes (computed once per rule)."""

    name: str

    def tokens(self, width: int, height: int) -> int:
        raise NotImplementedError

    def candidates(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def size_for(self, budget: int) -> ImageSize:
        table = _candidate_table(self)
        best = min(table, key=lambda s: (abs(s.tokens - budget), s.width * s.height))
        return best


@lru_cache(maxsize=8)
def _candidate_table(rule: _CandidateRule) -> list[ImageSize]:
    seen: dict[int, ImageSize] = {}
    for w, h in rule.candidates():
        t = rule.tokens(w, h)
        if t not in seen or w * h < seen[t].width * seen[t].height:
            seen[t] = ImageSize(w, h, t)
    return sorted(seen.values(), key=lambda s: s.tokens)


class LlavaNextRule(_CandidateRule):
    """LLaVA-1.6 anyres (as vLLM's ``LlavaNextProcessingInfo.get_num_image_tokens``)."""

    name = "llava-next"
    tile = 336
    patches = 24  # 336 / 14
    pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

    def _best_resolution(self, height: int, width: int) -> tuple[int, int]:
        best, best_eff, best_waste = self.pinpoints[0], -1, math.inf
        for h, w in self.pinpoints:
            scale = min(w / width, h / height)
            dw, dh = int(width * scale), int(height * scale)
            eff = min(dw * dh, width * height)
            waste = w * h - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (h, w), eff, waste
        return best

    def tokens(self, width: int, height: int) -> int:
        h, w = self._best_resolution(height, width)
        rows, cols = h // self.tile, w // self.tile
        cur_h, cur_w = self.patches * rows, self.patches * cols
        if width / height > cur_w / cur_h:
            new_h = int(round(height * (cur_w / width), 7))
            cur_h -= 2 * ((cur_h - new_h) // 2)
        else:
            new_w = int(round(width * (cur_h / height), 7))
            cur_w -= 2 * ((cur_w - new_w) // 2)
        return self.patches * self.patches + cur_h * cur_w + cur_h

    def candidates(self) -> list[tuple[int, int]]:
        out = []
        for h, w in self.pinpoints:
            # Narrowing one side of a pinpoint trims feature rows or columns.
            for k in range(1, 25):
                out.append((w, max(1, h * k // 24)))
                out.append((max(1, w * k // 24), h))
        return out


class InternVLRule(_CandidateRule):
    """InternVL dynamic tiling (``dynamic_preprocess`` with ``use_thumbnail``)."""

    name = "internvl"
    tile = 448
    tile_tokens = 256
    max_tiles = 12

    def _ratios(self) -> list[tuple[int, int]]:
        found = {
            (i, j)
            for n in range(1, self.max_tiles + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if 1 <= i * j <= self.max_tiles
        }
        return sorted(found, key=lambda r: r[0] * r[1])

    def tokens(self, width: int, height: int) -> int:
        aspect = width / height
        area = width * height
        best, best_diff = (1, 1), math.inf
        for i, j in self._ratios():
            diff = abs(aspect - i / j)
            if diff < best_diff:
                best, best_diff = (i, j), diff
            elif diff == best_diff and area > 0.5 * self.tile * self.tile * i * j:
                best = (i, j)
        n = best[0] * best[1]
        return self.tile_tokens * (n + (1 if n > 1 else 0))

    def candidates(self) -> list[tuple[int, int]]:
        return [(self.tile * i, self.tile * j) for i, j in self._ratios()]


LLAVA_NEXT = LlavaNextRule()
INTERNVL = InternVLRule()

_RULES: dict[str, ImageRule] = {
    "qwen2-vl": QWEN2_VL,
    "qwen3-vl": QWEN3_VL,
    "llava-1.5": LLAVA_15,
    "llava-next": LLAVA_NEXT,
    "internvl": INTERNVL,
}


def image_rule(family: str) -> ImageRule:
    if family not in _RULES:
        raise FineserveError(
            f"unknown --mm-model-family {family!r}; choose from {', '.join(IMAGE_FAMILIES)}"
        )
    return _RULES[family]


def infer_family(model_dir: str | Path | None) -> str | None:
    """The family named by a local model or processor directory's ``config.json``
    (``model_type``), or None when there is none or it names no known family."""
    if model_dir is None:
        return None
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    kind = str(cfg.get("model_type", ""))
    return _MODEL_TYPES.get(kind)


# ------------------------------------------------------------------------ a local processor


class ProcessorRule:
    """The counting rule of a local Hugging Face image processor (``--mm-processor DIR``),
    run offline: supported when it reports ``image_grid_thw`` and a ``merge_size`` (the
    Qwen-VL family and its relatives), whose grid gives the tokens directly. Sizes come
    from the built-in search on the processor's own patch, merge and pixel limits, each
    checked by running the processor once."""

    def __init__(self, directory: str | Path) -> None:
        try:
            from transformers import AutoImageProcessor
        except ImportError as e:  # pragma: no cover - transformers is a dependency
            raise FineserveError(f"--mm-processor needs transformers ({e})") from None
        try:
            proc: Any = AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                str(directory), local_files_only=True
            )
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FineserveError(f"--mm-processor {directory}: cannot load ({first})") from None
        patch = getattr(proc, "patch_size", None)
        merge = getattr(proc, "merge_size", None)
        size = getattr(proc, "size", None) or {}
        min_px = getattr(proc, "min_pixels", None) or size.get("shortest_edge")
        max_px = getattr(proc, "max_pixels", None) or size.get("longest_edge")
        if not (patch and merge and min_px and max_px):
            raise FineserveError(
                f"--mm-processor {directory}: {type(proc).__name__} does not report an image "
                "grid (patch_size, merge_size, min/max pixels); supported are Qwen-VL-style "
                "processors; use --mm-model-family for the others"
            )
        self.name = f"processor:{Path(directory).name}"
        self._proc = proc
        self._merge = int(merge)
        self._search = QwenVLRule(self.name, int(patch) * int(merge), int(min_px), int(max_px))

    def tokens(self, width: int, height: int) -> int:
        from PIL import Image

        out = self._proc(images=[Image.new("RGB", (width, height))], return_tensors="np")
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        return t * h * w // (self._merge * self._merge)

    def size_for(self, budget: int) -> ImageSize:
        size = self._search.size_for(budget)
        counted = self.tokens(size.width, size.height)
        return ImageSize(size.width, size.height, counted)


# ------------------------------------------------------------------------ video

#: Qwen2-VL's video processor: frames resized within these pixels (128..768 tokens a
#: frame), two frames per temporal patch.
QWEN2_VL_FRAME = QwenVLRule("qwen2-vl-video", 28, 128 * 28 * 28, 768 * 28 * 28)
TEMPORAL_PATCH = 2
#: vLLM reads at most 32 frames of a video by default (``num_frames``).
MAX_VIDEO_FRAMES = 32
#: Per-frame tokens preferred when a budget can be split several ways (448×448 px).
_FRAME_TOKENS = 256


@dataclass(frozen=True)
class VideoSize:
    """A video as JPEG frames (``data:video/jpeg``): frame count and pixel size, and the
    tokens Qwen2-VL's video processor makes of it."""

    frames: int
    width: int
    height: int
    tokens: int


def video_tokens(frames: int, width: int, height: int) -> int:
    """Qwen2-VL: one temporal patch per two frames, each the frame's grid tokens."""
    patches = -(-frames // TEMPORAL_PATCH)
    return patches * QWEN2_VL_FRAME.tokens(width, height)


def video_size_for(budget: int) -> VideoSize:
    """Frames (even, at most 32) and a frame size whose tokens are the budget, the split
    with per-frame tokens nearest 256; else the nearest representable count."""
    rule = QWEN2_VL_FRAME
    lo, hi = rule.token_range
    most = MAX_VIDEO_FRAMES // TEMPORAL_PATCH
    target = min(max(budget, lo), most * hi)
    for delta in range(0, most * hi):
        for t in (target - delta, target + delta) if delta else (target,):
            splits = [
                (abs(t // k - _FRAME_TOKENS), k)
                for k in range(1, most + 1)
                if t % k == 0 and lo <= t // k <= hi and rule._grid(t // k) is not None
            ]
            if splits:
                _, k = min(splits)
                grid = rule._grid(t // k)
                assert grid is not None
                a, b = grid
                return VideoSize(k * TEMPORAL_PATCH, b * rule.factor, a * rule.factor, t)
    raise FineserveError(f"no video size for {budget} tokens")


# ------------------------------------------------------------------------ audio

#: Audio families with a built-in rule.
AUDIO_FAMILIES = ("whisper-25hz",)
AUDIO_SAMPLE_RATE = 16_000
#: Samples per mel frame (10 ms at 16 kHz).
_HOP = 160
#: Whisper-style encoders take at most 30 s per clip.
MAX_AUDIO_S = 30.0


def audio_tokens(n_samples: int) -> int:
    """Tokens of a 16 kHz clip of ``n_samples`` (Qwen2-Audio's output lengths: a stride-2
    convolution, then 2× average pooling over the mel frames)."""
    frames = n_samples // _HOP
    if frames < 1:
        return 0
    conv = (frames - 1) // 2 + 1
    return max((conv - 2) // 2 + 1, 0)


def audio_samples_for(budget: int) -> tuple[int, int]:
    """(samples, tokens): the clip length whose token count is the budget (4 frames a
    token), capped at 30 s."""
    most = audio_tokens(int(MAX_AUDIO_S * AUDIO_SAMPLE_RATE))
    t = min(max(budget, 1), most)
    n = 4 * t * _HOP
    return n, audio_tokens(n)
