"""Serving metrics computed from engine records."""

from .serving import compute_metrics, format_summary

__all__ = ["compute_metrics", "format_summary"]
