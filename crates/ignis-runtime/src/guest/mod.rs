//! Running a guest under its limits: the one core shared by function
//! requests, actor messages and alarms (and, later, cron triggers).
//!
//! [`run_limited`] wraps a guest future in a CPU budget (time spent inside
//! `poll`, checked at least once per epoch slice because the store yields
//! at every tick) and a wall deadline, and turns what happened into an
//! [`Outcome`], counting it in the owner's [`GuestStats`]. It logs nothing:
//! failures travel as [`Error`]s to the one place that logs them.

mod stats;

pub use stats::{GuestStats, ROUTE_BUCKETS, route_bucket, wait_on};

use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, ErrorKind};
use crate::limits::{CpuBudget, CpuExceeded};

/// How a guest run ended.
pub(crate) enum Outcome<T> {
    /// The guest returned.
    Done(T),
    /// The guest trapped (not for memory).
    Trap(wasmtime::Error),
    /// The guest trapped after the memory limiter refused to grow.
    Memory,
    /// The CPU budget ran out.
    Cpu,
    /// The wall deadline passed.
    Wall,
}

impl<T> Outcome<T> {
    /// The guest's value, or the error a client gets.
    pub(crate) fn into_result(self) -> Result<T, Error> {
        match self {
            Outcome::Done(v) => Ok(v),
            Outcome::Trap(e) => Err(Error::trap(e)),
            Outcome::Memory => Err(Error::new(ErrorKind::MemoryLimit)),
            Outcome::Cpu => Err(Error::new(ErrorKind::CpuLimit)),
            Outcome::Wall => Err(Error::new(ErrorKind::WallLimit)),
        }
    }
}

/// The limits of one run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunLimits {
    /// Wall-clock deadline of the whole run.
    pub(crate) deadline: Instant,
    /// CPU time the run may use.
    pub(crate) cpu: Duration,
    /// A run that used at least this much CPU counts as a hog
    /// ([`GuestStats::route_mostly_hogs`]).
    pub(crate) hog_above: Duration,
    /// The run's route bucket, for the per-route hog score
    /// ([`GuestStats::route_mostly_hogs`]); `None` for actors.
    pub(crate) route: Option<usize>,
}

/// Runs `guest` under `limits`. The guest's output is its result and
/// whether the memory limiter refused growth during the run (then a trap is
/// reported as [`Outcome::Memory`]). CPU used is added to `stats` however
/// the run ends, including when this future is dropped.
pub(crate) async fn run_limited<T>(
    guest: impl Future<Output = (wasmtime::Result<T>, bool)> + Send,
    limits: RunLimits,
    stats: &GuestStats,
) -> Outcome<T> {
    let budget = CpuBudget::new(guest, limits.cpu, |used| {
        stats.record_cpu(used, limits.hog_above, limits.route)
    });
    let outcome = match tokio::time::timeout_at(limits.deadline, budget).await {
        Err(_) => Outcome::Wall,
        Ok(Err(CpuExceeded)) => Outcome::Cpu,
        Ok(Ok((Ok(v), _))) => Outcome::Done(v),
        Ok(Ok((Err(_), true))) => Outcome::Memory,
        Ok(Ok((Err(e), false))) => Outcome::Trap(e),
    };
    stats.record_outcome(&outcome);
    outcome
}
