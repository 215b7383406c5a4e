"""One typed configuration per stage, built once from the command line.

Every option's default lives here (the click options read it with :func:`default_of`), and
this is the only module that knows click's parameter names (``from_params``): past it, each
stage takes its own slice — :class:`WorkloadConfig` the workload, :class:`PromptConfig` the
prompt builder, :class:`TargetConfig` the servers and bodies, :class:`EngineConfig` the
engine's sizing and timeouts, :class:`MetricsConfig` the metrics, :class:`OutputConfig` the
files, :class:`MockConfig` the embedded mock, :class:`ScaleOutConfig` the run spread over
processes or Ray workers — and :class:`BlastConfig` holds them all.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FineserveError
from .traces.readers import TraceOptions
from .transport import Header, TlsConfig, parse_header, parse_headers

#: Metrics that take ``--percentile-metrics`` keys.
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el", "ttfo")


def default_of(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name`` (for the click option)."""
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(name)


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


def _given(p: Mapping[str, Any], **fields: str) -> dict[str, Any]:
    """``{field: p[param]}`` for each parameter that has a value: one left unset (None, or
    absent from a hand-built mapping) keeps the dataclass's default, the only one."""
    return {f: p[name] for f, name in fields.items() if p.get(name) is not None}


# ---------------------------------------------------------------------------- workload


def trace_options_from_params(p: Mapping[str, Any]) -> TraceOptions:
    """How a trace file is read (format, columns, unit; None = the format's default),
    from the trace options' parameters."""
    return TraceOptions(**{f.name: p.get(f.name) for f in dataclasses.fields(TraceOptions)})


@dataclass(frozen=True)
class LengthConfig:
    """Request lengths where the workload has none of its own."""

    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    #: Sample (input, output) pairs from this CSV instead.
    request_lengths_csv: Path | None = None


@dataclass(frozen=True)
class RampConfig:
    kind: str  # linear | step
    start_rate: float = 1.0
    end_rate: float = 10.0
    steps: int = 5


@dataclass(frozen=True)
class ParametricConfig:
    """FineServe's parametric model: per-window arrivals, NB micro-bursts, class lengths."""

    model_classes: tuple[str, ...] = ()
    datasets_dir: Path | None = None
    gamma_params_csv: Path | None = None
    window_start_column: str = "window_start_ms"
    window_end_column: str = "window_end_ms"
    gamma_shape_column: str = "gamma_shape"
    gamma_scale_column: str = "gamma_scale"
    window_s: float = 300.0
    extension_mode: str = "repeat_jitter"
    jitter_ratio: float = 0.05
    arrivals: str = "auto"
    nb_json: Path | None = None
    disable_nb_lt10b: bool = False
    class_lengths: bool = True
    nb_zero: str = "truncate"
    #: Spread requests uniformly inside their slot instead of the trace's placement (a
    #: trace on a clock grid otherwise generates on the same grid).
    dequantize: bool = False


#: Per modality, the options that give its count and per-item budget.
MEDIA_MIX_OPTIONS = {
    "image": ("--mm-images-per-request", "--mm-image-tokens"),
    "audio": ("--mm-audio-per-request", "--mm-audio-tokens"),
    "video": ("--mm-videos-per-request", "--mm-video-tokens"),
}


