//! The embedded mock of an OpenAI-compatible server: `/v1/completions`,
//! `/v1/chat/completions`, `/v1/responses` and `/v1/models`, streaming exactly `max_tokens`
//! (`max_completion_tokens`, `max_output_tokens`) tokens at a configured TTFT and inter-token
//! latency (as a server with `ignore_eos` does).
//!
//! Chat and Responses answers can be shaped like a reasoning model's: the first
//! round(R·N) tokens stream as reasoning (`delta.reasoning` or `delta.reasoning_content`,
//! `response.reasoning_text.delta`), the rest as content, or as tool-call fragments for a
//! fraction of requests; usage then reports `reasoning_tokens`. `/v1/completions` always
//! streams plain text. Fields a caller may add to a request body for the mock alone (a real
//! server ignores or rejects them, so only send them to the mock):
//! - `fineserve_reasoning_ratio`: R for this request, in [0, 1] (e.g. a schedule's
//!   `reason_ratio`), instead of the configured one;
//! - `fineserve_hash_ids` (list of integers) with `fineserve_block_size` (tokens a block,
//!   default 512): the prompt's prefix blocks. The mock keeps the blocks it has seen in an
//!   LRU of [`MockConfig::cache_blocks`] blocks and reports, in
//!   `usage.prompt_tokens_details.cached_tokens`, the tokens of the leading blocks it had
//!   seen (capped at the prompt's tokens), as a prefix cache would.
//!
//! Token deadlines are absolute (arrival + TTFT + k·ITL), so the cadence does not drift;
//! each one is subject to tokio's 1 ms timer granularity.
//!
//! Fault injection ([`FaultConfig`]) makes a given fraction of completion requests misbehave
//! the way real servers and proxies do, so the client's handling of each can be tested.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::time::{Instant, Sleep};

use crate::error::EngineError;
use crate::mock_media::{count_media, ImageRule};
use crate::mock_metrics::{Gauges, ServingCounters};
use crate::recv_stamp;

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub model: String,
    pub ttft: Duration,
    /// Added to the TTFT per prompt token (a prefill cost); prompt tokens are counted as
    /// whitespace-separated words, or the length of a token-id list.
    pub ttft_per_prompt_token: Duration,
    pub itl: Duration,
    /// Each token's deadline moves by a uniform amount in [-jitter, +jitter].
    pub itl_jitter: Duration,
    /// Tokens generated when a request names no `max_tokens`.
    pub default_max_tokens: u32,
    pub workers: usize,
    /// Generations served at once (a server's batch capacity); requests beyond it wait
    /// for a slot before their TTFT starts, so latency grows past capacity. 0 = no limit.
    pub max_concurrency: usize,
    pub faults: FaultConfig,
    /// Keep each stream's token emission instants, keyed by the request's `user` field, for
    /// benchmarks that check a client's token timing against the server's.
    pub record_token_times: bool,
    /// Keep the arrival instant of every completion request, so that benchmarks can measure
    /// any client's pacing (peers that record no send times included) at the server. The
    /// instant is the kernel's receive stamp of the request's bytes (`recv_stamp`).
    pub record_arrivals: bool,
    /// Share of each chat / Responses answer streamed as reasoning first, in [0, 1]; a
    /// request's `fineserve_reasoning_ratio` overrides it.
    pub reasoning_ratio: f64,
    pub reasoning_field: ReasoningField,
    /// Fraction of chat / Responses requests, in [0, 1], whose answer streams as tool-call
    /// fragments instead of content.
    pub tool_calls: f64,
    /// Capacity in blocks of the prefix-cache LRU behind `cached_tokens` (0: none cached).
    pub cache_blocks: usize,
    /// Pixels per image-token side when counting chat images (28: Qwen2-VL; 32: Qwen3-VL);
    /// image and audio tokens join the prompt tokens (usage and the per-token TTFT).
    pub image_token_side: u32,
    /// Serve HTTPS with a certificate signed by a CA made at start
    /// ([`MockServer::ca_pem`]).
    pub tls: bool,
}

/// The chat delta field that carries reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningField {
    /// `delta.reasoning`, as vLLM >= 0.16 sends it.
    #[default]
    Reasoning,
    /// `delta.reasoning_content`, as DeepSeek's API and older vLLM send it.
    ReasoningContent,
}

impl ReasoningField {
    pub const ALL: [ReasoningField; 2] =
        [ReasoningField::Reasoning, ReasoningField::ReasoningContent];

    pub fn name(self) -> &'static str {
        match self {
            ReasoningField::Reasoning => "reasoning",
            ReasoningField::ReasoningContent => "reasoning_content",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// A way for the mock to misbehave on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 500 with a JSON error body.
    Http500,
    /// HTTP 429 with a `Retry-After` header.
    Http429,
    /// The connection is reset (RST) after half the tokens.
    Reset,
    /// The stream's events come without SSE framing (bare JSON lines).
    MalformedSse,
    /// The event of the middle token carries truncated JSON.
    MalformedJson,
    /// No bytes for the stall duration after half the tokens, then the rest.
    Stall,
    /// The stream ends cleanly but without a finish reason and without `[DONE]`.
    NoDone,
    /// Response headers only after the first-byte delay.
    SlowFirstByte,
    /// The connection is closed right after the response, without `Connection: close`.
    CloseKeepAlive,
    /// The response never ends: tokens (or text) as fast as the client reads.
    Endless,
}

impl Fault {
    pub const ALL: [Fault; 10] = [
        Fault::Http500,
        Fault::Http429,
        Fault::Reset,
        Fault::MalformedSse,
        Fault::MalformedJson,
        Fault::Stall,
        Fault::NoDone,
        Fault::SlowFirstByte,
        Fault::CloseKeepAlive,
        Fault::Endless,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Http500 => "http_500",
            Fault::Http429 => "http_429",
            Fault::Reset => "reset",
            Fault::MalformedSse => "malformed_sse",
            Fault::MalformedJson => "malformed_json",
            Fault::Stall => "stall",
            Fault::NoDone => "no_done",
            Fault::SlowFirstByte => "slow_first_byte",
            Fault::CloseKeepAlive => "close_keepalive",
            Fault::Endless => "endless",
        }
    }

    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Which fraction of completion requests gets each fault (`/v1/models` and `/health` are
/// never faulted). Request n (in arrival order) draws u = frac(n·φ), a low-discrepancy
/// sequence, so any run of n requests holds each fault within about one of its share.
#[derive(Debug, Clone)]
pub struct FaultConfig {
    pub ratios: Vec<(Fault, f64)>,
    pub stall: Duration,
    pub first_byte_delay: Duration,
    pub retry_after_s: u32,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            ratios: Vec::new(),
            stall: Duration::from_secs(30),
            first_byte_delay: Duration::from_secs(30),
            retry_after_s: 1,
        }
    }
}

