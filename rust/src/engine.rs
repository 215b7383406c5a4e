//! Open-loop dispatch: a run is split over `lanes` OS threads, each with its own
//! current-thread tokio runtime, connection pool and pacer.
//!
//! Why lanes and not one multi-thread runtime: a request due now must be handed to a warm
//! connection on the thread that owns it, without cross-thread wake-ups or work stealing in
//! between. Each lane paces its share of the schedule (request i goes to lane i % lanes)
//! against one common start instant, so bursts split across lanes still leave together.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::client::{execute, ClientConfig, Endpoint, Pool, RunClock};
use crate::error::EngineError;
use crate::records::{ErrorKind, RecordColumns, RequestRecord};
use crate::timer::{
    lower_timer_slack, raise_thread_priority, set_realtime_priority, sleep_until_precise,
    HiResSleep,
};

/// A whole run's schedule, columnar.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// Send offset from the run's start instant, non-decreasing.
    pub t_ns: Vec<i64>,
    /// Index into `bodies` for each request.
    pub body_idx: Vec<u32>,
    pub endpoint_idx: Vec<u32>,
    /// Used to size per-request buffers; the body itself carries `max_tokens`.
    pub expected_output_tokens: Vec<u32>,
    pub bodies: Vec<Bytes>,
}

impl Schedule {
    pub fn len(&self) -> usize {
        self.t_ns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.t_ns.is_empty()
    }