@dataclass(frozen=True)
class MediaMixConfig:
    """Synthetic media per request (``--mm-images-per-request`` with ``--mm-image-tokens``,
    likewise audio and video): counts and per-item token budgets as distributions
    (:mod:`fineserve.media.dist`). ServeGen's multimodal pools bring their own."""

    images_per_request: str | None = None
    image_tokens: str | None = None
    audio_per_request: str | None = None
    audio_tokens: str | None = None
    videos_per_request: str | None = None
    video_tokens: str | None = None

    def spec(self, modality: str) -> tuple[str | None, str | None]:
        """(count, tokens) of one modality."""
        if modality == "image":
            return self.images_per_request, self.image_tokens
        if modality == "audio":
            return self.audio_per_request, self.audio_tokens
        return self.videos_per_request, self.video_tokens

    @property
    def active(self) -> bool:
        return any(self.spec(m)[0] is not None for m in ("image", "audio", "video"))

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> MediaMixConfig:
        cfg = cls(
            **{
                f.name: (str(p[f"mm_{f.name}"]) if p.get(f"mm_{f.name}") is not None else None)
                for f in dataclasses.fields(cls)
            }
        )
        for m, (count_opt, tokens_opt) in MEDIA_MIX_OPTIONS.items():
            count, tokens = cfg.spec(m)
            if (count is None) != (tokens is None):
                raise FineserveError(f"{count_opt} and {tokens_opt} go together")
        if cfg.active:
            from .media.mix import MediaSampler

            MediaSampler(cfg)  # validates the distributions, before any server starts
        return cfg


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send and when: ``generate`` and ``blast`` share it."""

    mode: str = "poisson"
    #: A schedule written by ``generate``: replayed (sliced and scaled), ``mode`` ignored.
    schedule: Path | None = None
    seed: int = 0
    num_prompts: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    ramp: RampConfig | None = None
    lengths: LengthConfig = field(default_factory=LengthConfig)
    #: replay/burstgpt: the trace (``--trace`` or ``--request-trace-csv``).
    trace: Path | None = None
    trace_read: TraceOptions = field(default_factory=TraceOptions)
    time_scale: float = 1.0
    start_s: float = 0.0
    duration_s: float | None = None
    parametric: ParametricConfig = field(default_factory=ParametricConfig)
    servegen_pool: Path | None = None
    servegen_clients: tuple[int, ...] | None = None
    burstgpt_params: Path | None = None
    rate_scale: float | None = None
    media: MediaMixConfig = field(default_factory=MediaMixConfig)
    #: Conversation traces: how long after its previous turn ends a turn leaves
    #: (``workloads.think``: gap, gap-minus-latency, fixed:S, lognormal:MU,SIGMA).
    think_time: str = "gap"
    #: The delay after a turn whose reply was a tool call, before its tool result is sent
    #: (``think``: the turn's think time; fixed:S, lognormal:MU,SIGMA).
    tool_latency: str = "think"
    #: The workload options the command line set (a schedule refuses those it cannot apply;
    #: an explicit --start is kept even when idle).
    given: frozenset[str] = frozenset()

    @classmethod
    def from_params(
        cls, p: Mapping[str, Any], given: frozenset[str] = frozenset()
    ) -> WorkloadConfig:
        seed = int(p.get("seed", 0) or 0)
        ramp = None
        if p.get("ramp"):
            ramp = RampConfig(p["ramp"], p["ramp_start_rate"], p["ramp_end_rate"], p["ramp_steps"])
        clients = None
        if p.get("servegen_clients"):
            try:
                clients = tuple(int(x) for x in str(p["servegen_clients"]).split(",") if x.strip())
            except ValueError:
                raise FineserveError("--servegen-clients takes ids like 0,1,5") from None
        parametric = ParametricConfig(
            model_classes=tuple(p.get("model_class") or ()),
            datasets_dir=_path(p.get("datasets_dir")),
            gamma_params_csv=_path(p.get("gamma_params_csv")),
            nb_json=_path(p.get("parametric_nb_json")),
            disable_nb_lt10b=bool(p.get("disable_parametric_nb_lt10b")),
            **_given(
                p,
                window_start_column="window_start_column",
                window_end_column="window_end_column",
                gamma_shape_column="gamma_shape_column",
                gamma_scale_column="gamma_scale_column",
                window_s="parametric_window_seconds",
                extension_mode="parametric_extension_mode",
                jitter_ratio="parametric_jitter_ratio",
                arrivals="parametric_arrivals",
                class_lengths="class_lengths",
                nb_zero="parametric_nb_zero",
                dequantize="dequantize",
            ),
        )
        lengths = LengthConfig(
            request_lengths_csv=_path(p.get("request_lengths_csv")),
            **_given(
                p,
                random_input_len="random_input_len",
                random_output_len="random_output_len",
                random_range_ratio="random_range_ratio",
            ),
        )
        return cls(
            schedule=_path(p.get("schedule")),
            seed=int(time.time()) if seed == -1 else seed,
            ramp=ramp,
            lengths=lengths,
            trace=_path(p.get("trace") or p.get("request_trace_csv")),
            trace_read=trace_options_from_params(p),
            parametric=parametric,
            servegen_pool=_path(p.get("servegen_pool")),
            servegen_clients=clients,
            burstgpt_params=_path(p.get("burstgpt_params")),
            media=MediaMixConfig.from_params(p),
            given=given,
            **_given(
                p,
                mode="mode",
                num_prompts="num_prompts",
                request_rate="request_rate",
                burstiness="burstiness",
                time_scale="time_scale",
                start_s="start",
                duration_s="duration",
                rate_scale="rate_scale",
                think_time="think_time",
                tool_latency="tool_latency",
            ),
        )

    @property
    def finite_rate(self) -> float | None:
        """``request_rate`` as a target rate (None for ``inf``)."""
        return self.request_rate if math.isfinite(self.request_rate) else None


# ---------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are made: synthetic words, or exact token lengths with a tokenizer."""

    tokenizer: str | None = None
    dataset_name: str = "random"
    dataset_path: Path | None = None
    dataset_output_len: bool = False
    apply_chat_template: bool = False
    prompt_suffix: str = ""
    prefix_block_size: int = 512
    shared_prefix_groups: int = 0
    shared_prefix_len: int = 0
    prompt_check: str = "sample"

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> PromptConfig:
        cfg = cls(
            tokenizer=p.get("tokenizer") or None,
            dataset_path=_path(p.get("dataset_path")),
            dataset_output_len=bool(p.get("dataset_output_len")),
            apply_chat_template=bool(p.get("apply_chat_template")),
            **_given(
                p,
                dataset_name="dataset_name",
                prompt_suffix="prompt_suffix",
                prefix_block_size="prefix_block_size",
                shared_prefix_groups="shared_prefix_groups",
                shared_prefix_len="shared_prefix_len",
                prompt_check="prompt_check",
            ),
        )
        if cfg.dataset_name == "sharegpt" and not cfg.dataset_path:
            raise FineserveError("--dataset-name sharegpt needs --dataset-path (a ShareGPT JSON)")
        if bool(cfg.shared_prefix_groups) != bool(cfg.shared_prefix_len):
            raise FineserveError("--shared-prefix-groups and --shared-prefix-len go together")
        if cfg.dataset_output_len and not cfg.dataset_path:
            raise FineserveError("--dataset-output-len needs --dataset-path")
        if not cfg.tokenizer and (cfg.dataset_path or cfg.apply_chat_template or cfg.prompt_suffix):
            raise FineserveError(
                "--dataset-path, --apply-chat-template and --prompt-suffix need --tokenizer"
            )
        return cfg


