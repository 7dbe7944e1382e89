//! Instances kept between requests of one function (`reuse`).
//!
//! Invariants:
//! - A kept instance serves one request at a time: it is in the pool only
//!   between requests, and a request takes it out for its whole run (for
//!   WASI 0.2 until `handle` returned, for 0.3 until the response body was
//!   read or dropped and `handle` returned). So every per-request limit
//!   stays exact: the CPU budget and wall deadline are the request's own,
//!   and the request-scoped host state (request id, log capture, outbound
//!   count, the memory limiter's refusal flag) starts again at
//!   [`InstancePool::take`].
//! - An instance goes back only if its request ended well. A trap, a limit
//!   (CPU, wall, memory) or a cancelled request drops the store with the
//!   guest future, so the instance is never seen again; the next request
//!   gets a fresh one.
//! - The pool belongs to one [`super::Function`]: an instance is never
//!   shared across functions, let alone tenants.
//! - A function never has more instances than `max_concurrency`, idle ones
//!   included, so the pool slots sized in
//!   [`crate::RuntimeSettings::from_manifest`] still hold: a request
//!   instantiates only when no instance is idle (then every live instance
//!   belongs to a running request, each holding an admission slot), and a
//!   request gives its instance back before it releases its slot.
//! - At most `max_idle` instances wait, each holding its memory; one is
//!   retired after `max_requests` requests or once it is `max_age` old,
//!   idle or not (a sweep every quarter of `max_age` drops idle ones that
//!   aged, so a function that stops receiving traffic frees its instances).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use ignis_config::Reuse;
use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p3::bindings::Service;

use crate::RequestId;
use crate::guest::GuestStats;
use crate::host::Host;
use crate::ticker::StoreLease;

/// An instantiated component, by world.
pub(super) enum Instance {
    P2(Proxy),
    P3(Service),
}

/// A request's store and, unless it is fresh, the instance in it.
pub(super) struct Kept {
    pub(super) store: Store<Host>,
    /// `None` until the request instantiates the component.
    pub(super) instance: Option<Instance>,
    /// Requests this instance finished.
    served: u32,
    born: Instant,
}

impl Kept {
    /// A fresh store: the request instantiates the component in it.
    pub(super) fn fresh(store: Store<Host>) -> Kept {
        Kept {
            store,
            instance: None,
            served: 0,
            born: Instant::now(),
        }
    }
}

/// The idle instances of one function.
pub(super) struct InstancePool {
    policy: Reuse,
    /// Most recently used last (taken first: its memory is warm).
    idle: Mutex<Vec<Kept>>,
    stats: Arc<GuestStats>,
}

impl InstancePool {
    pub(super) fn new(policy: Reuse, stats: Arc<GuestStats>) -> Arc<InstancePool> {
        let pool = Arc::new(InstancePool {
            policy,
            idle: Mutex::new(Vec::new()),
            stats,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep_every(
                Arc::downgrade(&pool),
                policy.max_age / 4,
                InstancePool::sweep,
            ));
        }
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Kept>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn young(&self, kept: &Kept) -> bool {
        kept.born.elapsed() < self.policy.max_age
    }

    /// An idle instance ready for request `request_id` (running the epoch
    /// ticker with `ticker`), if one is young enough.
    pub(super) fn take(
        &self,
        request_id: RequestId,
        ticker: impl FnOnce() -> StoreLease,
    ) -> Option<Kept> {
        let mut aged = Vec::new();
        let found = {
            let mut idle = self.lock();
            let found = loop {
                match idle.pop() {
                    None => break None,
                    Some(kept) if self.young(&kept) => break Some(kept),
                    Some(kept) => aged.push(kept),
                }
            };
            self.count_idle(&idle);
            found
        };
        // Dropped outside the lock: this frees the instances.
        drop(aged);
        let mut kept = found?;
        let host = kept.store.data_mut();
        host.set_ticker(Some(ticker()));
        host.begin_request(request_id);
        kept.store.set_epoch_deadline(1);
        self.stats.reused.fetch_add(1, Ordering::Relaxed);
        Some(kept)
    }

    /// The request on `kept` ended well: keep the instance for the next one,
    /// unless it served enough, is too old, or enough wait already.
    pub(super) fn give_back(&self, mut kept: Kept) {
        kept.served += 1;
        let host = kept.store.data_mut();
        host.end_request();
        host.set_ticker(None);
        if kept.served >= self.policy.max_requests || !self.young(&kept) {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.policy.max_idle as usize {
            idle.push(kept);
            self.count_idle(&idle);
        }
    }

    /// Publishes how many instances wait (called with the lock held, after
    /// every change, so the gauge is the list's length).
    fn count_idle(&self, idle: &[Kept]) {
        self.stats
            .idle_instances
            .store(idle.len() as u64, Ordering::Relaxed);
    }

    /// Drops idle instances past `max_age`.
    fn sweep(&self) {
        let aged: Vec<Kept> = {
            let mut idle = self.lock();
            let (young, aged): (Vec<Kept>, Vec<Kept>) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|k| self.young(k));
            *idle = young;
            self.count_idle(&idle);
            aged
        };
        if !aged.is_empty() {
            // Dropped outside the lock: this frees the instances.
            drop(aged);
            self.stats.notify();
        }
    }
}

impl Drop for InstancePool {
    fn drop(&mut self) {
        self.count_idle(&[]);
    }
}

/// Runs `sweep` on `pool` every `every` until the function is gone.
pub(super) async fn sweep_every<P>(pool: Weak<P>, every: std::time::Duration, sweep: fn(&P)) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => sweep(&pool),
            None => return,
        }
    }
}