    pub fn validate(&self, n_endpoints: usize) -> Result<(), EngineError> {
        let n = self.t_ns.len();
        let bad = |m: String| Err(EngineError::InvalidSchedule(m));
        if self.body_idx.len() != n
            || self.endpoint_idx.len() != n
            || self.expected_output_tokens.len() != n
        {
            return bad(format!(
                "column lengths differ: t_ns {n}, body_idx {}, endpoint_idx {}, expected_output_tokens {}",
                self.body_idx.len(),
                self.endpoint_idx.len(),
                self.expected_output_tokens.len()
            ));
        }
        if let Some(i) = self.t_ns.iter().position(|&t| t < 0) {
            return bad(format!("t_ns[{i}] is negative"));
        }
        if let Some(i) = self.t_ns.windows(2).position(|w| w[1] < w[0]) {
            return bad(format!("t_ns is not sorted at index {}", i + 1));
        }
        if let Some(i) = self
            .body_idx
            .iter()
            .position(|&b| b as usize >= self.bodies.len())
        {
            return bad(format!("body_idx[{i}] is outside the body table"));
        }
        if let Some(i) = self
            .endpoint_idx
            .iter()
            .position(|&e| e as usize >= n_endpoints)
        {
            return bad(format!("endpoint_idx[{i}] has no endpoint"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub endpoints: Vec<String>,
    pub client: ClientConfig,
    pub max_concurrency: Option<usize>,
    pub lanes: usize,
    /// Connections opened per endpoint before the start instant (split over lanes).
    pub warm_connections: usize,
    /// Yield-spin this long before each deadline instead of sleeping.
    pub spin: Duration,
    /// Gap between the end of warm-up and the start instant.
    pub start_delay: Duration,
    /// Run lanes under SCHED_FIFO when the process may (see `timer::set_realtime_priority`).
    pub realtime_priority: bool,
}

/// Live counters, readable from any thread while the run goes on.
#[derive(Debug, Default)]
pub struct Progress {
    pub scheduled: AtomicU64,
    pub dispatched: AtomicU64,
    pub sent: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub not_sent: AtomicU64,
    pub in_flight: AtomicU64,
    pub warm_connections: AtomicU64,
    pub warm_failures: AtomicU64,
    pub realtime_lanes: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ProgressSnapshot {
    pub scheduled: u64,
    pub dispatched: u64,
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub not_sent: u64,
    pub in_flight: u64,
    pub elapsed_ns: i64,
    pub started: bool,
    pub warm_connections: u64,
    pub warm_failures: u64,
    pub realtime_lanes: u64,
}

struct Shared {
    schedule: Schedule,
    endpoints: Vec<Endpoint>,
    config: EngineConfig,
    progress: Progress,
    stopping: AtomicBool,
    cancel: CancellationToken,
    semaphore: Option<Arc<Semaphore>>,
    start_gate: Barrier,
    t0: OnceLock<Instant>,
    t0_unix_ns: OnceLock<i64>,
    finished_lanes: Mutex<usize>,
    finished_cv: Condvar,
}

pub struct RunOutput {
    pub columns: RecordColumns,
    pub t0_unix_ns: i64,
    pub stopped: bool,
}

/// A run in progress. Dropping it without `finish` cancels and joins the lanes.
pub struct RunHandle {
    shared: Arc<Shared>,
    lanes: Vec<JoinHandle<Vec<RequestRecord>>>,
}

pub fn start(schedule: Schedule, config: EngineConfig) -> Result<RunHandle, EngineError> {
    if config.endpoints.is_empty() {
        return Err(EngineError::InvalidConfig("no endpoint given".into()));
    }
    if config.lanes == 0 {
        return Err(EngineError::InvalidConfig("lanes must be >= 1".into()));
    }
    if config.max_concurrency == Some(0) {
        return Err(EngineError::InvalidConfig(
            "max_concurrency must be >= 1".into(),
        ));
    }
    let endpoints = config
        .endpoints
        .iter()
        .map(|u| Endpoint::parse(u))
        .collect::<Result<Vec<_>, _>>()?;
    schedule.validate(endpoints.len())?;
    crate::timer::raise_nofile_limit();
    let lanes = config.lanes.min(schedule.len().max(1));
    let shared = Arc::new(Shared {
        progress: Progress::default(),
        stopping: AtomicBool::new(false),
        cancel: CancellationToken::new(),
        semaphore: config.max_concurrency.map(|c| Arc::new(Semaphore::new(c))),
        start_gate: Barrier::new(lanes),
        t0: OnceLock::new(),
        t0_unix_ns: OnceLock::new(),
        finished_lanes: Mutex::new(0),
        finished_cv: Condvar::new(),
        endpoints,
        schedule,
        config,
    });
    shared
        .progress
        .scheduled
        .store(shared.schedule.len() as u64, Ordering::Relaxed);
    let mut handles = Vec::with_capacity(lanes);
    for lane in 0..lanes {
        let sh = Arc::clone(&shared);
        let h = std::thread::Builder::new()
            .name(format!("fineserve-lane-{lane}"))
            .spawn(move || {
                let recs = run_lane(&sh, lane, lanes);
                if let Ok(mut n) = sh.finished_lanes.lock() {
                    *n += 1;
                }
                sh.finished_cv.notify_all();
                recs
            })
            .map_err(|e| EngineError::io("spawning a lane thread", e))?;
        handles.push(h);
    }
    Ok(RunHandle {
        shared,
        lanes: handles,
    })
}

/// A cheap, `Send` view of a run for waiting on it from another thread.
#[derive(Clone)]
pub struct RunWaiter {
    shared: Arc<Shared>,
    lanes: usize,
}

impl RunWaiter {
    /// Waits up to `timeout` for every lane to finish; true when they have.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut n) = self.shared.finished_lanes.lock() else {
            return true;
        };
        while *n < self.lanes {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self.shared.finished_cv.wait_timeout(n, deadline - now) {
                Ok((guard, _)) => n = guard,
                Err(_) => return true,
            }
        }
        true
    }
}

impl RunHandle {
    pub fn waiter(&self) -> RunWaiter {
        RunWaiter {
            shared: Arc::clone(&self.shared),
            lanes: self.lanes.len(),
        }
    }

    pub fn progress(&self) -> ProgressSnapshot {
        let p = &self.shared.progress;
        let t0 = self.shared.t0.get();
        ProgressSnapshot {
            scheduled: p.scheduled.load(Ordering::Relaxed),
            dispatched: p.dispatched.load(Ordering::Relaxed),
            sent: p.sent.load(Ordering::Relaxed),
            succeeded: p.succeeded.load(Ordering::Relaxed),
            failed: p.failed.load(Ordering::Relaxed),
            not_sent: p.not_sent.load(Ordering::Relaxed),
            in_flight: p.in_flight.load(Ordering::Relaxed),
            elapsed_ns: t0.map_or(0, |t0| RunClock { t0: *t0 }.now_ns()),
            started: t0.is_some(),
            warm_connections: p.warm_connections.load(Ordering::Relaxed),
            warm_failures: p.warm_failures.load(Ordering::Relaxed),
            realtime_lanes: p.realtime_lanes.load(Ordering::Relaxed),
        }
    }

    /// Waits up to `timeout` for every lane to finish; true when they have.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.waiter().wait(timeout)
    }

    /// Stops dispatching; requests in flight go on until they end or `cancel` is called.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
    }

    /// Aborts requests in flight (recorded as `Cancelled`); implies `stop`.
    pub fn cancel(&self) {
        self.stop();
        self.shared.cancel.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// Joins the lanes and assembles the records.
    pub fn finish(mut self) -> RunOutput {
        let mut records = Vec::with_capacity(self.shared.schedule.len());
        for h in self.lanes.drain(..) {
            if let Ok(r) = h.join() {
                records.extend(r);
            }
        }
        let reason = if self.is_stopping() {
            "run stopped before this request's scheduled time"
        } else {
            "lane ended before dispatch (internal error)"
        };
        let columns = RecordColumns::assemble(
            &self.shared.schedule.t_ns,
            &self.shared.schedule.endpoint_idx,
            records,
            reason,
        );
        RunOutput {
            columns,
            t0_unix_ns: self.shared.t0_unix_ns.get().copied().unwrap_or(0),
            stopped: self.is_stopping(),
        }
    }
}

impl Drop for RunHandle {
    fn drop(&mut self) {
        if !self.lanes.is_empty() {
            self.cancel();
            for h in self.lanes.drain(..) {
                let _ = h.join();
            }
        }
    }
}

fn run_lane(shared: &Arc<Shared>, lane: usize, lanes: usize) -> Vec<RequestRecord> {
    lower_timer_slack();
    let realtime = shared.config.realtime_priority && set_realtime_priority();
    if !realtime {
        raise_thread_priority();
    }
    if realtime {
        shared
            .progress
            .realtime_lanes
            .fetch_add(1, Ordering::Relaxed);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            // Cannot run this lane: its requests stay unsent and say why.
            shared.start_gate.wait();
            return lane_indices(shared.schedule.len(), lane, lanes)
                .map(|i| {
                    let mut r = RequestRecord::new(i, 0);
                    r.fail(ErrorKind::NotSent, format!("lane runtime failed: {e}"));
                    r
                })
                .collect();
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, lane_main(Arc::clone(shared), lane, lanes))
}

fn lane_indices(n: usize, lane: usize, lanes: usize) -> impl Iterator<Item = usize> {
    (lane..n).step_by(lanes)
}

struct LaneState {
    records: RefCell<Vec<RequestRecord>>,
    in_flight: Cell<usize>,
    idle: Notify,
}

async fn lane_main(shared: Arc<Shared>, lane: usize, lanes: usize) -> Vec<RequestRecord> {
    let endpoints: Rc<[Endpoint]> = shared.endpoints.clone().into();
    let pool = Rc::new(Pool::new(endpoints, shared.config.client.connect_timeout));
    warm_pool(&shared, &pool, lanes).await;

    // Common start instant: the first lane through the gate fixes it.
    shared.start_gate.wait();
    let t0 = *shared.t0.get_or_init(|| {
        let t0 = Instant::now() + shared.config.start_delay;
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64)
            + shared.config.start_delay.as_nanos() as i64;
        let _ = shared.t0_unix_ns.set(unix);
        t0
    });
    let clock = RunClock { t0 };

    let state = Rc::new(LaneState {
        records: RefCell::new(Vec::new()),
        in_flight: Cell::new(0),
        idle: Notify::new(),
    });
    let timer = HiResSleep::new().ok();
    let spin = shared.config.spin;
    let sched = &shared.schedule;
    let mut since_yield = 0usize;
    let mut not_dispatched = 0u64;
    let mut indices = lane_indices(sched.len(), lane, lanes);
    for i in indices.by_ref() {
        let deadline = t0 + Duration::from_nanos(sched.t_ns[i] as u64);
        if !wait_for(&shared, timer.as_ref(), deadline, spin).await {
            not_dispatched += 1;
            break;
        }
        dispatch(&shared, &pool, &state, clock, i);
        since_yield += 1;
        // Far behind schedule, every deadline has passed: let the spawned requests run.
        if since_yield >= 32 {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
    not_dispatched += indices.count() as u64;
    shared
        .progress
        .not_sent
        .fetch_add(not_dispatched, Ordering::Relaxed);

    while state.in_flight.get() > 0 {
        state.idle.notified().await;
    }
    state.records.take()
}

/// Sleeps until `deadline`; false if the run was stopped meanwhile.
async fn wait_for(
    shared: &Shared,
    timer: Option<&HiResSleep>,
    deadline: Instant,
    spin: Duration,
) -> bool {
    // Wake at least this often to notice a stop.
    const STOP_POLL: Duration = Duration::from_millis(20);
    loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        let target = deadline.min(now + STOP_POLL);
        match timer {
            Some(t) => sleep_until_precise(t, target, spin).await,
            None => tokio::time::sleep_until(target.into()).await,
        }
    }
}

async fn warm_pool(shared: &Shared, pool: &Rc<Pool>, lanes: usize) {
    let per_lane = shared.config.warm_connections.div_ceil(lanes);
    if per_lane == 0 {
        return;
    }
    for ep in 0..shared.endpoints.len() {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..per_lane {
            let p = Rc::clone(pool);
            set.spawn_local(async move { p.connect(ep).await.ok() });
            // Bound simultaneous connects so a listen backlog is not overrun.
            if set.len() >= 256 {
                collect_warm(shared, pool, ep, &mut set).await;
            }
        }
        collect_warm(shared, pool, ep, &mut set).await;
    }
}

type WarmSet = tokio::task::JoinSet<Option<crate::client::Sender>>;

async fn collect_warm(shared: &Shared, pool: &Pool, ep: usize, set: &mut WarmSet) {
    while let Some(res) = set.join_next().await {
        match res {
            Ok(Some(sender)) => {
                pool.put(ep, sender);
                shared
                    .progress
                    .warm_connections
                    .fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                shared
                    .progress
                    .warm_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn dispatch(
    shared: &Arc<Shared>,
    pool: &Rc<Pool>,
    state: &Rc<LaneState>,
    clock: RunClock,
    i: usize,
) {
    let sched = &shared.schedule;
    let body = sched.bodies[sched.body_idx[i] as usize].clone();
    let endpoint = sched.endpoint_idx[i] as usize;
    let expected = sched.expected_output_tokens[i] as usize;
    state.in_flight.set(state.in_flight.get() + 1);
    shared.progress.dispatched.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::clone(shared);
    let pool = Rc::clone(pool);
    let state = Rc::clone(state);
    tokio::task::spawn_local(async move {
        let mut rec = RequestRecord::new(i, expected + 1);
        let outcome = {
            let work = run_request(&shared, &pool, clock, endpoint, body, &mut rec);
            tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => None,
                r = work => Some(r),
            }
        };
        let p = &shared.progress;
        match outcome {
            None => {
                if rec.sent_ns < 0 {
                    rec.fail(
                        ErrorKind::NotSent,
                        "cancelled while queued for a concurrency slot",
                    );
                } else {
                    rec.fail(ErrorKind::Cancelled, "in flight when the run was cancelled");
                }
                rec.done_ns = clock.now_ns();
            }
            Some(Err((kind, msg))) => rec.fail(kind, msg),
            Some(Ok(())) => {}
        }
        if rec.sent_ns >= 0 {
            p.in_flight.fetch_sub(1, Ordering::Relaxed);
            if rec.error == ErrorKind::Ok {
                p.succeeded.fetch_add(1, Ordering::Relaxed);
            } else {
                p.failed.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            p.not_sent.fetch_add(1, Ordering::Relaxed);
        }
        state.records.borrow_mut().push(rec);
        let n = state.in_flight.get() - 1;
        state.in_flight.set(n);
        if n == 0 {
            state.idle.notify_one();
        }
    });
}

async fn run_request(
    shared: &Shared,
    pool: &Pool,
    clock: RunClock,
    endpoint: usize,
    body: Bytes,
    rec: &mut RequestRecord,
) -> Result<(), (ErrorKind, String)> {
    let _permit = match &shared.semaphore {
        Some(sem) => Some(
            Arc::clone(sem)
                .acquire_owned()
                .await
                .map_err(|_| (ErrorKind::NotSent, "concurrency limiter closed".to_owned()))?,
        ),
        None => None,
    };
    let cfg = &shared.config.client;
    let progress = &shared.progress;
    let result = tokio::time::timeout(
        cfg.total_timeout,
        execute(pool, cfg, clock, endpoint, body, rec, || {
            progress.sent.fetch_add(1, Ordering::Relaxed);
            progress.in_flight.fetch_add(1, Ordering::Relaxed);
        }),
    )
    .await;
    match result {
        Err(_) => Err((
            ErrorKind::TotalTimeout,
            format!(
                "request exceeded the total timeout of {:?}",
                cfg.total_timeout
            ),
        )),
        Ok(r) => r,
    }
}