# ---------------------------------------------------------------------------- target


#: Where ``--dp-rank-policy`` takes each request's rank from.
DP_RANK_POLICIES = ("round-robin", "by-class", "by-session")


@dataclass(frozen=True)
class MediaConfig:
    """How a multimodal schedule's media is made and sent (:mod:`fineserve.media`)."""

    #: Whose processor sizes images (None: from --mm-processor/--tokenizer, else qwen2-vl).
    model_family: str | None = None
    processor: Path | None = None
    image_format: str = "png"
    content: str = "gradient"
    reuse: float = 0.0
    url_base: str | None = None
    media_dir: Path | None = None

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> MediaConfig:
        cfg = cls(
            model_family=p.get("mm_model_family") or None,
            processor=_path(p.get("mm_processor")),
            url_base=p.get("mm_url_base") or None,
            media_dir=_path(p.get("mm_dir")),
            **_given(p, image_format="mm_format", content="mm_content", reuse="mm_reuse"),
        )
        if cfg.media_dir is not None and cfg.url_base is None:
            raise FineserveError("--mm-dir goes with --mm-url-base")
        if cfg.url_base is not None and not cfg.url_base.startswith(("http://", "https://")):
            raise FineserveError(f"--mm-url-base must be an http(s) URL, got {cfg.url_base!r}")
        if cfg.model_family is not None and cfg.processor is not None:
            raise FineserveError("--mm-model-family and --mm-processor: give one")
        return cfg


