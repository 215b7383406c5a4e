//! The thin pyo3 layer: `fineserve._engine`. All conversion between Python and the engine
//! happens here, and `EngineError` is the one exception the engine raises.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::client::ClientConfig;
use crate::engine::{self, timeout_secs, EngineConfig, HistoryApi, RunHandle, Schedule, TurnText};
use crate::error::EngineError as CoreError;
use crate::mock::{Fault, FaultConfig, MockConfig, MockServer, ReasoningField};
use crate::records::{ErrorKind, RecordColumns};

create_exception!(
    _engine,
    EngineError,
    PyException,
    "A run could not start: bad schedule, endpoint or configuration."
);

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> Self {
        EngineError::new_err(e.to_string())
    }
}

/// A run in progress; see `start_run`.
#[pyclass(name = "Run", module = "fineserve._engine")]
struct PyRun {
    handle: Mutex<Option<RunHandle>>,
}

impl PyRun {
    fn with<T>(&self, f: impl FnOnce(&RunHandle) -> T) -> PyResult<T> {
        let guard = self
            .handle
            .lock()
            .map_err(|_| PyRuntimeError::new_err("run state poisoned"))?;
        guard
            .as_ref()
            .map(f)
            .ok_or_else(|| PyRuntimeError::new_err("results() was already called on this run"))
    }
}

