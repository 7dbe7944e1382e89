//! Per-request limits: memory (a `ResourceLimiter`) and CPU time (measured
//! while the guest future is polled).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::guest::GuestStats;
use crate::sched::CpuInstant;

use wasmtime::ResourceLimiter;

/// Most core instances, linear memories and tables one instance (a
/// component and everything it contains) may have. The pooling allocator
/// enforces the same caps per component (`engine.rs`); this limiter
/// enforces them with the on-demand allocator too.
pub(crate) const MAX_CORE_INSTANCES: u32 = 64;
/// See [`MAX_CORE_INSTANCES`].
pub(crate) const MAX_MEMORIES: u32 = 4;
/// See [`MAX_CORE_INSTANCES`].
pub(crate) const MAX_TABLES: u32 = 16;
/// Table elements one instance may hold, all tables together.
pub(crate) const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Caps an instance's memory and table growth, counted over all its linear
/// memories and all its tables together (a component with N memories gets
/// the function's `memory` in total, not N times it), and remembers whether
/// it said no, so a trap that follows can be reported as "memory limit
/// exceeded".
///
/// A growth the limiter allowed but wasmtime then failed stays counted:
/// the error is on the side of refusing.
pub(crate) struct MemoryLimiter {
    max_memory: usize,
    max_table_elements: usize,
    memory_total: usize,
    table_total: usize,
    pub(crate) denied: bool,
    /// Where the largest memory total is kept (`memory_high_water`).
    stats: Option<Arc<GuestStats>>,
}

impl MemoryLimiter {
    pub(crate) fn new(max_memory: u64) -> Self {
        MemoryLimiter {
            max_memory: usize::try_from(max_memory).unwrap_or(usize::MAX),
            max_table_elements: MAX_TABLE_ELEMENTS,
            memory_total: 0,
            table_total: 0,
            denied: false,
            stats: None,
        }
    }

    /// Records the instance's memory total, each time it grows, into
    /// `stats.memory_high_water` (a growth is rare: no cost per request).
    pub(crate) fn recording_into(mut self, stats: Arc<GuestStats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Bytes of linear memory the instance holds, all memories together.
    #[cfg(test)]
    pub(crate) fn memory_total(&self) -> usize {
        self.memory_total
    }
}

/// Lets one memory (or table) of an instance go from `current` to
/// `desired` if the instance's `total` stays within `max`; a refusal sets
/// `denied`.
fn grow_within(
    total: &mut usize,
    denied: &mut bool,
    (current, desired): (usize, usize),
    max: usize,
) -> bool {
    match total.checked_add(desired.saturating_sub(current)) {
        Some(grown) if grown <= max => {
            *total = grown;
            true
        }
        _ => {
            *denied = true;
            false
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let max = self.max_memory;
        let grown = grow_within(
            &mut self.memory_total,
            &mut self.denied,
            (current, desired),
            max,
        );
        if let (true, Some(stats)) = (grown, &self.stats) {
            stats
                .memory_high_water
                .fetch_max(self.memory_total as u64, Ordering::Relaxed);
        }
        Ok(grown)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let max = self.max_table_elements;
        Ok(grow_within(
            &mut self.table_total,
            &mut self.denied,
            (current, desired),
            max,
        ))
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES as usize
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES as usize
    }

    fn tables(&self) -> usize {
        MAX_TABLES as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_counted_over_all_memories_of_an_instance() {
        let mut limiter = MemoryLimiter::new(10 << 20);
        // Two memories of 4 MiB each fit; a third does not.
        assert!(limiter.memory_growing(0, 4 << 20, None).unwrap());
        assert!(limiter.memory_growing(0, 4 << 20, None).unwrap());
        assert!(!limiter.memory_growing(0, 4 << 20, None).unwrap());
        assert!(limiter.denied);
        // Growing one of them by 2 MiB still fits (8 + 2 = 10 MiB) ...
        assert!(limiter.memory_growing(4 << 20, 6 << 20, None).unwrap());
        assert_eq!(limiter.memory_total(), 10 << 20);
        // ... and by one more byte does not.
        assert!(
            !limiter
                .memory_growing(6 << 20, (6 << 20) + 1, None)
                .unwrap()
        );
    }

    #[test]
    fn table_elements_are_counted_over_all_tables() {
        let mut limiter = MemoryLimiter::new(1 << 20);
        assert!(
            limiter
                .table_growing(0, MAX_TABLE_ELEMENTS / 2, None)
                .unwrap()
        );
        assert!(
            limiter
                .table_growing(0, MAX_TABLE_ELEMENTS / 2, None)
                .unwrap()
        );
        assert!(!limiter.table_growing(0, 1, None).unwrap());
        assert!(
            !limiter
                .table_growing(usize::MAX - 1, usize::MAX, None)
                .unwrap()
        );
    }
}

/// Wraps the future that runs a guest and stops it once the time spent inside
/// `poll` (guest code plus synchronous host calls) passes the budget. Epoch
/// slices make the guest return `Pending` at every tick, so the check runs at
/// least once per slice even for a guest that never yields on its own.
///
/// When it is dropped (finished, stopped or cancelled) the CPU it measured is
/// reported to `on_drop`.
pub(crate) struct CpuBudget<F, R: FnMut(Duration)> {
    inner: Pin<Box<F>>,
    budget: Duration,
    used: Duration,
    on_drop: R,
}

impl<F, R: FnMut(Duration)> Drop for CpuBudget<F, R> {
    fn drop(&mut self) {
        (self.on_drop)(self.used);
    }
}

/// The budget ran out.
#[derive(Debug)]
pub(crate) struct CpuExceeded;

impl<F: Future, R: FnMut(Duration)> CpuBudget<F, R> {
    pub(crate) fn new(inner: F, budget: Duration, on_drop: R) -> Self {
        CpuBudget {
            inner: Box::pin(inner),
            budget,
            used: Duration::ZERO,
            on_drop,
        }
    }
}

impl<F: Future, R: FnMut(Duration) + Unpin> Future for CpuBudget<F, R> {
    type Output = Result<F::Output, CpuExceeded>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let start = CpuInstant::now();
        let polled = self.inner.as_mut().poll(cx);
        self.used += start.elapsed();
        match polled {
            Poll::Ready(v) => Poll::Ready(Ok(v)),
            Poll::Pending if self.used > self.budget => Poll::Ready(Err(CpuExceeded)),
            Poll::Pending => Poll::Pending,
        }
    }
}