@dataclass(frozen=True)
class PinConfig:
    """What pins a request beyond its endpoint: its session in a header (a router keeps
    sessions sticky), its data-parallel rank in a header (vLLM's
    ``X-data-parallel-rank``), its LoRA adapter as the request's model."""

    #: Header that carries the conversation id (ServeGen: the client id).
    session_header: str | None = None
    #: Data-parallel ranks requests are pinned to (None: not pinned).
    dp_ranks: int | None = None
    dp_rank_policy: str = "round-robin"
    dp_rank_header: str = "X-data-parallel-rank"
    #: LoRA adapters served as model names; each request (each conversation) asks for one.
    lora_modules: tuple[str, ...] = ()
    #: uniform | zipf:S | weights:w1,w2,...
    lora_distribution: str = "uniform"

    @property
    def request_headers(self) -> list[str]:
        """Header names whose value each request carries, in engine column order."""
        names = [self.session_header] if self.session_header else []
        return names + ([self.dp_rank_header] if self.dp_ranks else [])

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> PinConfig:
        from .requests.pinning import lora_weights

        modules = tuple(m.strip() for m in (p.get("lora_modules") or "").split(",") if m.strip())
        if len(set(modules)) < len(modules):
            raise FineserveError("--lora-modules lists an adapter twice")
        cfg = cls(
            lora_modules=modules,
            **_given(
                p,
                session_header="session_header",
                dp_ranks="dp_ranks",
                dp_rank_policy="dp_rank_policy",
                dp_rank_header="dp_rank_header",
                lora_distribution="lora_distribution",
            ),
        )
        if cfg.dp_ranks is not None and cfg.dp_ranks < 1:
            raise FineserveError(f"--dp-ranks must be at least 1, got {cfg.dp_ranks}")
        if p.get("lora_distribution") and not modules:
            raise FineserveError("--lora-distribution needs --lora-modules")
        if modules:
            lora_weights(cfg.lora_distribution, len(modules))  # refused now, in one line
        for option, name in (
            ("--session-header", cfg.session_header),
            ("--dp-rank-header", cfg.dp_rank_header),
        ):
            if name is not None:
                parse_header(f"{name}: 0", option)
        if (
            cfg.session_header
            and cfg.dp_ranks
            and (cfg.session_header.lower() == cfg.dp_rank_header.lower())
        ):
            raise FineserveError("--session-header and --dp-rank-header name the same header")
        return cfg


