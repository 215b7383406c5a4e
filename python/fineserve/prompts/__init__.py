"""Prompt construction: synthetic words without a tokenizer, exact token lengths with one."""

from .prefix import PrefixHitCounter
from .sources import load_prompt_dataset, load_prompt_texts
from .synthetic import SyntheticPromptBuilder
from .tokenized import TokenizedPromptBuilder, load_tokenizer

__all__ = [
    "PrefixHitCounter",
    "SyntheticPromptBuilder",
    "TokenizedPromptBuilder",
    "load_prompt_dataset",
    "load_prompt_texts",
    "load_tokenizer",
]
