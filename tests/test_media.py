"""Multimodal requests sized to a token budget (issue 23): the schedule's media lists, the
families' counting rules (checked against Hugging Face's own Qwen2-VL processor), the
spliced PNGs and WAVs (decoded by Pillow and the stdlib), and what an independent server
receives from ``blast``."""

from __future__ import annotations

import base64
import io
import json
import wave
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import SHARED_DATA, invoke
from fineserve.errors import FineserveError
from fineserve.media.budget import (
    INTERNVL,
    LLAVA_15,
    LLAVA_NEXT,
    QWEN2_VL,
    QWEN3_VL,
    ProcessorRule,
    audio_samples_for,
    audio_tokens,
    infer_family,
)
from fineserve.media.dist import parse_int_dist
from fineserve.media.encode import MediaEncoder, adler32_combine
from fineserve.schedule import Schedule, concat, read_schedule, write_schedule
from stdlib_server import OpenAIServer

MM_POOL = SHARED_DATA / "servegen" / "multimodal" / "mm-image"


def qwen2_vl_tokens_independent(width: int, height: int) -> int:
    """Qwen2-VL's count as its model card states it (not fineserve's code): sides rounded
    to multiples of 28 within [56·56, 28·28·16384] pixels, one token per 28×28."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=12845056)
    return (h // 28) * (w // 28)


def test_adler32_combine_matches_zlib() -> None:
    import zlib

    rng = np.random.default_rng(1)
    for n1, n2 in ((0, 5), (7, 0), (1000, 70000), (65521, 3)):
        a = rng.integers(0, 256, n1, dtype=np.uint8).tobytes()
        b = rng.integers(0, 256, n2, dtype=np.uint8).tobytes()
        assert adler32_combine(zlib.adler32(a), zlib.adler32(b), n2) == zlib.adler32(a + b)


def test_qwen2_vl_sizes_hit_the_budget_under_hugging_faces_processor() -> None:
    pytest.importorskip("transformers")
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
    for budget in (4, 64, 255, 525, 714, 1196, 1222, 1223, 1230, 4099, 16384):
        size = QWEN2_VL.size_for(budget)
        out = proc(images=[Image.new("RGB", (size.width, size.height))], return_tensors="np")
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        assert t * h * w // 4 == size.tokens, budget
        # Exact where a grid of at most 200:1 exists; otherwise the nearest count.
        assert abs(size.tokens - budget) <= max(1, 0.02 * budget), (budget, size)
    assert QWEN2_VL.size_for(1196).tokens == 1196
    assert QWEN2_VL.size_for(1223).tokens in (1222, 1224)  # 1223 is prime: 1 × 1223 is too thin
    assert QWEN2_VL.size_for(1).tokens == 4  # below min_pixels: the smallest image
    assert QWEN2_VL.size_for(10**6).tokens == 16384  # above max_pixels: the largest


def test_other_families_count_as_their_processors() -> None:
    assert QWEN3_VL.size_for(1024).width % 32 == 0 and QWEN3_VL.size_for(1024).tokens == 1024
    assert LLAVA_15.size_for(1000).tokens == 576 and LLAVA_15.tokens(5, 900) == 576
    # InternVL: 448 px tiles of 256 tokens, plus a thumbnail when there are several.
    assert INTERNVL.tokens(448, 448) == 256
    assert INTERNVL.tokens(896, 896) == 5 * 256
    assert INTERNVL.tokens(1344, 448) == 4 * 256
    assert INTERNVL.size_for(1300).tokens == 1280
    # LLaVA-1.6 at its pinpoints: 576 base + unpadded grid features + a newline per row.
    assert LLAVA_NEXT.tokens(672, 672) == 576 + 48 * 48 + 48
    assert LLAVA_NEXT.tokens(672, 336) == 576 + 24 * 48 + 24
    size = LLAVA_NEXT.size_for(2000)
    assert LLAVA_NEXT.tokens(size.width, size.height) == size.tokens
    assert abs(size.tokens - 2000) < 60


def test_processor_rule_reads_a_local_processor(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "patch_size": 14,
                "merge_size": 2,
                "temporal_patch_size": 2,
                "min_pixels": 3136,
                "max_pixels": 1003520,
            }
        )
    )
    rule = ProcessorRule(tmp_path)
    size = rule.size_for(1196)
    assert size.tokens == 1196 == qwen2_vl_tokens_independent(size.width, size.height)
    assert rule.size_for(5000).tokens == 1280  # this processor's max_pixels: 1280 tokens
    with pytest.raises(FineserveError, match="cannot load"):
        ProcessorRule(tmp_path / "missing")


def test_family_is_inferred_from_a_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert infer_family(tmp_path) == "qwen2-vl"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert infer_family(tmp_path) is None


@pytest.mark.parametrize("content", ["gradient", "noise"])
def test_png_images_decode_to_their_size_with_distinct_pixels(content: str) -> None:
    enc = MediaEncoder(content=content)
    decoded = []
    for k in range(3):
        encoded = enc.image(1288, 728, k.to_bytes(16, "little"))
        raw = encoded.raw()
        assert len(raw) == encoded.nbytes
        img = Image.open(io.BytesIO(raw))
        img.load()  # decodes every row: the spliced stream and its checksums are valid
        assert img.size == (1288, 728) and img.mode == "RGB"
        decoded.append(np.asarray(img))
    assert enc.bases_built == 1
    assert not np.array_equal(decoded[0], decoded[1])
    assert np.array_equal(decoded[0][1:, 16:], decoded[1][1:, 16:])  # only the tag differs
    again = enc.image(1288, 728, (0).to_bytes(16, "little")).raw()
    assert again == enc.image(1288, 728, bytes(16)).raw()


def test_jpeg_and_wav_decode() -> None:
    enc = MediaEncoder(image_format="jpeg")
    a = Image.open(io.BytesIO(enc.image(640, 480, b"a" * 16).raw()))
    b = Image.open(io.BytesIO(enc.image(640, 480, b"b" * 16).raw()))
    a.load()
    b.load()
    assert a.size == (640, 480) and a.format == "JPEG"
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    samples, tokens = audio_samples_for(50)
    assert tokens == 50 and audio_tokens(samples) == 50
    with wave.open(io.BytesIO(MediaEncoder.wav(samples, b"t" * 16, 16000).raw())) as w:
        assert (w.getframerate(), w.getnframes(), w.getnchannels()) == (16000, samples, 1)
    assert audio_samples_for(10**6)[1] == audio_tokens(30 * 16000)  # 30 s at most


def test_distributions_parse_and_refuse_in_one_line() -> None:
    rng = np.random.default_rng(0)
    assert set(parse_int_dist("uniform:1,3", "--x", floor=0).sample(500, rng)) == {1, 2, 3}
    pdf = parse_int_dist("{525: 0.25, 1196: 0.75}", "--x", floor=1).sample(4000, rng)
    assert set(pdf) == {525, 1196} and abs(np.mean(pdf == 1196) - 0.75) < 0.03
    assert parse_int_dist("4", "--x", floor=0).sample(3, rng).tolist() == [4, 4, 4]
    for bad, why in (("0", ">= 1"), ("uniform:3,1", "LO <= HI"), ("pdf:1", "VALUE=WEIGHT"),
                     ("zipf:2", "unknown distribution"), ("1.5", "whole numbers")):  # fmt: skip
        with pytest.raises(FineserveError, match=why) as e:
            parse_int_dist(bad, "--mm-image-tokens", floor=1)
        assert "\n" not in str(e.value) and "--mm-image-tokens" in str(e.value)


def _with_images(n: int, counts: list[int], values: list[int]) -> Schedule:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Schedule(
        np.arange(n, dtype=np.int64) * 1000,
        np.full(n, 10),
        np.full(n, 4),
        lists={"image_tokens": (np.asarray(values, dtype=np.int64), offsets)},
    )


def test_media_lists_survive_take_concat_and_parquet(tmp_path: Path) -> None:
    a = _with_images(3, [1, 0, 2], [5, 6, 7])
    b = _with_images(2, [2, 1], [8, 9, 10])
    b.t_ns += 10_000
    joined = concat([a, b])
    assert joined.media_counts("image_tokens").tolist() == [1, 0, 2, 2, 1]
    assert joined.media_sums("image_tokens").tolist() == [5, 0, 13, 17, 10]
    assert joined.take(np.array([2, 4])).media_sums("image_tokens").tolist() == [13, 10]
    summary = write_schedule(tmp_path / "s.parquet", iter([a, b]), {})
    assert summary["total_image_items"] == 6 and summary["total_image_tokens"] == 45
    chunks, n, _ = read_schedule(tmp_path / "s.parquet", chunk_rows=2)
    back = concat(list(chunks))
    assert n == 5 and back.media_sums("image_tokens").tolist() == [5, 0, 13, 17, 10]
    with pytest.raises(FineserveError, match="media columns"):
        concat([a, Schedule(np.array([20_000]), np.array([1]), np.array([1]))])


@pytest.mark.skipif(not MM_POOL.is_dir(), reason="shared ServeGen multimodal pool absent")
def test_generate_samples_servegen_multimodal_clients(tmp_path: Path) -> None:
    out = tmp_path / "mm.parquet"
    r = invoke("generate", "--mode", "servegen", "--servegen-pool", str(MM_POOL),
               "--duration", "600", "-o", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "Total image items / tokens:" in r.output
    t = pq.read_table(out)
    images = t["image_tokens"].to_pylist()
    assert len(images) > 100
    # The pool's first window: one image per request, its budget from the image PDF.
    assert all(len(x) == 1 for x in images)
    support = {525, 714, 1196, 1222, 1230}
    assert {v for x in images for v in x} <= support
    assert all(x == [] for x in t["audio_tokens"].to_pylist())
    assert set(t["input_len"].to_pylist()) <= {136, 372}  # text_tokens, the text part alone
    r = invoke("generate", "--mode", "servegen", "--servegen-pool", str(MM_POOL),
               "--mm-images-per-request", "2", "--mm-image-tokens", "10",
               "-o", str(tmp_path / "x.parquet"))  # fmt: skip
    assert r.exit_code != 0 and "already gives each request its media" in r.output


def test_a_pool_with_counts_but_no_budgets_is_one_line(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "chunk-0-trace.csv").write_text("0,1.0,1.0,Gamma,1.0,1.0\n")
    (pool / "chunk-0-dataset.json").write_text(
        json.dumps(
            {
                "0": {
                    "text_tokens": "{10: 1.0}",
                    "image_count": "{2: 1.0}",
                    "image_tokens": "{0: 1.0}",
                    "output_tokens": "{5: 1.0}",
                }
            }
        )
    )
    r = invoke("generate", "--mode", "servegen", "--servegen-pool", str(pool),
               "-o", str(tmp_path / "x.parquet"))  # fmt: skip
    assert r.exit_code != 0
    assert "image_count has requests with images but image_tokens has no positive budget" in (
        r.output
    )


def _images_of(body: dict[str, object]) -> list[Image.Image]:
    out = []
    for msg in body["messages"]:  # type: ignore[attr-defined]
        content = msg["content"]
        for part in content if isinstance(content, list) else []:
            if part["type"] == "image_url":
                url = part["image_url"]["url"]
                assert url.startswith("data:image/png;base64,")
                img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                img.load()
                out.append(img)
    return out


@pytest.mark.skipif(not MM_POOL.is_dir(), reason="shared ServeGen multimodal pool absent")
def test_blast_sends_each_scheduled_image_at_its_token_budget(
    tmp_path: Path, servers: list[OpenAIServer]
) -> None:
    """The issue's 'done when': a schedule from ServeGen's mm-image clients, replayed
    against an independent server, arrives with as many images per request as scheduled,
    each decoding to a size that Qwen2-VL's rule turns into the scheduled budget."""
    pytest.importorskip("transformers")
    sched = tmp_path / "mm.parquet"
    r = invoke("generate", "--mode", "servegen", "--servegen-pool", str(MM_POOL),
               "--duration", "900", "--time-scale", "100", "-o", str(sched))  # fmt: skip
    assert r.exit_code == 0, r.output
    want = pq.read_table(sched)["image_tokens"].to_pylist()
    server = OpenAIServer()
    servers.append(server)
    res = tmp_path / "res.json"
    r = invoke("blast", "--base-url", server.base_url(), "--backend", "openai-chat",
               "--schedule", str(sched), "--disable-tqdm", "--output-file", str(res),
               "--warmup-requests", "0")  # fmt: skip
    assert r.exit_code == 0, r.output
    posts = [s.body for s in server.seen if s.method == "POST"]
    assert len(posts) == len(want)
    # Requests arrive in any order: compare (count, budgets) per request as multisets.
    got = sorted((len(imgs), [qwen2_vl_tokens_independent(*i.size) for i in imgs])
                 for imgs in map(_images_of, posts))  # fmt: skip
    expected = sorted((len(w), w) for w in want)
    assert [g[0] for g in got] == [e[0] for e in expected]
    flat_got = sorted(t for _, ts in got for t in ts)
    flat_want = sorted(t for w in want for t in w)
    close = sum(abs(g - w) <= max(1, 0.02 * w) for g, w in zip(flat_got, flat_want))
    assert close / len(flat_want) >= 0.98
    m = json.loads(res.read_text())
    assert m["total_image_count"] == len(flat_want)
    assert m["total_image_tokens_scheduled"] == sum(flat_want)
    assert m["total_image_tokens"] == sum(flat_got)
    assert m["media"]["image_family"] == "qwen2-vl"
    assert "Total image items / tokens:" in r.output


