//! HTTP/1.1 client side of a lane: endpoints, a keep-alive connection pool, and the execution
//! of one request with per-event timing.
//!
//! Everything here runs on one lane's current-thread runtime, so the pool needs no locks.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use crate::engine::{ConnBudget, ConnSlot};
use crate::error::EngineError;
use crate::records::{ErrorKind, RequestRecord};
use crate::recv_stamp::{self, StampedStream};
use crate::sse::{decode_event, ChunkInfo, EventKind, SseParser};
use crate::tls::{describe as describe_tls, tls_cause, ClientTlsOptions};

/// One target URL, resolved once before the run.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub addr: SocketAddr,
    pub host_header: HeaderValue,
    pub uri: Uri,
    /// The whole URL, for HTTP/2 requests.
    pub abs_uri: Uri,
    /// `https://`: the connection speaks TLS, with SNI (and certificate name) `server_name`.
    pub tls: bool,
    pub server_name: ServerName<'static>,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, EngineError> {
        let bad = |reason: &str| EngineError::InvalidEndpoint {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a valid URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("URL must start with http:// or https://")),
        };
        let authority = uri.authority().ok_or_else(|| bad("URL has no host"))?;
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host = authority.host().trim_matches(['[', ']']);
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| bad(&format!("cannot resolve host: {e}")))?
            .next()
            .ok_or_else(|| bad("host resolves to no address"))?;
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| bad("host is not a valid TLS server name"))?;
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|_| bad("invalid host"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let path_uri: Uri = path.parse().map_err(|_| bad("invalid path"))?;
        Ok(Self {
            url: url.to_owned(),
            addr,
            host_header,
            uri: path_uri,
            abs_uri: uri.clone(),
            tls,
            server_name,
        })
    }
}

/// Client settings shared by every request of a run.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub stream: bool,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    pub max_body_bytes: usize,
    /// `Authorization` value, marked sensitive so it never appears in debug output.
    pub authorization: Option<HeaderValue>,
    /// `--header`s, on every request (credential-like values marked sensitive).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers whose value each request carries in its schedule (`Schedule::header_values`):
    /// a session id, a data-parallel rank.
    pub request_headers: Vec<HeaderName>,
    /// Strings blanked out of every error message: the API key and credential-like
    /// header values.
    pub secrets: Vec<String>,
    /// How `https://` endpoints are checked (`--cacert`, `--insecure`, `--cert/--key`).
    pub tls: ClientTlsOptions,
    /// HTTP/2 instead of HTTP/1.1 (`--http2`).
    pub http2: bool,
    /// Local addresses new connections are bound to, in turn (empty: the kernel picks).
    /// One address has ~28k ephemeral ports towards one server; several lift that limit
    /// (e.g. 127.0.0.2, 127.0.0.3, … towards a server on loopback).
    pub source_ips: Vec<IpAddr>,
}

impl Default for ClientConfig {
    /// The Python layer's `EngineOptions` defaults.
    fn default() -> Self {
        Self {
            stream: true,
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(600),
            total_timeout: Duration::from_secs(3600),
            max_body_bytes: 64 << 20,
            authorization: None,
            headers: Vec::new(),
            request_headers: Vec::new(),
            secrets: Vec::new(),
            tls: ClientTlsOptions::default(),
            http2: false,
            source_ips: Vec::new(),
        }
    }
}

