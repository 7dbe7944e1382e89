//! Counters of one function or actor class.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::histogram::Histogram;

use super::Outcome;

/// Counters for one function or actor class. `active` is the number of
/// requests running in a function instance (idle kept instances are
/// `idle_instances`; actor activations are counted by their directory).
#[derive(Debug, Default)]
pub struct GuestStats {
    /// Requests (or actor messages and alarms) received.
    pub requests: AtomicU64,
    /// Requests running in an instance now.
    pub active: AtomicU64,
    /// Requests that instantiated the component (a fresh instance).
    pub fresh_instances: AtomicU64,
    /// Requests served by an instance kept from an earlier request.
    pub reused: AtomicU64,
    /// Instances kept for reuse, waiting for a request now.
    pub idle_instances: AtomicU64,
    /// Guest traps (including memory-limit traps).
    pub traps: AtomicU64,
    /// Runs stopped for memory.
    pub memory_kills: AtomicU64,
    /// Runs stopped at the CPU budget.
    pub cpu_kills: AtomicU64,
    /// Runs stopped at the wall deadline.
    pub wall_kills: AtomicU64,
    /// Requests whose client went away before the guest finished.
    pub cancelled: AtomicU64,
    /// Requests whose guest outlived its first slice and moved to the fair scheduler.
    pub demoted: AtomicU64,
    /// Requests started directly in the fair scheduler because their route's
    /// recent requests were CPU hogs.
    pub started_pooled: AtomicU64,
    /// CPU time used by all runs, in nanoseconds.
    pub cpu_nanos: AtomicU64,
    /// Time to instantiate the component, per fresh instance.
    pub instantiation: Histogram,
    /// The most linear memory one instance held, in bytes.
    pub memory_high_water: AtomicU64,
    /// Per route (request paths hashed into [`ROUTE_BUCKETS`] buckets), a
    /// moving average of "this run used more than half a slice of CPU", in
    /// 1/1024ths: where requests of a route start.
    route_hog_scores: [AtomicU64; ROUTE_BUCKETS],
    changed: Notify,
}

/// Buckets of per-route hog scores: a function's paths hash into these,
/// so the state stays fixed-size whatever paths clients send.
pub const ROUTE_BUCKETS: usize = 32;

/// The hog-score bucket of a request path (the query is not part of it).
pub fn route_bucket(path: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    (h.finish() % ROUTE_BUCKETS as u64) as usize
}

fn update_hog_score(score: &AtomicU64, hog: bool) {
    let _ = score.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
        Some(s - s / 8 + if hog { HOG_STEP } else { 0 })
    });
}

/// Weight of one run in the hog score's moving average: 1/8.
const HOG_STEP: u64 = 128;
/// Above this score (half of recent runs were hogs) new requests skip the
/// connection task and start in the fair scheduler.
const HOG_THRESHOLD: u64 = 512;

impl GuestStats {
    /// Records one run's CPU time and updates its route's hog score (if it
    /// has a route).
    pub(crate) fn record_cpu(&self, used: Duration, hog_above: Duration, route: Option<usize>) {
        self.cpu_nanos
            .fetch_add(used.as_nanos() as u64, Ordering::Relaxed);
        if let Some(route) = route {
            update_hog_score(
                &self.route_hog_scores[route % ROUTE_BUCKETS],
                used >= hog_above,
            );
        }
    }

    /// Counts how a run ended.
    pub(crate) fn record_outcome<T>(&self, outcome: &Outcome<T>) {
        let counters: &[&AtomicU64] = match outcome {
            Outcome::Done(_) => &[],
            Outcome::Trap(_) => &[&self.traps],
            Outcome::Memory => &[&self.traps, &self.memory_kills],
            Outcome::Cpu => &[&self.cpu_kills],
            Outcome::Wall => &[&self.wall_kills],
        };
        for c in counters {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether recent runs of the route in bucket `route` were mostly CPU
    /// hogs (see [`route_bucket`]).
    pub fn route_mostly_hogs(&self, route: usize) -> bool {
        self.route_hog_scores[route % ROUTE_BUCKETS].load(Ordering::Relaxed) > HOG_THRESHOLD
    }

    /// Waits until no instance is alive.
    pub async fn wait_idle(&self) {
        self.wait_until(|s| s.active.load(Ordering::SeqCst) == 0)
            .await;
    }

    /// Waits until `check` holds; re-checked each time an instance starts or ends.
    pub async fn wait_until(&self, check: impl Fn(&Self) -> bool) {
        wait_on(&self.changed, || check(self)).await;
    }

    /// Wakes `wait_until` callers (an instance started or ended).
    pub(crate) fn notify(&self) {
        self.changed.notify_waiters();
    }
}

/// Waits until `check` holds, re-checking it each time `changed` is
/// notified (with `notify_waiters`). Registers before checking, so a change
/// between the check and the wait is not missed.
pub async fn wait_on(changed: &Notify, check: impl Fn() -> bool) {
    loop {
        let notified = changed.notified();
        if check() {
            return;
        }
        notified.await;
    }
}
