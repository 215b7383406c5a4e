"""fineserve: realistic LLM-serving workloads, driven open-loop by a Rust engine."""

from ._engine import ERROR_KINDS, EngineError
from ._engine import __version__ as __version__
from .mock import MockServer
from .runner import EngineOptions, RunRecords, run_engine
from .schedule import Schedule

__all__ = [
    "ERROR_KINDS",
    "EngineError",
    "EngineOptions",
    "MockServer",
    "RunRecords",
    "Schedule",
    "__version__",
    "run_engine",
]