impl ClientConfig {
    pub fn bearer(api_key: &str) -> Option<HeaderValue> {
        let mut v = HeaderValue::from_str(&format!("Bearer {api_key}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// `message` with the API key and credential-like header values blanked out: error
    /// text quotes server responses, and a server or proxy may echo the request's headers
    /// back.
    pub fn redact(&self, mut message: String) -> String {
        let key = self
            .authorization
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_start_matches("Bearer ").trim());
        for secret in key
            .into_iter()
            .chain(self.secrets.iter().map(String::as_str))
        {
            if !secret.is_empty() && message.contains(secret) {
                message = message.replace(secret, "[redacted]");
            }
        }
        message
    }
}

/// One connection: hyper's request handle (HTTP/1.1, or HTTP/2 where one connection
/// carries many requests), and the kernel's receive stamp of the latest bytes read on it
/// (system-clock ns; 0 where the kernel gives none).
pub struct Sender {
    send: Send,
    rx_unix_ns: Arc<AtomicI64>,
}

enum Send {
    H1(SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    pub fn is_closed(&self) -> bool {
        match &self.send {
            Send::H1(s) => s.is_closed(),
            Send::H2(s) => s.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match &self.send {
            Send::H1(s) => s.is_ready(),
            Send::H2(s) => s.is_ready(),
        }
    }

    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match &mut self.send {
            Send::H1(s) => s.ready().await,
            Send::H2(s) => s.ready().await,
        }
    }

    /// Another handle on an HTTP/2 connection (its requests multiplex); None for HTTP/1.1.
    fn share(&self) -> Option<Sender> {
        match &self.send {
            Send::H2(s) => Some(Sender {
                send: Send::H2(s.clone()),
                rx_unix_ns: Arc::clone(&self.rx_unix_ns),
            }),
            Send::H1(_) => None,
        }
    }

    fn is_h2(&self) -> bool {
        matches!(self.send, Send::H2(_))
    }

    async fn send_request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match &mut self.send {
            Send::H1(s) => s.send_request(req).await,
            Send::H2(s) => s.send_request(req).await,
        }
    }

    /// The kernel's receive stamp of the latest bytes (0: none).
    pub fn last_rx_unix_ns(&self) -> i64 {
        self.rx_unix_ns.load(Ordering::Relaxed)
    }
}

/// A pooled keep-alive connection and when it came back.
struct IdleConn {
    sender: Sender,
    since: Instant,
}

impl IdleConn {
    fn now(sender: Sender) -> Self {
        let since = Instant::now();
        Self { sender, since }
    }
}

/// How long a connection sits unused in its lane's pool before the lane gives it up for
/// another lane waiting for connection budget. A lane past a server's ceiling takes a
/// returned connection again within microseconds; closing it at once for another busy
/// lane (as before) made both reconnect in turn: at 40k req/s offered to a mock serving
/// ~20k, 4,000 connections were opened 21,000 times (at 250 ms: 9,000; at 1 s: 5,900).
const IDLE_BEFORE_TRIM: Duration = Duration::from_secs(1);

/// Idle keep-alive connections per endpoint, oldest first (taken from the back).
pub struct Pool {
    endpoints: Rc<[Endpoint]>,
    idle: RefCell<Vec<Vec<IdleConn>>>,
    connect_timeout: Duration,
    source_ips: Vec<IpAddr>,
    next_source: Cell<usize>,
    /// For `https://` endpoints (built once per run, shared by the lanes).
    tls: Option<TlsConnector>,
    /// Connections open at once over every lane (the descriptor budget).
    budget: Arc<ConnBudget>,
    /// Speak HTTP/2 (prior knowledge on http://, ALPN h2 on https://): one connection
    /// per endpoint and lane carries every request.
    http2: bool,
    /// This lane's requests waiting for a connection, per endpoint: a connection that
    /// comes back goes to one of them (reused) rather than closing for another lane.
    waiting_here: RefCell<Vec<usize>>,
    /// Signalled, per endpoint, when a connection comes back while some wait here.
    returned: Vec<Notify>,
}

type Failure = (ErrorKind, String);

impl Pool {
    pub fn new(
        endpoints: Rc<[Endpoint]>,
        connect_timeout: Duration,
        source_ips: Vec<IpAddr>,
        first_source: usize,
        tls: Option<TlsConnector>,
        budget: Arc<ConnBudget>,
        http2: bool,
    ) -> Self {
        let idle = RefCell::new((0..endpoints.len()).map(|_| Vec::new()).collect());
        Self {
            idle,
            connect_timeout,
            source_ips,
            next_source: Cell::new(first_source),
            tls,
            budget,
            http2,
            waiting_here: RefCell::new(vec![0; endpoints.len()]),
            returned: (0..endpoints.len()).map(|_| Notify::new()).collect(),
            endpoints,
        }
    }

    fn has_idle(&self, endpoint: usize) -> bool {
        self.idle.borrow()[endpoint]
            .iter()
            .any(|c| !c.sender.is_closed())
    }

    /// A TCP connection to `addr`, from the next source address when there are several.
    /// A source address that cannot be bound is its own error (not a port shortage).
    async fn open(&self, addr: SocketAddr) -> Result<TcpStream, Failure> {
        let connect_error =
            |e: std::io::Error| (ErrorKind::Connect, describe_connect_error(addr, &e));
        if self.source_ips.is_empty() {
            return TcpStream::connect(addr).await.map_err(connect_error);
        }
        let i = self.next_source.get();
        self.next_source.set(i.wrapping_add(1));
        let src = self.source_ips[i % self.source_ips.len()];
        let bind_error = |e: std::io::Error| {
            (
                ErrorKind::Connect,
                format!("cannot use source address {src} to reach {addr}: {e} (is it an address of this machine, of the same IP version?)"),
            )
        };
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(bind_error)?;
        // The port is chosen at connect, for this server (as without a source address):
        // bind() alone would take a port no other connection may share, from any server.
        let on: libc::c_int = 1;
        // SAFETY: valid descriptor; the option value is a c_int that outlives the call.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::new(src, 0)).map_err(bind_error)?;
        sock.connect(addr).await.map_err(connect_error)
    }

    pub fn endpoint(&self, i: usize) -> &Endpoint {
        &self.endpoints[i]
    }

    /// Opens a new connection (TCP, then TLS for `https://`, within the connect timeout);
    /// its driver task runs on the current `LocalSet`.
    pub fn connect(
        &self,
        endpoint: usize,
    ) -> Pin<Box<dyn Future<Output = Result<Sender, Failure>> + '_>> {
        self.boxed_connection(endpoint, None)
    }

    /// `new_connection` on the heap: a connect (TCP, TLS, handshake) is a state machine
    /// of kilobytes that every request task would otherwise carry for its whole life,
    /// though most take a pooled connection (each spawn copies the whole task).
    fn boxed_connection(
        &self,
        endpoint: usize,
        reserved: Option<ConnSlot>,
    ) -> Pin<Box<dyn Future<Output = Result<Sender, Failure>> + '_>> {
        Box::pin(self.new_connection(endpoint, reserved))
    }