@dataclass(frozen=True)
class TargetConfig:
    """The servers and what each request's body says."""

    backend: str = "vllm"
    #: Base URLs of the given servers; empty: the embedded mock is started.
    base_urls: tuple[str, ...] = ()
    #: API path (``--endpoint``); None: the backend's default.
    endpoint: str | None = None
    model: str | None = None
    class_models: Mapping[str, str] = field(default_factory=dict)
    #: ``--route`` values and the legacy ``--route-class`` pins, as given.
    route: tuple[str, ...] = ()
    route_class: tuple[str, ...] = ()
    turn_affinity: bool = True
    #: Later turns carry the replies their earlier turns received (``live``), or stand-in
    #: answers made before the run (``synthetic``); ``auto``: live on chat-style APIs.
    conversation_history: str = "auto"
    #: ``--backend openai-responses``: the conversation in each request's ``input``
    #: (``client``) or kept by the server (``server``: ``previous_response_id``).
    responses_history: str = "client"
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = True
    ignore_eos: bool = True
    #: ``--header``s, on every request (credential-like values never shown).
    headers: tuple[Header, ...] = ()
    tls: TlsConfig = field(default_factory=TlsConfig)
    #: HTTP/2 instead of HTTP/1.1 (``--http2``).
    http2: bool = False
    pins: PinConfig = field(default_factory=PinConfig)
    #: OPENAI_API_KEY, read once; never printed, stored or put in an error.
    api_key: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> TargetConfig:
        from .api import parse_extra_body
        from .routing import parse_pairs
        from .server import base_url_from

        bases = [b for b in (base_url_from(u, None, None) for u in p.get("base_url") or ()) if b]
        if not bases:
            single = base_url_from(None, p.get("host"), p.get("port"))
            bases = [single] if single else []
        elif p.get("host") or p.get("port"):
            raise FineserveError("give either --base-url or --host/--port, not both")
        pins = PinConfig.from_params(p)
        if pins.lora_modules and p.get("class_model"):
            raise FineserveError(
                "--lora-modules and --class-model both choose each request's model; give one"
            )
        tls = TlsConfig(
            ca_file=_path(p.get("cacert")),
            cert_file=_path(p.get("cert")),
            key_file=_path(p.get("key")),
            insecure=bool(p.get("insecure")),
        )
        tls.check()
        headers = parse_headers(p.get("header") or (), reserved=pins.request_headers)
        api_key = os.environ.get("OPENAI_API_KEY") or None
        if p.get("backend") == "anthropic-messages":
            headers, api_key = _anthropic_auth(headers), None
        return cls(
            base_urls=tuple(bases),
            endpoint=p.get("endpoint") or None,
            model=p.get("model") or None,
            class_models=parse_pairs(p.get("class_model") or (), "--class-model"),
            route=tuple(p.get("route") or ()),
            route_class=tuple(p.get("route_class") or ()),
            extra_body=parse_extra_body(p.get("extra_request_body")),
            **_given(
                p,
                backend="backend",
                turn_affinity="turn_affinity",
                conversation_history="conversation_history",
                responses_history="responses_history",
            ),
            stream=not p.get("disable_stream"),
            ignore_eos=not p.get("disable_ignore_eos"),
            headers=headers,
            tls=tls,
            http2=bool(p.get("http2")),
            pins=pins,
            api_key=api_key,
        )

    @property
    def path(self) -> str:
        """The API path every request goes to."""
        from .api import DEFAULT_ENDPOINT

        endpoint = self.endpoint or DEFAULT_ENDPOINT[self.backend]
        return endpoint if endpoint.startswith("/") else "/" + endpoint

    @property
    def chat(self) -> bool:
        from .api import is_chat_endpoint

        return is_chat_endpoint(self.path)

    @property
    def live_history(self) -> bool:
        """Later turns carry the replies their earlier turns actually received."""
        if self.conversation_history == "auto":
            return self.chat
        return self.conversation_history == "live"

    @property
    def history_api(self) -> str:
        """The engine's ``history_api`` for this target (``off`` without live history)."""
        from .api import history_api

        if not self.live_history:
            return "off"
        return history_api(self.backend, self.path, self.responses_history)


def _anthropic_auth(headers: tuple[Header, ...]) -> tuple[Header, ...]:
    """Anthropic's Messages API authenticates with ``x-api-key`` (``$ANTHROPIC_API_KEY``,
    else ``$OPENAI_API_KEY``), not a bearer token, and needs ``anthropic-version``; a
    ``--header`` of either name is kept as given."""
    from .api import ANTHROPIC_VERSION

    given = {h.name.lower() for h in headers}
    key = os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("OPENAI_API_KEY")
    added = []
    if key and "x-api-key" not in given:
        added.append(Header("x-api-key", key))
    if "anthropic-version" not in given:
        added.append(Header("anthropic-version", ANTHROPIC_VERSION))
    return (*headers, *added)


