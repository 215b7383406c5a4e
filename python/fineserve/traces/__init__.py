"""Trace files → columnar requests (arrival time, lengths, optional sessions and prefix
blocks), with malformed and invalid rows counted, never silently dropped."""

from .base import Trace
from .readers import FORMATS, TraceOptions, detect_format, load_trace

__all__ = ["FORMATS", "Trace", "TraceOptions", "detect_format", "load_trace"]
