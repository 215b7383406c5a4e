"""A Llama-style decoder with random weights and a tokenizer built offline, for serving
benchmarks on a machine without network (vLLM's benchmarks use dummy weights the same way).

    python make_model.py OUT_DIR [--hidden 2048 --layers 16]

Tokenizer: a 32k byte-level BPE trained on this Python's standard library sources, with a
Llama-3-like chat template. Model: hidden 2048, 16 layers, 16 heads (8 KV heads), MLP 5632,
vocab 32000, 8192 positions, bf16: ~0.75 B parameters.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    started = time.time()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:400]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=32_000,
            special_tokens=["<|begin|>", "<|end|>", "<|start|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|end|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(
        f"model: {params / 1e9:.3f} B parameters, vocab {len(tok)}, saved to {args.out} "
        f"in {time.time() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
