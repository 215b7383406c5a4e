//! The run's connection budget: connections open at once, over every lane, at most `cap`.
//!
//! Lanes keep their own idle connections, so a cap on requests in flight alone does not
//! bound descriptors: one lane's idle pool holds descriptors while another lane opens new
//! connections. A lane that needs a connection past the cap waits here (its request's
//! dispatch lag grows, honestly) instead of failing with "too many open files"; meanwhile
//! lanes close the connections that sit unused in their pools, so the waiters get budget
//! back (`Pool::trim`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Debug)]
pub struct ConnBudget {
    cap: usize,
    open: AtomicUsize,
    waiting: AtomicUsize,
    freed: Notify,
    /// Connects that had to wait for budget, and the ns they waited in all.
    pub waits: AtomicU64,
    pub wait_ns: AtomicU64,
    /// The most connections open at once.
    pub peak: AtomicUsize,
    /// Connections opened in all (TCP connected; warm ones included), counted by the
    /// pools: far more than the peak means connections were closed and opened again.
    pub opened: AtomicU64,
}

/// One connection's share of the budget, returned when dropped (the connection closed).
#[derive(Debug)]
pub struct ConnSlot(Arc<ConnBudget>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

impl ConnBudget {
    /// `cap` = 0: no cap.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: if cap == 0 { usize::MAX } else { cap },
            open: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            waits: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
            peak: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
        }
    }

    fn try_take(&self) -> bool {
        let mut open = self.open.load(Ordering::Acquire);
        loop {
            if open >= self.cap {
                return false;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(open + 1, Ordering::Relaxed);
                    return true;
                }
                Err(now) => open = now,
            }
        }
    }

    /// A slot for one new connection, waiting for one to close when the budget is spent.
    pub async fn take(self: &Arc<Self>) -> ConnSlot {
        if let Some(slot) = self.try_slot() {
            return slot;
        }
        let started = std::time::Instant::now();
        // Counted as waiting until taken or given up (the future dropped: a waiter that
        // got a pooled connection instead).
        let _waiting = Waiting::new(self);
        loop {
            // Registered before the check, so a slot freed in between still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_take() {
                break;
            }
            // Woken only by a slot's release (Notify passes a wake-up on when the waiter
            // it chose gave up), never by a timer: past a server's ceiling a backlog of
            // hundreds of thousands of requests can wait here, and timed rechecks of each
            // took the lanes' cores (the send rate fell to a third of the server's).
            freed.await;
        }
        self.note_wait(started.elapsed().as_nanos() as u64);
        ConnSlot(Arc::clone(self))
    }

    /// A slot now, if the budget has one.
    pub fn try_slot(self: &Arc<Self>) -> Option<ConnSlot> {
        self.try_take().then(|| ConnSlot(Arc::clone(self)))
    }

    /// Counts one wait of `ns` (for budget, or for a pooled connection instead).
    pub fn note_wait(&self, ns: u64) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.wait_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Connects waiting for budget now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One waiter in `ConnBudget::waiting` for as long as it lives.
struct Waiting<'a>(&'a ConnBudget);

impl<'a> Waiting<'a> {
    fn new(budget: &'a ConnBudget) -> Self {
        budget.waiting.fetch_add(1, Ordering::AcqRel);
        Self(budget)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_budget_waits_until_a_connection_closes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let budget = Arc::new(ConnBudget::new(2));
        rt.block_on(async {
            let a = budget.take().await;
            let _b = budget.take().await;
            assert_eq!(budget.open(), 2);
            let waiter = async {
                let _c = budget.take().await;
                budget.open()
            };
            let release = async {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                assert_eq!(budget.waiting(), 1);
                drop(a);
            };
            let (open, ()) = tokio::join!(waiter, release);
            assert_eq!(open, 2);
        });
        assert_eq!(budget.waits.load(Ordering::Relaxed), 1);
        assert!(budget.wait_ns.load(Ordering::Relaxed) >= 15_000_000);
        assert_eq!(budget.peak.load(Ordering::Relaxed), 2);
        assert_eq!(budget.open(), 0);
    }
}