# ---------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class EngineConfig:
    """How the engine is sized and how long it waits (the run's EngineOptions are built
    from this once the workload and the servers are known)."""

    max_concurrency: int | None = None
    #: Connections open at once (None: what the open-files limit allows).
    max_connections: int | None = None
    #: None: half the CPUs (1 to 8), at least 2 for a schedule with bursts.
    lanes: int | None = None
    #: None: the peak requests in any second, capped.
    warm_connections: int | None = None
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 600.0
    idle_timeout_s: float = 600.0
    request_timeout_s: float = 3600.0
    max_response_mb: float = 64.0
    source_ips: tuple[str, ...] = ()
    drain_grace_s: float = 30.0
    realtime_priority: bool = False
    warmup_requests: int = 1

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> EngineConfig:
        ips = tuple(a.strip() for a in (p.get("source_ip") or "").split(",") if a.strip())
        for address in ips:  # the engine checks too; here before any server starts
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise FineserveError(f"source address {address!r} is not an IP address") from None
        return cls(
            source_ips=ips,
            realtime_priority=bool(p.get("realtime_priority")),
            **_given(
                p,
                max_concurrency="max_concurrency",
                max_connections="max_connections",
                lanes="lanes",
                warm_connections="warm_connections",
                connect_timeout_s="connect_timeout",
                first_byte_timeout_s="first_byte_timeout",
                idle_timeout_s="idle_timeout",
                request_timeout_s="request_timeout",
                max_response_mb="max_response_mb",
                drain_grace_s="drain_grace",
                warmup_requests="warmup_requests",
            ),
        )


# ---------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricsConfig:
    #: Goodput SLOs in ms by metric (vLLM's ``--goodput``).
    slos: Mapping[str, float] = field(default_factory=dict)
    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")
    metric_percentiles: tuple[float, ...] = (99.0,)
    window_s: float = 10.0

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> MetricsConfig:
        from .metrics.serving import parse_goodput

        names = tuple(
            m.strip() for m in (p.get("percentile_metrics") or "").split(",") if m.strip()
        )
        bad = [m for m in names if m not in PERCENTILE_METRICS]
        if bad:
            raise FineserveError(
                f"--percentile-metrics: unknown {bad[0]!r}; choose from "
                + ", ".join(PERCENTILE_METRICS)
            )
        try:
            qs = tuple(
                float(q) for q in (p.get("metric_percentiles") or "").split(",") if q.strip()
            )
        except ValueError:
            raise FineserveError("--metric-percentiles takes numbers like 50,90,99") from None
        if any(not 0 < q < 100 for q in qs):
            raise FineserveError("--metric-percentiles must be between 0 and 100 (exclusive)")
        given: dict[str, Any] = _given(p, window_s="metrics_window")
        if names:
            given["percentile_metrics"] = names
        if qs:
            given["metric_percentiles"] = qs
        cfg = cls(slos=parse_goodput(p.get("goodput") or ()), **given)
        if not (cfg.window_s > 0 and math.isfinite(cfg.window_s)):
            raise FineserveError("--metrics-window must be a positive number of seconds")
        return cfg

    def with_slo_percentiles(
        self, metrics: tuple[str, ...], percentiles: tuple[float, ...]
    ) -> MetricsConfig:
        """Also the percentile keys an SLO check reads (sweep)."""
        return dataclasses.replace(
            self,
            percentile_metrics=tuple(dict.fromkeys([*self.percentile_metrics, *metrics])),
            metric_percentiles=tuple(dict.fromkeys([*self.metric_percentiles, *percentiles])),
        )


# ---------------------------------------------------------------------------- output