impl FaultConfig {
    /// Checks that every ratio is in [0, 1] and that they add up to at most 1.
    pub fn validate(&self) -> Result<(), EngineError> {
        let mut total = 0.0;
        for &(f, r) in &self.ratios {
            if !(0.0..=1.0).contains(&r) {
                return Err(EngineError::InvalidConfig(format!(
                    "fault {}: ratio must be in [0, 1], got {r}",
                    f.name()
                )));
            }
            total += r;
        }
        if total > 1.0 + 1e-9 {
            return Err(EngineError::InvalidConfig(format!(
                "fault ratios add up to {total}, more than 1"
            )));
        }
        Ok(())
    }

    fn draw(&self, seq: u64) -> Option<Fault> {
        if self.ratios.is_empty() {
            return None;
        }
        let u = (seq.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64
            / (1u64 << 53) as f64;
        let mut acc = 0.0;
        for &(f, r) in &self.ratios {
            acc += r;
            if u < acc {
                return Some(f);
            }
        }
        None
    }

    fn has(&self, fault: Fault) -> bool {
        self.ratios.iter().any(|&(f, r)| f == fault && r > 0.0)
    }
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            model: "fineserve-mock".into(),
            ttft: Duration::from_millis(20),
            ttft_per_prompt_token: Duration::ZERO,
            itl: Duration::from_millis(5),
            itl_jitter: Duration::ZERO,
            default_max_tokens: 16,
            workers: 1,
            max_concurrency: 0,
            faults: FaultConfig::default(),
            record_token_times: false,
            record_arrivals: false,
            reasoning_ratio: 0.0,
            reasoning_field: ReasoningField::Reasoning,
            tool_calls: 0.0,
            cache_blocks: 100_000,
            image_token_side: 28,
            tls: false,
        }
    }
}

impl MockConfig {
    pub fn validate(&self) -> Result<(), EngineError> {
        self.faults.validate()?;
        for (name, v) in [
            ("reasoning_ratio", self.reasoning_ratio),
            ("tool_calls", self.tool_calls),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(EngineError::InvalidConfig(format!(
                    "mock {name} must be in [0, 1], got {v}"
                )));
            }
        }
        Ok(())
    }
}

/// The prefix blocks the mock has seen, least recently used evicted first.
#[derive(Debug, Default)]
pub struct BlockLru {
    clock: u64,
    last_use: HashMap<i64, u64>,
    by_use: BTreeMap<u64, i64>,
}

impl BlockLru {
    /// Uses a request's blocks in order; returns how many leading blocks were already held
    /// (a prefix cache reuses a prefix: after the first miss nothing more is a hit).
    pub fn use_prefix(&mut self, blocks: &[i64], capacity: usize) -> usize {
        if capacity == 0 {
            return 0;
        }
        let mut hits = 0;
        let mut prefix = true;
        for &b in blocks {
            self.clock += 1;
            match self.last_use.insert(b, self.clock) {
                Some(old) => {
                    self.by_use.remove(&old);
                    hits += usize::from(prefix);
                }
                None => prefix = false,
            }
            self.by_use.insert(self.clock, b);
            while self.last_use.len() > capacity {
                match self.by_use.pop_first() {
                    Some((_, evicted)) => {
                        self.last_use.remove(&evicted);
                    }
                    None => break,
                }
            }
        }
        hits
    }

    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }
}

/// Token emission instants of finished streams, in ns since the mock started.
#[derive(Debug, Default)]
pub struct TokenLog {
    pub streams: Vec<(String, Vec<i64>)>,
}

#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub completions: AtomicU64,
    pub active_streams: AtomicU64,
    pub bad_requests: AtomicU64,
    pub connections: AtomicU64,
    /// TLS handshakes that failed (a client that does not trust the mock's CA).
    pub tls_failures: AtomicU64,
    /// TLS handshakes that resumed an earlier session (no certificate exchange).
    pub tls_resumed: AtomicU64,
    /// Faults injected so far, in [`Fault::ALL`] order.
    pub faults: [AtomicU64; Fault::ALL.len()],
    fault_seq: AtomicU64,
    pub token_log: std::sync::Mutex<TokenLog>,
    /// Arrival instants of completion requests (with `record_arrivals`), ns since the start.
    arrivals: std::sync::Mutex<Vec<i64>>,
    /// Prefix blocks seen (`fineserve_hash_ids`), for `cached_tokens`.
    prefix_cache: std::sync::Mutex<BlockLru>,
    /// Responses stored for `previous_response_id`: id → the conversation's tokens so far
    /// (prompt and output). Bounded: the oldest go first.
    stored_responses: std::sync::Mutex<std::collections::BTreeMap<u64, u64>>,
    /// What `GET /metrics` reports (vLLM's names).
    pub serving: ServingCounters,
    /// The start instant, and the system clock then (kernel receive stamps use it).
    epoch: std::sync::OnceLock<(std::time::Instant, i64)>,
}

impl MockStats {
    /// ns since the mock started (the token log's clock).
    fn now_ns(&self) -> i64 {
        self.epoch().0.elapsed().as_nanos() as i64
    }

    fn epoch(&self) -> &(std::time::Instant, i64) {
        self.epoch.get_or_init(|| {
            let unix_ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64);
            (std::time::Instant::now(), unix_ns)
        })
    }

    /// A kernel receive stamp (system clock, ns) on the log's clock.
    fn unix_to_log_ns(&self, unix_ns: i64) -> i64 {
        unix_ns - self.epoch().1
    }

    /// Takes the completion-request arrival instants recorded so far (in arrival order).
    pub fn take_arrivals(&self) -> Vec<i64> {
        match self.arrivals.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => Vec::new(),
        }
    }

    /// Takes the token log collected so far.
    pub fn take_token_log(&self) -> Vec<(String, Vec<i64>)> {
        match self.token_log.lock() {
            Ok(mut log) => std::mem::take(&mut log.streams),
            Err(_) => Vec::new(),
        }
    }
}

