//! The process's epoch ticker.
//!
//! One thread advances the epoch of every engine once per tick. A store's
//! epoch deadline is one tick, so each tick is a scheduling slice for the
//! guest running in it. Ticks matter only while a store exists (guest code
//! runs nowhere else), so every store holds a [`StoreLease`], and the thread
//! parks once its ticks have found no store for [`IDLE_BEFORE_PARK`]: an
//! idle server makes no wake-ups. (A store that lives between two ticks is
//! not seen; at worst the thread parks under a trickle of short requests and
//! the next one unparks it.) The next lease unparks it; the first slice of a guest
//! that starts while the ticker is parked ends one tick after the ticker
//! resumes, as it would on a running ticker. Told to stop, the thread ends
//! once no store is left (a guest can only stop at a tick).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

/// How long the ticker keeps ticking without finding a store before it
/// parks (bursts of requests a few milliseconds apart do not park it).
pub const IDLE_BEFORE_PARK: Duration = Duration::from_secs(1);

/// The shared state between the ticker thread and the stores' leases.
pub(crate) struct Ticker {
    /// Stores alive now (leases held).
    live: AtomicUsize,
    /// Set by the thread just before it parks, cleared when it resumes.
    parked: AtomicBool,
    stop: AtomicBool,
    /// Ticks so far (every engine's epoch has advanced this often).
    ticks: AtomicU64,
    thread: OnceLock<Thread>,
    /// Signalled when the thread parks (for [`Ticker::wait_parked`]).
    parked_signal: (Mutex<()>, Condvar),
}

/// Held by every store: keeps the ticker running while the store exists.
pub(crate) struct StoreLease(Arc<Ticker>);

impl Drop for StoreLease {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticker {
    /// Starts the ticker thread; `advance` increments the epoch of every
    /// engine at each tick.
    pub(crate) fn spawn(
        tick: Duration,
        idle_before_park: Duration,
        advance: impl Fn() + Send + 'static,
    ) -> std::io::Result<Arc<Ticker>> {
        let ticker = Arc::new(Ticker {
            live: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            thread: OnceLock::new(),
            parked_signal: (Mutex::new(()), Condvar::new()),
        });
        let idle_ticks = idle_before_park
            .as_nanos()
            .div_ceil(tick.as_nanos().max(1))
            .max(1);
        let state = ticker.clone();
        let handle = std::thread::Builder::new()
            .name("ignis-epoch".into())
            .spawn(move || state.run(tick, idle_ticks, advance))?;
        // `set` cannot fail: this is the only place that sets it. Leases
        // exist only once `spawn` has returned, so every unpark finds it.
        let _ = ticker.thread.set(handle.thread().clone());
        Ok(ticker)
    }

    fn run(&self, tick: Duration, idle_ticks: u128, advance: impl Fn()) {
        let mut idle = 0u128;
        // Stopped, it still ticks while a store lives: a guest running on
        // a scheduler thread ends (or sees its cancellation) only at an
        // epoch yield, and the scheduler joins that thread after the
        // ticker was told to stop.
        while !self.stop.load(Ordering::SeqCst) || self.live.load(Ordering::SeqCst) > 0 {
            if self.live.load(Ordering::SeqCst) > 0 {
                idle = 0;
            } else {
                idle += 1;
                if idle >= idle_ticks {
                    self.park_while_idle();
                    idle = 0;
                    continue;
                }
            }
            std::thread::sleep(tick);
            advance();
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Parks until a lease is taken (or the ticker stops).
    ///
    /// The flag and the count form a Dekker pair, both sequentially
    /// consistent: either this thread sees the new lease and does not park,
    /// or the lease sees `parked` and unparks it (an unpark before `park`
    /// makes `park` return at once).
    fn park_while_idle(&self) {
        self.parked.store(true, Ordering::SeqCst);
        {
            let _guard = self
                .parked_signal
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.parked_signal.1.notify_all();
        }
        while self.live.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::SeqCst) {
            std::thread::park();
        }
        self.parked.store(false, Ordering::SeqCst);
    }

    /// A lease for a new store; unparks the thread if it is parked.
    pub(crate) fn lease(self: &Arc<Self>) -> StoreLease {
        self.live.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.unpark();
        }
        StoreLease(self.clone())
    }

    fn unpark(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// Stops the thread (at its next tick, or at once if it is parked).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.unpark();
    }

    pub(crate) fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    pub(crate) fn is_parked(&self) -> bool {
        self.parked.load(Ordering::SeqCst)
    }

    /// Blocks the calling thread until the ticker is parked, at most
    /// `timeout`; returns whether it is.
    pub(crate) fn wait_parked(&self, timeout: Duration) -> bool {
        let (lock, signal) = &self.parked_signal;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (_guard, _) = signal
            .wait_timeout_while(guard, timeout, |_| !self.is_parked())
            .unwrap_or_else(|e| e.into_inner());
        self.is_parked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticker(idle: Duration) -> Arc<Ticker> {
        Ticker::spawn(Duration::from_millis(1), idle, || {}).unwrap()
    }

    /// Waits until the tick count passes `after`; false after five seconds.
    fn ticks_pass(t: &Ticker, after: u64) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if t.ticks() > after {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    #[test]
    fn parks_when_no_store_exists_and_a_lease_wakes_it() {
        let t = ticker(Duration::from_millis(5));
        assert!(t.wait_parked(Duration::from_secs(5)), "ticker never parked");
        let before = t.ticks();
        let lease = t.lease();
        assert!(ticks_pass(&t, before), "a lease did not restart the ticks");
        assert!(!t.is_parked());
        drop(lease);
        assert!(
            t.wait_parked(Duration::from_secs(5)),
            "ticker did not park again"
        );
        t.stop();
    }

    #[test]
    fn a_held_lease_keeps_it_ticking() {
        let t = ticker(Duration::from_millis(2));
        let _lease = t.lease();
        // Well past the idle period: still ticking, never parked.
        let start = t.ticks();
        assert!(ticks_pass(&t, start + 50));
        assert!(!t.is_parked());
        t.stop();
    }

    /// A guest still running when the server stops (a cancelled CPU hog on
    /// a scheduler thread) can only stop at its next epoch yield, and the
    /// scheduler joins its threads after the ticker is told to stop. Before
    /// this, a stopped ticker stopped at once: that guest spun forever and
    /// the shutdown hung (found by the e2e test
    /// `a_shared_instance_runs_on_the_connections_runtime_until_it_hogs_the_cpu`);
    /// this test failed then.
    #[test]
    fn a_stopped_ticker_ticks_on_while_a_store_lives() {
        let t = ticker(Duration::from_millis(1));
        let lease = t.lease();
        t.stop();
        let stopped = t.ticks();
        assert!(ticks_pass(&t, stopped + 5), "no tick after stop");
        drop(lease);
    }

    /// Leases taken at every point of the thread's cycle (while it ticks,
    /// as it parks, after it parked) are never lost: each one sees the
    /// ticks advance.
    #[test]
    fn no_lease_is_lost_to_a_racing_park() {
        let t = ticker(Duration::from_millis(1));
        for i in 0..300u32 {
            // The thread parks about one tick after the last lease is gone;
            // spread the next lease over 0-3 ticks from then.
            let delay = Duration::from_micros(u64::from(i % 30) * 100);
            let from = std::time::Instant::now();
            while from.elapsed() < delay {
                std::hint::spin_loop();
            }
            let before = t.ticks();
            let lease = t.lease();
            assert!(
                ticks_pass(&t, before),
                "lost wake-up: ticks stuck at {before}"
            );
            drop(lease);
        }
        t.stop();
    }
}