    /// Budget for a new connection to `endpoint` when no idle one is there to reuse,
    /// waited for now (None: an idle connection can be taken). A request reserves before
    /// it is stamped as sent, so that waiting for the client's own descriptors shows as
    /// dispatch lag, not as the server's latency; returns the ns it waited.
    ///
    /// Past the budget the request waits for whichever comes first: budget (a connection
    /// closed somewhere), or one of this lane's connections coming back. Past a server's
    /// ceiling every lane waits, and each then reuses its own connections as the server
    /// frees them, as a fixed pool would: closing them for one another would turn every
    /// request into a new connection, and the send rate into the connect rate.
    pub async fn reserve(&self, endpoint: usize) -> (Option<ConnSlot>, i64) {
        if self.has_idle(endpoint) {
            return (None, 0);
        }
        if let Some(slot) = self.budget.try_slot() {
            return (Some(slot), 0);
        }
        let started = Instant::now();
        self.waiting_here.borrow_mut()[endpoint] += 1;
        let got = {
            let budget = self.budget.take();
            tokio::pin!(budget);
            loop {
                tokio::select! {
                    slot = &mut budget => break Some(slot),
                    () = self.returned[endpoint].notified() => {
                        if self.has_idle(endpoint) {
                            break None;
                        }
                    }
                }
            }
        };
        self.waiting_here.borrow_mut()[endpoint] -= 1;
        let waited_ns = started.elapsed().as_nanos() as i64;
        if got.is_none() {
            self.budget.note_wait(waited_ns as u64);
        }
        (got, waited_ns)
    }

