//! Open-loop dispatch: a run is split over `lanes` OS threads, each with its own
//! current-thread tokio runtime, connection pool and pacer.
//!
//! Why lanes and not one multi-thread runtime: a request due now must be handed to a warm
//! connection on the thread that owns it, without cross-thread wake-ups or work stealing in
//! between. Each lane paces its share of the schedule (request i goes to lane i % lanes)
//! against one common start instant, so bursts split across lanes still leave together.
//!
//! The schedule arrives in chunks (`RunHandle::feed`), so a run of any length holds only
//! the part of its schedule that has not left yet; records are taken out as they complete
//! (`RunHandle::drain`), so they do not pile up either.
//!
//! Modules by concern: `config` and `schedule` (what a run is given, and their checks),
//! `handle` (feeding, draining, stopping a run from outside), `lanes` (the threads),
//! `pacing` (start instant and deadlines), `dispatch` (one request from deadline to
//! record), `turns` (conversation turns), `routing` (least-outstanding) and `progress`.

mod budget;
mod config;
mod dispatch;
mod handle;
mod history;
mod lanes;
mod pacing;
mod progress;
mod routing;
mod schedule;
mod turns;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::{Arc, Barrier, Condvar, Mutex, OnceLock};
use std::time::Instant;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::client::Endpoint;
use crate::error::EngineError;
use crate::records::RequestRecord;

pub use budget::{ConnBudget, ConnSlot};
pub use config::{timeout_secs, EngineConfig};
pub use handle::{RunHandle, RunOutput, RunWaiter};
pub use history::{Carry, HistoryApi, HistoryKind, TurnText};
pub use progress::{Progress, ProgressSnapshot};
pub use schedule::Schedule;

use handle::Feeder;
use turns::TurnBoard;

/// What a run's lanes and its handle share.
struct Shared {
    endpoints: Vec<Endpoint>,
    /// Built once when an endpoint is `https://`: every lane's connections share its
    /// configuration and TLS session cache.
    tls: Option<tokio_rustls::TlsConnector>,
    config: EngineConfig,
    progress: Progress,
    stopping: AtomicBool,
    /// Why the run was stopped early (`RunHandle::stop_because`): what its requests that
    /// were never sent say.
    stop_reason: OnceLock<String>,
    cancel: CancellationToken,
    semaphore: Option<Arc<Semaphore>>,
    /// Connections open at once, over every lane.
    budget: Arc<ConnBudget>,
    start_gate: Barrier,
    t0: OnceLock<Instant>,
    t0_unix_ns: OnceLock<i64>,
    finished_lanes: Mutex<usize>,
    finished_cv: Condvar,
    /// Completed records not yet drained, one vector per lane (uncontended locks).
    records: Vec<Mutex<Vec<RequestRecord>>>,
    /// Requests sent and not finished, per endpoint (for least-outstanding routing).
    outstanding: Vec<AtomicI64>,
    /// Per route group, where the tie-breaking scan starts next (spreads ties).
    route_cursor: Vec<AtomicU64>,
    /// Ends of conversation turns that later turns wait for.
    turns: TurnBoard,
}

impl Shared {
    /// What a request that was never sent because the run stopped says.
    fn not_sent_reason(&self) -> &str {
        self.stop_reason
            .get()
            .map_or(pacing::STOPPED_REASON, String::as_str)
    }
}

/// Starts a run over a whole schedule (fed at once, input closed).
pub fn start(schedule: Schedule, config: EngineConfig) -> Result<RunHandle, EngineError> {
    let n = schedule.len();
    let handle = start_streaming(config, n)?;
    handle.feed(schedule)?;
    handle.close_input();
    Ok(handle)
}

/// Starts a run whose schedule comes later, in chunks, through `RunHandle::feed`.
/// `expected_len` (0 if unknown) only bounds the number of lanes for tiny schedules.
pub fn start_streaming(
    config: EngineConfig,
    expected_len: usize,
) -> Result<RunHandle, EngineError> {
    config.validate()?;
    let endpoints = config
        .endpoints
        .iter()
        .map(|u| Endpoint::parse(u))
        .collect::<Result<Vec<_>, _>>()?;
    let tls = if endpoints.iter().any(|e| e.tls) {
        Some(tokio_rustls::TlsConnector::from(
            config.client.tls.build(config.client.http2)?,
        ))
    } else {
        None
    };
    crate::limits::raise_nofile_limit();
    let lanes = if expected_len > 0 {
        config.lanes.min(expected_len)
    } else {
        config.lanes
    };
    let shared = Arc::new(Shared {
        progress: Progress::default(),
        stopping: AtomicBool::new(false),
        stop_reason: OnceLock::new(),
        cancel: CancellationToken::new(),
        semaphore: config.max_concurrency.map(|c| Arc::new(Semaphore::new(c))),
        budget: Arc::new(ConnBudget::new(config.max_connections)),
        start_gate: Barrier::new(lanes),
        t0: OnceLock::new(),
        t0_unix_ns: OnceLock::new(),
        finished_lanes: Mutex::new(0),
        finished_cv: Condvar::new(),
        records: (0..lanes).map(|_| Mutex::new(Vec::new())).collect(),
        outstanding: (0..endpoints.len()).map(|_| AtomicI64::new(0)).collect(),
        route_cursor: (0..config.route_groups.len())
            .map(|_| AtomicU64::new(0))
            .collect(),
        turns: TurnBoard::default(),
        endpoints,
        tls,
        config,
    });
    let mut handles = Vec::with_capacity(lanes);
    let mut senders = Vec::with_capacity(lanes);
    for lane in 0..lanes {
        let sh = Arc::clone(&shared);
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        let h = std::thread::Builder::new()
            .name(format!("fineserve-lane-{lane}"))
            .spawn(move || {
                lanes::run_lane(&sh, lane, lanes, rx);
                if let Ok(mut n) = sh.finished_lanes.lock() {
                    *n += 1;
                }
                sh.finished_cv.notify_all();
            })
            .map_err(|e| EngineError::io("spawning a lane thread", e))?;
        handles.push(h);
    }
    Ok(RunHandle {
        shared,
        lanes: handles,
        feeder: Mutex::new(Some(Feeder {
            senders,
            next_index: 0,
            last_t_ns: 0,
        })),
    })
}
