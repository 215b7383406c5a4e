"""Prompts of exact token length under a real Hugging Face tokenizer (built offline in a
fixture), intended and unintended prefix sharing, chat templates, backends' bodies, and
multi-endpoint routing checked on the mocks' own counters."""

from __future__ import annotations

import inspect
import json
import json as _json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, invoke
from fineserve.api import BodyTemplate
from fineserve.mock import MockServer
from fineserve.prompts import (
    PrefixHitCounter,
    TokenizedPromptBuilder,
    load_prompt_texts,
    load_tokenizer,
)
from fineserve.results import read_requests
from fineserve.routing import Deployment

CHAT_TEMPLATE = (
    "{% for m in messages %}<|begin|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|begin|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style) trained on Python's own sources,
    saved as a Hugging Face tokenizer directory with a chat template."""
    import argparse
    import collections
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import email.message
    import json as json_mod
    import logging

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        inspect.getsource(m)
        for m in (argparse, collections, email.message, json_mod, logging, inspect)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=["<|begin|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tok(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(str(tokenizer_dir))


def lengths(tok, prompts: list[str]) -> list[int]:  # type: ignore[no-untyped-def]
    return [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]


@pytest.mark.slow
def test_exact_lengths_round_trip(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    b = TokenizedPromptBuilder(tok, seed=3, max_input_len=6000, check="all")
    rng = np.random.default_rng(0)
    want = np.concatenate([[1, 2, 3, 5, 8], rng.integers(1, 6000, 300)])
    prompts, actual, report = b.build(0, want)
    assert report.checked == len(want) and report.mismatched == 0
    assert lengths(tok, prompts) == want.tolist() == actual.tolist()
    # Distinct content up front: no two prompts share their first tokens by accident.
    ids = tok(prompts[5:], add_special_tokens=False)["input_ids"]
    firsts = {tuple(x[:8]) for x in ids if len(x) >= 8}
    assert len(firsts) == sum(len(x) >= 8 for x in ids)


@pytest.mark.slow
def test_sampled_check_checks_a_sample_then_everything_after_a_miss(tok) -> None:  # type: ignore[no-untyped-def]
    b = TokenizedPromptBuilder(tok, seed=5, max_input_len=2000)  # check="sample"
    want = np.random.default_rng(1).integers(1, 2000, 1000)
    prompts, _, report = b.build(0, want)
    assert report.checked == 256 and report.mismatched == 0 and not b.check_all
    assert lengths(tok, prompts) == want.tolist()
    # A builder that saw a miss checks every later prompt.
    b.check_all = True
    _, _, report = b.build(1000, want[:300])
    assert report.checked == 300


def test_dataset_source_and_suffix(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    share = tmp_path / "sharegpt.json"
    convs = [
        {
            "conversations": [
                {"from": "human", "value": f"Question {i}: why is the sky blue?"},
                {"from": "gpt", "value": "Rayleigh scattering."},
            ]
        }
        for i in range(50)
    ] + [{"conversation": []}, {"nothing": 1}]
    share.write_text(json.dumps(convs))
    texts, summary = load_prompt_texts(share)
    assert len(texts) == 50 and "skipped 2 no prompt text" in summary
    from fineserve.prompts.tokenized import source_text_from

    b = TokenizedPromptBuilder(
        tok,
        source_text=source_text_from(texts),
        seed=1,
        max_input_len=300,
        prompt_suffix=" Answer briefly.",
        check="all",
    )
    prompts, _, report = b.build(10, np.array([40, 120, 300]))
    assert report.mismatched == 0
    assert all(p.endswith(" Answer briefly.Assistant:") for p in prompts)  # as FineServe
    assert lengths(tok, prompts) == [40, 120, 300]
    assert "sky" in " ".join(prompts)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a b c"}\nnot json\n{"text": "d e f"}\n')
    texts, summary = load_prompt_texts(jl)
    assert texts == ["a b c", "d e f"] and "1 malformed line" in summary


@pytest.mark.slow
def test_hash_ids_share_exactly_the_shared_blocks(tok) -> None:  # type: ignore[no-untyped-def]
    b = TokenizedPromptBuilder(tok, seed=0, block_size=64, max_input_len=1000, check="all")
    hash_ids = np.array([7, 8, 9, 7, 8, 10, 11, 7])
    offsets = np.array([0, 3, 6, 7, 8])
    want = np.array([180, 150, 60, 64])
    prompts, _, report = b.build(0, want, hash_ids, offsets)
    assert report.mismatched == 0
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    assert [len(x) for x in ids] == want.tolist()
    assert ids[0][:128] == ids[1][:128]  # blocks 7, 8 shared
    assert ids[0][128:134] != ids[1][128:134]  # block 9 vs 10
    assert ids[2][:6] != ids[0][:6]  # block 11 shares nothing
    assert ids[3] == ids[0][:64]  # block 7 alone


def test_distinct_block_ids_never_share_a_block_even_from_a_tiny_source(tok) -> None:  # type: ignore[no-untyped-def]
    """A source of a few hundred tokens is the pool many times over, so windows repeat;
    blocks of different ids must still differ from their first token (else a prefix cache
    would hit where the trace shares nothing), and equal ids must still match."""
    from fineserve.prompts import SyntheticPromptBuilder
    from fineserve.schedule import Schedule

    source = " The quick brown fox jumps over the lazy dog while the cat sleeps." * 8
    b = TokenizedPromptBuilder(tok, source_text=source, seed=0, block_size=32, check="all")
    n = 400
    ids = np.arange(1000, 1000 + n)  # one block per request, all different
    lens = np.full(n, 32)
    prompts, _, report = b.build(0, lens, ids, np.arange(n + 1))
    assert report.mismatched == 0
    enc = tok(prompts, add_special_tokens=False)["input_ids"]
    assert len({tuple(x[:8]) for x in enc}) == n
    again, _, _ = b.build(n, lens[:3], ids[:3], np.arange(4))
    assert again == prompts[:3]

    syn = SyntheticPromptBuilder(0, pool_words=64, block_size=32)
    big_ids = np.arange(n) * 65536  # equal modulo the pool: the old offsets coincided
    sched = Schedule(np.arange(n), lens, lens, hash_ids=big_ids, hash_offsets=np.arange(n + 1))
    words, _ = syn.build_chunk(0, sched)
    assert len({w.split()[0] for w in words}) == n
    assert all(len(w.split()) == 32 for w in words)


@pytest.mark.slow
def test_shared_prefix_groups(tok) -> None:  # type: ignore[no-untyped-def]
    b = TokenizedPromptBuilder(
        tok, seed=0, shared_prefix_groups=2, shared_prefix_len=50, check="all"
    )
    prompts, _, report = b.build(0, np.array([120, 120, 120, 120, 30]))
    assert report.mismatched == 0
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    assert ids[0][:50] == ids[2][:50] and ids[1][:50] == ids[3][:50]
    assert ids[0][:5] != ids[1][:5]
    assert ids[0][50:55] != ids[2][50:55]  # the suffixes are the requests' own
    assert len(ids[4]) == 30 and ids[4] == ids[0][:30]


@pytest.mark.slow
def test_chat_template_applied_with_exact_length(tok) -> None:  # type: ignore[no-untyped-def]
    b = TokenizedPromptBuilder(tok, seed=0, apply_chat_template=True, check="all")
    prompts, _, report = b.build(0, np.array([40, 400]))
    assert report.mismatched == 0
    for p in prompts:
        assert p.startswith("<|begin|>user\n") and p.endswith("<|end|>\n<|begin|>assistant\n")
    assert lengths(tok, prompts) == [40, 400]


@pytest.mark.slow
def test_special_tokens_count_towards_a_completions_prompt(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """A Llama-style tokenizer adds BOS, so the server counts it: the prompt body is one
    token shorter; a chat template that writes BOS itself does not get a second one."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    raw.add_special_tokens(["<s>"])
    bos_id = raw.token_to_id("<s>")
    raw.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|end|>")
    fast.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    fast.save_pretrained(tmp_path / "bos")
    tok = load_tokenizer(str(tmp_path / "bos"))
    want = np.array([40, 400])
    for template in (False, True):
        b = TokenizedPromptBuilder(tok, seed=0, apply_chat_template=template, check="all")
        prompts, _, report = b.build(0, want)
        assert report.mismatched == 0
        served = tok(prompts)["input_ids"]  # as the server tokenizes a completions prompt
        assert [len(x) for x in served] == want.tolist()
        assert all(x[0] == bos_id and x[1] != bos_id for x in served)
    chat = TokenizedPromptBuilder(tok, seed=0, check="all", count_special_tokens=False)
    prompts, _, _ = chat.build(0, want)
    assert lengths(tok, prompts) == want.tolist()  # a chat message: no BOS of its own


def test_prefix_hit_rate_matches_a_direct_count() -> None:
    rng = np.random.default_rng(4)
    n, bs = 400, 16
    counts = rng.integers(1, 6, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    # Ids drawn from a small space so that prefixes repeat.
    ids = np.concatenate([np.cumsum(rng.integers(1, 4, c)) + rng.integers(0, 300) for c in counts])
    lens = counts * bs - rng.integers(0, bs, n)
    c = PrefixHitCounter(bs)
    for lo in range(0, n, 64):  # in chunks, as a run feeds them
        hi = min(n, lo + 64)
        c.add(lens[lo:hi], ids[offsets[lo] : offsets[hi]], offsets[lo : hi + 1] - offsets[lo])
    seen: set[int] = set()
    hit = 0
    for i in range(n):
        prefix_ok = True
        for j, b in enumerate(ids[offsets[i] : offsets[i + 1]].tolist()):
            take = min(bs, int(lens[i]) - j * bs)
            if prefix_ok and b in seen:
                hit += take
            else:
                prefix_ok = False
            seen.add(b)
    assert c.rate == pytest.approx(hit / lens.sum())
    assert 0.1 < c.rate < 0.9


@pytest.mark.parametrize(
    "backend, endpoint, must, must_not",
    [
        ("vllm", None, {"ignore_eos": True, "max_tokens": 9, "min_tokens": 9}, ["messages"]),
        ("sglang", None, {"ignore_eos": True, "max_tokens": 9, "min_tokens": 9}, []),
        ("openai", None, {"max_tokens": 9}, ["ignore_eos", "min_tokens"]),
        ("openai-chat", None, {"max_completion_tokens": 9}, ["ignore_eos", "prompt"]),
        ("tgi", None, {"max_tokens": 9}, ["ignore_eos", "min_tokens", "prompt"]),
        ("vllm", "/v1/chat/completions", {"min_tokens": 9, "max_tokens": 9}, ["prompt"]),
    ],
)
def test_backend_bodies(backend: str, endpoint: str | None, must: dict, must_not: list) -> None:
    from fineserve.api import DEFAULT_ENDPOINT, is_chat_endpoint

    chat = is_chat_endpoint(endpoint or DEFAULT_ENDPOINT[backend])
    body = _json.loads(
        BodyTemplate(backend, "m", stream=True, ignore_eos=True, chat=chat).render("hi x", 9)
    )
    for k, v in must.items():
        assert body[k] == v
    for k in must_not:
        assert k not in body
    if chat:
        assert body["messages"] == [{"role": "user", "content": "hi x"}]
    else:
        assert body["prompt"] == "hi x"


def test_body_template_slots_and_overrides() -> None:
    from fineserve.errors import FineserveError

    t = BodyTemplate("vllm", "m", stream=False, ignore_eos=True, extra={"min_tokens": 1})
    for prompt, n in [('a "q"\n', 5), ("b", 7)]:
        body = _json.loads(t.render(prompt, n))
        assert (body["prompt"], body["max_tokens"], body["min_tokens"]) == (prompt, n, 1)
        assert body["ignore_eos"] is True and body["model"] == "m"
    off = _json.loads(BodyTemplate("vllm", "m", stream=False, ignore_eos=False).render("x", 3))
    assert "ignore_eos" not in off and "min_tokens" not in off and off["max_tokens"] == 3
    for bad in ({"max_tokens": 4}, {"prompt": "fixed"}):
        with pytest.raises(FineserveError, match="must not replace"):
            BodyTemplate("vllm", "m", stream=False, ignore_eos=True, extra=bad)


def test_blast_with_tokenizer_reports_exact_lengths(tokenizer_dir: Path, tmp_path: Path) -> None:
    req = tmp_path / "r.parquet"
    res = tmp_path / "r.json"
    r = invoke(
        "blast",
        "--tokenizer",
        str(tokenizer_dir),
        "--num-prompts",
        "60",
        "--request-rate",
        "200",
        "--random-input-len",
        "300",
        "--random-range-ratio",
        "0.9",
        "--random-output-len",
        "4",
        "--prompt-check",
        "all",
        "--disable-tqdm",
        "--save-requests",
        str(req),
        "--output-file",
        str(res),
    )
    assert r.exit_code == 0, r.output
    m = json.loads(res.read_text())
    assert m["prompt_check"] == {"checked": 60, "repaired": 0, "mismatched": 0}
    table, _ = read_requests(req)
    lens = table["input_len"].to_pylist()
    assert min(lens) >= 30 and max(lens) <= 570 and len(set(lens)) > 10
    assert sum(lens) == m["total_input_tokens"]
    for bad, why in [
        (tmp_path / "nope", "no such directory"),
        (tmp_path, "no tokenizer.json"),
        ("no-such-model-anywhere", "cannot load it offline"),
    ]:
        r = invoke("blast", "--tokenizer", str(bad), "--num-prompts", "1")
        assert r.exit_code != 0 and why in r.output and "Traceback" not in r.output


def test_fineserve_presaved_dataset_gives_output_lengths(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """FineServe's pre-saved JSON (input_text, output_length): the texts feed the prompts,
    and with --dataset-output-len request i asks for entry (i mod N)'s output length."""
    data = tmp_path / "fineserve.json"
    entries = [
        {"input_text": f"Entry {i}: tell me about the weather in town {i}.", "output_length": n}
        for i, n in enumerate([3, 5, 7])
    ]
    data.write_text(json.dumps([*entries, {"input_text": "no length here"}]))
    req = tmp_path / "r.parquet"
    args = [
        "blast",
        "--tokenizer",
        str(tokenizer_dir),
        "--dataset-path",
        str(data),
        "--num-prompts",
        "9",
        "--request-rate",
        "100",
        "--random-input-len",
        "40",
        "--disable-tqdm",
        "--warmup-requests",
        "0",
        "--save-requests",
        str(req),
    ]
    r = invoke(*args, "--dataset-output-len")
    assert r.exit_code == 0, r.output
    assert "4 prompts (JSON), 3 with an output length" in r.output  # notices show with the mock
    table, _ = read_requests(req)
    assert table["output_len"].to_pylist() == [3, 5, 7] * 3
    assert table["completion_tokens"].to_pylist() == [3, 5, 7] * 3  # what the server was asked
    r = invoke(*args[:-2], "--random-output-len", "4")  # without the flag: the workload's
    assert r.exit_code == 0, r.output
    nolen = tmp_path / "nolen.jsonl"
    nolen.write_text('{"prompt": "a b c d"}\n')
    r = invoke(
        "blast",
        "--tokenizer",
        str(tokenizer_dir),
        "--dataset-path",
        str(nolen),
        "--dataset-output-len",
        "--num-prompts",
        "2",
    )
    assert r.exit_code != 0 and "has no output_length" in r.output
    r = invoke("blast", "--dataset-output-len", "--num-prompts", "2")
    assert r.exit_code != 0 and "needs --dataset-path" in r.output


def test_dataset_file_shapes(tmp_path: Path) -> None:
    """ShareGPT's singular ``conversation`` key, a pretty-printed JSON object holding the
    list, and one that is itself an entry."""
    from fineserve.prompts import load_prompt_dataset

    conv = tmp_path / "conv.json"
    conv.write_text(
        json.dumps(
            [
                {
                    "conversation": [
                        {"from": "user", "value": "first?"},
                        {"from": "gpt", "value": "x"},
                    ]
                },
                {"conversation": [{"from": "gpt", "value": "no human turn"}]},
            ]
        )
    )
    texts, outs, summary = load_prompt_dataset(conv)
    assert texts == ["first?"] and outs == [-1] and "skipped 1 no prompt text" in summary
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"input_text": "a", "output_length": 9}]}, indent=2))
    assert load_prompt_dataset(wrapped)[:2] == (["a"], [9])
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"prompt": "just one", "max_tokens": 4}, indent=2))
    assert load_prompt_dataset(single)[:2] == (["just one"], [4])


