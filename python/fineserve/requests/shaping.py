"""Schedule chunks → request bodies: prompts, the model of each request's class, its
endpoint, and (against the embedded mock) what the schedule says the server would do."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..api import BodyTemplate
from ..errors import FineserveError
from ..media.requests import MediaRequests
from ..metrics.fidelity import slot_sizes
from ..prompts import PrefixHitCounter, SyntheticPromptBuilder, TokenizedPromptBuilder
from ..routing import Deployment
from ..runner import EngineChunk
from ..schedule import Schedule, ScheduleDigest
from .pinning import Pinner
from .turns import LiveTurns, extend_turns

#: Schedule columns carried into the records (labels for breakdowns and the results file;
#: ``think_ns``: the think time a later turn was released after, beside its release in
#: ``scheduled_ns``).
LABEL_COLUMNS = ("class", "client_id", "session_id", "turn", "reason_ratio", "think_ns")


@dataclass
class RequestShapes:
    """How a schedule chunk becomes request bodies: prompts, body template per class's
    model, and endpoint assignment."""

    builder: SyntheticPromptBuilder | TokenizedPromptBuilder
    templates: dict[str, BodyTemplate]  # model → template
    default_model: str
    class_models: dict[str, str]
    deployment: Deployment
    #: ``--dataset-output-len``: request i's output length is entry (i mod N)'s.
    output_lens: npt.NDArray[np.int64] | None = None
    #: The target is the embedded mock: tell it, per request, what the schedule says the
    #: server would do (``reason_ratio``; prefix blocks, for its cached-token counts).
    mock_fields: bool = False
    #: Session and data-parallel-rank headers, LoRA adapters (None: none).
    pinner: Pinner | None = None
    #: A multimodal schedule's media as content parts (None: text only).
    media: MediaRequests | None = None
    #: Live conversation history: the engine's ``history_api`` (``off``: later turns are
    #: built here with stand-in answers, ``requests.turns``).
    history_api: str = "off"
    #: Live history: each turn's own new text and what could not be sized as the trace
    #: says (None: synthetic history).
    live_turns: LiveTurns | None = None

    @classmethod
    def for_targets(
        cls,
        builder: SyntheticPromptBuilder | TokenizedPromptBuilder,
        targets: Any,
        output_lens: npt.NDArray[np.int64] | None = None,
        *,
        mock_fields: bool = False,
        pinner: Pinner | None = None,
        media: MediaRequests | None = None,
        history_api: str = "off",
    ) -> RequestShapes:
        """The shapes for resolved :class:`~fineserve.targets.Targets`."""
        return cls(
            builder,
            targets.templates,
            targets.model,
            targets.class_models,
            targets.deployment,
            output_lens,
            mock_fields=mock_fields,
            pinner=pinner if pinner is not None and pinner.active else None,
            media=media,
            history_api=history_api,
            live_turns=LiveTurns() if history_api != "off" else None,
        )


def engine_chunks(
    chunks: Iterator[Schedule],
    shapes: RequestShapes,
    digest: ScheduleDigest | None = None,
    prefix: PrefixHitCounter | None = None,
) -> Iterator[EngineChunk]:
    """Schedule chunks → request bodies, in order; request i's prompt is its own unless
    sharing is intended (hash_ids, shared-prefix groups)."""
    base = 0
    chunks = _bounded_media(chunks)
    builder = shapes.builder
    # Chat requests carry a conversation as alternating messages; completions one text.
    chat = any(t.chat for t in shapes.templates.values())
    # Prompts of turns that later turns extend: index → [text, tokens, answer, followers left].
    history: dict[int, list[Any]] = {}
    for c in chunks:
        n = len(c)
        if shapes.output_lens is not None:
            picks = shapes.output_lens[(base + np.arange(n)) % len(shapes.output_lens)]
            c = dataclasses.replace(c, output_len=picks)
        if digest is not None:
            digest.add(c)
        prompts, actual_len = builder.build_chunk(base, c)
        turns = None
        live_rows = None
        if "parent" in c.extra:
            actual_len = np.asarray(actual_len, dtype=np.int64).copy()
            if shapes.live_turns is not None:
                live_rows = shapes.live_turns.own_texts(builder, base, c, prompts, actual_len)
            else:
                extend_turns(builder, base, c, prompts, actual_len, history, chat=chat)
            turns = (c.extra["parent"], c.extra["think_ns"], c.extra["followers"])
        if prefix is not None:
            _count_prefix(prefix, builder, base, c, actual_len)
        classes = c.extra.get("class")
        if classes is not None and shapes.class_models:
            models = np.array(
                [shapes.class_models.get(str(k), shapes.default_model) for k in classes],
                dtype=object,
            )
        else:
            models = np.full(n, shapes.default_model, dtype=object)
        pins = shapes.pinner.pins(base, c) if shapes.pinner is not None else None
        if pins is not None and pins.models is not None:
            models = pins.models
        fields = mock_fields(c, shapes.builder.block_size) if shapes.mock_fields else None
        media = None
        if c.lists:
            if shapes.media is None:
                raise FineserveError("a chunk of the schedule has media, its first chunk none")
            media = shapes.media.build(c)
        bodies, live = _bodies(shapes, c, live_rows, prompts, models, fields, media)
        slot_size, slot_edge = slot_sizes(c.t_ns)
        extra: dict[str, Any] = {
            "input_len": np.asarray(actual_len, dtype=np.int64),
            "output_len": c.output_len,
            # For the metrics only (micro-burst membership), not written to the results.
            "_slot_size": slot_size,
            "_slot_edge": slot_edge,
            **{k: v for k, v in c.extra.items() if k in LABEL_COLUMNS},
        }
        if media is not None:
            extra.update(media.columns)
        if len(shapes.templates) > 1:
            extra["model"] = models
        if pins is not None:
            extra.update(pins.labels)
        yield EngineChunk(
            t_ns=c.t_ns,
            bodies=bodies,
            body_idx=np.arange(n, dtype=np.uint32),
            endpoint_idx=shapes.deployment.assign(classes, n),
            expected_output_tokens=c.output_len,
            extra=extra,
            turns=turns,
            live=live,
            header_values=pins.header_values if pins is not None else (),
        )
        base += n


def _count_prefix(
    prefix: PrefixHitCounter,
    builder: SyntheticPromptBuilder | TokenizedPromptBuilder,
    base: int,
    c: Schedule,
    actual_len: npt.NDArray[np.int64],
) -> None:
    """The prompts' intended prefix sharing, for the theoretical hit rate."""
    if c.hash_ids is not None and c.hash_offsets is not None:
        prefix.add(actual_len, c.hash_ids, c.hash_offsets)
    elif builder.groups > 0 and builder.prefix_len > 0:
        prefix.add_shared(base, actual_len, builder.groups, builder.prefix_len)
    else:
        prefix.add_plain(actual_len)


