//! When requests leave: the run's common start instant, and sleeping (then spinning) to
//! each request's deadline while watching for a stop.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::timer::{spin_until, HiResSleep, LoadMeter};

use super::Shared;

/// Wake at least this often to notice a stop.
pub(super) const STOP_POLL: Duration = Duration::from_millis(20);

pub(super) const STOPPED_REASON: &str = "run stopped before this request's scheduled time";

/// The run's start instant; the first lane through the start gate fixes it (every lane
/// has warmed its connections by then): `start_delay` from now, or the system-clock
/// instant `start_at_unix_ns` (now, if that has passed).
pub(super) fn start_instant(shared: &Shared) -> Instant {
    *shared.t0.get_or_init(|| {
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
    })
}

/// Sleeps until `deadline`; false if the run was stopped meanwhile.
pub(super) async fn wait_for(
    shared: &Shared,
    timer: Option<&HiResSleep>,
    deadline: Instant,
    spin: Duration,
    meter: &LoadMeter,
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
            Some(t) => spin_until(t, target, spin, Some(meter)).await,
            None => tokio::time::sleep_until(target.into()).await,
        }
    }
}