@pytest.mark.slow
def test_round_robin_and_least_outstanding_spread_load(tmp_path: Path) -> None:
    fast1, fast2 = MockServer(ttft_ms=2, itl_ms=1), MockServer(ttft_ms=2, itl_ms=1)
    slow = MockServer(ttft_ms=300, itl_ms=20)
    try:
        urls = [fast1.base_url, fast2.base_url, slow.base_url]
        base = [
            "blast",
            "--num-prompts",
            "300",
            "--request-rate",
            "300",
            "--random-output-len",
            "8",
            "--warmup-requests",
            "0",
            "--disable-tqdm",
        ]
        for u in urls:
            base += ["--base-url", u]
        r = invoke(*base)
        assert r.exit_code == 0, r.output
        got = [s.stats()["completions"] for s in (fast1, fast2, slow)]
        assert got == [100, 100, 100]
        res = tmp_path / "lo.json"
        r = invoke(*base, "--route", "least-outstanding", "--output-file", str(res))
        assert r.exit_code == 0, r.output
        after = [s.stats()["completions"] - g for s, g in zip((fast1, fast2, slow), got)]
        assert sum(after) == 300
        # The slow server holds its requests ~30x longer, so it gets far fewer.
        assert after[2] < 30 and min(after[:2]) > 100
        by_endpoint = json.loads(res.read_text())["breakdown"]["endpoint"]
        assert sum(v["completed"] for v in by_endpoint.values()) == 300
        assert by_endpoint[slow.base_url + "/v1/completions"]["completed"] == after[2]
    finally:
        for s in (fast1, fast2, slow):
            s.stop()