def _bodies(
    shapes: RequestShapes,
    c: Schedule,
    live_rows: npt.NDArray[np.int64] | None,
    prompts: list[Any],
    models: npt.NDArray[Any],
    fields: list[str] | None,
    media: Any,
) -> tuple[list[bytes], tuple[npt.NDArray[np.int64], npt.NDArray[np.uint32]] | None]:
    """The chunk's request bodies; under live history, the conversation turns'
    (``live_rows``) are rendered once, with only their own text, and the engine's
    columns (tool_ns, turn_text) come with them."""
    n = len(c)
    is_turn = np.zeros(n, dtype=bool)
    if live_rows is not None:
        is_turn[live_rows] = True
    bodies = [
        b"" if turn else shapes.templates[m].render(p, int(t), f, mp)
        for p, m, t, f, mp, turn in zip(
            prompts,
            models.tolist(),
            c.output_len.tolist(),
            fields or [""] * n,
            media.parts if media is not None else [()] * n,
            is_turn.tolist(),
        )
    ]
    if live_rows is None:
        return bodies, None
    offsets = np.zeros((n, 6), dtype=np.uint32)
    server = shapes.history_api == "responses-server"
    for i in live_rows.tolist():
        body, off = shapes.templates[models[i]].render_turn(
            prompts[i],
            int(c.output_len[i]),
            fields[i] if fields else "",
            media.parts[i] if media is not None else (),
            server_history=server,
        )
        bodies[i] = body
        offsets[i] = off.row()
    tool_ns = c.extra.get("tool_ns", c.extra["think_ns"])
    return bodies, (np.asarray(tool_ns, dtype=np.int64), offsets)


#: Media tokens per piece of a multimodal chunk whose bodies are built at once: a chunk's
#: bodies are held until it is fed, and 4 noise images of 1,196 tokens make 15 MB of body.
MEDIA_TOKENS_PER_PIECE = 16_384


def _bounded_media(chunks: Iterator[Schedule]) -> Iterator[Schedule]:
    """Multimodal chunks cut into pieces of about :data:`MEDIA_TOKENS_PER_PIECE` media
    tokens (at least one request each), so bodies are built as they come due; text-only
    chunks pass whole."""
    for c in chunks:
        if not c.lists:
            yield c
            continue
        tokens = sum(c.media_sums(name) for name in c.lists)
        ends = np.cumsum(tokens)
        start = 0
        while start < len(c):
            reach = (ends[start - 1] if start else 0) + MEDIA_TOKENS_PER_PIECE
            stop = max(int(np.searchsorted(ends, reach, side="right")), start + 1)
            yield c.take(np.arange(start, min(stop, len(c))))
            start = stop


def mock_fields(c: Schedule, block_size: int) -> list[str] | None:
    """Per request, the embedded mock's body fields (JSON members) that carry the
    schedule's ``reason_ratio`` and prefix blocks; None when the schedule has neither."""
    ratio = c.extra.get("reason_ratio")
    hashed = c.hash_ids is not None and c.hash_offsets is not None
    if ratio is None and not hashed:
        return None
    out = []
    for i in range(len(c)):
        parts = []
        if ratio is not None and np.isfinite(ratio[i]):
            parts.append(f'"fineserve_reasoning_ratio":{min(max(float(ratio[i]), 0.0), 1.0)!r}')
        if hashed:
            lo, hi = int(c.hash_offsets[i]), int(c.hash_offsets[i + 1])  # type: ignore[index]
            ids = ",".join(str(int(h)) for h in c.hash_ids[lo:hi])  # type: ignore[index]
            parts.append(f'"fineserve_hash_ids":[{ids}],"fineserve_block_size":{block_size}')
        out.append(",".join(parts))
    return out
