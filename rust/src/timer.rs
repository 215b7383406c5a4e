//! Precise pacing primitives.
//!
//! tokio's timer wheel has 1 ms granularity, too coarse for 1 ms micro-bursts. A `timerfd`
//! registered with the tokio reactor wakes the lane within tens of microseconds without
//! blocking its socket I/O; the last `spin` microseconds before a deadline are covered by
//! yielding to the runtime in a loop (which keeps I/O moving on the lane). Hand-written over
//! `libc` because the timerfd crates are either synchronous or unmaintained.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

pub struct HiResSleep {
    fd: AsyncFd<OwnedFd>,
}

impl HiResSleep {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the returned descriptor is checked and owned below.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the descriptor is owned by the AsyncFd and stays open as long as it does.
        let fd = unsafe { AsyncFd::register(owned) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Sleeps for `dur` (relative), waking through the reactor.
    pub async fn sleep(&self, dur: Duration) -> io::Result<()> {
        if dur.is_zero() {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: dur.as_secs() as libc::time_t,
                tv_nsec: dur.subsec_nanos() as libc::c_long,
            },
        };
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: valid descriptor and a fully initialised itimerspec.
        let rc = unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reading 8 bytes into an 8-byte buffer from a valid descriptor.
            let n = unsafe { libc::read(fd, expirations.as_mut_ptr().cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(err);
        }
    }
}

/// Waits until `deadline`: reactor sleep to `spin` before it, then yield-spin.
pub async fn sleep_until_precise(timer: &HiResSleep, deadline: Instant, spin: Duration) {
    spin_until(timer, deadline, spin, None).await;
}

/// `sleep_until_precise`, adding to `idle` the time spun with nothing else to run.
pub async fn spin_until(
    timer: &HiResSleep,
    deadline: Instant,
    spin: Duration,
    idle: Option<&LoadMeter>,
) {
    let now = Instant::now();
    if deadline > now + spin {
        let _ = timer.sleep(deadline - now - spin).await;
    }
    let mut last = Instant::now();
    while last < deadline {
        tokio::task::yield_now().await;
        let now = Instant::now();
        // A yield that came straight back ran nothing else: the core was idle, spinning.
        if let Some(meter) = idle {
            let step = now - last;
            if step < LoadMeter::IDLE_YIELD {
                meter.idle(step);
            }
        }
        last = now;
    }
}

/// A lane's own use of its core, per window of 100 ms: its thread's CPU time less what it
/// spun idle before deadlines (thread CPU time alone counts a lane that spins between
/// requests as busy). A window above 90% is saturated: the lane had no time to spare.
pub struct LoadMeter {
    mark: Instant,
    mark_cpu_ns: u64,
    idle_ns: Cell<u64>,
    mark_idle_ns: u64,
    pub windows: u64,
    pub saturated: u64,
}

impl LoadMeter {
    const WINDOW: Duration = Duration::from_millis(100);
    const SATURATED: f64 = 0.9;
    const IDLE_YIELD: Duration = Duration::from_micros(5);

    pub fn new() -> Self {
        Self {
            mark: Instant::now(),
            mark_cpu_ns: thread_cpu_ns(),
            idle_ns: Cell::new(0),
            mark_idle_ns: 0,
            windows: 0,
            saturated: 0,
        }
    }

    fn idle(&self, d: Duration) {
        self.idle_ns.set(self.idle_ns.get() + d.as_nanos() as u64);
    }