@dataclass(frozen=True)
class OutputConfig:
    output_file: Path | None = None
    #: vLLM's --save-result: the JSON goes to result_dir / (result_filename or vLLM's name).
    save_result: bool = False
    result_dir: Path | None = None
    result_filename: str | None = None
    save_requests: Path | None = None
    save_detailed: bool = False
    show_progress: bool = True

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> OutputConfig:
        cfg = cls(
            output_file=_path(p.get("output_file")),
            save_result=bool(p.get("save_result")),
            result_dir=_path(p.get("result_dir")),
            result_filename=p.get("result_filename") or None,
            save_requests=_path(p.get("save_requests")),
            save_detailed=bool(p.get("save_detailed")),
            show_progress=not p.get("disable_tqdm"),
        )
        if cfg.save_result and cfg.output_file:
            raise FineserveError("give --output-file or --save-result (vLLM's name), not both")
        if (cfg.result_dir or cfg.result_filename) and not cfg.save_result:
            raise FineserveError("--result-dir and --result-filename go with --save-result")
        if cfg.save_detailed and not (cfg.output_file or cfg.save_result):
            raise FineserveError("--save-detailed needs --output-file (or --save-result)")
        return cfg

    @property
    def writes_result(self) -> bool:
        return bool(self.output_file or self.save_result)


# ---------------------------------------------------------------------------- mock, ray


@dataclass(frozen=True)
class MockConfig:
    """The embedded mock server (started when no server is given)."""

    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    max_concurrency: int = 0
    reasoning_ratio: float = 0.0
    reasoning_field: str = "reasoning"
    tool_calls: float = 0.0
    #: Serve HTTPS (a CA made at start; ``MockServer.ca_file`` is its PEM).
    tls: bool = False
    #: MockServer's fault keyword arguments (faults, stall_ms, ...).
    faults: Mapping[str, Any] = field(default_factory=dict)
    #: Pixels per image-token side when the mock counts chat images: 28 (Qwen2-VL), or 32
    #: when the run sizes images for Qwen3-VL.
    image_token_side: int = 28

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> MockConfig:
        return cls(
            faults=mock_fault_kwargs(p, "--mock-fault") if "faults" in p else {},
            image_token_side=32 if p.get("mm_model_family") == "qwen3-vl" else 28,
            **_given(
                p,
                ttft_ms="mock_ttft_ms",
                itl_ms="mock_itl_ms",
                max_concurrency="mock_max_concurrency",
                reasoning_ratio="mock_reasoning_ratio",
                reasoning_field="mock_reasoning_field",
                tool_calls="mock_tool_calls",
                tls="mock_tls",
            ),
        )


def mock_fault_kwargs(p: Mapping[str, Any], option: str) -> dict[str, Any]:
    """MockServer's fault keyword arguments from the fault options' parameters."""
    from .mock import parse_faults

    return {
        "faults": parse_faults(p["faults"], option),
        "stall_ms": p["fault_stall_s"] * 1e3,
        "first_byte_delay_ms": p["fault_first_byte_delay_s"] * 1e3,
        "retry_after_s": p["fault_retry_after_s"],
    }


#: Where Ray workers go: spread over the nodes (default), or packed onto as few as hold them.
RAY_PLACEMENTS = ("spread", "pack")


@dataclass(frozen=True)
class ScaleOutConfig:
    """One run spread over several engines: processes on this host (past one process's
    open-files limit and cores), or Ray workers on a cluster's nodes."""

    #: A Ray cluster address (auto, ray://HOST:10001) or "local"; None: no Ray.
    address: str | None = None
    workers: int = 2
    #: Engine processes on this host (1: the engine runs in this process).
    processes: int = 1
    #: Where Ray puts the workers: "spread" over the nodes, or "pack" onto few.
    ray_placement: str = "spread"

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> ScaleOutConfig:
        cfg = cls(
            p.get("ray") or None,
            **_given(p, workers="workers", processes="processes", ray_placement="ray_placement"),
        )
        if cfg.address and cfg.processes > 1:
            raise FineserveError(
                "--processes and --ray are two ways to spread a run; choose one "
                "(--ray local --workers N also runs on this host)"
            )
        if cfg.address:
            from .distributed import import_ray

            import_ray()  # refused now, before any server starts, if Ray is missing
        return cfg

    @property
    def engines(self) -> int:
        """Engine instances the schedule is split over."""
        return self.workers if self.address else self.processes


# ---------------------------------------------------------------------------- blast


