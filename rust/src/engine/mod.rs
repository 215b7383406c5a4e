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

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::client::{execute, ClientConfig, Endpoint, Pool, RunClock};
use crate::error::EngineError;
use crate::records::{ErrorKind, RecordColumns, RequestRecord};
use crate::timer::{lower_timer_slack, sleep_until_precise, HiResSleep, RealtimeGovernor};

/// A run's schedule, or one chunk of it, columnar.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// Send offset from the run's start instant, non-decreasing (also across chunks).
    pub t_ns: Vec<i64>,
    /// Index into `bodies` for each request.
    pub body_idx: Vec<u32>,
    pub endpoint_idx: Vec<u32>,
    /// Used to size per-request buffers; the body itself carries `max_tokens`.
    pub expected_output_tokens: Vec<u32>,
    pub bodies: Vec<Bytes>,
    /// Conversation turns (all three empty when there are none): the schedule index of the
    /// turn this request follows (-1: none); it leaves `think_ns` after that turn ends,
    /// not at `t_ns` (which then only orders the schedule).
    pub parent: Vec<i64>,
    pub think_ns: Vec<i64>,
    /// How many later requests follow this one (its end is published for them).
    pub followers: Vec<u32>,
}

impl Schedule {
    pub fn len(&self) -> usize {
        self.t_ns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.t_ns.is_empty()
    }

