"""fineserve against real vLLM servers (CPU build, tiny random models): the checks of the
``vllm`` test tier as one script, with one summary JSON and a table of the figures.

    python benches/vllm_cpu/run.py --vllm-venv /tmp/vllm-venv [--model-dir /tmp] \\
        [--json vllm_cpu.json] [--work DIR] [--only lengths,reasoning,prefix,routing]

Starts its servers itself (each in its own process group, stopped at the end, also on an
error or Ctrl-C): a plain model with prefix caching (``--enable-prefix-caching
--enable-prompt-tokens-details --block-size 32``), a reasoning model behind
``--reasoning-parser deepseek_r1``, and a second plain server for the routing check. The
models are ``--model-dir``/tiny and tiny-r (``../shared/vllm-cpu/make_tiny_model.py``), or
built into the work directory. The runs and the figures are the ones ``tests/test_vllm.py``
asserts on (``tests/vllm_server.py``); here a failed check is a row marked NO, not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import vllm_server as vs

PARTS = ("lengths", "reasoning", "prefix", "routing")


def _ms(x: Any) -> str:
    return "-" if x is None else f"{x:.0f}"


def _vllm_version(venv: Path) -> str:
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('vllm'))",
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


class Bench:
    def __init__(self, venv: Path, work: Path, model_root: Path | None) -> None:
        self.venv, self.work = venv, work
        self.runs = work / "runs"
        if model_root is not None:
            os.environ[vs.MODEL_DIR_ENV] = str(model_root)
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {"checks": {}, "servers": {}}

    def model(self, reasoning: bool) -> Path:
        started = time.monotonic()
        path = vs.model_dir(self.venv, self.work / "models", reasoning=reasoning)
        self.summary.setdefault("models", {})[path.name] = {
            "path": str(path),
            "ready_s": round(time.monotonic() - started, 1),
        }
        return path

    def row(self, name: str, passed: bool, figures: dict[str, Any], **cells: str) -> None:
        self.summary["checks"][name] = {"passed": passed, **figures}
        self.rows.append({"check": name, "met": "yes" if passed else "NO", **cells})
        print(
            f"  {name}: {'ok' if passed else 'FAILED'} ({figures.get('wall_s', '-')} s)", flush=True
        )

    def failed(self, name: str, error: BaseException) -> None:
        self.summary["checks"][name] = {"passed": False, "error": str(error)[-2000:]}
        self.rows.append({"check": name, "met": "NO", "note": str(error).splitlines()[0][:60]})
        print(f"  {name}: ERROR {str(error).splitlines()[0][:200]}", flush=True)

    def server_started(self, kind: str, server: Any) -> None:
        self.summary["servers"][kind] = {
            "url": server.base_url,
            "startup_s": None if server.startup_s is None else round(server.startup_s, 1),
        }
        print(
            f"{kind} server ready at {server.base_url} ({server.startup_s or 0:.0f} s)", flush=True
        )

    # --- the checks ------------------------------------------------------------------

    def lengths(self, plain: Any, tiny: Path) -> None:
        dataset, trace = self.work / "sharegpt.json", self.work / "hash_trace.jsonl"
        outs = vs.write_sharegpt(dataset)
        rows = vs.write_hash_trace(trace, block=16)
        overhead = vs.chat_overhead(tiny)
        for case in vs.LENGTH_CASES:
            try:
                run = vs.blast(
                    [plain.base_url],
                    self.runs,
                    case.name,
                    case.argv(model=tiny, dataset=dataset, trace=trace),
                    servers=[plain],
                )
            except (AssertionError, subprocess.SubprocessError) as e:
                self.failed(case.name, e)
                continue
            f = vs.length_figures(run, overhead if case.chat else 0)
            out_ok = f["output_equal"] if case.exact_output else f["output_at_most"]
            passed = f["ok"] == f["requests"] and f["prompt_equal"] == f["ok"] == out_ok
            if case.source == "trace":
                passed &= run.col("input_len") == [r["input_length"] for r in rows]
            if case.source == "dataset":
                passed &= run.col("output_len") == [outs[i % len(outs)] for i in run.col("index")]
            self.row(
                case.name,
                passed,
                f,
                ok=f"{f['ok']}/{f['requests']}",
                prompt=f"{f['prompt_equal']}/{f['ok']}" + (f" (+{overhead})" if case.chat else ""),
                output=(
                    f"{f['output_equal']}/{f['ok']}"
                    if case.exact_output
                    else f"{f['output_at_most']}/{f['ok']} (<=)"
                ),
                ttft=_ms(f["mean_ttft_ms"]),
                tpot=_ms(f["mean_tpot_ms"]),
            )

    def reasoning(self, server: Any, tiny_r: Path) -> None:
        overhead = vs.chat_overhead(tiny_r)
        for name, args, n in (
            ("reasoning-chat", vs.REASONING_CHAT_ARGS, 24),
            ("reasoning-responses", vs.REASONING_RESPONSES_ARGS, 10),
        ):
            try:
                run = vs.blast(
                    [server.base_url],
                    self.runs,
                    name,
                    ["--tokenizer", str(tiny_r), *args],
                    servers=[server],
                )
            except (AssertionError, subprocess.SubprocessError) as e:
                self.failed(name, e)
                continue
            f = vs.reasoning_figures(run)
            lf = vs.length_figures(run, overhead)
            share_events = f["reasoning_chunks"] / max(f["chunks"], 1)
            json_share = f["reasoning_token_share"]
            missing = [
                k
                for k in ("total_reasoning_tokens", "reasoning_token_share", "mean_ttfo_ms")
                if k not in run.result
            ]
            passed = (
                f["ok"] == f["requests"] == n
                and f["reasoning_chunks"] == f["chunks"] > 0
                and f["requests_with_answer"] == 0
                and lf["prompt_equal"] == lf["ok"]
                and not missing
                and json_share is not None
                and json_share >= 0.9
            )
            note = f"JSON lacks {', '.join(missing)}" if missing else ""
            if f["server_reasoning_tokens"] == 0 and f["output_tokens"]:
                note = (note + "; " if note else "") + "vLLM usage reasoning_tokens=0"
            self.row(
                name,
                passed,
                {**f, "prompt_equal": lf["prompt_equal"], "reasoning_event_share": share_events},
                ok=f"{f['ok']}/{f['requests']}",
                prompt=f"{lf['prompt_equal']}/{lf['ok']} (+{overhead})",
                output=f"{lf['output_equal']}/{lf['ok']}",
                ttft=_ms(f["mean_ttft_ms"]),
                tpot=_ms(f["mean_tpot_ms"]),
                reasoning=f"events {100 * share_events:.0f}%, JSON "
                + ("-" if json_share is None else f"{100 * json_share:.0f}%"),
                note=note,
            )

    def prefix(self, plain: Any, tiny: Path) -> None:
        name = "mooncake-prefix"
        if not vs.MOONCAKE_TRACE.is_file():
            self.failed(name, RuntimeError(f"{vs.MOONCAKE_TRACE} not found"))
            return
        trace = self.work / "mooncake_slice.jsonl"
        info = vs.write_mooncake_slice(vs.MOONCAKE_TRACE, trace)
        try:
            run = vs.blast(
                [plain.base_url],
                self.runs,
                name,
                ["--tokenizer", str(tiny), "--trace", str(trace), *vs.MOONCAKE_ARGS],
                servers=[plain],
            )
        except (AssertionError, subprocess.SubprocessError) as e:
            self.failed(name, e)
            return
        f = vs.prefix_figures(run, info["hits"])
        theo = f["theoretical_rate_json"] or 0.0
        measured_json = f["measured_rate_json"]
        passed = (
            f["ok"] == f["requests"]
            and f["reported"] == f["ok"]
            and f["over_theoretical_count"] == 0
            and f["measured_rate"] >= 0.5 * theo
            and measured_json is not None
            and abs(measured_json - f["measured_rate"]) <= 0.01
        )
        self.row(
            name,
            passed,
            {**f, "slice": {k: v for k, v in info.items() if k != "hits"}},
            ok=f"{f['ok']}/{f['requests']}",
            ttft=_ms(f["mean_ttft_ms"]),
            cached=(
                f"{f['cached_tokens']}/{f['prompt_tokens']} tok: "
                f"{100 * f['measured_rate']:.1f}% vs theor. {100 * theo:.1f}%"
            ),
            note="" if measured_json is not None else "JSON lacks prefix_hit_rate_measured",
        )

    def routing(self, a: Any, b: Any, tiny: Path) -> None:
        name = "two-servers"
        bases = [a.base_url, b.base_url]
        try:
            run = vs.blast(
                bases, self.runs, name, ["--tokenizer", str(tiny), *vs.ROUTING_ARGS], servers=[a, b]
            )
        except (AssertionError, subprocess.SubprocessError) as e:
            self.failed(name, e)
            return
        f = vs.endpoint_figures(run, bases)
        per = list(f["per_endpoint"].values())
        completed = sorted(v for v in f["breakdown_completed"].values() if v is not None)
        passed = (
            f["ok"] == f["requests"] == 30
            and min(per) >= 1
            and not f["routing_violations"]
            and completed == sorted(f["per_endpoint_ok"].values())
        )
        self.row(
            name,
            passed,
            f,
            ok=f"{f['ok']}/{f['requests']}",
            ttft=_ms(f["mean_ttft_ms"]),
            note=f"per endpoint {per[0]} / {per[1]}; JSON breakdown {completed}; "
            f"{len(f['routing_violations'])} sent to the busier server",
        )

    def table(self) -> str:
        cols = [
            ("check", "check"),
            ("ok", "ok"),
            ("prompt", "prompt tok = input_len"),
            ("output", "output tok = requested"),
            ("ttft", "TTFT ms"),
            ("tpot", "TPOT ms"),
            ("reasoning", "reasoning share"),
            ("cached", "cached tokens measured vs theoretical"),
            ("met", "met"),
            ("note", "note"),
        ]
        lines = [
            "| " + " | ".join(h for _, h in cols) + " |",
            "|" + "---|" * len(cols),
        ]
        for r in self.rows:
            lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |")
        return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--vllm-venv", type=Path, default=vs.venv_from_env(), required=vs.venv_from_env() is None
    )
    ap.add_argument("--model-dir", type=Path, help="directory with tiny/ and tiny-r/ (else built)")
    ap.add_argument("--json", type=Path, default=Path("vllm_cpu.json"), help="summary JSON")
    ap.add_argument("--work", type=Path, help="runs, logs, models (default: a temporary dir)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated of {','.join(PARTS)}")
    a = ap.parse_args()
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"--only: unknown {', '.join(sorted(unknown))}")
    vs.check_venv(a.vllm_venv)
    work = a.work or Path(tempfile.mkdtemp(prefix="fineserve-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    bench = Bench(a.vllm_venv, work, a.model_dir)
    started = time.monotonic()
    bench.summary.update(
        {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "vllm": _vllm_version(a.vllm_venv),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "work": str(work),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
    )
    print(f"work directory {work}", flush=True)
    need_plain = {"lengths", "prefix", "routing"} & set(parts)
    with contextlib.ExitStack() as stack:
        tiny = bench.model(False) if need_plain else None
        tiny_r = bench.model(True) if "reasoning" in parts else None
        # Start every server now, wait for each in turn: start-ups overlap.
        pending: dict[str, Any] = {}
        if tiny is not None:
            pending["plain"] = vs.plain_server(a.vllm_venv, tiny, logs)
        if "routing" in parts and tiny is not None:
            pending["second"] = vs.plain_server(a.vllm_venv, tiny, logs, "tiny-second")
        if tiny_r is not None:
            pending["reasoning"] = vs.reasoning_server(a.vllm_venv, tiny_r, logs)
        servers: dict[str, Any] = {}
        external = vs.external_urls()
        for kind, server in pending.items():
            if kind in external:
                servers[kind] = vs.ExternalServer(kind, external[kind])
            else:
                stack.callback(server.stop)
                server.start()
        for kind, server in pending.items():
            if kind not in servers:
                try:
                    servers[kind] = server.wait_ready(vs.START_TIMEOUT_S + 120 * (len(pending) - 1))
                except RuntimeError as e:
                    print(str(e), file=sys.stderr)
                    bench.summary["servers"][kind] = {"error": str(e)[-2000:]}
                    continue
            bench.server_started(kind, servers[kind])
        if "plain" in servers and tiny is not None:
            if "lengths" in parts:
                bench.lengths(servers["plain"], tiny)
            if "prefix" in parts:
                bench.prefix(servers["plain"], tiny)
            if "routing" in parts and "second" in servers:
                bench.routing(servers["plain"], servers["second"], tiny)
        if "reasoning" in servers and tiny_r is not None:
            bench.reasoning(servers["reasoning"], tiny_r)
    bench.summary["wall_s"] = round(time.monotonic() - started, 1)
    a.json.write_text(json.dumps(bench.summary, indent=2, default=str))
    print()
    print(bench.table())
    print(
        f"\n{sum(r['met'] == 'yes' for r in bench.rows)}/{len(bench.rows)} checks met; "
        f"{bench.summary['wall_s']:.0f} s; summary in {a.json}"
    )
    return 0 if bench.rows and all(r["met"] == "yes" for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