#[pymethods]
impl PyRun {
    /// Live counters: scheduled, dispatched, sent, succeeded, failed, not_sent, in_flight,
    /// elapsed_ns, started, t0_unix_ns, connections_open, connections_peak, connections_opened,
    /// connection_waiting, connection_waits, connection_wait_ns, warm_connections, warm_failures, realtime_lanes,
    /// realtime_demotions, token_events, kernel_stamped_events, lane_windows,
    /// lane_saturated_windows.
    fn progress<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = self.with(|h| h.progress())?;
        let d = PyDict::new(py);
        d.set_item("scheduled", p.scheduled)?;
        d.set_item("dispatched", p.dispatched)?;
        d.set_item("sent", p.sent)?;
        d.set_item("succeeded", p.succeeded)?;
        d.set_item("failed", p.failed)?;
        d.set_item("not_sent", p.not_sent)?;
        d.set_item("in_flight", p.in_flight)?;
        d.set_item("elapsed_ns", p.elapsed_ns)?;
        d.set_item("started", p.started)?;
        d.set_item("t0_unix_ns", p.t0_unix_ns)?;
        d.set_item("connections_open", p.connections_open)?;
        d.set_item("connections_peak", p.connections_peak)?;
        d.set_item("connections_opened", p.connections_opened)?;
        d.set_item("connection_waiting", p.connection_waiting)?;
        d.set_item("connection_waits", p.connection_waits)?;
        d.set_item("connection_wait_ns", p.connection_wait_ns)?;
        d.set_item("warm_connections", p.warm_connections)?;
        d.set_item("warm_failures", p.warm_failures)?;
        d.set_item("realtime_lanes", p.realtime_lanes)?;
        d.set_item("realtime_demotions", p.realtime_demotions)?;
        d.set_item("lane_windows", p.lane_windows)?;
        d.set_item("lane_saturated_windows", p.lane_saturated_windows)?;
        d.set_item("token_events", p.token_events)?;
        d.set_item("kernel_stamped_events", p.kernel_stamped_events)?;
        Ok(d)
    }

    /// Waits up to `timeout_s` with the GIL released; True once every request is done.
    fn wait(&self, py: Python<'_>, timeout_s: f64) -> PyResult<bool> {
        let waiter = self.with(|h| h.waiter())?;
        let d = Duration::from_secs_f64(timeout_s.max(0.0));
        Ok(py.detach(move || waiter.wait(d)))
    }

    /// Stops dispatching; requests in flight continue until done or `cancel()`. With a
    /// `reason`, the requests never sent say it instead of "run stopped ...".
    #[pyo3(signature = (reason = None))]
    fn stop(&self, reason: Option<String>) -> PyResult<()> {
        self.with(|h| match reason {
            Some(r) => h.stop_because(&r),
            None => h.stop(),
        })
    }

    /// Aborts requests in flight (recorded as cancelled) and stops dispatching.
    fn cancel(&self) -> PyResult<()> {
        self.with(|h| h.cancel())
    }

    /// Appends a chunk to the schedule: request i sends `bodies[body_idx[i]]` at
    /// `t_ns[i]`; `turns` = (parent, think_ns, followers); `header_values`: one column per
    /// `EngineOptions.request_headers` (negative: no header); `live` = (tool_ns, turn_text)
    /// for live history (`turn_text`: n × 6 byte offsets, see `engine::TurnText`). Raises
    /// `EngineError`, accepting nothing, once the input is closed or the run is stopping.
    #[pyo3(signature = (
        t_ns, body_idx, bodies, endpoint_idx, expected_output_tokens, turns = None,
        header_values = None, live = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn feed(
        &self,
        t_ns: PyReadonlyArray1<'_, i64>,
        body_idx: PyReadonlyArray1<'_, u32>,
        bodies: Vec<Bound<'_, PyBytes>>,
        endpoint_idx: PyReadonlyArray1<'_, u32>,
        expected_output_tokens: PyReadonlyArray1<'_, u32>,
        turns: Option<PyTurns<'_>>,
        header_values: Option<Vec<PyReadonlyArray1<'_, i64>>>,
        live: Option<PyLive<'_>>,
    ) -> PyResult<()> {
        let (tool_ns, turn_text) = match live {
            Some(PyLive(tool, offsets)) => {
                let offsets = offsets.as_array();
                if offsets.ncols() != 6 {
                    return Err(PyValueError::new_err("turn_text must have 6 columns"));
                }
                let rows = offsets
                    .rows()
                    .into_iter()
                    .map(|r| TurnText::from_row([r[0], r[1], r[2], r[3], r[4], r[5]]))
                    .collect();
                (tool.as_slice()?.to_vec(), rows)
            }
            None => (Vec::new(), Vec::new()),
        };
        let (parent, think_ns, followers) = match turns {
            Some(PyTurns(p, t, f)) => (
                p.as_slice()?.to_vec(),
                t.as_slice()?.to_vec(),
                f.as_slice()?.to_vec(),
            ),
            None => (Vec::new(), Vec::new(), Vec::new()),
        };
        let chunk = Schedule {
            t_ns: t_ns.as_slice()?.to_vec(),
            body_idx: body_idx.as_slice()?.to_vec(),
            endpoint_idx: endpoint_idx.as_slice()?.to_vec(),
            expected_output_tokens: expected_output_tokens.as_slice()?.to_vec(),
            bodies: bodies
                .iter()
                .map(|b| Bytes::copy_from_slice(b.as_bytes()))
                .collect(),
            parent,
            think_ns,
            followers,
            tool_ns,
            turn_text,
            header_values: header_values
                .unwrap_or_default()
                .iter()
                .map(|c| c.as_slice().map(<[i64]>::to_vec))
                .collect::<Result<_, _>>()?,
        };
        self.with(|h| h.feed(chunk))?.map_err(PyErr::from)
    }

    /// Declares the schedule complete; the run ends once every fed request is done.
    fn close_input(&self) -> PyResult<()> {
        self.with(|h| h.close_input())
    }

    /// Records completed since the last drain, as numpy columns in completion order.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let cols = self.with(|h| h.drain())?;
        columns_dict(py, cols)
    }

    /// Closes the input, blocks (GIL released) until the run ends and returns the records
    /// not drained yet, in schedule order, with `t0_unix_ns` and `stopped`.
    fn results<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let handle = self
            .handle
            .lock()
            .map_err(|_| PyRuntimeError::new_err("run state poisoned"))?
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("results() was already called on this run"))?;
        let out = py.detach(move || handle.finish());
        let d = columns_dict(py, out.columns)?;
        d.set_item("t0_unix_ns", out.t0_unix_ns)?;
        d.set_item("stopped", out.stopped)?;
        Ok(d)
    }
}