    /// Checks the columns; `after_ns` is the last send offset of the previous chunk.
    /// `n_targets` counts endpoints plus route groups (see `EngineConfig::route_groups`).
    pub fn validate(&self, n_targets: usize, after_ns: i64) -> Result<(), EngineError> {
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
        if let Some(&first) = self.t_ns.first() {
            if first < after_ns {
                return bad(format!(
                    "t_ns[0] = {first} is before the previous chunk's last send offset {after_ns}"
                ));
            }
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
            .position(|&e| e as usize >= n_targets)
        {
            return bad(format!("endpoint_idx[{i}] has no endpoint or route group"));
        }
        let turns = [self.parent.len(), self.think_ns.len(), self.followers.len()];
        if turns.iter().any(|&l| l != 0) {
            if turns.iter().any(|&l| l != n) {
                return bad(
                    "parent, think_ns and followers must all be given, one per request".into(),
                );
            }
            if let Some(i) = self.think_ns.iter().position(|&t| t < 0) {
                return bad(format!("think_ns[{i}] is negative"));
            }
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
    /// Start at this system-clock instant (ns since the Unix epoch) instead, so that runs
    /// on several machines share one start; if warm-up ends later, the run starts then.
    pub start_at_unix_ns: Option<i64>,
    /// Run lanes under SCHED_FIFO when the process may (see `timer::set_realtime_priority`).
    pub realtime_priority: bool,
    /// Dynamic routing: a request whose `endpoint_idx` is `endpoints.len() + g` goes, when
    /// it is sent, to the endpoint of group `g` with the fewest requests outstanding
    /// (least-outstanding routing across the run's lanes).
    pub route_groups: Vec<Vec<usize>>,
    /// A conversation's later turn goes to the endpoint that served its previous turn
    /// (session affinity, so the server's prefix cache can reuse the conversation).
    pub turn_affinity: bool,
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
    /// Times a lane left SCHED_FIFO because it was busy (see `RealtimeGovernor`).
    pub realtime_demotions: AtomicU64,
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
    pub realtime_demotions: u64,
}

/// A chunk as the lanes see it: where it starts in the whole schedule, and its columns.
struct Chunk {
    base: u64,
    schedule: Schedule,
}

/// The feeding side of a run: one channel per lane, plus what validation needs.
struct Feeder {
    senders: Vec<mpsc::UnboundedSender<Arc<Chunk>>>,
    next_index: u64,
    last_t_ns: i64,
}

struct Shared {
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
    /// Completed records not yet drained, one vector per lane (uncontended locks).
    records: Vec<Mutex<Vec<RequestRecord>>>,
    /// Requests sent and not finished, per endpoint (for least-outstanding routing).
    outstanding: Vec<AtomicI64>,
    /// Per route group, where the tie-breaking scan starts next (spreads ties).
    route_cursor: Vec<AtomicU64>,
    /// Ends of conversation turns that later turns wait for.
    turns: TurnBoard,
}

/// How a turn ended: (done_ns, succeeded, the endpoint that served it).
type TurnEnd = Option<(i64, bool, u32)>;

/// Publishes the end of turns that other requests follow. A follower may start waiting
/// before or after its turn ends; a `watch` channel per turn covers both, across lanes.
#[derive(Default)]
struct TurnBoard {
    slots: Mutex<HashMap<u64, TurnSlot>>,
}

struct TurnSlot {
    end: tokio::sync::watch::Sender<TurnEnd>,
    /// Followers that have not read the end yet (the slot goes when none is left).
    left: u32,
}

impl TurnBoard {
    fn slot<R>(&self, index: u64, f: impl FnOnce(&mut TurnSlot) -> R) -> Option<R> {
        let mut slots = self.slots.lock().ok()?;
        let slot = slots.entry(index).or_insert_with(|| TurnSlot {
            end: tokio::sync::watch::channel(None).0,
            left: u32::MAX,
        });
        Some(f(slot))
    }

    fn publish(&self, index: u64, followers: u32, end: (i64, bool, u32)) {
        self.slot(index, |s| {
            s.left = s.left.min(followers);
            s.end.send_replace(Some(end));
        });
    }

    fn subscribe(&self, index: u64) -> Option<tokio::sync::watch::Receiver<TurnEnd>> {
        self.slot(index, |s| s.end.subscribe())
    }

    fn consumed(&self, index: u64) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(s) = slots.get_mut(&index) {
                s.left = s.left.saturating_sub(1);
                if s.left == 0 {
                    slots.remove(&index);
                }
            }
        }
    }
}

pub struct RunOutput {
    pub columns: RecordColumns,
    pub t0_unix_ns: i64,
    pub stopped: bool,
}

/// A run in progress. Dropping it without `finish` cancels and joins the lanes.
pub struct RunHandle {
    shared: Arc<Shared>,
    lanes: Vec<JoinHandle<()>>,
    feeder: Mutex<Option<Feeder>>,
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
    for (g, group) in config.route_groups.iter().enumerate() {
        if group.is_empty() || group.iter().any(|&e| e >= endpoints.len()) {
            return Err(EngineError::InvalidConfig(format!(
                "route group {g} must list endpoints 0..{}",
                endpoints.len()
            )));
        }
    }
    crate::limits::raise_nofile_limit();
    let lanes = if expected_len > 0 {
        config.lanes.min(expected_len)
    } else {
        config.lanes
    };
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
        records: (0..lanes).map(|_| Mutex::new(Vec::new())).collect(),
        outstanding: (0..endpoints.len()).map(|_| AtomicI64::new(0)).collect(),
        route_cursor: (0..config.route_groups.len())
            .map(|_| AtomicU64::new(0))
            .collect(),
        turns: TurnBoard::default(),
        endpoints,
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
                run_lane(&sh, lane, lanes, rx);
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
            realtime_demotions: p.realtime_demotions.load(Ordering::Relaxed),
        }
    }

    /// Waits up to `timeout` for every lane to finish; true when they have.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.waiter().wait(timeout)
    }

    /// Appends a chunk to the schedule. Its send offsets continue the previous chunk's
    /// (same start instant). Fails, accepting nothing, once the input is closed or the run
    /// is stopping; the caller then accounts for those requests itself.
    pub fn feed(&self, chunk: Schedule) -> Result<(), EngineError> {
        let mut guard = self
            .feeder
            .lock()
            .map_err(|_| EngineError::InvalidConfig("feeder poisoned".into()))?;
        let Some(feeder) = guard.as_mut() else {
            return Err(EngineError::InputClosed(
                "the schedule input is closed".into(),
            ));
        };
        if self.is_stopping() {
            return Err(EngineError::InputClosed("the run is stopping".into()));
        }
        chunk.validate(
            self.shared.endpoints.len() + self.shared.config.route_groups.len(),
            feeder.last_t_ns,
        )?;
        let base = feeder.next_index;
        if let Some(i) = chunk
            .parent
            .iter()
            .enumerate()
            .position(|(j, &p)| p >= (base + j as u64) as i64)
        {
            return Err(EngineError::InvalidSchedule(format!(
                "parent[{i}] must be an earlier request of the schedule"
            )));
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let n = chunk.len() as u64;
        feeder.last_t_ns = chunk.t_ns[chunk.len() - 1];
        let c = Arc::new(Chunk {
            base: feeder.next_index,
            schedule: chunk,
        });
        // Lanes close their receivers only after a stop, and stop() waits for this lock, so
        // these sends cannot fail; checked anyway so that a broken invariant is an error,
        // not requests that silently vanish.
        let lanes = feeder.senders.len() as u64;
        let mut accepted = true;
        for (lane, tx) in feeder.senders.iter().enumerate() {
            let has_work = first_in_chunk(c.base, lane as u64, lanes) < n;
            if has_work && tx.send(Arc::clone(&c)).is_err() {
                accepted = false;
            }
        }
        if !accepted {
            return Err(EngineError::InputClosed("the run is stopping".into()));
        }
        feeder.next_index += n;
        self.shared
            .progress
            .scheduled
            .fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// No more chunks: lanes finish once what was fed is done.
    pub fn close_input(&self) {
        if let Ok(mut g) = self.feeder.lock() {
            g.take();
        }
    }

    /// Takes the records completed since the last drain (completion order).
    pub fn drain(&self) -> RecordColumns {
        RecordColumns::from_records(self.take_records(), false)
    }

    fn take_records(&self) -> Vec<RequestRecord> {
        let mut all = Vec::new();
        for m in &self.shared.records {
            if let Ok(mut v) = m.lock() {
                if all.is_empty() {
                    all = std::mem::take(&mut *v);
                } else {
                    all.append(&mut v);
                }
            }
        }
        all
    }

    /// Stops dispatching; requests in flight go on until they end or `cancel` is called.
    pub fn stop(&self) {
        // Under the feeder lock, so a chunk is either fed whole before the stop or refused.
        let _feeder = self.feeder.lock();
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

    /// Closes the input, joins the lanes and returns the records not drained yet, in
    /// schedule order.
    pub fn finish(mut self) -> RunOutput {
        self.close_input();
        for h in self.lanes.drain(..) {
            let _ = h.join();
        }
        let columns = RecordColumns::from_records(self.take_records(), true);
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
            self.close_input();
            for h in self.lanes.drain(..) {
                let _ = h.join();
            }
        }
    }
}

/// First position in a chunk starting at `base` that belongs to `lane`.
fn first_in_chunk(base: u64, lane: u64, lanes: u64) -> u64 {
    (lane + lanes - base % lanes) % lanes
}

/// Positions in `chunk` that belong to `lane`, from `from` on.
fn lane_positions(
    chunk: &Chunk,
    from: u64,
    lane: usize,
    lanes: usize,
) -> impl Iterator<Item = usize> {
    let first = first_in_chunk(chunk.base, lane as u64, lanes as u64);
    let start = if from <= first {
        first
    } else {
        first + (from - first).div_ceil(lanes as u64) * lanes as u64
    };
    (start as usize..chunk.schedule.len()).step_by(lanes)
}

fn push_record(shared: &Shared, lane: usize, rec: RequestRecord) {
    if let Ok(mut v) = shared.records[lane].lock() {
        v.push(rec);
    }
}

/// Records `chunk`'s requests of this lane from position `from` on as not sent.
fn mark_not_sent(shared: &Shared, lane: usize, lanes: usize, chunk: &Chunk, from: u64, why: &str) {
    let s = &chunk.schedule;
    let mut n = 0u64;
    for j in lane_positions(chunk, from, lane, lanes) {
        let mut r = RequestRecord::new(chunk.base + j as u64, s.t_ns[j], s.endpoint_idx[j], 0);
        r.fail(ErrorKind::NotSent, why);
        push_record(shared, lane, r);
        n += 1;
    }
    shared.progress.not_sent.fetch_add(n, Ordering::Relaxed);
}

const STOPPED_REASON: &str = "run stopped before this request's scheduled time";

fn run_lane(
    shared: &Arc<Shared>,
    lane: usize,
    lanes: usize,
    mut rx: mpsc::UnboundedReceiver<Arc<Chunk>>,
) {
    lower_timer_slack();
    let governor = RealtimeGovernor::new(shared.config.realtime_priority);
    if governor.realtime() {
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
            let why = format!("lane runtime failed: {e}");
            while let Some(chunk) = rx.blocking_recv() {
                mark_not_sent(shared, lane, lanes, &chunk, 0, &why);
            }
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(
        &rt,
        lane_main(Arc::clone(shared), lane, lanes, rx, governor),
    );
}

struct LaneState {
    in_flight: Cell<usize>,
    idle: Notify,
}

/// Next chunk for this lane; None once the input is closed or the run is stopping.
async fn next_chunk(
    shared: &Shared,
    rx: &mut mpsc::UnboundedReceiver<Arc<Chunk>>,
) -> Option<Arc<Chunk>> {
    loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return None;
        }
        match tokio::time::timeout(STOP_POLL, rx.recv()).await {
            Ok(chunk) => return chunk,
            Err(_) => continue,
        }
    }
}