pub struct MockServer {
    addr: SocketAddr,
    /// With `MockConfig::tls`: the PEM of the CA that signed the mock's certificate.
    ca_pem: Option<String>,
    stats: Arc<MockStats>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockServer {
    pub fn start(host: &str, port: u16, config: MockConfig) -> Result<Self, EngineError> {
        config.validate()?;
        crate::limits::raise_nofile_limit();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.max(1))
            .thread_name("fineserve-mock")
            .enable_all()
            .build()
            .map_err(|e| EngineError::io("starting the mock runtime", e))?;
        let bind: SocketAddr = format!("{host}:{port}")
            .parse()
            .or_else(|_| {
                std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or(())
            })
            .map_err(|_| {
                EngineError::InvalidConfig(format!("cannot bind mock to {host}:{port}"))
            })?;
        let listener = rt.block_on(async {
            let sock = if bind.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }?;
            sock.set_reuseaddr(true)?;
            sock.bind(bind)?;
            // A deep backlog: a load generator warms thousands of connections at once.
            sock.listen(65_535)
        });
        let listener = listener
            .map_err(|e| EngineError::io(format!("binding the mock server to {bind}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| EngineError::io("reading the mock address", e))?;
        let identity = if config.tls {
            Some(crate::tls::MockIdentity::generate(host)?)
        } else {
            None
        };
        let ca_pem = identity.as_ref().map(|i| i.ca_pem.clone());
        let acceptor = identity.map(|i| tokio_rustls::TlsAcceptor::from(i.server_config));
        let stats = Arc::new(MockStats::default());
        stats.now_ns();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let slots = (config.max_concurrency > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(config.max_concurrency)));
        // A zero linger turns the close after a failed body into an RST, as a crashed server
        // or a proxy's reset would look.
        let reset_on_close = config.faults.has(Fault::Reset);
        let cfg = Arc::new(config);
        let st = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("fineserve-mock-accept".into())
            .spawn(move || {
                rt.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else {
                                    // EMFILE and the like: back off instead of spinning.
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                    continue;
                                };
                                let _ = stream.set_nodelay(true);
                                if reset_on_close {
                                    let _ = stream.set_zero_linger();
                                }
                                st.connections.fetch_add(1, Ordering::Relaxed);
                                let cfg = Arc::clone(&cfg);
                                let st = Arc::clone(&st);
                                let slots = slots.clone();
                                let tls = acceptor.clone();
                                if cfg.record_arrivals && recv_stamp::enable(&stream).is_ok() {
                                    let (io, rx_ns) = recv_stamp::StampedStream::new(stream);
                                    tokio::spawn(serve_maybe_tls(io, tls, Some(rx_ns), cfg, st, slots));
                                } else {
                                    tokio::spawn(serve_maybe_tls(stream, tls, None, cfg, st, slots));
                                }
                            }
                        }
                    }
                });
                rt.shutdown_background();
            })
            .map_err(|e| EngineError::io("spawning the mock thread", e))?;
        Ok(Self {
            addr,
            ca_pem,
            stats,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &MockStats {
        &self.stats
    }

    /// The CA a client trusts to reach this mock over TLS (None without `tls`).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves one connection, after a TLS handshake when the mock speaks TLS.
async fn serve_maybe_tls<S>(
    stream: S,
    tls: Option<tokio_rustls::TlsAcceptor>,
    rx_ns: Option<Arc<AtomicI64>>,
    cfg: Arc<MockConfig>,
    stats: Arc<MockStats>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match tls {
        None => serve_connection(stream, rx_ns, cfg, stats, slots).await,
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(s) => {
                if s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    stats.tls_resumed.fetch_add(1, Ordering::Relaxed);
                }
                serve_connection(s, rx_ns, cfg, stats, slots).await
            }
            Err(_) => {
                stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            }
        },
    }
}

/// Serves one connection; a `close_keepalive` fault closes it once its response is done.
/// With `rx_ns` (the connection's latest kernel receive stamp), arrivals are logged at
/// that stamp instead of when the handler runs.
async fn serve_connection<S>(
    stream: S,
    rx_ns: Option<Arc<AtomicI64>>,
    cfg: Arc<MockConfig>,
    stats: Arc<MockStats>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let close = Arc::new(tokio::sync::Notify::new());
    let close_req = Arc::clone(&close);
    let svc = hyper::service::service_fn(move |req| {
        let rx_unix_ns = rx_ns.as_ref().map_or(0, |a| a.load(Ordering::Relaxed));
        handle(
            req,
            rx_unix_ns,
            Arc::clone(&cfg),
            Arc::clone(&stats),
            slots.clone(),
            Arc::clone(&close_req),
        )
    });
    // HTTP/1.1, or HTTP/2 when the client opens with its preface (h2c prior knowledge, or
    // ALPN h2 over TLS).
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = close.notified() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response<MockBody> {
    let mut r = Response::new(MockBody::whole(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(status: StatusCode, msg: &str) -> Response<MockBody> {
    // OpenAI's error types: the client's fault for 4xx, the server's for 5xx.
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = serde_json::json!({"error": {"message": msg, "type": kind}});
    json_response(status, body.to_string())
}

async fn handle(
    req: http::Request<Incoming>,
    rx_unix_ns: i64,
    cfg: Arc<MockConfig>,
    stats: Arc<MockStats>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
    close: Arc<tokio::sync::Notify>,
) -> Result<Response<MockBody>, Infallible> {
    let mut arrival = Instant::now();
    let received = arrival;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let api = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => return Ok(metrics_response(&cfg, &stats)),
        (&Method::GET, "/v1/models") => {
            let body = serde_json::json!({
                "object": "list",
                "data": [{"id": cfg.model, "object": "model", "owned_by": "fineserve"}],
            });
            return Ok(json_response(StatusCode::OK, body.to_string()));
        }
        (&Method::GET, "/health") => return Ok(json_response(StatusCode::OK, "{}".into())),
        (&Method::POST, "/v1/completions") => Api::Completions,
        (&Method::POST, "/v1/chat/completions") => Api::Chat,
        (&Method::POST, "/v1/responses") => Api::Responses,
        (&Method::POST, "/v1/messages") => Api::Messages,
        _ => return Ok(error_response(StatusCode::NOT_FOUND, "no such route")),
    };
    if cfg.record_arrivals {
        let at_ns = if rx_unix_ns > 0 {
            stats.unix_to_log_ns(rx_unix_ns)
        } else {
            stats.now_ns()
        };
        if let Ok(mut v) = stats.arrivals.lock() {
            v.push(at_ns);
        }
    }
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(error_response(StatusCode::BAD_REQUEST, "unreadable body")),
    };
    let parsed: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                &format!("body is not JSON: {e}"),
            ));
        }
    };
    let n_tokens = parsed
        .get("max_output_tokens")
        .or_else(|| parsed.get("max_completion_tokens"))
        .or_else(|| parsed.get("max_tokens"))
        .and_then(|v| v.as_u64())
        .map_or(cfg.default_max_tokens, |v| v.min(u32::MAX as u64) as u32);
    let stream = parsed
        .get("stream")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let include_usage = parsed
        .pointer("/stream_options/include_usage")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let mut prompt_tokens = count_prompt_tokens(&parsed, api);
    // Server-side history: the stored conversation comes before this request's input.
    if let Some(prev) = parsed.get("previous_response_id").filter(|v| !v.is_null()) {
        let known = prev
            .as_str()
            .and_then(|s| s.strip_prefix("resp_"))
            .and_then(|n| n.parse::<u64>().ok())
            .and_then(|n| stats.stored_responses.lock().ok()?.get(&n).copied());
        match known {
            Some(tokens) if api == Api::Responses => prompt_tokens += tokens,
            _ => {
                stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("previous response {prev} not found"),
                ));
            }
        }
    }
    if api == Api::Chat {
        match count_media(&parsed, &ImageRule::for_side(cfg.image_token_side)) {
            Ok(m) => prompt_tokens += m.image_tokens + m.audio_tokens + m.video_tokens,
            Err(msg) => {
                stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                return Ok(error_response(StatusCode::BAD_REQUEST, &msg));
            }
        }
    }
    let shape = match RequestShape::parse(&parsed, &cfg) {
        Ok(s) => s,
        Err(msg) => {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(error_response(StatusCode::BAD_REQUEST, &msg));
        }
    };
    let fault = cfg
        .faults
        .draw(stats.fault_seq.fetch_add(1, Ordering::Relaxed));
    if let Some(f) = fault {
        stats.faults[f as usize].fetch_add(1, Ordering::Relaxed);
    }
    match fault {
        Some(Fault::Http500) => {
            return Ok(error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "injected fault: internal server error",
            ))
        }
        Some(Fault::Http429) => {
            let mut r = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "injected fault: rate limit reached",
            );
            r.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(cfg.faults.retry_after_s),
            );
            return Ok(r);
        }
        Some(Fault::SlowFirstByte) => tokio::time::sleep(cfg.faults.first_byte_delay).await,
        _ => {}
    }
    // Past capacity a request waits for a slot, and its generation starts when it gets one.
    let permit = match slots {
        Some(sem) => match Waiting::enter(&stats).wait_for(sem).await {
            Ok(p) => Some(p),
            Err(_) => {
                return Ok(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting down",
                ))
            }
        },
        None => None,
    };
    if permit.is_some() {
        arrival = Instant::now();
    }
    let ttft = cfg.ttft + cfg.ttft_per_prompt_token * prompt_tokens as u32;
    let seq = stats.completions.fetch_add(1, Ordering::Relaxed);
    if api == Api::Responses && parsed.get("store").and_then(|v| v.as_bool()) != Some(false) {
        if let Ok(mut stored) = stats.stored_responses.lock() {
            stored.insert(seq, prompt_tokens + u64::from(n_tokens));
            while stored.len() > STORED_RESPONSES {
                stored.pop_first();
            }
        }
    }
    // Blocks are used once the request is served (not for an injected HTTP error).
    let cached_tokens = shape.hash_ids.as_ref().map(|ids| {
        let hits = match stats.prefix_cache.lock() {
            Ok(mut lru) => lru.use_prefix(ids, cfg.cache_blocks),
            Err(_) => 0,
        };
        (hits as u64 * shape.block_size).min(prompt_tokens)
    });
    let counters = &stats.serving;
    counters
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::Relaxed);
    if let Some(hit) = cached_tokens {
        counters
            .prefix_queries
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        counters.prefix_hits.fetch_add(hit, Ordering::Relaxed);
    }
    let (reasoning_tokens, tool_call) = if api == Api::Completions {
        (0, false)
    } else {
        let r = (shape.reasoning_ratio * f64::from(n_tokens)).round() as u32;
        (r.min(n_tokens), draw_sqrt2(seq) < cfg.tool_calls)
    };
    let model: Arc<str> = parsed
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or(&cfg.model)
        .into();
    let endless = fault == Some(Fault::Endless);
    let gen = Generation {
        id: seq,
        api,
        reasoning_tokens,
        reasoning_field: cfg.reasoning_field,
        report_reasoning: api != Api::Completions && shape.reasoning_given,
        tool_call,
        cached_tokens,
        model,
        n_tokens: if endless { u32::MAX } else { n_tokens },
        fault,
        fault_at: n_tokens / 2,
        stall: cfg.faults.stall,
        prompt_tokens,
        include_usage,
        received,
        start: arrival + ttft,
        itl: if endless { Duration::ZERO } else { cfg.itl },
        jitter: cfg.itl_jitter,
        rng: seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        emitted: 0,
        last_deadline: arrival,
        pending: None,
        token_times: cfg.record_token_times.then(|| {
            let user = parsed.get("user").and_then(|u| u.as_str()).unwrap_or("");
            (
                user.to_owned(),
                Vec::with_capacity(n_tokens.min(4096) as usize),
            )
        }),
    };
    stats.active_streams.fetch_add(1, Ordering::Relaxed);
    let guard = ActiveGuard {
        stats: Arc::clone(&stats),
        _slot: permit,
        close: (fault == Some(Fault::CloseKeepAlive)).then_some(close),
    };
    let (ctype, body) = if stream {
        ("text/event-stream", MockBody::stream(gen, guard))
    } else if endless {
        ("application/json", MockBody::endless_whole(gen, guard))
    } else {
        ("application/json", MockBody::delayed_whole(gen, guard))
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    Ok(r)
}

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
    Responses,
    /// Anthropic's `/v1/messages`.
    Messages,
}

