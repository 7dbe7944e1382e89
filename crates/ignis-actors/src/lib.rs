//! Function actors and the fair guest scheduler.
//!
//! Every deployed function is a [`FunctionActor`]: a concurrency cap, a
//! bounded mailbox of requests waiting for an instance, a queue deadline and
//! counters. The edge hands each request to [`FunctionActor::call`]; the
//! actor runs it at once if an instance slot is free, queues it if the
//! mailbox has room, and otherwise sheds it with [`CallError::MailboxFull`]
//! (503 + `Retry-After`) without touching the runtime. A queued request that
//! waits past the queue deadline is shed too ([`CallError::QueueTimeout`]).
//!
//! The actor is a state machine, not a task: admission runs in the caller's
//! task under the actor's semaphore, so accepting a request costs no extra
//! hop and shedding one costs a few atomic operations.
//!
//! [`FairScheduler`] is the process-wide scheduler for guests that outlast
//! their first slice (see `ignis_runtime::sched`): weighted fair queueing by
//! virtual CPU time across tenants, on dedicated low-priority threads.
//! [`ActorDirectory`] runs durable actors: one activation per
//! `(class, id)`, messages one at a time (input gate), replies released
//! after their writes are durable (output gate), persisted alarms and idle
//! eviction.
//!
//! docs/actors.md states the semantics.

mod durable;
mod function;
mod scheduler;

pub use durable::{ALARM_FIRST_BACKOFF, ALARM_MAX_ATTEMPTS, ActorDirectory, DirectoryStats};
pub use function::{ActorStats, Admission, CallError, FunctionActor, Slot};
pub use scheduler::{FairScheduler, TenantStats};