/// Wake at least this often to notice a stop.
const STOP_POLL: Duration = Duration::from_millis(20);

async fn lane_main(
    shared: Arc<Shared>,
    lane: usize,
    lanes: usize,
    mut rx: mpsc::UnboundedReceiver<Arc<Chunk>>,
    mut governor: RealtimeGovernor,
) {
    let endpoints: Rc<[Endpoint]> = shared.endpoints.clone().into();
    let pool = Rc::new(Pool::new(
        endpoints,
        shared.config.client.connect_timeout,
        shared.config.client.source_ips.clone(),
        lane,
    ));
    warm_pool(&shared, &pool, lanes).await;

    // Common start instant: the first lane through the gate fixes it.
    shared.start_gate.wait();
    let t0 = *shared.t0.get_or_init(|| {
        let now = Instant::now();
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let delay = match shared.config.start_at_unix_ns {
            Some(at) => Duration::from_nanos(at.saturating_sub(now_unix).max(0) as u64),
            None => shared.config.start_delay,
        };
        let _ = shared.t0_unix_ns.set(now_unix + delay.as_nanos() as i64);
        now + delay
    });
    let clock = RunClock { t0 };

    let state = Rc::new(LaneState {
        in_flight: Cell::new(0),
        idle: Notify::new(),
    });
    let timer = HiResSleep::new().ok();
    let spin = shared.config.spin;
    let mut since_yield = 0usize;
    'chunks: while let Some(chunk) = next_chunk(&shared, &mut rx).await {
        for j in lane_positions(&chunk, 0, lane, lanes) {
            let deadline = t0 + Duration::from_nanos(chunk.schedule.t_ns[j] as u64);
            if !wait_for(&shared, timer.as_ref(), deadline, spin).await {
                mark_not_sent(&shared, lane, lanes, &chunk, j as u64, STOPPED_REASON);
                break 'chunks;
            }
            dispatch(&shared, &pool, &state, clock, lane, &chunk, j);
            governor.tick(Instant::now());
            since_yield += 1;
            // Far behind schedule, every deadline has passed: let the spawned requests run.
            if since_yield >= 32 {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
    }
    shared
        .progress
        .realtime_demotions
        .fetch_add(governor.demotions, Ordering::Relaxed);
    // Stopping (or input closed): nothing more can be fed to this lane; what was fed and
    // not reached is recorded as not sent.
    rx.close();
    while let Ok(chunk) = rx.try_recv() {
        mark_not_sent(&shared, lane, lanes, &chunk, 0, STOPPED_REASON);
    }

    while state.in_flight.get() > 0 {
        state.idle.notified().await;
    }
}

/// Sleeps until `deadline`; false if the run was stopped meanwhile.
async fn wait_for(
    shared: &Shared,
    timer: Option<&HiResSleep>,
    deadline: Instant,
    spin: Duration,
) -> bool {
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
    lane: usize,
    chunk: &Chunk,
    j: usize,
) {
    let sched = &chunk.schedule;
    let body = sched.bodies[sched.body_idx[j] as usize].clone();
    let endpoint = sched.endpoint_idx[j];
    let scheduled_ns = sched.t_ns[j];
    let index = chunk.base + j as u64;
    let expected = sched.expected_output_tokens[j] as usize;
    let parent = sched.parent.get(j).copied().unwrap_or(-1);
    let think_ns = sched.think_ns.get(j).copied().unwrap_or(0);
    let followers = sched.followers.get(j).copied().unwrap_or(0);
    state.in_flight.set(state.in_flight.get() + 1);
    shared.progress.dispatched.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::clone(shared);
    let pool = Rc::clone(pool);
    let state = Rc::clone(state);
    tokio::task::spawn_local(async move {
        let mut rec = RequestRecord::new(index, scheduled_ns, endpoint, expected + 1);
        if parent >= 0 {
            match follow_turn(&shared, clock, parent as u64, think_ns).await {
                Ok((release_ns, served_by)) => {
                    rec.scheduled_ns = release_ns;
                    if shared.config.turn_affinity {
                        rec.endpoint_idx = served_by;
                    }
                }
                Err(why) => {
                    rec.fail(ErrorKind::NotSent, why);
                    shared.progress.not_sent.fetch_add(1, Ordering::Relaxed);
                    if followers > 0 {
                        shared
                            .turns
                            .publish(index, followers, (-1, false, endpoint));
                    }
                    push_record(&shared, lane, rec);
                    finish_in_lane(&state);
                    return;
                }
            }
        }
        let outcome = {
            let work = run_request(&shared, &pool, clock, body, &mut rec);
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
        if followers > 0 {
            let ok = rec.error == ErrorKind::Ok;
            shared
                .turns
                .publish(index, followers, (rec.done_ns, ok, rec.endpoint_idx));
        }
        push_record(&shared, lane, rec);
        finish_in_lane(&state);
    });
}

fn finish_in_lane(state: &LaneState) {
    let n = state.in_flight.get() - 1;
    state.in_flight.set(n);
    if n == 0 {
        state.idle.notify_one();
    }
}

/// Waits for turn `parent` to end, then until `think_ns` after that; returns the release
/// offset and the endpoint that served the turn, or why the follower cannot be sent (the
/// turn failed, or the run stopped).
async fn follow_turn(
    shared: &Shared,
    clock: RunClock,
    parent: u64,
    think_ns: i64,
) -> Result<(i64, u32), &'static str> {
    let Some(mut rx) = shared.turns.subscribe(parent) else {
        return Err("turn bookkeeping failed");
    };
    let end = loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return Err(STOPPED_REASON);
        }
        if let Some(end) = *rx.borrow_and_update() {
            break end;
        }
        // Woken by the turn's end; the timeout only lets a stop be noticed.
        let _ = tokio::time::timeout(STOP_POLL, rx.changed()).await;
    };
    shared.turns.consumed(parent);
    let (done_ns, ok, served_by) = end;
    if !ok {
        return Err("the previous turn of its conversation failed or was not sent");
    }
    let release_ns = done_ns.saturating_add(think_ns);
    let deadline = clock.t0 + Duration::from_nanos(release_ns.max(0) as u64);
    loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return Err(STOPPED_REASON);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok((release_ns, served_by));
        }
        tokio::time::sleep_until(deadline.min(now + STOP_POLL).into()).await;
    }
}