    /// Call often (each dispatch); closes a window at most once per `WINDOW`.
    pub fn tick(&mut self, now: Instant) {
        if now < self.mark + Self::WINDOW {
            return;
        }
        let cpu = thread_cpu_ns();
        let idle = self.idle_ns.get();
        let used = cpu
            .saturating_sub(self.mark_cpu_ns)
            .saturating_sub(idle - self.mark_idle_ns);
        let busy = used as f64 / (now - self.mark).as_nanos().max(1) as f64;
        self.windows += 1;
        if busy >= Self::SATURATED {
            self.saturated += 1;
        }
        self.mark = now;
        self.mark_cpu_ns = cpu;
        self.mark_idle_ns = idle;
    }
}

impl Default for LoadMeter {
    fn default() -> Self {
        Self::new()
    }
}

/// Lowers this thread's timer slack so reactor wake-ups are not deferred (default 50 µs).
pub fn lower_timer_slack() {
    // SAFETY: prctl with integer arguments has no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Raises this thread's CPU priority (nice -10) when allowed, so that a lane woken just
/// before a deadline preempts ordinary threads instead of waiting for a time slice. Returns
/// whether it took effect; without the privilege the lane runs at normal priority.
pub fn raise_thread_priority() -> bool {
    // SAFETY: gettid/setpriority take and return plain integers.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -10) == 0
    }
}

/// Puts this thread under SCHED_FIFO (priority 1) when allowed: a woken lane then runs at
/// once instead of after a time slice of whatever else holds the core. The kernel's RT
/// throttling (by default 5% of each second left to other threads) keeps a spinning lane
/// from locking a core completely. Returns whether it took effect.
pub fn set_realtime_priority() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pthread_self is always valid; param is initialised.
    unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) == 0 }
}

/// Back to normal scheduling (nice -10 where allowed) from SCHED_FIFO.
pub fn clear_realtime_priority() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in set_realtime_priority.
    let ok =
        unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_OTHER, &param) };
    raise_thread_priority();
    ok == 0
}

/// CPU time this thread has used, in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and an initialised timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Keeps a lane under SCHED_FIFO only while it is mostly idle.
///
/// SCHED_FIFO is what keeps a sparse or bursty schedule on time on contended cores (a
/// woken lane preempts ordinary threads at once), but a lane busy all the time (a high
/// steady rate: it spins from one deadline to the next) would then hold its core, and the
/// kernel's RT throttling pauses it for 50 ms each second — far worse than normal
/// scheduling. So the lane measures its own CPU share over 100 ms windows: above
/// `BUSY_HIGH` it drops to normal scheduling, below `BUSY_LOW` it goes back.
pub struct RealtimeGovernor {
    allowed: bool,
    realtime: bool,
    mark: Instant,
    mark_cpu_ns: u64,
    pub demotions: u64,
}

impl RealtimeGovernor {
    const WINDOW: Duration = Duration::from_millis(100);
    const BUSY_HIGH: f64 = 0.6;
    const BUSY_LOW: f64 = 0.3;

    /// Tries SCHED_FIFO when `wanted`; `realtime()` says whether it took.
    pub fn new(wanted: bool) -> Self {
        let realtime = wanted && set_realtime_priority();
        if !realtime {
            raise_thread_priority();
        }
        Self {
            allowed: realtime,
            realtime,
            mark: Instant::now(),
            mark_cpu_ns: thread_cpu_ns(),
            demotions: 0,
        }
    }

    pub fn realtime(&self) -> bool {
        self.realtime
    }

    /// Call often (each dispatch); acts at most once per window.
    pub fn tick(&mut self, now: Instant) {
        if !self.allowed || now < self.mark + Self::WINDOW {
            return;
        }
        let cpu = thread_cpu_ns();
        let busy = cpu.saturating_sub(self.mark_cpu_ns) as f64
            / (now - self.mark).as_nanos().max(1) as f64;
        if self.realtime && busy > Self::BUSY_HIGH {
            clear_realtime_priority();
            self.realtime = false;
            self.demotions += 1;
        } else if !self.realtime && busy < Self::BUSY_LOW {
            self.realtime = set_realtime_priority();
        }
        self.mark = now;
        self.mark_cpu_ns = cpu;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precise_sleep_never_wakes_early_and_usually_on_time() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let t = HiResSleep::new().expect("timerfd");
            let mut late = Vec::new();
            for _ in 0..50 {
                let deadline = Instant::now() + Duration::from_micros(700);
                sleep_until_precise(&t, deadline, Duration::from_micros(200)).await;
                let now = Instant::now();
                assert!(now >= deadline, "woke before the deadline");
                late.push(now - deadline);
            }
            late.sort();
            // Generous functional bound on the median (other tests share the cores);
            // precision figures live in benches/.
            assert!(
                late[25] < Duration::from_millis(1),
                "median lateness {:?}",
                late[25]
            );
        });
    }
}