impl Api {
    /// Every event is preceded by an `event: <type>` line, and the stream ends without
    /// `[DONE]` after an event that always carries usage.
    fn typed_events(self) -> bool {
        matches!(self, Api::Responses | Api::Messages)
    }
}

/// Responses kept for `previous_response_id` (each costs two integers).
const STORED_RESPONSES: usize = 1 << 20;

/// u = frac((n+1)·√2): a low-discrepancy draw per request, independent of the faults'
/// golden-ratio sequence over the same request numbers.
fn draw_sqrt2(n: u64) -> f64 {
    (n.wrapping_add(1).wrapping_mul(0x6A09_E667_F3BC_C908) >> 11) as f64 / (1u64 << 53) as f64
}

/// What a request's own `fineserve_*` fields ask of the mock.
struct RequestShape {
    reasoning_ratio: f64,
    /// A reasoning ratio applies (configured or given): usage reports `reasoning_tokens`.
    reasoning_given: bool,
    hash_ids: Option<Vec<i64>>,
    block_size: u64,
}

impl RequestShape {
    fn parse(v: &serde_json::Value, cfg: &MockConfig) -> Result<Self, String> {
        let (reasoning_ratio, given) = match v.get("fineserve_reasoning_ratio") {
            None | Some(serde_json::Value::Null) => (cfg.reasoning_ratio, false),
            Some(r) => match r.as_f64() {
                Some(r) if (0.0..=1.0).contains(&r) => (r, true),
                _ => {
                    return Err(format!(
                        "fineserve_reasoning_ratio must be in [0, 1], got {r}"
                    ))
                }
            },
        };
        let hash_ids = match v.get("fineserve_hash_ids") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_i64().or_else(|| x.as_u64().map(|u| u as i64)))
                    .collect::<Option<Vec<i64>>>()
                    .ok_or("fineserve_hash_ids must be a list of integers")?,
            ),
            Some(_) => return Err("fineserve_hash_ids must be a list of integers".to_owned()),
        };
        let block_size = match v.get("fineserve_block_size") {
            None | Some(serde_json::Value::Null) => 512,
            Some(b) => match b.as_u64() {
                Some(b) if b > 0 => b,
                _ => {
                    return Err(format!(
                        "fineserve_block_size must be a positive integer, got {b}"
                    ))
                }
            },
        };
        Ok(Self {
            reasoning_ratio,
            reasoning_given: given || cfg.reasoning_ratio > 0.0,
            hash_ids,
            block_size,
        })
    }
}

