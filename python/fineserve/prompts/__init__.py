"""Prompt construction."""

from .synthetic import SyntheticPromptBuilder

__all__ = ["SyntheticPromptBuilder"]