@pytest.mark.slow
@pytest.mark.skipif(not (Path(__file__).parents[1] / "datasets").is_dir(), reason="no datasets")
def test_route_class_and_class_model(tmp_path: Path) -> None:
    datasets = Path(__file__).resolve().parents[1] / "datasets"
    a, b = MockServer(ttft_ms=2, itl_ms=1), MockServer(ttft_ms=2, itl_ms=1)
    try:
        req = tmp_path / "r.parquet"
        r = invoke(
            "blast",
            "--mode",
            "parametric",
            "--datasets-dir",
            str(datasets),
            "--model-class",
            "azure_code",
            "--model-class",
            "mooncake_synthetic",
            "--duration",
            "60",
            "--time-scale",
            "5",
            "--random-output-len",
            "4",
            "--base-url",
            a.base_url,
            "--base-url",
            b.base_url,
            "--route",
            f"azure_code={a.base_url}",
            "--class-model",
            "mooncake_synthetic=other-model",
            "--warmup-requests",
            "0",
            "--disable-tqdm",
            "--save-requests",
            str(req),
        )
        assert r.exit_code == 0, r.output
        table, _ = read_requests(req)
        cls = table["class"].to_pylist()
        ep = table["endpoint"].to_pylist()
        model = table["model"].to_pylist()
        azure = [e for c, e in zip(cls, ep) if c == "azure_code"]
        moon = [e for c, e in zip(cls, ep) if c == "mooncake_synthetic"]
        assert azure and set(azure) == {a.base_url + "/v1/completions"}
        assert len(set(moon)) == 2  # the other class spreads over both
        assert {m for c, m in zip(cls, model) if c == "mooncake_synthetic"} == {"other-model"}
        assert {m for c, m in zip(cls, model) if c == "azure_code"} == {"fineserve-mock"}
        assert a.stats()["completions"] + b.stats()["completions"] == table.num_rows
    finally:
        a.stop()
        b.stop()


