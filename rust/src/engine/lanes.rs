//! Lanes: OS threads, each with a current-thread tokio runtime, a connection pool and a
//! pacer. Request i of the whole schedule goes to lane i % lanes; every lane receives
//! the chunks that hold some of its requests and walks its own positions in them.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::client::{Endpoint, Pool, RunClock};
use crate::records::{ErrorKind, RequestRecord};
use crate::timer::{lower_timer_slack, HiResSleep, LoadMeter, RealtimeGovernor};

use super::dispatch::dispatch;
use super::pacing::{start_instant, wait_for, STOP_POLL};
use super::turns::ReleaseTimer;
use super::{Schedule, Shared};

/// A chunk as the lanes see it: where it starts in the whole schedule, and its columns.
pub(super) struct Chunk {
    pub(super) base: u64,
    pub(super) schedule: Schedule,
}

/// First position in a chunk starting at `base` that belongs to `lane`.
pub(super) fn first_in_chunk(base: u64, lane: u64, lanes: u64) -> u64 {
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

/// Hands a finished request's record to `RunHandle::drain`.
pub(super) fn push_record(shared: &Shared, lane: usize, rec: RequestRecord) {
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

/// A lane's thread: builds its runtime and runs `lane_main` on it.
pub(super) fn run_lane(
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

/// Requests of this lane not finished yet (the lane ends once none is left), and those
/// waiting to leave.
pub(super) struct LaneState {
    in_flight: Cell<usize>,
    idle: Notify,
    /// Requests spawned and not sent yet: waiting for a concurrency slot or a connection.
    queued: Cell<usize>,
    /// Signalled when `queued` falls below `QUEUE_LIMIT`.
    dequeued: Notify,
    /// Releases this lane's later turns at their think time (None: no timerfd).
    pub(super) release: Option<Rc<ReleaseTimer>>,
}

/// Requests of a lane that may wait to leave at once (for a concurrency slot or a
/// connection) before its pacer holds the next one. Past a server's ceiling the schedule
/// keeps coming while nothing leaves: spawned, each waiting request held a whole request
/// task (kilobytes), and a backlog growing by tens of thousands a second spent the lanes'
/// cores on fresh pages (30% of a saturated lane's CPU under perf), not on sending.
/// Held in the pacer, a request costs nothing until a connection frees; its wait is its
/// dispatch lag and is counted as a connection wait. Enough to take every connection that
/// comes back at once in a burst of replies.
pub(super) const QUEUE_LIMIT: usize = 128;

impl LaneState {
    pub(super) fn enter(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
    }

    pub(super) fn leave(&self) {
        let n = self.in_flight.get() - 1;
        self.in_flight.set(n);
        if n == 0 {
            self.idle.notify_one();
        }
    }

    /// Counts a request as waiting to leave until the guard drops (sent, or given up).
    pub(super) fn queue(self: &Rc<Self>) -> Queued {
        self.queued.set(self.queued.get() + 1);
        Queued(Rc::clone(self))
    }

    /// Waits (in the pacer) until fewer than `QUEUE_LIMIT` requests of this lane wait to
    /// leave; the ns it waited, or None if the run stopped meanwhile.
    async fn room_to_queue(&self, shared: &Shared) -> Option<i64> {
        if self.queued.get() < QUEUE_LIMIT {
            return Some(0);
        }
        let started = Instant::now();
        loop {
            if shared.stopping.load(Ordering::Relaxed) {
                return None;
            }
            let dequeued = self.dequeued.notified();
            if self.queued.get() < QUEUE_LIMIT {
                return Some(started.elapsed().as_nanos() as i64);
            }
            let _ = tokio::time::timeout(STOP_POLL, dequeued).await;
        }
    }
}

/// One request of a lane waiting to leave (see `LaneState::queue`).
pub(super) struct Queued(Rc<LaneState>);

impl Drop for Queued {
    fn drop(&mut self) {
        let n = self.0.queued.get() - 1;
        self.0.queued.set(n);
        if n + 1 == QUEUE_LIMIT {
            self.0.dequeued.notify_one();
        }
    }
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

/// Warms the pool, waits at the start gate, then paces this lane's requests chunk by
/// chunk until the input closes or the run stops, and waits for its requests to end.
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
        shared.tls.clone(),
        Arc::clone(&shared.budget),
        shared.config.client.http2,
    ));
    warm_pool(&shared, &pool, lanes).await;
    // While a connect (in any lane) waits for budget, this lane's connections that sat
    // idle a while close: a quiet lane must not sit on descriptors a busy one needs.
    let trimmer = Rc::clone(&pool);
    tokio::task::spawn_local(async move {
        loop {
            tokio::time::sleep(TRIM_EVERY).await;
            let waiting = trimmer.budget().waiting();
            if waiting > 0 {
                trimmer.trim(waiting);
            }
        }
    });

    // Common start instant: the first lane through the gate fixes it.
    shared.start_gate.wait();
    let t0 = start_instant(&shared);
    let clock = RunClock {
        t0,
        t0_unix_ns: shared.t0_unix_ns.get().copied().unwrap_or(0),
    };

    let release = ReleaseTimer::start().map(|(timer, task)| {
        tokio::task::spawn_local(task);
        timer
    });
    let state = Rc::new(LaneState {
        in_flight: Cell::new(0),
        idle: Notify::new(),
        queued: Cell::new(0),
        dequeued: Notify::new(),
        release,
    });
    let timer = HiResSleep::new().ok();
    let mut meter = LoadMeter::new();
    let spin = shared.config.spin;
    let mut since_yield = 0usize;
    'chunks: while let Some(chunk) = next_chunk(&shared, &mut rx).await {
        for j in lane_positions(&chunk, 0, lane, lanes) {
            let deadline = t0 + Duration::from_nanos(chunk.schedule.t_ns[j] as u64);
            if !wait_for(&shared, timer.as_ref(), deadline, spin, &meter).await {
                mark_not_sent(
                    &shared,
                    lane,
                    lanes,
                    &chunk,
                    j as u64,
                    shared.not_sent_reason(),
                );
                break 'chunks;
            }
            // A first turn leaves as soon as it can; a later one waits for its previous
            // turn first, so it is never held here.
            let mut held_ns = 0;
            if chunk.schedule.parent.get(j).is_none_or(|&p| p < 0) {
                match state.room_to_queue(&shared).await {
                    Some(ns) => held_ns = ns,
                    None => {
                        let why = shared.not_sent_reason();
                        mark_not_sent(&shared, lane, lanes, &chunk, j as u64, why);
                        break 'chunks;
                    }
                }
            }
            dispatch(&shared, &pool, &state, clock, lane, &chunk, j, held_ns);
            let now = Instant::now();
            governor.tick(now);
            meter.tick(now);
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
    shared
        .progress
        .lane_windows
        .fetch_add(meter.windows, Ordering::Relaxed);
    shared
        .progress
        .lane_saturated_windows
        .fetch_add(meter.saturated, Ordering::Relaxed);
    // Stopping (or input closed): nothing more can be fed to this lane; what was fed and
    // not reached is recorded as not sent.
    rx.close();
    while let Ok(chunk) = rx.try_recv() {
        mark_not_sent(&shared, lane, lanes, &chunk, 0, shared.not_sent_reason());
    }

    while state.in_flight.get() > 0 {
        state.idle.notified().await;
    }
}

/// How often a lane looks whether another waits for connection budget.
const TRIM_EVERY: Duration = Duration::from_millis(2);

async fn warm_pool(shared: &Shared, pool: &Rc<Pool>, lanes: usize) {
    let mut per_lane = shared.config.warm_connections.div_ceil(lanes);
    let cap = shared.config.max_connections;
    if cap > 0 {
        // Warm connections never exceed the budget: nothing would close to let them in.
        per_lane = per_lane.min(cap / (lanes * shared.endpoints.len()).max(1));
    }
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