def test_the_mock_counts_images_and_audio_as_prompt_tokens(tmp_path: Path) -> None:
    res = tmp_path / "res.json"
    r = invoke("blast", "--backend", "openai-chat", "--num-prompts", "30",
               "--request-rate", "200", "--random-input-len", "20", "--random-output-len", "3",
               "--mm-images-per-request", "choice:0,1,3", "--mm-image-tokens", "uniform:50,900",
               "--mm-audio-per-request", "choice:0,1", "--mm-audio-tokens", "40",
               "--mm-videos-per-request", "choice:0,1", "--mm-video-tokens", "512",
               "--disable-tqdm", "--output-file", str(res))  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(res.read_text())
    assert m["completed"] == 30 and m["total_image_count"] > 0 and m["total_audio_count"] > 0
    assert m["total_video_count"] > 0
    # The mock's count (header sizes, its own Rust rule) equals text + the budgets sent.
    assert m["prompt_tokens_server"] == m["prompt_tokens_budget"]
    assert m["prompt_tokens_budget"] == (
        m["total_input_tokens"]
        + m["total_image_tokens"]
        + m["total_audio_tokens"]
        + m["total_video_tokens"]
    )
    assert set(m["breakdown"]["image_count"]) <= {"0", "1", "3"}


def test_reuse_url_base_and_refusals(tmp_path: Path, servers: list[OpenAIServer]) -> None:
    server = OpenAIServer()
    servers.append(server)
    media_dir = tmp_path / "media"
    r = invoke("blast", "--base-url", server.base_url(), "--backend", "openai-chat",
               "--num-prompts", "40", "--request-rate", "500", "--random-output-len", "2",
               "--mm-images-per-request", "1", "--mm-image-tokens", "64", "--mm-reuse", "1",
               "--mm-url-base", "http://media.test/x", "--mm-dir", str(media_dir),
               "--disable-tqdm", "--warmup-requests", "0")  # fmt: skip
    assert r.exit_code == 0, r.output
    urls = [
        part["image_url"]["url"]
        for s in server.seen
        if s.method == "POST"
        for part in s.body["messages"][-1]["content"]
        if part["type"] == "image_url"
    ]
    assert len(urls) == 40 and all(u.startswith("http://media.test/x/") for u in urls)
    assert len(set(urls)) == 1  # --mm-reuse 1: every image after the first repeats it
    files = list(media_dir.iterdir())
    assert len(files) == 1
    with Image.open(files[0]) as img:
        assert img.size == (224, 224)  # 8 × 8 tokens
    r = invoke("blast", "--num-prompts", "3", "--mm-images-per-request", "1",
               "--mm-image-tokens", "64", "--disable-tqdm")  # fmt: skip
    assert r.exit_code != 0 and "needs the chat completions API" in r.output
    assert "Traceback" not in r.output
    r = invoke("blast", "--backend", "openai-chat", "--num-prompts", "3",
               "--mm-videos-per-request", "1", "--mm-video-tokens", "256",
               "--mm-url-base", "http://media.test/x", "--mm-dir", str(media_dir),
               "--disable-tqdm")  # fmt: skip
    assert r.exit_code != 0 and "videos go as data: URIs" in r.output
    r = invoke("blast", "--num-prompts", "3", "--mm-format", "jpeg", "--disable-tqdm")
    assert r.exit_code == 0 and "the --mm-* media options have no effect" in r.output


