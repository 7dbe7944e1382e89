//! A fixed-bucket histogram of durations, lock-free: recording is one
//! bucket search over 16 bounds and two relaxed atomic adds, so every
//! request can be recorded (request latency at the edge, instantiation
//! time, storage commit latency) without a lock shared by all connections.
//! Read at scrape time by the admin listener's Prometheus exposition. It
//! lives here, in the lowest crate that records one; `ignis-runtime`
//! re-exports it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (the last bucket, past 10 s, is
/// `+Inf`). From 50 µs (an instantiation) to 10 s (a slow origin).
pub const BOUNDS_SECONDS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

const BOUNDS_NANOS: [u64; 16] = {
    let mut out = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = (BOUNDS_SECONDS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// Durations counted into [`BOUNDS_SECONDS`] buckets, with their count
/// and sum.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 17],
    sum_nanos: AtomicU64,
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Sum of the recorded durations, in seconds.
    pub sum_seconds: f64,
    /// How many were recorded.
    pub count: u64,
    /// `(upper bound in seconds, count in this bucket alone)`, the last
    /// bound `f64::MAX` (`+Inf`); not cumulative.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NANOS.partition_point(|&b| b < nanos);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The current values. Taken without a lock: a scrape racing a record
    /// may see its bucket and not yet its sum (the count is the buckets'
    /// sum, so the two always agree).
    pub fn snapshot(&self) -> Snapshot {
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let bound = BOUNDS_SECONDS.get(i).copied().unwrap_or(f64::MAX);
                (bound, b.load(Ordering::Relaxed))
            })
            .collect();
        Snapshot {
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_the_bucket_whose_bound_covers_them() {
        let h = Histogram::default();
        h.record(Duration::from_micros(50)); // on the first bound: first bucket
        h.record(Duration::from_micros(51));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60)); // past the last bound: +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(h.count(), 4);
        assert_eq!(s.buckets[0], (0.00005, 1));
        assert_eq!(s.buckets[1], (0.0001, 1));
        assert_eq!(s.buckets[6], (0.005, 1));
        assert_eq!(s.buckets[16], (f64::MAX, 1));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 4);
        assert!(
            (s.sum_seconds - 60.003101).abs() < 1e-9,
            "{}",
            s.sum_seconds
        );
    }
}
