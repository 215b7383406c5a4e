//! The embedded mock of an OpenAI-compatible server: `/v1/completions`,
//! `/v1/chat/completions` and `/v1/models`, streaming exactly `max_tokens` tokens at a
//! configured TTFT and inter-token latency (as a server with `ignore_eos` does).
//!
//! Token deadlines are absolute (arrival + TTFT + k·ITL), so the cadence does not drift;
//! each one is subject to tokio's 1 ms timer granularity.
//!
//! Fault injection ([`FaultConfig`]) makes a given fraction of completion requests misbehave
//! the way real servers and proxies do, so the client's handling of each can be tested.

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
        }
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
    /// Faults injected so far, in [`Fault::ALL`] order.
    pub faults: [AtomicU64; Fault::ALL.len()],
    fault_seq: AtomicU64,
    pub token_log: std::sync::Mutex<TokenLog>,
    /// Arrival instants of completion requests (with `record_arrivals`), ns since the start.
    arrivals: std::sync::Mutex<Vec<i64>>,
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
    stats: Arc<MockStats>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockServer {
    pub fn start(host: &str, port: u16, config: MockConfig) -> Result<Self, EngineError> {
        config.faults.validate()?;
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
                                if cfg.record_arrivals && recv_stamp::enable(&stream).is_ok() {
                                    let (io, rx_ns) = recv_stamp::StampedStream::new(stream);
                                    tokio::spawn(serve_connection(io, Some(rx_ns), cfg, st, slots));
                                } else {
                                    tokio::spawn(serve_connection(stream, None, cfg, st, slots));
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
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
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
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let chat = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/models") => {
            let body = serde_json::json!({
                "object": "list",
                "data": [{"id": cfg.model, "object": "model", "owned_by": "fineserve"}],
            });
            return Ok(json_response(StatusCode::OK, body.to_string()));
        }
        (&Method::GET, "/health") => return Ok(json_response(StatusCode::OK, "{}".into())),
        (&Method::POST, "/v1/completions") => false,
        (&Method::POST, "/v1/chat/completions") => true,
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
        .get("max_completion_tokens")
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
    let prompt_tokens = count_prompt_tokens(&parsed, chat);
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
        Some(sem) => match sem.acquire_owned().await {
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
    let model: Arc<str> = parsed
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or(&cfg.model)
        .into();
    let endless = fault == Some(Fault::Endless);
    let gen = Generation {
        id: seq,
        chat,
        model,
        n_tokens: if endless { u32::MAX } else { n_tokens },
        fault,
        fault_at: n_tokens / 2,
        stall: cfg.faults.stall,
        prompt_tokens,
        include_usage,
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

fn count_prompt_tokens(v: &serde_json::Value, chat: bool) -> u64 {
    fn words(s: &str) -> u64 {
        s.split_whitespace().count() as u64
    }
    if chat {
        return v
            .get("messages")
            .and_then(|m| m.as_array())
            .map_or(0, |msgs| {
                msgs.iter()
                    .filter_map(|m| m.get("content").and_then(|c| c.as_str()))
                    .map(words)
                    .sum()
            });
    }
    match v.get("prompt") {
        Some(serde_json::Value::String(s)) => words(s),
        Some(serde_json::Value::Array(a)) => match a.first() {
            Some(serde_json::Value::Number(_)) => a.len() as u64,
            Some(serde_json::Value::String(s)) => words(s),
            _ => 0,
        },
        _ => 0,
    }
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
    chat: bool,
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

    /// `data: …` as is, or without the SSE framing for a `malformed_sse` fault.
    fn framed(&self, event: String) -> Bytes {
        match self.fault {
            Some(Fault::MalformedSse) => Bytes::from(event.trim_start_matches("data: ").to_owned()),
            _ => Bytes::from(event),
        }
    }

    fn token_event(&self, last: bool) -> Bytes {
        if self.fault == Some(Fault::MalformedJson) && self.emitted == self.fault_at + 1 {
            return Bytes::from_static(b"data: {\"choices\":[{\"index\":0,\"text\":\" tok\",\n\n");
        }
        let last = last && self.fault != Some(Fault::NoDone);
        let finish = if last { "\"length\"" } else { "null" };
        let s = if self.chat {
            format!(
                "data: {{\"id\":\"chatcmpl-{}\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"{}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok\"}},\"finish_reason\":{finish}}}]}}\n\n",
                self.id, self.model
            )
        } else {
            format!(
                "data: {{\"id\":\"cmpl-{}\",\"object\":\"text_completion\",\"created\":0,\"model\":\"{}\",\"choices\":[{{\"index\":0,\"text\":\" tok\",\"finish_reason\":{finish}}}]}}\n\n",
                self.id, self.model
            )
        };
        self.framed(s)
    }

    fn usage_json(&self) -> String {
        format!(
            "{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{}}}",
            self.prompt_tokens,
            self.n_tokens,
            self.prompt_tokens + self.n_tokens as u64
        )
    }

    fn usage_event(&self) -> Bytes {
        let obj = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        self.framed(format!(
            "data: {{\"id\":\"cmpl-{}\",\"object\":\"{obj}\",\"created\":0,\"model\":\"{}\",\"choices\":[],\"usage\":{}}}\n\n",
            self.id,
            self.model,
            self.usage_json()
        ))
    }

    fn whole_json(&self) -> Bytes {
        let text = " tok".repeat(self.n_tokens as usize);
        let s = if self.chat {
            format!(
                "{{\"id\":\"chatcmpl-{}\",\"object\":\"chat.completion\",\"created\":0,\"model\":\"{}\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{text}\"}},\"finish_reason\":\"length\"}}],\"usage\":{}}}",
                self.id, self.model, self.usage_json()
            )
        } else {
            format!(
                "{{\"id\":\"cmpl-{}\",\"object\":\"text_completion\",\"created\":0,\"model\":\"{}\",\"choices\":[{{\"index\":0,\"text\":\"{text}\",\"finish_reason\":\"length\"}}],\"usage\":{}}}",
                self.id, self.model, self.usage_json()
            )
        };
        Bytes::from(s)
    }
}

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
        Self {
            phase,
            gen: Some(gen),
            ready: None,
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
                loop {
                    gen.pending = None;
                    gen.emitted += 1;
                    if let (Some((_, times)), Some(t)) = (&mut gen.token_times, emitted_ns) {
                        times.push(t);
                    }
                    let last = gen.emitted >= gen.n_tokens;
                    frame.extend_from_slice(&gen.token_event(last));
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
                Bytes::from(frame)
            }
            Phase::Usage => {
                this.phase = Phase::Done;
                if gen.include_usage {
                    gen.usage_event()
                } else {
                    this.gen = Some(gen);
                    return self.poll_frame(cx);
                }
            }
            Phase::Done => {
                this.phase = Phase::End;
                gen.framed("data: [DONE]\n\n".to_owned())
            }
            Phase::Filler => Bytes::from(" tok".repeat(4096)),
            Phase::Whole => {
                let deadline = gen.start + gen.itl * gen.n_tokens.saturating_sub(1);
                if !this.wait(cx, deadline) {
                    this.gen = Some(gen);
                    return Poll::Pending;
                }
                this.phase = Phase::End;
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