fn columns_dict(py: Python<'_>, c: RecordColumns) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("index", c.index.into_pyarray(py))?;
    d.set_item("scheduled_ns", c.scheduled_ns.into_pyarray(py))?;
    d.set_item("sent_ns", c.sent_ns.into_pyarray(py))?;
    d.set_item("first_byte_ns", c.first_byte_ns.into_pyarray(py))?;
    d.set_item("first_token_ns", c.first_token_ns.into_pyarray(py))?;
    d.set_item("done_ns", c.done_ns.into_pyarray(py))?;
    d.set_item("n_chunks", c.n_chunks.into_pyarray(py))?;
    d.set_item("completion_tokens", c.completion_tokens.into_pyarray(py))?;
    d.set_item("prompt_tokens", c.prompt_tokens.into_pyarray(py))?;
    d.set_item("http_status", c.http_status.into_pyarray(py))?;
    d.set_item("error_kind", c.error_kind.into_pyarray(py))?;
    d.set_item("endpoint_idx", c.endpoint_idx.into_pyarray(py))?;
    d.set_item("first_answer_ns", c.first_answer_ns.into_pyarray(py))?;
    d.set_item("last_reasoning_ns", c.last_reasoning_ns.into_pyarray(py))?;
    d.set_item("reasoning_chunks", c.reasoning_chunks.into_pyarray(py))?;
    d.set_item("reasoning_tokens", c.reasoning_tokens.into_pyarray(py))?;
    d.set_item("cached_tokens", c.cached_tokens.into_pyarray(py))?;
    d.set_item("conn_wait_ns", c.conn_wait_ns.into_pyarray(py))?;
    d.set_item("usage_ignored", c.usage_ignored.into_pyarray(py))?;
    d.set_item("history_kind", c.history_kind.into_pyarray(py))?;
    d.set_item("history_bytes", c.history_bytes.into_pyarray(py))?;
    d.set_item("chunk_ns", c.chunk_ns.into_pyarray(py))?;
    d.set_item("chunk_offsets", c.chunk_offsets.into_pyarray(py))?;
    let (rows, msgs): (Vec<i64>, Vec<String>) = c
        .error_messages
        .into_iter()
        .map(|(i, m)| (i as i64, m))
        .unzip();
    d.set_item("error_index", rows.into_pyarray(py))?;
    d.set_item("error_message", msgs)?;
    Ok(d)
}

/// Conversation columns of a chunk: (parent, think_ns, followers), all or none.
#[derive(FromPyObject)]
struct PyTurns<'py>(
    PyReadonlyArray1<'py, i64>,
    PyReadonlyArray1<'py, i64>,
    PyReadonlyArray1<'py, u32>,
);

/// Live-history columns of a chunk: (tool_ns, turn_text).
#[derive(FromPyObject)]
struct PyLive<'py>(PyReadonlyArray1<'py, i64>, PyReadonlyArray2<'py, u32>);

/// `fineserve.runner.EngineOptions` as it crosses: each field read by attribute name
/// (`drain_grace_s` stays on the Python side). No `Debug`: it holds the API key.
#[derive(FromPyObject)]
struct PyEngineOptions {
    stream: bool,
    max_concurrency: Option<usize>,
    max_connections: usize,
    lanes: usize,
    warm_connections: usize,
    spin_us: u64,
    start_delay_ms: f64,
    connect_timeout_s: f64,
    first_byte_timeout_s: f64,
    idle_timeout_s: f64,
    total_timeout_s: f64,
    max_body_bytes: usize,
    api_key: Option<String>,
    realtime_priority: bool,
    route_groups: Vec<Vec<usize>>,
    source_ips: Vec<String>,
    turn_affinity: bool,
    history_api: String,
    reply_limit_bytes: usize,
    headers: Vec<(String, String, bool)>,
    request_headers: Vec<String>,
    ca_file: Option<String>,
    client_cert_file: Option<String>,
    client_key_file: Option<String>,
    insecure: bool,
    http2: bool,
}

