//! Where guests go when they outlast their first slice.
//!
//! The runtime starts every guest inside the caller's task. A guest that is
//! still running after half an epoch slice of CPU is handed, as an
//! [`async_task::Runnable`], to its tenant's [`SliceQueue`]; from then on
//! each wake-up (every epoch tick for a CPU-bound guest) schedules it there
//! again. [`FairScheduler`] implements these traits (weighted fair queueing
//! across tenants on dedicated threads); a runtime built without one keeps
//! every guest on the caller's executor.

mod fair;

pub use fair::{FairScheduler, TenantStats};

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

/// A fair scheduler for guests, shared by the whole process.
pub trait GuestScheduler: Send + Sync + 'static {
    /// The queue of `tenant` (called once per function, at load).
    fn tenant_queue(&self, tenant: &str) -> Arc<dyn SliceQueue>;
}

/// One tenant's run queue.
pub trait SliceQueue: Send + Sync + 'static {
    /// Queues one slice of a guest of this tenant that has used `attained`
    /// CPU so far (up to its previous slice). Called from any thread,
    /// including from inside another slice.
    fn schedule(&self, runnable: async_task::Runnable, attained: Duration);
}

thread_local! {
    static THREAD_CPU_CLOCK: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as a dedicated guest thread: CPU budgets of
/// guests polled on it are charged in thread CPU time, so time the OS gave
/// to other threads while this one was preempted is not charged to the guest.
pub fn use_thread_cpu_clock() {
    THREAD_CPU_CLOCK.with(|c| c.set(true));
}

/// A point on the clock CPU budgets are measured with on this thread.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CpuInstant {
    Wall(std::time::Instant),
    Thread(Duration),
}

impl CpuInstant {
    pub(crate) fn now() -> CpuInstant {
        if THREAD_CPU_CLOCK.with(Cell::get) {
            CpuInstant::Thread(thread_cpu_time())
        } else {
            CpuInstant::Wall(std::time::Instant::now())
        }
    }

    pub(crate) fn elapsed(self) -> Duration {
        match self {
            CpuInstant::Wall(t) => t.elapsed(),
            CpuInstant::Thread(t) => thread_cpu_time().saturating_sub(t),
        }
    }
}

/// CPU time consumed by the calling thread.
#[allow(unsafe_code)]
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a
    // constant the kernel always supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