def test_deployment_errors() -> None:
    from fineserve.errors import FineserveError

    with pytest.raises(FineserveError, match="not one of the --base-url"):
        Deployment.from_options(
            ["http://a/v1/c"], "round-robin", {"x": "http://b"}, lambda u: u[: -len("/v1/c")]
        )
    r = invoke("blast", "--shared-prefix-groups", "4", "--num-prompts", "2")
    assert r.exit_code != 0 and "go together" in r.output
    r = invoke("blast", "--prompt-suffix", " Answer.", "--num-prompts", "2")
    assert r.exit_code != 0 and "need --tokenizer" in r.output
    r = invoke("blast", "--route", "novalue")
    assert r.exit_code != 0 and "CLASS=URL" in r.output and "Traceback" not in r.output
    r = invoke("blast", "--route", "round-robin", "--route", "least-outstanding")
    assert r.exit_code != 0 and "one policy at most" in r.output
    r = invoke("blast", "--route-class", "novalue")  # the older spelling
    assert r.exit_code != 0 and "NAME=VALUE" in r.output


@pytest.mark.parametrize("route", ["round-robin", "least-outstanding"])
def test_turns_stay_on_the_server_of_their_conversation(tmp_path: Path, route: str) -> None:
    """Later turns go where the previous turn went (session affinity), whatever the policy;
    with --no-turn-affinity they follow the policy."""
    path = tmp_path / "bailian.jsonl"
    _bailian_trace(path, conversations=5)  # odd: round-robin alone moves later turns
    servers = [MockServer(ttft_ms=2, itl_ms=1) for _ in range(2)]
    rows = [_json.loads(x) for x in path.read_text().splitlines()]
    ids = [row["chat_id"] for row in rows]
    parents = [ids.index(r["parent_chat_id"]) if r["parent_chat_id"] >= 0 else -1 for r in rows]
    try:
        moved = {}
        for affinity in ("--turn-affinity", "--no-turn-affinity"):
            req = tmp_path / f"{affinity}.parquet"
            args = ["blast", "--mode", "replay", "--trace", str(path), "--time-scale", "8"]
            for s in servers:
                args += ["--base-url", s.base_url]
            r = invoke(
                *args,
                "--route",
                route,
                affinity,
                "--disable-tqdm",
                "--warmup-requests",
                "0",
                "--save-requests",
                str(req),
            )
            assert r.exit_code == 0, r.output
            table, _ = read_requests(req)
            assert set(table["error_kind"].to_pylist()) == {"ok"}
            ep = table["endpoint"].to_pylist()
            assert len(set(ep)) == 2  # conversations spread over both servers
            moved[affinity] = sum(ep[i] != ep[p] for i, p in enumerate(parents) if p >= 0)
        assert moved["--turn-affinity"] == 0
        if route == "round-robin":  # least-outstanding may keep them together by chance
            assert moved["--no-turn-affinity"] > 0
    finally:
        for s in servers:
            s.stop()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data absent")