    /// A new connection with `reserved` budget, or budget taken now: past the budget, wait
    /// for a connection to close (client-side queueing, not part of the connect timeout).
    /// The slot goes back when this connection closes.
    async fn new_connection(
        &self,
        endpoint: usize,
        reserved: Option<ConnSlot>,
    ) -> Result<Sender, Failure> {
        let slot = match reserved {
            Some(slot) => slot,
            None => self.budget.take().await,
        };
        let ep = &self.endpoints[endpoint];
        let addr = ep.addr;
        let timed_out = || {
            (
                ErrorKind::ConnectTimeout,
                format!(
                    "connect to {addr} timed out after {:?}",
                    self.connect_timeout
                ),
            )
        };
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let stream = tokio::time::timeout_at(deadline, self.open(addr))
            .await
            .map_err(|_| timed_out())??;
        self.budget.opened.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        // The kernel stamps each segment as it arrives (SO_TIMESTAMPNS): token times then
        // exclude how long this lane waited for a core. Where it cannot, reads carry no
        // stamp and events are stamped in user space, as before.
        let _ = recv_stamp::enable(&stream);
        let (stream, rx_unix_ns) = StampedStream::new(stream);
        if !ep.tls {
            return handshake(TokioIo::new(stream), addr, slot, rx_unix_ns, self.http2).await;
        }
        let Some(tls) = &self.tls else {
            return Err((ErrorKind::Tls, "no TLS configuration for https".to_owned()));
        };
        let stream = tokio::time::timeout_at(deadline, tls.connect(ep.server_name.clone(), stream))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                let why = tls_cause(&e).map_or_else(|| e.to_string(), describe_tls);
                (
                    ErrorKind::Tls,
                    format!("TLS handshake with {}: {why}", ep.url),
                )
            })?;
        handshake(TokioIo::new(stream), addr, slot, rx_unix_ns, self.http2).await
    }

    /// Closes up to `n` connections that sat idle `IDLE_BEFORE_TRIM` or longer, oldest
    /// first (another lane waits for connection budget), none of an endpoint that
    /// requests of this lane wait for.
    pub fn trim(&self, n: usize) {
        let mut idle = self.idle.borrow_mut();
        let waiting = self.waiting_here.borrow();
        let now = Instant::now();
        let mut left = n;
        for (list, &here) in idle.iter_mut().zip(waiting.iter()) {
            if here > 0 {
                continue;
            }
            let stale = list
                .iter()
                .take(left)
                .take_while(|c| now.duration_since(c.since) >= IDLE_BEFORE_TRIM)
                .count();
            list.drain(..stale);
            left -= stale;
        }
    }

    pub fn budget(&self) -> &ConnBudget {
        &self.budget
    }

    /// Pools a connection for reuse, handing it to a request of this lane that waits for
    /// one (`trim` closes it if it then sits unused while another lane waits for budget).
    /// An HTTP/2 handle is dropped: its connection stays pooled, shared.
    pub fn put(&self, endpoint: usize, sender: Sender) {
        let conn = IdleConn::now(sender);
        if conn.sender.is_h2() {
            let mut idle = self.idle.borrow_mut();
            if idle[endpoint].iter().all(|c| c.sender.is_closed()) && !conn.sender.is_closed() {
                idle[endpoint].clear();
                idle[endpoint].push(conn);
            }
            return;
        }
        if conn.sender.is_closed() {
            return;
        }
        self.idle.borrow_mut()[endpoint].push(conn);
        if self.waiting_here.borrow()[endpoint] > 0 {
            self.returned[endpoint].notify_one();
        }
    }

    /// An idle ready connection (`true`: reused), or a new one (`false`), opened with
    /// `reserved` budget when there is some.
    pub async fn take(
        &self,
        endpoint: usize,
        reserved: Option<ConnSlot>,
    ) -> Result<(Sender, bool), Failure> {
        if self.http2 {
            let shared = self.idle.borrow()[endpoint]
                .iter()
                .find(|c| !c.sender.is_closed())
                .and_then(|c| c.sender.share());
            if let Some(s) = shared {
                return Ok((s, true));
            }
            let sender = self.boxed_connection(endpoint, reserved).await?;
            if let Some(s) = sender.share() {
                self.idle.borrow_mut()[endpoint].push(IdleConn::now(s));
            }
            return Ok((sender, false));
        }
        loop {
            let candidate = self.idle.borrow_mut()[endpoint].pop();
            match candidate.map(|c| c.sender) {
                Some(mut s) => {
                    if s.is_closed() {
                        continue;
                    }
                    if s.is_ready() || s.ready().await.is_ok() {
                        return Ok((s, true));
                    }
                }
                None => return Ok((self.boxed_connection(endpoint, reserved).await?, false)),
            }
        }
    }
}

/// HTTP/1.1 over an open (plain or TLS) stream; the connection's driver runs on the
/// current `LocalSet`.
async fn handshake<T>(
    io: TokioIo<T>,
    addr: SocketAddr,
    slot: ConnSlot,
    rx_unix_ns: Arc<AtomicI64>,
    http2: bool,
) -> Result<Sender, Failure>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::marker::Send + 'static,
{
    let failed = |e: hyper::Error| {
        (
            ErrorKind::Connect,
            format!("HTTP handshake with {addr}: {e}"),
        )
    };
    let send = if http2 {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(failed)?;
        drive(conn, slot);
        Send::H2(sender)
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(failed)?;
        drive(conn, slot);
        Send::H1(sender)
    };
    Ok(Sender { send, rx_unix_ns })
}