fn count_prompt_tokens(v: &serde_json::Value, api: Api) -> u64 {
    fn words(s: &str) -> u64 {
        s.split_whitespace().count() as u64
    }
    /// A message's `content`: a string or a list of parts with `text` (or, for a tool
    /// result block, `content`).
    fn content_words(c: &serde_json::Value) -> u64 {
        match c {
            serde_json::Value::String(s) => words(s),
            serde_json::Value::Array(parts) => parts
                .iter()
                .map(|p| {
                    p.get("text")
                        .or_else(|| p.get("content"))
                        .map_or(0, content_words)
                })
                .sum(),
            _ => 0,
        }
    }
    // A message's content, a Responses tool result's `output`, a call's `arguments`.
    let messages = |m: Option<&serde_json::Value>| {
        m.and_then(|m| m.as_array()).map_or(0, |msgs| {
            msgs.iter()
                .filter_map(|m| {
                    m.get("content")
                        .or_else(|| m.get("output"))
                        .or_else(|| m.get("arguments"))
                })
                .map(content_words)
                .sum()
        })
    };
    match api {
        Api::Chat | Api::Messages => messages(v.get("messages")),
        Api::Responses => match v.get("input") {
            Some(serde_json::Value::String(s)) => words(s),
            other => messages(other),
        },
        Api::Completions => match v.get("prompt") {
            Some(serde_json::Value::String(s)) => words(s),
            Some(serde_json::Value::Array(a)) => match a.first() {
                Some(serde_json::Value::Number(_)) => a.len() as u64,
                Some(serde_json::Value::String(s)) => words(s),
                _ => 0,
            },
            _ => 0,
        },
    }
}

/// A request waiting for a generation slot, counted in `num_requests_waiting` until it
/// gets one or its client goes away.
struct Waiting<'a>(&'a MockStats);

impl<'a> Waiting<'a> {
    fn enter(stats: &'a MockStats) -> Self {
        stats.serving.waiting.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }

    async fn wait_for(
        self,
        sem: Arc<tokio::sync::Semaphore>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError> {
        sem.acquire_owned().await
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.serving.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

fn metrics_response(cfg: &MockConfig, stats: &MockStats) -> Response<MockBody> {
    let used_blocks = stats.prefix_cache.lock().map_or(0, |lru| lru.len());
    let kv_cache_usage = if cfg.cache_blocks > 0 {
        (used_blocks as f64 / cfg.cache_blocks as f64).min(1.0)
    } else {
        0.0
    };
    let gauges = Gauges {
        running: stats.active_streams.load(Ordering::Relaxed),
        kv_cache_usage,
    };
    let page = stats.serving.render(&cfg.model, gauges);
    let mut r = Response::new(MockBody::whole(Bytes::from(page)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// Held for a generation's life: counts it as active, keeps its capacity slot, and (for a
/// `close_keepalive` fault) closes the connection when the response is done.
struct ActiveGuard {
    stats: Arc<MockStats>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    close: Option<Arc<tokio::sync::Notify>>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.stats.active_streams.fetch_sub(1, Ordering::Relaxed);
        if let Some(c) = &self.close {
            c.notify_one();
        }
    }
}

struct Generation {
    id: u64,
    api: Api,
    /// When the request arrived (before any wait for a slot): vLLM's TTFT starts there.
    received: Instant,
    /// The first this many tokens are reasoning (chat and Responses only).
    reasoning_tokens: u32,
    reasoning_field: ReasoningField,
    /// Usage reports `reasoning_tokens` (a reasoning ratio applies to the request).
    report_reasoning: bool,
    /// The answer streams as tool-call fragments.
    tool_call: bool,
    /// Tokens served from the prefix cache, for requests that named their blocks.
    cached_tokens: Option<u64>,
    model: Arc<str>,
    n_tokens: u32,
    fault: Option<Fault>,
    /// Tokens sent before a mid-stream fault (reset, malformed JSON, stall) strikes.
    fault_at: u32,
    stall: Duration,
    prompt_tokens: u64,
    include_usage: bool,
    /// With `record_token_times`: the request's `user` and each token's emission instant.
    token_times: Option<(String, Vec<i64>)>,
    /// Deadline of the first token.
    start: Instant,
    itl: Duration,
    jitter: Duration,
    rng: u64,
    emitted: u32,
    last_deadline: Instant,
    /// Deadline of the next token once computed (jitter is drawn once per token).
    pending: Option<Instant>,
}

impl Generation {
    fn next_deadline(&mut self) -> Instant {
        if self.fault == Some(Fault::Stall) && self.emitted == self.fault_at {
            // Deadlines are absolute: moving the start delays every later token.
            self.start += self.stall;
            self.fault = None;
        }
        let mut d = self.start + self.itl * self.emitted;
        if !self.jitter.is_zero() && self.emitted > 0 {
            // xorshift64: cheap, deterministic per stream.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let span = self.jitter.as_nanos() as u64 * 2 + 1;
            let off = (self.rng % span) as i64 - self.jitter.as_nanos() as i64;
            d = if off >= 0 {
                d + Duration::from_nanos(off as u64)
            } else {
                d - Duration::from_nanos((-off) as u64)
            };
        }
        d = d.max(self.last_deadline);
        self.last_deadline = d;
        d
    }

    /// Appends one event: `data: …` (with `event: <type>` before it for the Responses
    /// API), or the bare JSON for a `malformed_sse` fault.
    fn push_event(&self, out: &mut Vec<u8>, event_type: &str, json: &str) {
        if self.fault == Some(Fault::MalformedSse) {
            out.extend_from_slice(json.as_bytes());
            out.extend_from_slice(b"\n\n");
            return;
        }
        if self.api.typed_events() {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(event_type.as_bytes());
            out.push(b'\n');
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(b"\n\n");
    }

    fn framed(&self, event_type: &str, json: &str) -> Bytes {
        let mut out = Vec::with_capacity(json.len() + 48);
        self.push_event(&mut out, event_type, json);
        Bytes::from(out)
    }

    /// Appends the event(s) of token number `self.emitted` (1-based).
    fn push_token_event(&self, out: &mut Vec<u8>, last: bool) {
        if self.fault == Some(Fault::MalformedJson) && self.emitted == self.fault_at + 1 {
            out.extend_from_slice(b"data: {\"choices\":[{\"index\":0,\"text\":\" tok\",\n\n");
            return;
        }
        let last = last && self.fault != Some(Fault::NoDone);
        let finish = if last { "\"length\"" } else { "null" };
        let k = self.emitted;
        let reasoning = k <= self.reasoning_tokens;
        let first_answer = k == self.reasoning_tokens + 1;
        let (id, model) = (self.id, &self.model);
        match self.api {
            Api::Completions => self.push_event(out, "", &format!(
                "{{\"id\":\"cmpl-{id}\",\"object\":\"text_completion\",\"created\":0,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\" tok\",\"finish_reason\":{finish}}}]}}"
            )),
            Api::Chat => {
                let delta: std::borrow::Cow<'static, str> = if reasoning {
                    match self.reasoning_field {
                        ReasoningField::Reasoning => "{\"reasoning\":\" tok\"}".into(),
                        ReasoningField::ReasoningContent => {
                            "{\"reasoning_content\":\" tok\"}".into()
                        }
                    }
                } else if self.tool_call && first_answer {
                    // As vLLM: the first fragment names the call, later ones only add
                    // argument text.
                    format!("{{\"tool_calls\":[{{\"index\":0,\"id\":\"call_{id}\",\"type\":\"function\",\"function\":{{\"name\":\"{TOOL_NAME}\",\"arguments\":\"tok\"}}}}]}}").into()
                } else if self.tool_call {
                    "{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\" tok\"}}]}".into()
                } else {
                    "{\"content\":\" tok\"}".into()
                };
                self.push_event(out, "", &format!(
                    "{{\"id\":\"chatcmpl-{id}\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}"
                ));
            }
            Api::Messages => self.push_messages_token(out, k, reasoning, first_answer),
            Api::Responses => {
                // Sequence numbers: 0 for response.created, then two per token (an item's
                // `output_item.added` and the delta), the end after the last token.
                let seq = 2 * u64::from(k);
                let answer_index = u32::from(self.reasoning_tokens > 0);
                if k == 1 && reasoning {
                    self.push_event(out, "response.output_item.added", &format!(
                        "{{\"type\":\"response.output_item.added\",\"sequence_number\":{},\"output_index\":0,\"item\":{{\"type\":\"reasoning\",\"id\":\"rs_{id}\",\"summary\":[],\"content\":[]}}}}",
                        seq - 1
                    ));
                } else if first_answer {
                    let item = if self.tool_call {
                        format!("{{\"type\":\"function_call\",\"id\":\"fc_{id}\",\"call_id\":\"call_{id}\",\"name\":\"{TOOL_NAME}\",\"arguments\":\"\",\"status\":\"in_progress\"}}")
                    } else {
                        format!("{{\"type\":\"message\",\"id\":\"msg_{id}\",\"role\":\"assistant\",\"status\":\"in_progress\",\"content\":[]}}")
                    };
                    self.push_event(out, "response.output_item.added", &format!(
                        "{{\"type\":\"response.output_item.added\",\"sequence_number\":{},\"output_index\":{answer_index},\"item\":{item}}}",
                        seq - 1
                    ));
                }
                let (ty, item, index) = if reasoning {
                    ("response.reasoning_text.delta", "rs", 0)
                } else if self.tool_call {
                    ("response.function_call_arguments.delta", "fc", answer_index)
                } else {
                    ("response.output_text.delta", "msg", answer_index)
                };
                self.push_event(out, ty, &format!(
                    "{{\"type\":\"{ty}\",\"sequence_number\":{seq},\"item_id\":\"{item}_{id}\",\"output_index\":{index},\"content_index\":0,\"delta\":\" tok\"}}"
                ));
            }
        }
    }

    /// Appends token `k`'s events of an Anthropic Messages stream: a content block opens
    /// where the reasoning (a `thinking` block) and the answer (`text` or `tool_use`) start.
    fn push_messages_token(&self, out: &mut Vec<u8>, k: u32, reasoning: bool, first_answer: bool) {
        let id = self.id;
        let answer_index = u32::from(self.reasoning_tokens > 0);
        if k == 1 && reasoning {
            self.push_event(out, "content_block_start",
                "{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}");
        } else if first_answer {
            if answer_index > 0 {
                self.push_event(
                    out,
                    "content_block_stop",
                    "{\"type\":\"content_block_stop\",\"index\":0}",
                );
            }
            let block = if self.tool_call {
                format!("{{\"type\":\"tool_use\",\"id\":\"toolu_{id}\",\"name\":\"{TOOL_NAME}\",\"input\":{{}}}}")
            } else {
                "{\"type\":\"text\",\"text\":\"\"}".to_owned()
            };
            self.push_event(out, "content_block_start", &format!(
                "{{\"type\":\"content_block_start\",\"index\":{answer_index},\"content_block\":{block}}}"
            ));
        }
        let (index, delta) = if reasoning {
            (0, "{\"type\":\"thinking_delta\",\"thinking\":\" tok\"}")
        } else if self.tool_call {
            (
                answer_index,
                "{\"type\":\"input_json_delta\",\"partial_json\":\" tok\"}",
            )
        } else {
            (answer_index, "{\"type\":\"text_delta\",\"text\":\" tok\"}")
        };
        self.push_event(
            out,
            "content_block_delta",
            &format!("{{\"type\":\"content_block_delta\",\"index\":{index},\"delta\":{delta}}}"),
        );
    }

    /// The first event of a Responses or Messages stream, sent with the headers (as vLLM
    /// does for Responses; Anthropic's `message_start` carries the prompt's usage).
    fn created_event(&self) -> Bytes {
        if self.api == Api::Messages {
            return self.framed("message_start", &format!(
                "{{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_{}\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"{}\",\"stop_reason\":null,\"usage\":{}}}}}",
                self.id, self.model, self.messages_usage(0)
            ));
        }
        self.framed("response.created", &format!(
            "{{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{{\"id\":\"resp_{}\",\"object\":\"response\",\"created_at\":0,\"status\":\"in_progress\",\"model\":\"{}\",\"output\":[],\"usage\":null}}}}",
            self.id, self.model
        ))
    }

    /// Anthropic's usage: `input_tokens` excludes the cache reads.
    fn messages_usage(&self, output_tokens: u32) -> String {
        let cached = self.cached_tokens.unwrap_or(0);
        let mut u = format!(
            "{{\"input_tokens\":{},\"output_tokens\":{output_tokens}",
            self.prompt_tokens.saturating_sub(cached)
        );
        if self.cached_tokens.is_some() {
            u.push_str(&format!(
                ",\"cache_read_input_tokens\":{cached},\"cache_creation_input_tokens\":0"
            ));
        }
        u.push('}');
        u
    }

    fn usage_json(&self) -> String {
        if self.api == Api::Messages {
            return self.messages_usage(self.n_tokens);
        }
        let (p, n) = (self.prompt_tokens, self.n_tokens);
        let mut u = if self.api == Api::Responses {
            format!(
                "{{\"input_tokens\":{p},\"output_tokens\":{n},\"total_tokens\":{},\"output_tokens_details\":{{\"reasoning_tokens\":{}}}",
                p + u64::from(n),
                self.reasoning_tokens
            )
        } else {
            format!(
                "{{\"prompt_tokens\":{p},\"completion_tokens\":{n},\"total_tokens\":{}",
                p + u64::from(n)
            )
        };
        if self.report_reasoning && self.api != Api::Responses {
            u.push_str(&format!(
                ",\"completion_tokens_details\":{{\"reasoning_tokens\":{}}}",
                self.reasoning_tokens
            ));
        }
        if let Some(c) = self.cached_tokens {
            let key = if self.api == Api::Responses {
                "input_tokens_details"
            } else {
                "prompt_tokens_details"
            };
            u.push_str(&format!(",\"{key}\":{{\"cached_tokens\":{c}}}"));
        }
        u.push('}');
        u
    }

    /// The usage chunk, or for the Responses API `response.completed` (which carries usage).
    fn usage_event(&self) -> Bytes {
        let (id, model) = (self.id, &self.model);
        match self.api {
            Api::Messages => {
                let mut out = Vec::with_capacity(320);
                if self.n_tokens > 0 {
                    let last = u32::from(self.reasoning_tokens > 0 && self.reasoning_tokens < self.n_tokens);
                    self.push_event(&mut out, "content_block_stop", &format!(
                        "{{\"type\":\"content_block_stop\",\"index\":{last}}}"
                    ));
                }
                let stop = if self.tool_call { "tool_use" } else { "max_tokens" };
                self.push_event(&mut out, "message_delta", &format!(
                    "{{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"{stop}\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{}}}}}",
                    self.n_tokens
                ));
                self.push_event(&mut out, "message_stop", "{\"type\":\"message_stop\"}");
                Bytes::from(out)
            }
            Api::Responses => self.framed("response.completed", &format!(
                "{{\"type\":\"response.completed\",\"sequence_number\":{},\"response\":{{\"id\":\"resp_{id}\",\"object\":\"response\",\"created_at\":0,\"status\":\"completed\",\"model\":\"{model}\",\"output\":[],\"usage\":{}}}}}",
                2 * u64::from(self.n_tokens) + 1,
                self.usage_json()
            )),
            api => {
                let obj = if api == Api::Chat {
                    "chat.completion.chunk"
                } else {
                    "text_completion"
                };
                self.framed("", &format!(
                    "{{\"id\":\"cmpl-{id}\",\"object\":\"{obj}\",\"created\":0,\"model\":\"{model}\",\"choices\":[],\"usage\":{}}}",
                    self.usage_json()
                ))
            }
        }
    }

    fn whole_json(&self) -> Bytes {
        let (id, model) = (self.id, &self.model);
        let r = self.reasoning_tokens.min(self.n_tokens);
        let reasoning = " tok".repeat(r as usize);
        let answer = " tok".repeat((self.n_tokens - r) as usize);
        let usage = self.usage_json();
        let s = match self.api {
            Api::Completions => format!(
                "{{\"id\":\"cmpl-{id}\",\"object\":\"text_completion\",\"created\":0,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\"{answer}\",\"finish_reason\":\"length\"}}],\"usage\":{usage}}}"
            ),
            Api::Chat => {
                let mut msg = String::from("{\"role\":\"assistant\"");
                if r > 0 {
                    msg.push_str(&format!(
                        ",\"{}\":\"{reasoning}\"",
                        self.reasoning_field.name()
                    ));
                }
                if self.tool_call && !answer.is_empty() {
                    msg.push_str(&format!(",\"content\":null,\"tool_calls\":[{{\"id\":\"call_{id}\",\"type\":\"function\",\"function\":{{\"name\":\"{TOOL_NAME}\",\"arguments\":\"{answer}\"}}}}]"));
                } else {
                    msg.push_str(&format!(",\"content\":\"{answer}\""));
                }
                msg.push('}');
                format!(
                    "{{\"id\":\"chatcmpl-{id}\",\"object\":\"chat.completion\",\"created\":0,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"message\":{msg},\"finish_reason\":\"length\"}}],\"usage\":{usage}}}"
                )
            }
            Api::Messages => {
                let mut blocks = Vec::new();
                if r > 0 {
                    blocks.push(format!("{{\"type\":\"thinking\",\"thinking\":\"{reasoning}\",\"signature\":\"\"}}"));
                }
                if self.tool_call && !answer.is_empty() {
                    // The arguments as the other APIs stream them, inside an object.
                    blocks.push(format!("{{\"type\":\"tool_use\",\"id\":\"toolu_{id}\",\"name\":\"{TOOL_NAME}\",\"input\":{{\"text\":\"{answer}\"}}}}"));
                } else {
                    blocks.push(format!("{{\"type\":\"text\",\"text\":\"{answer}\"}}"));
                }
                let stop = if self.tool_call { "tool_use" } else { "max_tokens" };
                format!(
                    "{{\"id\":\"msg_{id}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"{model}\",\"content\":[{}],\"stop_reason\":\"{stop}\",\"stop_sequence\":null,\"usage\":{usage}}}",
                    blocks.join(",")
                )
            }
            Api::Responses => {
                let mut items = Vec::new();
                if r > 0 {
                    items.push(format!("{{\"type\":\"reasoning\",\"id\":\"rs_{id}\",\"summary\":[],\"content\":[{{\"type\":\"reasoning_text\",\"text\":\"{reasoning}\"}}]}}"));
                }
                if self.tool_call && !answer.is_empty() {
                    items.push(format!("{{\"type\":\"function_call\",\"id\":\"fc_{id}\",\"call_id\":\"call_{id}\",\"name\":\"{TOOL_NAME}\",\"arguments\":\"{answer}\",\"status\":\"completed\"}}"));
                } else {
                    items.push(format!("{{\"type\":\"message\",\"id\":\"msg_{id}\",\"role\":\"assistant\",\"status\":\"completed\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{answer}\",\"annotations\":[]}}]}}"));
                }
                format!(
                    "{{\"id\":\"resp_{id}\",\"object\":\"response\",\"created_at\":0,\"status\":\"completed\",\"model\":\"{model}\",\"output\":[{}],\"usage\":{usage}}}",
                    items.join(",")
                )
            }
        };
        Bytes::from(s)
    }
}

/// The function a mock tool call names.
const TOOL_NAME: &str = "fineserve_tool";

enum Phase {
    Tokens,
    Usage,
    Done,
    Whole,
    /// An endless non-streamed answer: a JSON prefix, then text forever.
    Filler,
    End,
}

/// A response body that produces its frames on schedule, without a task or channel per
/// stream: the body's own `poll_frame` owns the timer.
pub struct MockBody {
    phase: Phase,
    gen: Option<Generation>,
    ready: Option<Bytes>,
    sleep: Option<Pin<Box<Sleep>>>,
    _guard: Option<ActiveGuard>,
}

impl MockBody {
    fn whole(bytes: Bytes) -> Self {
        Self {
            phase: Phase::End,
            gen: None,
            ready: Some(bytes),
            sleep: None,
            _guard: None,
        }
    }