/// A header name as given, or a one-line error naming it.
fn header_name(name: &str) -> Result<http::HeaderName, CoreError> {
    http::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| CoreError::InvalidConfig(format!("header name {name:?} is not valid")))
}

/// The engine's configuration for these options, without endpoints or a start instant
/// (`start_run` adds both); `EngineConfig::validate` checks it as the run starts.
impl TryFrom<PyEngineOptions> for EngineConfig {
    type Error = CoreError;

    fn try_from(o: PyEngineOptions) -> Result<Self, CoreError> {
        let source_ips = o
            .source_ips
            .iter()
            .map(|s| {
                s.trim().parse::<std::net::IpAddr>().map_err(|_| {
                    CoreError::InvalidConfig(format!("source address {s:?} is not an IP address"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let api_key = o.api_key.or_else(|| std::env::var("OPENAI_API_KEY").ok());
        let mut secrets = Vec::new();
        let mut headers = Vec::with_capacity(o.headers.len());
        for (name, value, sensitive) in o.headers {
            let n = header_name(&name)?;
            let mut v = http::HeaderValue::from_str(&value).map_err(|_| {
                CoreError::InvalidConfig(format!(
                    "header {name}: the value has characters a header cannot carry"
                ))
            })?;
            if sensitive {
                v.set_sensitive(true);
                secrets.push(value);
            }
            headers.push((n, v));
        }
        let request_headers = o
            .request_headers
            .iter()
            .map(|n| header_name(n))
            .collect::<Result<Vec<_>, _>>()?;
        let path = |p: Option<String>| p.filter(|s| !s.is_empty()).map(std::path::PathBuf::from);
        let tls = crate::tls::ClientTlsOptions {
            ca_file: path(o.ca_file),
            cert_file: path(o.client_cert_file),
            key_file: path(o.client_key_file),
            insecure: o.insecure,
        };
        let client = ClientConfig {
            stream: o.stream,
            connect_timeout: timeout_secs("connect_timeout_s", o.connect_timeout_s)?,
            first_byte_timeout: timeout_secs("first_byte_timeout_s", o.first_byte_timeout_s)?,
            idle_timeout: timeout_secs("idle_timeout_s", o.idle_timeout_s)?,
            total_timeout: timeout_secs("total_timeout_s", o.total_timeout_s)?,
            max_body_bytes: o.max_body_bytes,
            authorization: api_key
                .filter(|k| !k.is_empty())
                .and_then(|k| ClientConfig::bearer(&k)),
            headers,
            request_headers,
            secrets,
            tls,
            http2: o.http2,
            source_ips,
        };
        let start_delay =
            Duration::try_from_secs_f64(o.start_delay_ms.max(0.0) / 1e3).map_err(|_| {
                CoreError::InvalidConfig(format!(
                    "start_delay_ms must be a number of milliseconds, got {}",
                    o.start_delay_ms
                ))
            })?;
        Ok(EngineConfig {
            endpoints: Vec::new(),
            client,
            max_concurrency: o.max_concurrency,
            max_connections: o.max_connections,
            lanes: o.lanes,
            warm_connections: o.warm_connections,
            spin: Duration::from_micros(o.spin_us),
            start_delay,
            start_at_unix_ns: None,
            realtime_priority: o.realtime_priority,
            route_groups: o.route_groups,
            turn_affinity: o.turn_affinity,
            history_api: HistoryApi::parse(&o.history_api).ok_or_else(|| {
                CoreError::InvalidConfig(format!("unknown history API {:?}", o.history_api))
            })?,
            reply_limit_bytes: o.reply_limit_bytes,
        })
    }
}

/// Starts an open-loop run and returns at once; its schedule comes through `Run.feed`
/// until `Run.close_input`.
#[pyfunction]
#[pyo3(signature = (endpoints, options, *, start_at_unix_ns = None))]
fn start_run(
    endpoints: Vec<String>,
    options: PyEngineOptions,
    start_at_unix_ns: Option<i64>,
) -> PyResult<PyRun> {
    let config = EngineConfig {
        endpoints,
        start_at_unix_ns,
        ..EngineConfig::try_from(options)?
    };
    let handle = engine::start_streaming(config, 0)?;
    Ok(PyRun {
        handle: Mutex::new(Some(handle)),
    })
}

/// The embedded OpenAI-compatible mock server, running on its own threads.
#[pyclass(name = "MockServer", module = "fineserve._engine")]
struct PyMockServer {
    server: Mutex<Option<MockServer>>,
    host: String,
    port: u16,
    ca_pem: Option<String>,
}

#[pymethods]
impl PyMockServer {
    #[new]
    #[pyo3(signature = (
        host = "127.0.0.1".to_owned(), port = 0, *, model = "fineserve-mock".to_owned(),
        ttft_ms = 20.0, ttft_per_prompt_token_ms = 0.0, itl_ms = 5.0, itl_jitter_ms = 0.0,
        default_max_tokens = 16, workers = 1, max_concurrency = 0, faults = Vec::new(),
        stall_ms = 30_000.0, first_byte_delay_ms = 30_000.0, retry_after_s = 1,
        record_token_times = false, record_arrivals = false, reasoning_ratio = 0.0,
        reasoning_field = "reasoning".to_owned(), tool_calls = 0.0, cache_blocks = 100_000,
        tls = false, image_token_side = 28,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: String,
        port: u16,
        model: String,
        ttft_ms: f64,
        ttft_per_prompt_token_ms: f64,
        itl_ms: f64,
        itl_jitter_ms: f64,
        default_max_tokens: u32,
        workers: usize,
        max_concurrency: usize,
        faults: Vec<(String, f64)>,
        stall_ms: f64,
        first_byte_delay_ms: f64,
        retry_after_s: u32,
        record_token_times: bool,
        record_arrivals: bool,
        reasoning_ratio: f64,
        reasoning_field: String,
        tool_calls: f64,
        cache_blocks: usize,
        tls: bool,
        image_token_side: u32,
    ) -> PyResult<Self> {
        let ms = |name: &str, v: f64| -> PyResult<Duration> {
            if v.is_finite() && v >= 0.0 {
                Ok(Duration::from_secs_f64(v / 1e3))
            } else {
                Err(EngineError::new_err(format!(
                    "{name} must be >= 0 ms, got {v}"
                )))
            }
        };
        let ratios = faults
            .into_iter()
            .map(|(name, ratio)| {
                Fault::parse(&name).map(|f| (f, ratio)).ok_or_else(|| {
                    let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                    EngineError::new_err(format!(
                        "unknown fault {name:?}; known: {}",
                        known.join(", ")
                    ))
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let fault_config = FaultConfig {
            ratios,
            stall: ms("stall_ms", stall_ms)?,
            first_byte_delay: ms("first_byte_delay_ms", first_byte_delay_ms)?,
            retry_after_s,
        };
        let cfg = MockConfig {
            model,
            ttft: ms("ttft_ms", ttft_ms)?,
            ttft_per_prompt_token: ms("ttft_per_prompt_token_ms", ttft_per_prompt_token_ms)?,
            itl: ms("itl_ms", itl_ms)?,
            itl_jitter: ms("itl_jitter_ms", itl_jitter_ms)?,
            default_max_tokens,
            workers,
            max_concurrency,
            faults: fault_config,
            record_token_times,
            record_arrivals,
            reasoning_ratio,
            reasoning_field: ReasoningField::parse(&reasoning_field).ok_or_else(|| {
                let known: Vec<&str> = ReasoningField::ALL.iter().map(|f| f.name()).collect();
                EngineError::new_err(format!(
                    "unknown reasoning_field {reasoning_field:?}; known: {}",
                    known.join(", ")
                ))
            })?,
            tool_calls,
            cache_blocks,
            tls,
            image_token_side: if image_token_side == 32 { 32 } else { 28 },
        };
        let server = MockServer::start(&host, port, cfg)?;
        let addr = server.addr();
        Ok(Self {
            ca_pem: server.ca_pem().map(str::to_owned),
            server: Mutex::new(Some(server)),
            host: addr.ip().to_string(),
            port: addr.port(),
        })
    }

    #[getter]
    fn host(&self) -> String {
        self.host.clone()
    }

    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// With `tls=True`: the PEM of the CA that signed the mock's certificate (what a
    /// client trusts, e.g. through `--cacert`); None otherwise.
    #[getter]
    fn ca_pem(&self) -> Option<String> {
        self.ca_pem.clone()
    }

    /// Counters: requests, completions, active_streams, bad_requests, connections,
    /// tls_failures, tls_resumed, and
    /// `fault_<name>` for each injected fault.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        use std::sync::atomic::Ordering::Relaxed;
        let d = PyDict::new(py);
        let guard = self
            .server
            .lock()
            .map_err(|_| PyRuntimeError::new_err("mock state poisoned"))?;
        if let Some(s) = guard.as_ref() {
            let st = s.stats();
            d.set_item("requests", st.requests.load(Relaxed))?;
            d.set_item("completions", st.completions.load(Relaxed))?;
            d.set_item("active_streams", st.active_streams.load(Relaxed))?;
            d.set_item("bad_requests", st.bad_requests.load(Relaxed))?;
            d.set_item("connections", st.connections.load(Relaxed))?;
            d.set_item("tls_failures", st.tls_failures.load(Relaxed))?;
            d.set_item("tls_resumed", st.tls_resumed.load(Relaxed))?;
            for (f, n) in Fault::ALL.iter().zip(&st.faults) {
                d.set_item(format!("fault_{}", f.name()), n.load(Relaxed))?;
            }
        }
        Ok(d)
    }

    /// Token emission instants (ns since the mock started) of the streams finished since
    /// the last call, by the requests' `user` field (needs `record_token_times=True`).
    fn take_token_times<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let guard = self
            .server
            .lock()
            .map_err(|_| PyRuntimeError::new_err("mock state poisoned"))?;
        let d = PyDict::new(py);
        if let Some(s) = guard.as_ref() {
            for (user, times) in s.stats().take_token_log() {
                d.set_item(user, times.into_pyarray(py))?;
            }
        }
        Ok(d)
    }

    /// Arrival instants (ns since the mock started) of the completion requests received
    /// since the last call, in arrival order (needs `record_arrivals=True`).
    fn take_arrival_times<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let guard = self
            .server
            .lock()
            .map_err(|_| PyRuntimeError::new_err("mock state poisoned"))?;
        let v = guard
            .as_ref()
            .map_or_else(Vec::new, |s| s.stats().take_arrivals());
        Ok(v.into_pyarray(py))
    }

    /// Stops accepting and closes every connection. Idempotent.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let server = self
            .server
            .lock()
            .map_err(|_| PyRuntimeError::new_err("mock state poisoned"))?
            .take();
        if let Some(mut s) = server {
            py.detach(move || s.stop());
        }
        Ok(())
    }
}

/// Raises the open-files limit as far as allowed; returns the soft limit (before, after).
#[pyfunction]
fn raise_open_files_limit() -> (u64, u64) {
    let l = crate::limits::raise_nofile_limit();
    (l.before, l.after)
}

/// The kernel's ephemeral port range (inclusive), or None where it cannot be read.
#[pyfunction]
fn ephemeral_port_range() -> Option<(u16, u16)> {
    crate::limits::ephemeral_port_range()
}

#[pymodule]
#[pyo3(name = "_engine")]
fn engine_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRun>()?;
    m.add_class::<PyMockServer>()?;
    m.add_function(wrap_pyfunction!(start_run, m)?)?;
    m.add_function(wrap_pyfunction!(raise_open_files_limit, m)?)?;
    m.add_function(wrap_pyfunction!(ephemeral_port_range, m)?)?;
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    let kinds: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.name()).collect();
    m.add("ERROR_KINDS", kinds)?;
    let faults: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
    m.add("MOCK_FAULTS", faults)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
