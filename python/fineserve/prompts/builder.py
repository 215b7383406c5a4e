"""Which prompt builder a run uses: synthetic words, or exact token lengths."""

from __future__ import annotations

import time
from typing import Union

import numpy as np
import numpy.typing as npt

from ..config import PromptConfig
from ..console import note
from ..errors import FineserveError
from ..schedule import Schedule
from .sources import load_prompt_dataset
from .synthetic import SyntheticPromptBuilder
from .tokenized import TokenizedPromptBuilder, load_tokenizer, prompt_cache_dir, source_text_from

#: Prompt pools cover at least this many tokens per prompt (longer ones are refused).
MIN_PROMPT_POOL_TOKENS = 65_536

PromptBuilder = Union[SyntheticPromptBuilder, TokenizedPromptBuilder]


def select_builder(
    cfg: PromptConfig,
    seed: int,
    first: Schedule,
    *,
    chat: bool,
    quiet: bool = False,
    is_mock: bool = False,
) -> tuple[PromptBuilder, npt.NDArray[np.int64] | None]:
    """Exact token lengths with ``--tokenizer``; approximate synthetic words without (exact
    against the mock, which counts words, so it needs no notice there). Also the dataset's
    output lengths when ``--dataset-output-len`` asks for them."""
    if cfg.apply_chat_template and chat:
        raise FineserveError(
            "--apply-chat-template is for the completions API; the chat API applies the "
            "server's template itself"
        )
    if not cfg.tokenizer:
        if not quiet and not is_mock:
            note(
                "no --tokenizer: synthetic word prompts; input lengths are approximate "
                "(one word ≈ one token for common tokenizers; the mock counts words)"
            )
        synthetic = SyntheticPromptBuilder(
            seed,
            block_size=cfg.prefix_block_size,
            shared_prefix_groups=cfg.shared_prefix_groups,
            shared_prefix_len=cfg.shared_prefix_len,
        )
        return synthetic, None
    tok = load_tokenizer(cfg.tokenizer)
    source = None
    output_lens = None
    if cfg.dataset_path is not None:
        texts, outputs, summary = load_prompt_dataset(cfg.dataset_path)
        if not quiet:
            note(summary)
        source = source_text_from(texts)
        if cfg.dataset_output_len:
            output_lens = np.asarray([x for x in outputs if x > 0], dtype=np.int64)
            if not len(output_lens):
                raise FineserveError(
                    f"--dataset-output-len: {cfg.dataset_path} has no output_length "
                    "(or output_len, max_tokens) fields"
                )
    started = time.perf_counter()
    builder = TokenizedPromptBuilder(
        tok,
        source_text=source,
        seed=seed,
        max_input_len=max(int(first.input_len.max()), MIN_PROMPT_POOL_TOKENS),
        block_size=cfg.prefix_block_size,
        apply_chat_template=cfg.apply_chat_template,
        prompt_suffix=cfg.prompt_suffix,
        shared_prefix_groups=cfg.shared_prefix_groups,
        shared_prefix_len=cfg.shared_prefix_len,
        cache_dir=prompt_cache_dir(),
        check=cfg.prompt_check,
        count_special_tokens=not chat,
    )
    if not quiet:
        note(
            f"tokenizer {cfg.tokenizer}: prompt pool of {builder.pool.n} tokens "
            f"({'cached' if builder.pool.cached else 'tokenized'} in "
            f"{time.perf_counter() - started:.1f} s)"
        )
    return builder, output_lens
