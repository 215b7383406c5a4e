//! A run's live counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::client::RunClock;

use super::budget::ConnBudget;

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
    /// Token events timed, and of those, timed by the kernel's receive stamp.
    pub token_events: AtomicU64,
    pub kernel_stamped_events: AtomicU64,
    /// 100 ms windows of the lanes' pacing (summed over lanes), and those in which a lane
    /// used over 90% of its core for work (`LoadMeter`); counted as each lane ends.
    pub lane_windows: AtomicU64,
    pub lane_saturated_windows: AtomicU64,
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
    /// The start instant on the system clock (ns since the Unix epoch; 0 before it).
    pub t0_unix_ns: i64,
    /// Connections open now, the most at once, connects waiting for budget now, and
    /// connects that waited (with their total wait).
    pub connections_open: u64,
    pub connections_peak: u64,
    pub connections_opened: u64,
    pub connection_waiting: u64,
    pub connection_waits: u64,
    pub connection_wait_ns: u64,
    pub warm_connections: u64,
    pub warm_failures: u64,
    pub realtime_lanes: u64,
    pub realtime_demotions: u64,
    pub token_events: u64,
    pub kernel_stamped_events: u64,
    pub lane_windows: u64,
    pub lane_saturated_windows: u64,
}

impl Progress {
    /// The counters now; `t0` is the run's start instant once it is fixed (and
    /// `t0_unix_ns` the system clock then).
    pub(super) fn snapshot(
        &self,
        t0: Option<&Instant>,
        t0_unix_ns: Option<i64>,
        budget: &ConnBudget,
    ) -> ProgressSnapshot {
        ProgressSnapshot {
            scheduled: self.scheduled.load(Ordering::Relaxed),
            dispatched: self.dispatched.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            not_sent: self.not_sent.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            elapsed_ns: t0.map_or(0, |t0| {
                RunClock {
                    t0: *t0,
                    t0_unix_ns: 0,
                }
                .now_ns()
            }),
            started: t0.is_some(),
            t0_unix_ns: t0_unix_ns.unwrap_or(0),
            connections_open: budget.open() as u64,
            connections_peak: budget.peak.load(Ordering::Relaxed) as u64,
            connections_opened: budget.opened.load(Ordering::Relaxed),
            connection_waiting: budget.waiting() as u64,
            connection_waits: budget.waits.load(Ordering::Relaxed),
            connection_wait_ns: budget.wait_ns.load(Ordering::Relaxed),
            warm_connections: self.warm_connections.load(Ordering::Relaxed),
            warm_failures: self.warm_failures.load(Ordering::Relaxed),
            realtime_lanes: self.realtime_lanes.load(Ordering::Relaxed),
            realtime_demotions: self.realtime_demotions.load(Ordering::Relaxed),
            token_events: self.token_events.load(Ordering::Relaxed),
            kernel_stamped_events: self.kernel_stamped_events.load(Ordering::Relaxed),
            lane_windows: self.lane_windows.load(Ordering::Relaxed),
            lane_saturated_windows: self.lane_saturated_windows.load(Ordering::Relaxed),
        }
    }
}