/// Runs a connection's driver on the current `LocalSet`; its budget slot goes back when
/// the connection ends.
fn drive(conn: impl std::future::Future + 'static, slot: ConnSlot) {
    tokio::task::spawn_local(async move {
        let _ = conn.await;
        drop(slot);
    });
}

fn describe_connect_error(addr: SocketAddr, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => format!(
            "connect to {addr}: no free local port (ephemeral ports exhausted); \
             widen net.ipv4.ip_local_port_range or use more source addresses"
        ),
        Some(libc::EMFILE) | Some(libc::ENFILE) => {
            format!("connect to {addr}: too many open files; raise `ulimit -n`")
        }
        _ => format!("connect to {addr}: {e}"),
    }
}

/// Monotonic ns since the run's start instant; `t0_unix_ns` is the system clock then, to
/// bring the kernel's receive stamps onto the run's clock.
#[derive(Debug, Clone, Copy)]
pub struct RunClock {
    pub t0: Instant,
    pub t0_unix_ns: i64,
}

impl RunClock {
    /// When bytes read at kernel stamp `rx_unix_ns` arrived, on the run's clock: the stamp
    /// where there is one, not before `not_before_ns` (a stamp of earlier bytes) and not
    /// after now; else now. The flag says whether the kernel's stamp was used.
    pub fn arrival_ns(&self, rx_unix_ns: i64, not_before_ns: i64) -> (i64, bool) {
        let now = self.now_ns();
        if rx_unix_ns <= 0 || self.t0_unix_ns <= 0 {
            return (now, false);
        }
        let t = rx_unix_ns - self.t0_unix_ns;
        if t < not_before_ns {
            return (now, false);
        }
        (t.min(now), true)
    }

    pub fn now_ns(&self) -> i64 {
        let now = Instant::now();
        if now >= self.t0 {
            (now - self.t0).as_nanos() as i64
        } else {
            -((self.t0 - now).as_nanos() as i64)
        }
    }
}

/// What one request sends: its body and its values of `ClientConfig::request_headers`.
#[derive(Debug, Clone)]
pub struct RequestParts {
    pub body: Bytes,
    pub header_values: Vec<i64>,
}

/// Runs one request on `pool`, filling `rec`. Returns the failure, if any; a partially filled
/// `rec` (timestamps so far) is kept either way.
///
/// `sent_ns` is stamped, and `on_sent` called, when the request leaves the pacer for the
/// network: before taking a connection, so a connection that had to be opened on the spot
/// counts in TTFT (as users feel it) and a connect failure is a sent-and-failed request.
pub async fn execute(
    pool: &Pool,
    cfg: &ClientConfig,
    clock: RunClock,
    endpoint: usize,
    request: RequestParts,
    rec: &mut RequestRecord,
    on_sent: impl FnOnce(),
) -> Result<(), Failure> {
    execute_unredacted(pool, cfg, clock, endpoint, request, rec, on_sent)
        .await
        .map_err(|(kind, msg)| (kind, cfg.redact(msg)))
}