def test_videos_are_jpeg_frames_at_their_budget(
    tmp_path: Path, servers: list[OpenAIServer]
) -> None:
    """Each video arrives as vLLM's ``data:video/jpeg`` (comma-joined JPEG frames): an
    even number of frames (two a temporal patch, at most 32) whose size Qwen2-VL's video
    rule (128–768 tokens a frame) turns into the budget."""
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    server = OpenAIServer()
    servers.append(server)
    res = tmp_path / "res.json"
    budgets = [256, 1000, 4096, 12288]
    r = invoke("blast", "--base-url", server.base_url(), "--backend", "openai-chat",
               "--num-prompts", "12", "--request-rate", "100", "--random-output-len", "2",
               "--mm-videos-per-request", "1",
               "--mm-video-tokens", "choice:" + ",".join(map(str, budgets)),
               "--disable-tqdm", "--warmup-requests", "0", "--output-file", str(res))  # fmt: skip
    assert r.exit_code == 0, r.output
    seen = []
    for s in server.seen:
        if s.method != "POST":
            continue
        (part,) = [p for p in s.body["messages"][-1]["content"] if p["type"] == "video_url"]
        url = part["video_url"]["url"]
        assert url.startswith("data:video/jpeg;base64,")
        frames = [Image.open(io.BytesIO(base64.b64decode(f))) for f in url.split(",")[1:]]
        assert len(frames) % 2 == 0 and len(frames) <= 32
        assert len({f.size for f in frames}) == 1 and all(f.format == "JPEG" for f in frames)
        w, h = frames[0].size
        rh, rw = smart_resize(h, w, factor=28, min_pixels=128 * 784, max_pixels=768 * 784)
        seen.append(len(frames) // 2 * (rh // 28) * (rw // 28))
    assert len(seen) == 12 and set(seen) <= set(budgets)
    m = json.loads(res.read_text())
    assert m["total_video_count"] == 12 and m["total_video_tokens"] == sum(seen)
    assert m["total_video_tokens_scheduled"] == sum(seen)


def test_the_mocks_ttft_grows_with_media_tokens(tmp_path: Path) -> None:
    """With a prefill cost per prompt token, a request's TTFT at the mock grows with its
    image tokens as with its text."""
    from fineserve import MockServer

    with MockServer(ttft_ms=5, itl_ms=1, ttft_per_prompt_token_ms=0.01) as mock:
        res = tmp_path / "res.json"
        r = invoke("blast", "--base-url", mock.base_url, "--backend", "openai-chat",
                   "--num-prompts", "40", "--request-rate", "100", "--random-input-len", "10",
                   "--random-output-len", "2", "--mm-images-per-request", "choice:0,1",
                   "--mm-image-tokens", "1000", "--disable-tqdm", "--warmup-requests", "0",
                   "--output-file", str(res))  # fmt: skip
        assert r.exit_code == 0, r.output
    by_count = json.loads(res.read_text())["breakdown"]["image_count"]
    # 1000 image tokens × 0.01 ms: 10 ms more before the first token.
    gap_ms = by_count["1"]["median_ttft_ms"] - by_count["0"]["median_ttft_ms"]
    assert 8 < gap_ms < 16, gap_ms  # counted once, not per message or twice


def test_budgets_beyond_the_model_are_sent_at_the_nearest_size_and_said(tmp_path: Path) -> None:
    res = tmp_path / "res.json"
    r = invoke("blast", "--backend", "openai-chat", "--num-prompts", "3",
               "--request-rate", "100", "--random-output-len", "2",
               "--mm-images-per-request", "1", "--mm-image-tokens", "100000",
               "--disable-tqdm", "--output-file", str(res))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "3 of 3 images could not meet their token budget under qwen2-vl" in r.output
    m = json.loads(res.read_text())
    assert m["total_image_tokens"] == 3 * 16384  # Qwen2-VL's max_pixels: 16,384 tokens
    assert m["total_image_tokens_scheduled"] == 300_000
    assert m["media"]["images_off_budget"] == 3
    assert m["prompt_tokens_server"] == m["prompt_tokens_budget"]  # the mock agrees
