//! Conversation turns: a later turn leaves `think_ns` after its previous turn ends, so
//! the end of a turn is published for the requests that follow it, across lanes.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::client::RunClock;
use crate::timer::{sleep_until_precise, HiResSleep};

use super::history::Carry;
use super::pacing::STOP_POLL;
use super::Shared;

/// How a turn ended.
#[derive(Clone, Debug)]
pub(super) struct TurnEnd {
    pub done_ns: i64,
    /// The turn succeeded; with live history, its carry could be built (else `why`).
    pub ok: bool,
    /// The endpoint that served it.
    pub served_by: u32,
    /// Live history: the turn's messages and reply, for its followers.
    pub carry: Option<Arc<Carry>>,
    /// Why followers cannot be sent although the turn succeeded.
    pub why: Option<&'static str>,
}

impl TurnEnd {
    pub fn failed(endpoint: u32) -> Self {
        TurnEnd {
            done_ns: -1,
            ok: false,
            served_by: endpoint,
            carry: None,
            why: None,
        }
    }
}

/// What a follower learns when it is released.
pub(super) struct Release {
    pub release_ns: i64,
    pub served_by: u32,
    pub carry: Option<Arc<Carry>>,
}

/// Publishes the end of turns that other requests follow. A follower may start waiting
/// before or after its turn ends; a `watch` channel per turn covers both, across lanes.
#[derive(Default)]
pub(super) struct TurnBoard {
    slots: Mutex<HashMap<u64, TurnSlot>>,
}

struct TurnSlot {
    end: tokio::sync::watch::Sender<Option<TurnEnd>>,
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

    pub(super) fn publish(&self, index: u64, followers: u32, end: TurnEnd) {
        self.slot(index, |s| {
            s.left = s.left.min(followers);
            s.end.send_replace(Some(end));
        });
    }

    fn subscribe(&self, index: u64) -> Option<tokio::sync::watch::Receiver<Option<TurnEnd>>> {
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

/// A lane's release clock for later turns: one timerfd serves every turn waiting on the
/// lane (tokio's own timer wakes on 1 ms ticks, as coarse as a whole micro-burst slot).
pub(super) struct ReleaseTimer {
    queue: RefCell<BinaryHeap<Reverse<Waiting>>>,
    /// An earlier deadline than the one slept for was queued.
    changed: Notify,
}

/// A turn waiting for its release, ordered by deadline alone (turns due at the same
/// instant are woken together, in any order).
struct Waiting {
    at: Instant,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

impl ReleaseTimer {
    /// The timer, and the task (to spawn on the lane) that fires it; None without a
    /// timerfd (turns then wait on tokio's timer). It does not spin before a release: the
    /// timerfd wakes within tens of microseconds, and a second spinner on the lane would
    /// take time from its pacer (bench_live_history).
    pub(super) fn start() -> Option<(Rc<Self>, impl std::future::Future<Output = ()>)> {
        let fd = HiResSleep::new().ok()?;
        let timer = Rc::new(ReleaseTimer {
            queue: RefCell::new(BinaryHeap::new()),
            changed: Notify::new(),
        });
        let me = Rc::clone(&timer);
        let task = async move {
            loop {
                let next = {
                    let mut q = me.queue.borrow_mut();
                    let now = Instant::now();
                    while q.peek().is_some_and(|w| w.0.at <= now) {
                        if let Some(Reverse(w)) = q.pop() {
                            let _ = w.wake.send(());
                        }
                    }
                    q.peek().map(|w| w.0.at)
                };
                match next {
                    None => me.changed.notified().await,
                    Some(at) => {
                        tokio::select! {
                            _ = sleep_until_precise(&fd, at, Duration::ZERO) => {}
                            _ = me.changed.notified() => {}
                        }
                    }
                }
            }
        };
        Some((timer, task))
    }

    fn wake_at(&self, at: Instant) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut q = self.queue.borrow_mut();
        let earliest = q.peek().is_none_or(|w| at < w.0.at);
        q.push(Reverse(Waiting { at, wake: tx }));
        if earliest {
            self.changed.notify_one();
        }
        rx
    }
}

/// Waits for turn `parent` to end, then until `think_ns` after that (`tool_ns` when the
/// turn's reply was a tool call), on the lane's `release` clock; returns the release, or
/// why the follower cannot be sent (the turn failed, or the run stopped).
pub(super) async fn follow_turn<'a>(
    shared: &'a Shared,
    release: Option<&ReleaseTimer>,
    clock: RunClock,
    parent: u64,
    think_ns: i64,
    tool_ns: i64,
) -> Result<Release, &'a str> {
    let Some(mut rx) = shared.turns.subscribe(parent) else {
        return Err("turn bookkeeping failed");
    };
    let end = loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return Err(shared.not_sent_reason());
        }
        if let Some(end) = rx.borrow_and_update().as_ref() {
            break end.clone();
        }
        // Woken by the turn's end; the timeout only lets a stop be noticed.
        let _ = tokio::time::timeout(STOP_POLL, rx.changed()).await;
    };
    shared.turns.consumed(parent);
    if !end.ok {
        return Err(end
            .why
            .unwrap_or("the previous turn of its conversation failed or was not sent"));
    }
    let tool_call = end.carry.as_ref().is_some_and(|c| !c.tool_ids.is_empty());
    let delay_ns = if tool_call { tool_ns } else { think_ns };
    let release_ns = end.done_ns.saturating_add(delay_ns);
    let deadline = clock.t0 + Duration::from_nanos(release_ns.max(0) as u64);
    if let Some(timer) = release {
        let mut woken = timer.wake_at(deadline);
        loop {
            if shared.stopping.load(Ordering::Relaxed) {
                return Err(shared.not_sent_reason());
            }
            match tokio::time::timeout(STOP_POLL, &mut woken).await {
                Ok(_) => break,
                Err(_) => continue, // only to notice a stop
            }
        }
    }
    loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return Err(shared.not_sent_reason());
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Release {
                release_ns,
                served_by: end.served_by,
                carry: end.carry,
            });
        }
        tokio::time::sleep_until(deadline.min(now + STOP_POLL).into()).await;
    }
}
