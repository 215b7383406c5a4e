"""The servers a run drives: their URLs and models, each request body's template, how
requests spread over them, and the warm-up that checks they answer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .api import BodyTemplate
from .config import TargetConfig
from .console import warn
from .errors import FineserveError
from .prompts.builder import PromptBuilder
from .routing import Deployment, parse_pairs, parse_route
from .runner import EngineOptions, run_engine
from .schedule import Schedule
from .server import check_url, fetch_models


@dataclass
class Targets:
    """The resolved target: full endpoint URLs, the default model, a body template per
    model asked for, and the deployment that assigns requests to endpoints."""

    urls: list[str]
    model: str
    class_models: dict[str, str]
    templates: dict[str, BodyTemplate]
    deployment: Deployment

    @property
    def description(self) -> str:
        if len(self.urls) == 1:
            return self.urls[0]
        return f"{len(self.urls)} endpoints ({self.deployment.route})"


def resolve_model(base: str, cfg: TargetConfig, *, quiet: bool = False) -> str:
    """The model to ask ``base`` for: ``--model``, else the first it lists. LoRA adapters
    the server does not list are named in a warning (a gateway may not list them)."""
    model = cfg.model
    try:
        models = fetch_models(base, api_key=cfg.api_key, headers=cfg.headers, tls=cfg.tls)
    except FineserveError as e:
        if model and "HTTP" in e.message:
            warn(f"{e.message}; using --model {model}")
            return model
        raise
    missing = [m for m in cfg.pins.lora_modules if m not in models]
    if missing and models and not quiet:
        warn(f"{base}/v1/models does not list the LoRA adapter(s) {', '.join(missing)}")
    if model:
        return model
    if not models:
        raise FineserveError(f"GET {base}/v1/models lists no model; pass --model")
    return models[0]


def resolve_targets(cfg: TargetConfig, bases: list[str], *, quiet: bool = False) -> Targets:
    """Checks each server speaks the OpenAI API and finds the model to ask for."""
    path = cfg.path
    urls = [b + path for b in bases]
    if len(set(urls)) < len(urls):
        raise FineserveError("--base-url lists the same server twice")
    for u in urls:
        check_url(u)
    if any(u.startswith("https://") for u in urls) and cfg.tls.insecure and not quiet:
        warn("--insecure: server certificates are not verified")
    if cfg.http2 and not quiet:
        warn(
            "--http2: each lane's requests share one connection, so they reach the server "
            "less precisely on time than over HTTP/1.1 (benches/bench_http2.py)"
        )
    served = [resolve_model(b, cfg, quiet=quiet) for b in bases]
    model = served[0]
    if len(set(served)) > 1 and not cfg.model and not quiet:
        warn(
            f"the endpoints serve different first models {served}; every request asks for "
            f"{model} (pass --model or --class-model)"
        )
    class_models = dict(cfg.class_models)
    extra = dict(cfg.extra_body)
    if cfg.history_api == "responses-server":
        # Server-side history needs the server to keep each response.
        extra = {"store": True, **extra}
    templates = {
        m: BodyTemplate(
            cfg.backend,
            m,
            stream=cfg.stream,
            ignore_eos=cfg.ignore_eos,
            extra=extra,
            chat=cfg.chat,
        )
        for m in {model, *class_models.values(), *cfg.pins.lora_modules}
    }
    policy, pins = parse_route(cfg.route)
    deployment = Deployment.from_options(
        urls,
        policy,
        parse_pairs([*pins, *cfg.route_class], "--route"),
        lambda u: u[: len(u) - len(path)],
    )
    return Targets(urls, model, class_models, templates, deployment)


@dataclass
class WarmUpTiming:
    """What the warm-up's successful requests took (medians, seconds)."""

    ttft_s: float
    tpot_s: float

    def e2e_s(self, output_tokens: float) -> float:
        """Expected end-to-end time of a request of ``output_tokens`` tokens."""
        return self.ttft_s + self.tpot_s * max(output_tokens - 1, 0)


def warm_up(
    targets: Targets,
    body_of_first: bytes,
    count: int,
    options: EngineOptions,
) -> WarmUpTiming | None:
    """FineServe's warm-up: ``count`` copies of the first prompt (at most 32 tokens out) to
    every endpoint; an endpoint that fails them all stops the run in one line. Returns the
    successful requests' median TTFT and TPOT (None if none streamed a token)."""
    urls = targets.urls
    warm_opts = dataclasses.replace(
        options, warm_connections=0, max_concurrency=None, route_groups=[]
    )
    total = count * len(urls)
    rec = run_engine(
        urls,
        np.zeros(total, dtype=np.int64),
        [body_of_first],
        np.zeros(total, dtype=np.uint32),
        np.repeat(np.arange(len(urls), dtype=np.uint32), count),
        np.full(total, 32),
        warm_opts,
        show_progress=False,
    )
    kinds = rec.col("error_kind")
    if rec.interrupted:
        raise FineserveError("interrupted during warm-up")
    for e, url in enumerate(urls):
        mine = rec.col("endpoint_idx") == e
        if np.all(kinds[mine] != 0):
            rows = np.flatnonzero(mine & (kinds != 0))
            msgs = dict(zip(rec.col("error_index").tolist(), rec.columns["error_message"]))
            msg = msgs.get(int(rows[0]), "unknown") if len(rows) else "unknown"
            raise FineserveError(f"warm-up failed: all {count} requests to {url} failed ({msg})")
    sent, first, done = rec.col("sent_ns"), rec.col("first_token_ns"), rec.col("done_ns")
    ok = (kinds == 0) & (first >= 0)
    if not ok.any():
        return None
    chunks = rec.col("n_chunks")
    multi = ok & (chunks > 1)
    tpot = (done - first)[multi] / (chunks[multi] - 1) if multi.any() else np.zeros(1)
    return WarmUpTiming(float(np.median(first[ok] - sent[ok])) / 1e9, float(np.median(tpot)) / 1e9)


def first_body(targets: Targets, builder: PromptBuilder, schedule: Schedule) -> bytes:
    """The warm-up body: the schedule's first prompt, at most 32 tokens out."""
    one = schedule.take(np.arange(1))
    prompts, _ = builder.build_chunk(0, one, record=False)
    return targets.templates[targets.model].render(prompts[0], min(int(schedule.output_len[0]), 32))
