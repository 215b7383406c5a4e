//! Least-outstanding routing: a request for a route group goes, when it is sent, to the
//! group's endpoint with the fewest requests outstanding across the run's lanes.

use std::sync::atomic::{AtomicI64, Ordering};

use super::Shared;

/// Keeps an endpoint's outstanding count up while a request is on it.
pub(super) struct Outstanding<'a>(&'a AtomicI64);

impl<'a> Outstanding<'a> {
    pub(super) fn on(count: &'a AtomicI64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoint for a request: its own, or for a route group the member with the fewest
/// requests outstanding right now (ties broken round-robin).
pub(super) fn route(shared: &Shared, target: usize) -> usize {
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
