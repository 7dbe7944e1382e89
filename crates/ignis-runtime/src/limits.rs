//! Per-request limits: memory (a `ResourceLimiter`) and CPU time (measured
//! while the guest future is polled).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::sched::CpuInstant;

use wasmtime::ResourceLimiter;

/// Caps linear memory and table growth and remembers whether it said no, so a
/// trap that follows can be reported as "memory limit exceeded".
pub(crate) struct MemoryLimiter {
    pub(crate) max_memory: usize,
    pub(crate) max_table_elements: usize,
    pub(crate) denied: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(max_memory: u64) -> Self {
        MemoryLimiter {
            max_memory: usize::try_from(max_memory).unwrap_or(usize::MAX),
            max_table_elements: 1 << 20,
            denied: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_table_elements {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
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