def test_mooncake_replay_reports_prefix_hit_rate(tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    r = invoke(
        "blast",
        "--mode",
        "replay",
        "--trace",
        str(SHARED_DATA / "mooncake/synthetic_trace.jsonl"),
        "--num-prompts",
        "200",
        "--time-scale",
        "20",
        "--random-output-len",
        "4",
        "--disable-tqdm",
        "--output-file",
        str(res),
    )
    assert r.exit_code == 0, r.output
    rate = json.loads(res.read_text())["prefix_hit_rate_theoretical"]
    assert 0.0 < rate < 1.0


def _bailian_trace(path: Path, conversations: int = 12, turns: int = 3) -> None:
    """Qwen-Bailian-shaped JSONL: each turn's input holds its history plus 40 new tokens;
    turns of one conversation are 2 s apart, conversations start 0.3 s apart."""
    rows = []
    cid = 1000
    for c in range(conversations):
        parent, inp = -1, 60 + c
        for t in range(turns):
            rows.append(
                {
                    "chat_id": cid,
                    "parent_chat_id": parent,
                    "turn": t + 1,
                    "timestamp": 300 * c + 2000 * t,
                    "input_length": inp,
                    "output_length": 8,
                    "hash_ids": [cid],
                }
            )
            parent, cid, inp = cid, cid + 1, inp + 8 + 40
    rows.sort(key=lambda r: r["timestamp"])
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.slow
def test_bailian_turns_extend_their_history(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fineserve.requests import RequestShapes, engine_chunks
    from fineserve.traces import TraceOptions, load_trace
    from fineserve.workloads.replay import replay_chunks

    path = tmp_path / "bailian.jsonl"
    _bailian_trace(path)
    trace = load_trace(path, TraceOptions())
    assert (trace.extra["parent"] >= 0).sum() == 24
    assert set(np.unique(trace.extra["followers"])) == {0, 1}
    assert len(np.unique(trace.extra["session_id"])) == 12
    b = TokenizedPromptBuilder(tok, seed=0, check="all")
    template = BodyTemplate("vllm", "m", stream=True, ignore_eos=True)
    shapes = RequestShapes(b, {"m": template}, "m", {}, Deployment(["http://x/v1/completions"]))
    # Chunks of 5 rows, so parents and followers sit in different chunks.
    import fineserve.workloads.replay as replay_mod

    old = replay_mod.CHUNK_ROWS
    replay_mod.CHUNK_ROWS = 5
    try:
        chunks = list(engine_chunks(replay_chunks(trace, time_scale=2.0), shapes))
    finally:
        replay_mod.CHUNK_ROWS = old
    prompts = [_json.loads(body)["prompt"] for ch in chunks for body in ch.bodies]
    parent = np.concatenate([ch.turns[0] for ch in chunks])
    think = np.concatenate([ch.turns[1] for ch in chunks])
    want = trace.input_len
    assert lengths(tok, prompts) == want.tolist()
    for i in np.flatnonzero(parent >= 0).tolist():
        assert prompts[i].startswith(prompts[parent[i]])
        assert think[i] == 1_000_000_000  # 2 s of trace at time scale 2
    roots = np.flatnonzero(parent < 0)
    assert len({p[:20] for p in (prompts[i] for i in roots)}) == len(roots)


@pytest.mark.slow
@pytest.mark.parametrize("tokenized", [False, True])
def test_chat_turns_carry_the_conversation_as_messages(
    tok, tmp_path: Path, tokenized: bool
) -> None:  # type: ignore[no-untyped-def]
    """On a chat endpoint a later turn is its conversation so far: the earlier turns'
    messages, the stand-in answer as the assistant's, then its own text as the user's,
    with as many tokens in all as the trace's input length."""
    from fineserve.prompts import SyntheticPromptBuilder
    from fineserve.requests import RequestShapes, engine_chunks
    from fineserve.traces import TraceOptions, load_trace
    from fineserve.workloads.replay import replay_chunks

    path = tmp_path / "bailian.jsonl"
    _bailian_trace(path, conversations=6, turns=3)
    trace = load_trace(path, TraceOptions())
    b = TokenizedPromptBuilder(tok, seed=0, check="all") if tokenized else SyntheticPromptBuilder(0)
    template = BodyTemplate("vllm", "m", stream=True, ignore_eos=True, chat=True)
    url = "http://x/v1/chat/completions"
    shapes = RequestShapes(b, {"m": template}, "m", {}, Deployment([url]))
    chunks = list(engine_chunks(replay_chunks(trace), shapes))
    bodies = [_json.loads(body) for ch in chunks for body in ch.bodies]
    parent = np.concatenate([ch.turns[0] for ch in chunks])
    output_len = trace.output_len
    for i, body in enumerate(bodies):
        msgs = body["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) + ["user"]
        p = int(parent[i])
        if p < 0:
            assert len(msgs) == 1
            continue
        assert msgs[:-2] == bodies[p]["messages"]  # the conversation so far, unchanged
        if tokenized:
            n_tokens = [len(tok(m["content"], add_special_tokens=False)["input_ids"]) for m in msgs]
            assert n_tokens[-2] == output_len[p]  # the answer: the previous turn's output
            assert sum(n_tokens) == trace.input_len[i]
        else:  # synthetic prompts: words
            assert len(msgs[-2]["content"].split()) == output_len[p]
    assert sum(len(b["messages"]) == 5 for b in bodies) == 6  # every third turn


def test_blast_replays_conversations_turn_after_turn(tmp_path: Path) -> None:
    path = tmp_path / "bailian.jsonl"
    _bailian_trace(path, conversations=6)
    req = tmp_path / "r.parquet"
    r = invoke(
        "blast",
        "--mode",
        "replay",
        "--trace",
        str(path),
        "--time-scale",
        "4",
        "--disable-tqdm",
        "--save-requests",
        str(req),
        "--warmup-requests",
        "0",
    )
    assert r.exit_code == 0, r.output
    table, _ = read_requests(req)
    t = {c: np.asarray(table[c].to_pylist()) for c in ("sent_ns", "done_ns", "scheduled_ns")}
    trace_rows = [_json.loads(x) for x in path.read_text().splitlines()]
    ids = [row["chat_id"] for row in trace_rows]
    assert all(k == "ok" for k in table["error_kind"].to_pylist())
    for i, row in enumerate(trace_rows):
        if row["parent_chat_id"] < 0:
            continue
        p = ids.index(row["parent_chat_id"])
        # Released 0.5 s (2 s / 4) after the previous turn ended, and sent then.
        assert t["scheduled_ns"][i] == t["done_ns"][p] + 500_000_000
        assert 0 <= t["sent_ns"][i] - t["scheduled_ns"][i] < 5_000_000


@pytest.mark.slow
def test_pool_grows_for_a_longer_prompt_than_it_was_sized_for(tok) -> None:  # type: ignore[no-untyped-def]
    b = TokenizedPromptBuilder(tok, seed=2, max_input_len=100, check="all")
    small = b.pool.n
    long = small // 2 + 1000  # more than the first pool can hold twice over
    prompts, _, report = b.build(0, np.array([50, long]))
    assert b.pool.n > small and report.mismatched == 0
    assert lengths(tok, prompts) == [50, long]
