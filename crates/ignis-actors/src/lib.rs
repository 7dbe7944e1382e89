//! Admission in front of functions, and durable actors.
//!
//! Every deployed function sits behind a [`FunctionGate`]: a concurrency
//! cap, a bounded mailbox of requests waiting for an instance, a queue
//! deadline and counters. The edge hands each request to
//! [`FunctionGate::call`]; the gate runs it at once if an instance slot is
//! free, queues it if the mailbox has room, and otherwise sheds it with an
//! [`ErrorKind::Overloaded`](ignis_runtime::ErrorKind::Overloaded) error
//! (503 + `Retry-After`) without touching the runtime. A queued request
//! that waits past the queue deadline is shed too
//! ([`ErrorKind::QueueTimeout`](ignis_runtime::ErrorKind::QueueTimeout)).
//!
//! The gate is a state machine, not a task: admission runs in the caller's
//! task under the gate's semaphore, so accepting a request costs no extra
//! hop and shedding one costs a few atomic operations.
//!
//! [`ActorDirectory`] runs durable actors: one activation per
//! `(class, id)`, messages one at a time (input gate), replies released
//! after their writes are durable (output gate), persisted alarms and idle
//! eviction.
//!
//! [`cron::CronTriggers`] call functions and actors on a schedule.
//!
//! docs/scheduling.md states the admission semantics, docs/actors.md the
//! durable actors', docs/operations.md the cron triggers'.

mod admission;
pub mod cron;
mod durable;

pub use admission::{Admission, AdmissionStats, FunctionGate, Slot, retry_after};
pub use cron::CronClaim;
pub use durable::{
    ALARM_FIRST_BACKOFF, ALARM_MAX_ATTEMPTS, ActorDirectory, CALLER_HEADER, ClassStats, Cluster,
    ClusterFuture, DirectoryStats, Forward, MAX_HOPS, Placement,
};