/// Keeps an endpoint's outstanding count up while a request is on it.
struct Outstanding<'a>(&'a AtomicI64);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoint for a request: its own, or for a route group the member with the fewest
/// requests outstanding right now (ties broken round-robin).
fn route(shared: &Shared, target: usize) -> usize {
    let n = shared.endpoints.len();
    if target < n {
        return target;
    }
    let g = target - n;
    let group = &shared.config.route_groups[g];
    let start = shared.route_cursor[g].fetch_add(1, Ordering::Relaxed) as usize;
    let mut best = group[start % group.len()];
    let mut best_load = shared.outstanding[best].load(Ordering::Relaxed);
    for k in 1..group.len() {
        let e = group[(start + k) % group.len()];
        let load = shared.outstanding[e].load(Ordering::Relaxed);
        if load < best_load {
            best = e;
            best_load = load;
        }
    }
    best
}

async fn run_request(
    shared: &Shared,
    pool: &Pool,
    clock: RunClock,
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
    // Routed when it can leave (after any concurrency wait), so the choice sees the
    // endpoints' load at that moment.
    let endpoint = route(shared, rec.endpoint_idx as usize);
    rec.endpoint_idx = endpoint as u32;
    shared.outstanding[endpoint].fetch_add(1, Ordering::Relaxed);
    let _outstanding = Outstanding(&shared.outstanding[endpoint]);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(base: u64, len: usize) -> Chunk {
        Chunk {
            base,
            schedule: Schedule {
                t_ns: vec![0; len],
                ..Schedule::default()
            },
        }
    }

    #[test]
    fn lanes_partition_every_chunk_by_global_index() {
        for lanes in 1..5usize {
            for base in 0..7u64 {
                let c = chunk(base, 11);
                for from in 0..12u64 {
                    let mut seen: Vec<usize> = (0..lanes)
                        .flat_map(|lane| lane_positions(&c, from, lane, lanes))
                        .collect();
                    seen.sort_unstable();
                    let want: Vec<usize> = (from as usize..11).collect();
                    assert_eq!(seen, want, "lanes {lanes} base {base} from {from}");
                }
                for lane in 0..lanes {
                    assert!(lane_positions(&c, 0, lane, lanes)
                        .all(|j| (base as usize + j) % lanes == lane));
                }
            }
        }
    }
}