async fn execute_unredacted(
    pool: &Pool,
    cfg: &ClientConfig,
    clock: RunClock,
    endpoint: usize,
    request: RequestParts,
    rec: &mut RequestRecord,
    on_sent: impl FnOnce(),
) -> Result<(), Failure> {
    let RequestParts {
        body,
        header_values,
    } = request;
    let (reserved, waited_ns) = pool.reserve(endpoint).await;
    rec.conn_wait_ns += waited_ns;
    rec.sent_ns = clock.now_ns();
    on_sent();
    let first_byte_deadline = tokio::time::Instant::now() + cfg.first_byte_timeout;
    let (mut sender, mut reused) = pool.take(endpoint, reserved).await?;
    let ep = pool.endpoint(endpoint);
    let h2 = sender.is_h2();
    let build = || {
        // HTTP/2 carries the authority in the request line (`:authority`), not `Host`.
        let mut builder = if h2 {
            Request::builder()
                .method(Method::POST)
                .uri(ep.abs_uri.clone())
        } else {
            Request::builder()
                .method(Method::POST)
                .uri(ep.uri.clone())
                .header(HOST, ep.host_header.clone())
        };
        builder = builder
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(
                USER_AGENT,
                HeaderValue::from_static(concat!("fineserve/", env!("CARGO_PKG_VERSION"))),
            );
        if let Some(auth) = &cfg.authorization {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        for (name, value) in &cfg.headers {
            builder = builder.header(name, value.clone());
        }
        // A negative value: this request does not carry that header.
        for (name, &v) in cfg.request_headers.iter().zip(header_values.iter()) {
            if v >= 0 {
                builder = builder.header(name, HeaderValue::from(v));
            }
        }
        builder
            .body(Full::new(body.clone()))
            .map_err(|e| (ErrorKind::InvalidResponse, format!("building request: {e}")))
    };

    let resp = loop {
        let sent = tokio::time::timeout_at(first_byte_deadline, sender.send_request(build()?));
        match sent.await {
            Err(_) => {
                return Err((
                    ErrorKind::FirstByteTimeout,
                    format!("no response headers within {:?}", cfg.first_byte_timeout),
                ))
            }
            // A kept-alive connection the server closed as the request went out (its
            // keep-alive timeout, a restart): no response came, so the request goes again
            // once on a new connection, as browsers do for a reused connection.
            Ok(Err(e)) if reused && closed_before_response(&e) => {
                reused = false;
                sender = pool.connect(endpoint).await?;
            }
            Ok(Err(e)) => return Err(transport_failure(&e)),
            Ok(Ok(r)) => break r,
        }
    };
    rec.first_byte_ns = clock.arrival_ns(sender.last_rx_unix_ns(), rec.sent_ns).0;
    rec.http_status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(|v| format!(" (Retry-After: {})", v.trim()))
        .unwrap_or_default();
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut body = resp.into_body();

    let status = http::StatusCode::from_u16(rec.http_status).unwrap_or(http::StatusCode::OK);
    if !status.is_success() {
        let mut snippet = Vec::new();
        let complete = read_limited(&mut body, cfg.idle_timeout, 2048, &mut snippet).await;
        rec.done_ns = clock.now_ns();
        if complete {
            pool.put(endpoint, sender);
        }
        let text = String::from_utf8_lossy(&snippet);
        return Err((
            ErrorKind::HttpStatus,
            format!("HTTP {}{retry_after}: {}", rec.http_status, text.trim()),
        ));
    }

    let is_sse = content_type.starts_with("text/event-stream");
    let is_json = content_type.starts_with("application/json");
    if cfg.stream && !is_sse && !is_json {
        return Err((
            ErrorKind::InvalidResponse,
            format!("expected text/event-stream, got content-type {content_type:?}"),
        ));
    }
    let outcome = if is_sse {
        read_stream(&mut body, cfg, clock, rec, &sender).await
    } else {
        read_whole(&mut body, cfg, clock, rec).await
    };
    rec.done_ns = clock.now_ns();
    if outcome.is_ok() {
        pool.put(endpoint, sender);
    }
    outcome
}

/// The connection was gone before any of the response arrived: not sent at all, closed
/// (FIN) before a response, or reset / broken while the request was being written.
fn closed_before_response(e: &hyper::Error) -> bool {
    if e.is_canceled() || e.is_incomplete_message() {
        return true;
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        src = s.source();
    }
    false
}

/// A broken exchange: `tls` when the TLS layer is the cause (a server that asks for a
/// client certificate refuses it only after the client's handshake ends, on the first
/// request; a peer that drops TLS mid-stream), `transport` otherwise.
fn transport_failure(e: &hyper::Error) -> Failure {
    match tls_cause(e) {
        Some(t) => (ErrorKind::Tls, format!("TLS: {}", describe_tls(t))),
        None => (ErrorKind::Transport, transport_message(e)),
    }
}

fn transport_message(e: &hyper::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Reads up to `limit` bytes; true if the body ended (so the connection is reusable).
async fn read_limited(
    body: &mut hyper::body::Incoming,
    idle: Duration,
    limit: usize,
    out: &mut Vec<u8>,
) -> bool {
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    let room = limit.saturating_sub(out.len());
                    out.extend_from_slice(&data[..data.len().min(room)]);
                    if out.len() >= limit {
                        return false;
                    }
                }
            }
            Ok(None) => return true,
            _ => return false,
        }
    }
}

