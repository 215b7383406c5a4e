//! A run seen from outside: feeding chunks, draining records, stopping, waiting, and the
//! final collection once the lanes are joined.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::error::EngineError;
use crate::records::{RecordColumns, RequestRecord};

use super::lanes::{first_in_chunk, Chunk};
use super::progress::ProgressSnapshot;
use super::{Schedule, Shared};

/// The feeding side of a run: one channel per lane, plus what validation needs.
pub(super) struct Feeder {
    pub(super) senders: Vec<mpsc::UnboundedSender<Arc<Chunk>>>,
    pub(super) next_index: u64,
    pub(super) last_t_ns: i64,
}

pub struct RunOutput {
    pub columns: RecordColumns,
    pub t0_unix_ns: i64,
    pub stopped: bool,
}

/// A run in progress. Dropping it without `finish` cancels and joins the lanes.
pub struct RunHandle {
    pub(super) shared: Arc<Shared>,
    pub(super) lanes: Vec<JoinHandle<()>>,
    pub(super) feeder: Mutex<Option<Feeder>>,
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
        self.shared.progress.snapshot(
            self.shared.t0.get(),
            self.shared.t0_unix_ns.get().copied(),
            &self.shared.budget,
        )
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
            self.shared.config.client.request_headers.len(),
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

    /// Stops dispatching, as `stop`, for `reason`: what the requests never sent say
    /// (the first reason given is kept).
    pub fn stop_because(&self, reason: &str) {
        let _ = self.shared.stop_reason.set(reason.to_owned());
        self.stop();
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
