"""Multimodal requests (issue 23): how fast images are made, and what 4 images a request do
to the bodies and the dispatch lag at 50 req/s.

Part 1, image encoding, per image size (token budget under Qwen2-VL): fineserve's spliced
PNG (one base per size, only the tagged first row compressed per image) against the
baseline a user would write, Pillow encoding each tagged image from scratch (PNG, and
JPEG), same sizes, same run. The first image of a size pays for its base; that cost is
reported apart.

Part 2, sending: ``fineserve blast`` at 50 req/s against the mock in its own process
(which parses every body and sizes each image from its header), 4 images of 1,196 tokens
a request, against the same schedule without images (the baseline); gradient pixels, and
noise pixels (15 MB a body) at 10 and 50 req/s. Figures: mean body size, p99 dispatch
lag, share sent in its scheduled ms, and the server's prompt tokens against text + image
budget.

Usage: python benches/bench_media.py [--seconds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fineserve.media.budget import QWEN2_VL
from fineserve.media.encode import MediaEncoder, base_pixels
from mock_proc import MockProcess


def per_s(fn: Any, n: int) -> float:
    start = time.perf_counter()
    for k in range(n):
        fn(k)
    return n / (time.perf_counter() - start)


def encoding(budgets: list[int], n: int) -> list[dict[str, Any]]:
    rows = []
    for budget in budgets:
        size = QWEN2_VL.size_for(budget)
        w, h = size.width, size.height
        for content in ("gradient", "noise"):
            enc = MediaEncoder(content=content)
            start = time.perf_counter()
            first = enc.image(w, h, bytes(16))
            base_s = time.perf_counter() - start

            def spliced_png(k: int, enc: MediaEncoder = enc, w: int = w, h: int = h) -> None:
                enc.image(w, h, (k + 1).to_bytes(16, "little"))

            spliced = per_s(spliced_png, n)
            pixels = base_pixels(w, h, content, 0)

            def pillow(k: int, fmt: str, px: np.ndarray = pixels) -> None:
                tagged = px.copy()
                tagged[0, :6] = np.frombuffer((k + 1).to_bytes(18, "little"), np.uint8).reshape(
                    6, 3
                )
                buf = io.BytesIO()
                Image.fromarray(tagged).save(buf, format=fmt)
                base64.b64encode(buf.getvalue())

            few = max(n // 20, 5)
            rows.append(
                {
                    "tokens": budget,
                    "size": f"{w}x{h}",
                    "content": content,
                    "png_bytes": first.nbytes,
                    "base_ms": base_s * 1e3,
                    "spliced_png_per_s": spliced,
                    "pillow_png_per_s": per_s(lambda k: pillow(k, "PNG"), few),
                    "pillow_jpeg_per_s": per_s(lambda k: pillow(k, "JPEG"), few),
                }
            )
            assert Image.open(io.BytesIO(first.raw())).size == (w, h)
    return rows


def blast(
    base_url: str, seconds: float, images: int, content: str, rate: int, out: Path
) -> dict[str, Any]:
    args = [
        sys.executable, "-m", "fineserve.cli", "blast", "--base-url", base_url,
        "--backend", "openai-chat", "--num-prompts", str(int(rate * seconds)),
        "--request-rate", str(rate), "--random-input-len", "256",
        "--random-output-len", "4", "--disable-tqdm", "--warmup-requests", "0",
        "--output-file", str(out),
    ]  # fmt: skip
    if images:
        args += ["--mm-images-per-request", str(images), "--mm-image-tokens", "1196"]
        args += ["--mm-content", content]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"blast failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    m = json.loads(out.read_text())
    n = m["completed"] or 1
    image_bytes = m.get("total_image_bytes", 0)
    return {
        "rate": rate,
        "images_per_request": images,
        "content": content if images else "-",
        "completed": m["completed"],
        "failed": m["failed"],
        # base64 text of the images (4/3 of their bytes) plus the text prompt's JSON.
        "mean_image_kib_in_body": image_bytes * 4 / 3 / n / 1024,
        "p99_dispatch_lag_us": m["p99_dispatch_lag_us"],
        "sent_in_scheduled_ms": m["sent_in_scheduled_ms_fraction"],
        "p50_ttft_ms": m["median_ttft_ms"],
        "server_prompt_over_budget": m.get("prompt_tokens_server_over_budget"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--images", type=int, default=300, help="images timed per size")
    ap.add_argument("--json")
    args = ap.parse_args()
    report: dict[str, Any] = {"encoding": encoding([256, 1196, 4096], args.images)}
    for r in report["encoding"]:
        print(
            f"{r['tokens']:>5} tok {r['size']:>10} {r['content']:>8}: spliced PNG "
            f"{r['spliced_png_per_s']:8.0f}/s ({r['png_bytes'] / 1024:7.1f} KiB, base "
            f"{r['base_ms']:6.1f} ms) | Pillow PNG {r['pillow_png_per_s']:6.1f}/s, "
            f"JPEG {r['pillow_jpeg_per_s']:6.1f}/s"
        )
    sends = []
    with MockProcess(ttft_ms=5, itl_ms=1, record_arrivals=False) as mock:
        with tempfile.TemporaryDirectory() as d:
            runs = ((0, "gradient", 50), (4, "gradient", 50), (4, "noise", 10), (4, "noise", 50))
            for images, content, rate in runs:
                row = blast(mock.base_url, args.seconds, images, content, rate, Path(d) / "r.json")
                sends.append(row)
                print(
                    f"{rate} req/s, {images} images ({row['content']}): body images "
                    f"{row['mean_image_kib_in_body']:8.1f} KiB, p99 lag "
                    f"{row['p99_dispatch_lag_us']:8.1f} us, in their ms "
                    f"{row['sent_in_scheduled_ms']:.4f}, TTFT p50 {row['p50_ttft_ms']:.1f} ms, "
                    f"ok {row['completed']} failed {row['failed']}, server/budget "
                    f"{row['server_prompt_over_budget']}"
                )
    report["sending"] = sends
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