    fn stream(gen: Generation, guard: ActiveGuard) -> Self {
        let phase = if gen.n_tokens == 0 {
            Phase::Usage
        } else {
            Phase::Tokens
        };
        let ready = gen.api.typed_events().then(|| gen.created_event());
        Self {
            phase,
            gen: Some(gen),
            ready,
            sleep: None,
            _guard: Some(guard),
        }
    }

    fn delayed_whole(gen: Generation, guard: ActiveGuard) -> Self {
        Self {
            phase: Phase::Whole,
            gen: Some(gen),
            ready: None,
            sleep: None,
            _guard: Some(guard),
        }
    }

    fn endless_whole(gen: Generation, guard: ActiveGuard) -> Self {
        let prefix = format!(
            "{{\"id\":\"cmpl-{}\",\"object\":\"text_completion\",\"choices\":[{{\"index\":0,\"text\":\"",
            gen.id
        );
        Self {
            phase: Phase::Filler,
            gen: Some(gen),
            ready: Some(Bytes::from(prefix)),
            sleep: None,
            _guard: Some(guard),
        }
    }

    /// Ready once `deadline` has passed.
    fn wait(&mut self, cx: &mut Context<'_>, deadline: Instant) -> bool {
        if Instant::now() >= deadline {
            self.sleep = None;
            return true;
        }
        let sleep = match &mut self.sleep {
            Some(s) => {
                if s.deadline() != deadline {
                    s.as_mut().reset(deadline);
                }
                s
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        if sleep.as_mut().poll(cx).is_ready() {
            self.sleep = None;
            true
        } else {
            false
        }
    }
}

use std::future::Future;

impl Drop for MockBody {
    /// A recorded stream's token instants go to the log when its response is done (or
    /// abandoned by the client).
    fn drop(&mut self) {
        let times = self.gen.as_mut().and_then(|g| g.token_times.take());
        if let (Some(times), Some(guard)) = (times, &self._guard) {
            if let Ok(mut log) = guard.stats.token_log.lock() {
                log.streams.push(times);
            }
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    /// Only the `reset` fault fails a body; hyper then aborts the connection.
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if let Some(b) = this.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(mut gen) = this.gen.take() else {
            return Poll::Ready(None);
        };
        let out = match this.phase {
            Phase::Tokens => {
                if gen.fault == Some(Fault::Reset) && gen.emitted >= gen.fault_at {
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected fault: connection reset",
                    ))));
                }
                let deadline = match gen.pending {
                    Some(d) => d,
                    None => {
                        let d = gen.next_deadline();
                        gen.pending = Some(d);
                        d
                    }
                };
                if !this.wait(cx, deadline) {
                    this.gen = Some(gen);
                    return Poll::Pending;
                }
                // Emit every token already due in one frame: a server that is behind sends
                // what it has, and with ITL 0 a whole stream costs one write.
                let mut frame = Vec::with_capacity(160);
                let now = Instant::now();
                let emitted_ns = match (&gen.token_times, &this._guard) {
                    (Some(_), Some(g)) => Some(g.stats.now_ns()),
                    _ => None,
                };
                let emitted_before = gen.emitted;
                if emitted_before == 0 {
                    if let Some(g) = &this._guard {
                        g.stats.serving.observe_ttft(now - gen.received);
                    }
                }
                loop {
                    gen.pending = None;
                    gen.emitted += 1;
                    if let (Some((_, times)), Some(t)) = (&mut gen.token_times, emitted_ns) {
                        times.push(t);
                    }
                    let last = gen.emitted >= gen.n_tokens;
                    gen.push_token_event(&mut frame, last);
                    if last {
                        this.phase = if gen.fault == Some(Fault::NoDone) {
                            Phase::End
                        } else {
                            Phase::Usage
                        };
                        break;
                    }
                    let next = gen.next_deadline();
                    gen.pending = Some(next);
                    let reset_due = gen.fault == Some(Fault::Reset) && gen.emitted >= gen.fault_at;
                    if next > now || frame.len() > 16 * 1024 || reset_due {
                        break;
                    }
                }
                if let Some(g) = &this._guard {
                    let served = &g.stats.serving;
                    served
                        .generation_tokens
                        .fetch_add(u64::from(gen.emitted - emitted_before), Ordering::Relaxed);
                    if gen.emitted >= gen.n_tokens {
                        served.success.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Bytes::from(frame)
            }
            Phase::Usage => {
                this.phase = Phase::Done;
                // The Responses API always ends with `response.completed`, usage included.
                if gen.include_usage || gen.api.typed_events() {
                    gen.usage_event()
                } else {
                    this.gen = Some(gen);
                    return self.poll_frame(cx);
                }
            }
            Phase::Done => {
                this.phase = Phase::End;
                if gen.api.typed_events() {
                    // No `[DONE]` in the Responses and Messages APIs.
                    this.gen = Some(gen);
                    return Poll::Ready(None);
                }
                gen.framed("", "[DONE]")
            }
            Phase::Filler => Bytes::from(" tok".repeat(4096)),
            Phase::Whole => {
                let deadline = gen.start + gen.itl * gen.n_tokens.saturating_sub(1);
                if !this.wait(cx, deadline) {
                    this.gen = Some(gen);
                    return Poll::Pending;
                }
                this.phase = Phase::End;
                if let Some(g) = &this._guard {
                    let served = &g.stats.serving;
                    served.observe_ttft(gen.start.saturating_duration_since(gen.received));
                    served
                        .generation_tokens
                        .fetch_add(u64::from(gen.n_tokens), Ordering::Relaxed);
                    served.success.fetch_add(1, Ordering::Relaxed);
                }
                gen.whole_json()
            }
            Phase::End => return Poll::Ready(None),
        };
        this.gen = Some(gen);
        Poll::Ready(Some(Ok(Frame::data(out))))
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && matches!(self.phase, Phase::End)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lru_counts_leading_hits_and_evicts_the_least_recent() {
        let mut lru = BlockLru::default();
        assert_eq!(lru.use_prefix(&[1, 2, 3], 4), 0);
        assert_eq!(lru.use_prefix(&[1, 2, 3], 4), 3);
        // A miss ends the prefix: block 3 after the new block 5 is no hit.
        assert_eq!(lru.use_prefix(&[1, 5, 3], 4), 1);
        assert_eq!(lru.len(), 4);
        // Block 2 is now the least recently used; 6 evicts it.
        assert_eq!(lru.use_prefix(&[6], 4), 0);
        assert_eq!(lru.len(), 4);
        assert_eq!(lru.use_prefix(&[1, 2], 4), 1);
        assert_eq!(BlockLru::default().use_prefix(&[1, 1], 0), 0);
    }

    #[test]
    fn request_shape_reads_and_checks_the_fineserve_fields() {
        let cfg = MockConfig {
            reasoning_ratio: 0.25,
            ..MockConfig::default()
        };
        let v: serde_json::Value = serde_json::json!({"fineserve_reasoning_ratio": 0.5,
            "fineserve_hash_ids": [3, 4], "fineserve_block_size": 64});
        let s = RequestShape::parse(&v, &cfg).expect("valid");
        assert_eq!(s.reasoning_ratio, 0.5);
        assert!(s.reasoning_given);
        assert_eq!(s.hash_ids, Some(vec![3, 4]));
        assert_eq!(s.block_size, 64);
        let s = RequestShape::parse(&serde_json::json!({}), &MockConfig::default()).expect("ok");
        assert!(!s.reasoning_given && s.hash_ids.is_none() && s.block_size == 512);
        for bad in [
            serde_json::json!({"fineserve_reasoning_ratio": 1.5}),
            serde_json::json!({"fineserve_reasoning_ratio": "half"}),
            serde_json::json!({"fineserve_hash_ids": [1, "x"]}),
            serde_json::json!({"fineserve_hash_ids": 5}),
            serde_json::json!({"fineserve_block_size": 0}),
        ] {
            assert!(RequestShape::parse(&bad, &cfg).is_err(), "{bad}");
        }
        let bad = MockConfig {
            tool_calls: 2.0,
            ..MockConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn the_tool_call_draw_holds_its_share() {
        let n = 1000;
        let hits = (0..n).filter(|&i| draw_sqrt2(i) < 0.3).count();
        assert!((295..=305).contains(&hits), "{hits}");
    }
}
