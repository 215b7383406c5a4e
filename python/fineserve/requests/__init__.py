"""The request stage: schedule chunks become the engine's chunks of request bodies."""

from .shaping import LABEL_COLUMNS, RequestShapes, engine_chunks, mock_fields
from .turns import extend_turns

__all__ = ["LABEL_COLUMNS", "RequestShapes", "engine_chunks", "extend_turns", "mock_fields"]
