//! The embedded mock of an OpenAI-compatible server: `/v1/completions`,
//! `/v1/chat/completions` and `/v1/models`, streaming exactly `max_tokens` tokens at a
//! configured TTFT and inter-token latency (as a server with `ignore_eos` does).
//!
//! Token deadlines are absolute (arrival + TTFT + k·ITL), so the cadence does not drift;
//! each one is subject to tokio's 1 ms timer granularity.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
        }
    }
}

#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub completions: AtomicU64,
    pub active_streams: AtomicU64,
    pub bad_requests: AtomicU64,
}

pub struct MockServer {
    addr: SocketAddr,
    stats: Arc<MockStats>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockServer {
    pub fn start(host: &str, port: u16, config: MockConfig) -> Result<Self, EngineError> {
        crate::timer::raise_nofile_limit();
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
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let slots = (config.max_concurrency > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(config.max_concurrency)));
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
                                let cfg = Arc::clone(&cfg);
                                let st = Arc::clone(&st);
                                let slots = slots.clone();
                                tokio::spawn(async move {
                                    let svc = hyper::service::service_fn(move |req| {
                                        handle(req, Arc::clone(&cfg), Arc::clone(&st), slots.clone())
                                    });
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), svc)
                                        .await;
                                });
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
    let body = serde_json::json!({"error": {"message": msg, "type": "invalid_request_error"}});
    json_response(status, body.to_string())
}

async fn handle(
    req: http::Request<Incoming>,
    cfg: Arc<MockConfig>,
    stats: Arc<MockStats>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
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
    let gen = Generation {
        id: seq,
        chat,
        model,
        n_tokens,
        prompt_tokens,
        include_usage,
        start: arrival + ttft,
        itl: cfg.itl,
        jitter: cfg.itl_jitter,
        rng: seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        emitted: 0,
        last_deadline: arrival,
        pending: None,
    };
    stats.active_streams.fetch_add(1, Ordering::Relaxed);
    let guard = ActiveGuard {
        stats: Arc::clone(&stats),
        _slot: permit,
    };
    let (ctype, body) = if stream {
        ("text/event-stream", MockBody::stream(gen, guard))
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

/// Held for a generation's life: counts it as active and keeps its capacity slot.
struct ActiveGuard {
    stats: Arc<MockStats>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.stats.active_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Generation {
    id: u64,
    chat: bool,
    model: Arc<str>,
    n_tokens: u32,
    prompt_tokens: u64,
    include_usage: bool,
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

    fn token_event(&self, last: bool) -> Bytes {
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
        Bytes::from(s)
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
        Bytes::from(format!(
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

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(b) = this.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(mut gen) = this.gen.take() else {
            return Poll::Ready(None);
        };
        let out = match this.phase {
            Phase::Tokens => {
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
                loop {
                    gen.pending = None;
                    gen.emitted += 1;
                    let last = gen.emitted >= gen.n_tokens;
                    frame.extend_from_slice(&gen.token_event(last));
                    if last {
                        this.phase = Phase::Usage;
                        break;
                    }
                    let next = gen.next_deadline();
                    gen.pending = Some(next);
                    if next > now || frame.len() > 16 * 1024 {
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
                Bytes::from_static(b"data: [DONE]\n\n")
            }
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