@dataclass(frozen=True)
class ServerMetricsConfig:
    """Scraping the servers' Prometheus metrics during the run."""

    #: Scrape ``<base-url>/metrics`` of every endpoint (``--server-metrics``).
    endpoints: bool = False
    #: More pages to scrape (a router, a DCGM or node exporter); not joined to requests.
    urls: tuple[str, ...] = ()
    interval_s: float = 0.5

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> ServerMetricsConfig:
        urls = tuple(u.strip() for u in p.get("server_metrics_url") or () if u.strip())
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise FineserveError(f"--server-metrics-url {u}: expected an http(s):// URL")
        cfg = cls(
            endpoints=bool(p.get("server_metrics")),
            urls=urls,
            **_given(p, interval_s="server_metrics_interval"),
        )
        if not (cfg.interval_s >= 0.05 and math.isfinite(cfg.interval_s)):
            raise FineserveError(
                f"--server-metrics-interval must be at least 0.05 s, got {cfg.interval_s:g}"
            )
        return cfg

    @property
    def enabled(self) -> bool:
        return self.endpoints or bool(self.urls)


@dataclass(frozen=True)
class StopConfig:
    """Conditions that end a run early (``--stop-on-*``), judged over the requests that
    completed in the last ``window_s`` seconds (at least ``min_requests`` of them)."""

    failure_rate: float | None = None
    ttft_p99_ms: float | None = None
    lag_ms: float | None = None
    window_s: float = 10.0
    min_requests: int = 20

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> StopConfig:
        return cls(
            **_given(
                p,
                failure_rate="stop_on_failure_rate",
                ttft_p99_ms="stop_on_ttft_p99_ms",
                lag_ms="stop_on_lag_ms",
                window_s="stop_window",
            )
        )

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.failure_rate, self.ttft_p99_ms, self.lag_ms))


@dataclass(frozen=True)
class RepeatConfig:
    """``--num-runs``: the same schedule run again, for confidence intervals."""

    num_runs: int = 1
    cooldown_s: float = 0.0
    #: ``POST /reset_prefix_cache`` on every endpoint between runs (vLLM).
    reset_prefix_cache: bool = False

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> RepeatConfig:
        return cls(
            **_given(
                p,
                num_runs="num_runs",
                cooldown_s="cooldown",
                reset_prefix_cache="reset_prefix_cache",
            )
        )


@dataclass(frozen=True)
class BlastConfig:
    """Everything one ``blast`` run needs, each stage's slice apart."""

    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mock: MockConfig = field(default_factory=MockConfig)
    scale_out: ScaleOutConfig = field(default_factory=ScaleOutConfig)
    server_metrics: ServerMetricsConfig = field(default_factory=ServerMetricsConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    repeat: RepeatConfig = field(default_factory=RepeatConfig)

    @classmethod
    def from_params(cls, p: Mapping[str, Any], given: frozenset[str] = frozenset()) -> BlastConfig:
        """From click's parameters (``given``: the workload options the command line set).
        Every check that needs no server runs here, before any server starts."""
        return cls(
            workload=WorkloadConfig.from_params(p, given),
            prompts=PromptConfig.from_params(p),
            media=MediaConfig.from_params(p),
            target=TargetConfig.from_params(p),
            engine=EngineConfig.from_params(p),
            metrics=MetricsConfig.from_params(p),
            output=OutputConfig.from_params(p),
            mock=MockConfig.from_params(p),
            scale_out=ScaleOutConfig.from_params(p),
            server_metrics=ServerMetricsConfig.from_params(p),
            stop=StopConfig.from_params(p),
            repeat=RepeatConfig.from_params(p),
        )

    @property
    def uses_mock(self) -> bool:
        return not self.target.base_urls

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON (results metadata); the API key is left out and
        credential-like header values are redacted."""
        out: dict[str, Any] = _jsonable(dataclasses.asdict(self))
        out["target"]["headers"] = [{"name": h.name, "value": h.shown} for h in self.target.headers]
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if k != "api_key"}
    if isinstance(value, (list, tuple, frozenset, set)):
        return [
            _jsonable(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)
        ]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
