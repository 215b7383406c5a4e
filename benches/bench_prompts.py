"""Prompt building speed: 100k prompts of mixed lengths with exact token counts.

Tokenizer: a 32k byte-level BPE (GPT-2 / Llama-3 style) trained here on Python's standard
library sources, so the bench needs no network. Figures:

- cold: tokenizing the prompt pool once, then building 100k prompts with the default
  sampled length check;
- warm: the same with the pool from the cache (a rerun);
- every prompt re-encoded (``--prompt-check all``), on 10k prompts;
- baseline, in the same run: FineServe's per-prompt way (encode a source prompt, repeat or
  truncate its ids to the target, decode, re-encode to check), timed on 2,000 prompts.

    python benches/bench_prompts.py [--prompts 100000] [--json out.json]
Target: 100k prompts in a few seconds on the 2-vCPU dev machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:400]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32_000,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)


def baseline(tok, texts: list[str], lens: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    """FineServe-style: per prompt, encode, repeat/truncate ids, decode, re-encode."""
    started = time.perf_counter()
    off = 0
    for i, want in enumerate(lens.tolist()):
        ids = tok(texts[i % len(texts)], add_special_tokens=False)["input_ids"]
        while len(ids) < want:
            ids = ids + ids
        text = tok.decode(ids[:want])
        off += len(tok(text, add_special_tokens=False)["input_ids"]) != want
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from fineserve.prompts import TokenizedPromptBuilder, load_tokenizer

    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(6.0, 1.0, args.prompts), 1, 16_000).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        tdir = Path(tmp) / "tok"
        started = time.perf_counter()
        train_tokenizer(tdir)
        print(f"trained a 32k BPE tokenizer in {time.perf_counter() - started:.1f} s")
        tok = load_tokenizer(str(tdir))
        cache = Path(tmp) / "cache"
        out: dict = {"prompts": args.prompts, "mean_len": float(lens.mean())}
        for label in ("cold", "warm"):
            started = time.perf_counter()
            b = TokenizedPromptBuilder(tok, seed=0, max_input_len=16_000, cache_dir=cache)
            pool_s = time.perf_counter() - started
            started = time.perf_counter()
            prompts, _, report = b.build(0, lens)
            build_s = time.perf_counter() - started
            out[label] = {
                "pool_s": pool_s,
                "build_s": build_s,
                "checked": report.checked,
                "mismatched": report.mismatched,
            }
            print(
                f"{label}: pool {pool_s:.2f} s ({'cached' if b.pool.cached else 'tokenized'}),"
                f" {args.prompts} prompts {build_s:.2f} s, {report.summary()}"
            )
        n_all = min(10_000, args.prompts)
        started = time.perf_counter()
        _, _, report = b.build(0, lens[:n_all], check="all")
        all_s = time.perf_counter() - started
        out["check_all_10k_s"] = all_s
        print(f"check=all: {n_all} prompts {all_s:.2f} s, {report.summary()}")
        texts = prompts[:200]
        n_base = 2_000
        base_s = baseline(tok, texts, lens[:n_base])
        per_prompt = base_s / n_base
        ours = out["warm"]["build_s"] / args.prompts
        out["baseline_per_prompt_ms"] = per_prompt * 1e3
        out["fineserve_per_prompt_ms"] = ours * 1e3
        print(
            f"baseline (encode, cut, decode, re-encode per prompt): "
            f"{per_prompt * 1e3:.3f} ms/prompt vs {ours * 1e3:.4f} ms/prompt "
            f"→ {per_prompt / ours:.0f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