/// The idle timeout of one response body, armed once: a frame only notes the time, and
/// the timer, when it fires, is moved to the latest frame + `idle` if one came since.
/// A timeout per frame put and took a timer-wheel entry for every token.
struct IdleDeadline {
    idle: Duration,
    last_frame: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl IdleDeadline {
    fn new(idle: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            idle,
            last_frame: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    /// Ready once `idle` passed without a frame.
    async fn expired(&mut self) {
        loop {
            (&mut self.timer).await;
            let due = self.last_frame + self.idle;
            if due <= tokio::time::Instant::now() {
                return;
            }
            self.timer.as_mut().reset(due);
        }
    }
}

async fn next_frame(
    body: &mut hyper::body::Incoming,
    idle: &mut IdleDeadline,
) -> Result<Option<Bytes>, Failure> {
    loop {
        let frame = tokio::select! {
            biased;
            f = body.frame() => f,
            () = idle.expired() => {
                return Err((
                    ErrorKind::IdleTimeout,
                    format!("no bytes from the server for {:?}", idle.idle),
                ))
            }
        };
        idle.last_frame = tokio::time::Instant::now();
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(transport_failure(&e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Folds one decoded event into the record: its token timings by kind, and its usage.
fn record_chunk(info: &ChunkInfo, t_ns: i64, rec: &mut RequestRecord) {
    if info.has_output() {
        // TTFT is the first token of any kind (vLLM's definition); the first answer token
        // (content or tool call) is kept apart for TTFO.
        if rec.first_token_ns < 0 {
            rec.first_token_ns = t_ns;
        }
        rec.chunk_ns.push(t_ns);
        if info.reasoning {
            rec.reasoning_chunks += 1;
            rec.last_reasoning_ns = t_ns;
        }
        if (info.answer || info.tool_call) && rec.first_answer_ns < 0 {
            rec.first_answer_ns = t_ns;
        }
    }
    if let Some(c) = info.completion_tokens {
        rec.completion_tokens = c;
    }
    if let Some(p) = info.prompt_tokens {
        rec.prompt_tokens = p;
    }
    if let Some(r) = info.reasoning_tokens {
        rec.reasoning_tokens = r;
    }
    if let Some(c) = info.cached_tokens {
        rec.cached_tokens = c;
    }
    if info.usage_ignored {
        rec.usage_ignored = 1;
    }
}

#[derive(Default)]
struct StreamState {
    events: u64,
    done: bool,
    finished: bool,
    failure: Option<Failure>,
}

impl StreamState {
    fn on_event(&mut self, data: &[u8], t_ns: i64, rec: &mut RequestRecord) {
        if self.failure.is_some() {
            return;
        }
        self.events += 1;
        match decode_event(data) {
            Ok(EventKind::Done) => self.done = true,
            Ok(EventKind::Chunk(info)) => {
                if let Some(msg) = info.error {
                    self.failure = Some((
                        ErrorKind::InvalidResponse,
                        format!("server error in stream: {msg}"),
                    ));
                    return;
                }
                self.finished |= info.finish_reason;
                record_chunk(&info, t_ns, rec);
                if let Some(reply) = rec.reply.as_mut() {
                    reply.capture(data);
                }
            }
            Err(msg) => self.failure = Some((ErrorKind::InvalidResponse, msg)),
        }
    }
}

async fn read_stream(
    body: &mut hyper::body::Incoming,
    cfg: &ClientConfig,
    clock: RunClock,
    rec: &mut RequestRecord,
    conn: &Sender,
) -> Result<(), Failure> {
    let mut parser = SseParser::new();
    let mut state = StreamState::default();
    let mut last_ns = rec.sent_ns;
    let mut idle = IdleDeadline::new(cfg.idle_timeout);
    while let Some(data) = next_frame(body, &mut idle).await? {
        let (t_ns, kernel) = clock.arrival_ns(conn.last_rx_unix_ns(), last_ns);
        last_ns = t_ns;
        let events_before = rec.chunk_ns.len();
        parser.feed(&data, |ev| state.on_event(ev, t_ns, rec));
        if kernel {
            rec.kernel_stamped_events += (rec.chunk_ns.len() - events_before) as u32;
        }
        if let Some(f) = state.failure.take() {
            return Err(f);
        }
        if parser.bytes_seen() > cfg.max_body_bytes as u64 {
            return Err((
                ErrorKind::TooLarge,
                format!("stream exceeded {} bytes", cfg.max_body_bytes),
            ));
        }
    }
    let t_ns = clock.now_ns();
    parser.finish(|ev| state.on_event(ev, t_ns, rec));
    if let Some(f) = state.failure.take() {
        return Err(f);
    }
    if state.events == 0 && parser.bytes_seen() > 0 {
        return Err((
            ErrorKind::InvalidResponse,
            format!(
                "not an SSE stream: {} bytes without a `data:` event",
                parser.bytes_seen()
            ),
        ));
    }
    if !state.done && !state.finished {
        return Err((
            ErrorKind::Incomplete,
            "stream ended without [DONE] or a finish_reason".to_owned(),
        ));
    }
    if rec.first_token_ns < 0 {
        // As vLLM's benchmark client: a stream without any token has no TTFT to report.
        return Err((
            ErrorKind::InvalidResponse,
            "stream ended without any token (no content, reasoning or tool-call delta)".to_owned(),
        ));
    }
    Ok(())
}

async fn read_whole(
    body: &mut hyper::body::Incoming,
    cfg: &ClientConfig,
    clock: RunClock,
    rec: &mut RequestRecord,
) -> Result<(), Failure> {
    let mut buf = Vec::new();
    let mut idle = IdleDeadline::new(cfg.idle_timeout);
    while let Some(data) = next_frame(body, &mut idle).await? {
        if buf.len() + data.len() > cfg.max_body_bytes {
            return Err((
                ErrorKind::TooLarge,
                format!("response exceeded {} bytes", cfg.max_body_bytes),
            ));
        }
        buf.extend_from_slice(&data);
    }
    let t_ns = clock.now_ns();
    match decode_event(&buf) {
        Ok(EventKind::Chunk(info)) => {
            if let Some(msg) = info.error {
                return Err((ErrorKind::InvalidResponse, format!("server error: {msg}")));
            }
            // Without streaming the whole answer becomes visible at once: first token = end.
            record_chunk(&info, t_ns, rec);
            if let Some(reply) = rec.reply.as_mut() {
                reply.capture(&buf);
            }
            Ok(())
        }
        Ok(EventKind::Done) => Err((ErrorKind::InvalidResponse, "bare [DONE] body".to_owned())),
        Err(msg) => Err((ErrorKind::InvalidResponse, msg)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_key_is_redacted_from_messages() {
        let cfg = ClientConfig {
            authorization: ClientConfig::bearer("sk-SECRET"),
            secrets: vec!["gw-token-1".into()],
            ..ClientConfig::default()
        };
        let msg = cfg.redact("HTTP 401: bad header Authorization: Bearer sk-SECRET".into());
        assert_eq!(msg, "HTTP 401: bad header Authorization: Bearer [redacted]");
        let msg = cfg.redact("echo: X-Gw: gw-token-1, sk-SECRET".into());
        assert_eq!(msg, "echo: X-Gw: [redacted], [redacted]");
        let none = ClientConfig {
            authorization: None,
            secrets: Vec::new(),
            ..cfg
        };
        assert_eq!(none.redact("sk-SECRET".into()), "sk-SECRET");
    }

    #[test]
    fn kernel_stamps_are_used_only_when_they_can_be_right() {
        let t0 = Instant::now();
        let clock = RunClock {
            t0,
            t0_unix_ns: 1_000_000_000_000,
        };
        std::thread::sleep(Duration::from_millis(5));
        // A stamp 2 ms into the run, after the request left at 1 ms: used as it is.
        assert_eq!(
            clock.arrival_ns(1_000_002_000_000, 1_000_000),
            (2_000_000, true)
        );
        // A stamp of bytes from before the request (an earlier response): the lane's clock.
        let (t, kernel) = clock.arrival_ns(1_000_000_500_000, 1_000_000);
        assert!(!kernel && t >= 5_000_000);
        // No stamp, or a stamp from the future (clocks stepped): never after now.
        assert!(!clock.arrival_ns(0, 0).1);
        let (t, kernel) = clock.arrival_ns(2_000_000_000_000, 0);
        assert!(kernel && t <= clock.now_ns());
    }

    #[test]
    fn exhausted_ports_and_descriptors_name_the_remedy() {
        let addr: SocketAddr = "127.0.0.1:8000".parse().expect("addr");
        let ports = describe_connect_error(
            addr,
            &std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL),
        );
        assert!(ports.contains("ephemeral ports exhausted"), "{ports}");
        assert!(ports.contains("source addresses"), "{ports}");
        let files = describe_connect_error(addr, &std::io::Error::from_raw_os_error(libc::EMFILE));
        assert!(files.contains("ulimit -n"), "{files}");
        let refused =
            describe_connect_error(addr, &std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(
            refused.starts_with("connect to 127.0.0.1:8000: "),
            "{refused}"
        );
    }
}
