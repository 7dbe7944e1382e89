//! The function actor: admission, mailbox, queue deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use ignis_runtime::{Body, Function, GuestError, HttpError, RequestMeta, wait_on};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Why a call did not produce the guest's response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// All instances were busy and the mailbox was full: shed at once.
    #[error("function is over capacity: {waiting} requests already waiting")]
    MailboxFull {
        /// Requests waiting when this one arrived.
        waiting: u32,
        /// Suggested client back-off.
        retry_after: Duration,
    },
    /// The request waited in the mailbox past the queue deadline.
    #[error("no instance became free within {waited:?}")]
    QueueTimeout {
        /// The queue deadline it hit.
        waited: Duration,
        /// Suggested client back-off.
        retry_after: Duration,
    },
    /// The guest ran and failed (trap, limits, no response, ...).
    #[error(transparent)]
    Guest(#[from] GuestError),
}

impl CallError {
    /// The HTTP status the edge answers with.
    pub fn status(&self) -> u16 {
        match self {
            CallError::MailboxFull { .. } | CallError::QueueTimeout { .. } => 503,
            CallError::Guest(e) => e.status(),
        }
    }

    /// The `Retry-After` to send with a shed request.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::MailboxFull { retry_after, .. }
            | CallError::QueueTimeout { retry_after, .. } => Some(*retry_after),
            CallError::Guest(_) => None,
        }
    }
}

/// Admission counters of one actor.
#[derive(Debug, Default)]
pub struct ActorStats {
    /// Requests that got an instance slot (at once or after waiting).
    pub admitted: AtomicU64,
    /// Requests that had to wait in the mailbox.
    pub queued: AtomicU64,
    /// Requests waiting in the mailbox now.
    pub waiting: AtomicU32,
    /// Requests shed because the mailbox was full.
    pub shed_full: AtomicU64,
    /// Requests shed at the queue deadline.
    pub shed_timeout: AtomicU64,
    changed: Notify,
}

impl ActorStats {
    /// Waits until `check` holds; re-checked whenever a counter changes.
    pub async fn wait_until(&self, check: impl Fn(&Self) -> bool) {
        wait_on(&self.changed, || check(self)).await;
    }

    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// One deployed function as an actor (see the crate docs).
pub struct FunctionActor {
    function: Arc<Function>,
    admission: Admission,
}

/// The admission state machine of one actor: instance slots, the mailbox
/// bound and the queue deadline.
pub struct Admission {
    slots: Arc<Semaphore>,
    mailbox: u32,
    queue_timeout: Duration,
    retry_after: Duration,
    stats: ActorStats,
}

/// An admitted request's instance slot; released when dropped.
pub type Slot = OwnedSemaphorePermit;

/// Decrements the waiting count however the wait ends (slot, deadline, or
/// the caller dropping the request).
struct Waiting<'a>(&'a ActorStats);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl FunctionActor {
    /// An actor for `function`, with its limits' `max_concurrency`,
    /// `mailbox` and `queue_timeout`.
    pub fn new(function: Arc<Function>) -> Arc<FunctionActor> {
        let limits = function.limits();
        let admission =
            Admission::new(limits.max_concurrency, limits.mailbox, limits.queue_timeout);
        Arc::new(FunctionActor {
            function,
            admission,
        })
    }

    /// The function this actor runs.
    pub fn function(&self) -> &Arc<Function> {
        &self.function
    }

    /// Admission counters.
    pub fn stats(&self) -> &ActorStats {
        &self.admission.stats
    }

    /// Runs `request` if admitted. Shed requests return at once (mailbox
    /// full) or at the queue deadline, without instantiating anything.
    pub async fn call<B>(
        &self,
        request: http::Request<B>,
        meta: RequestMeta,
    ) -> Result<http::Response<Body>, CallError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<HttpError>,
    {
        let slot = self.admission.admit().await?;
        Ok(self.function.handle(request, meta, Some(slot)).await?)
    }
}

impl Admission {
    /// `max_concurrency` slots, up to `mailbox` waiting for `queue_timeout`.
    pub fn new(max_concurrency: u32, mailbox: u32, queue_timeout: Duration) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(max_concurrency as usize)),
            mailbox,
            queue_timeout,
            // Whole seconds (the header's unit), at least one.
            retry_after: Duration::from_secs(queue_timeout.as_secs_f64().ceil().max(1.0) as u64),
            stats: ActorStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &ActorStats {
        &self.stats
    }

    /// Runs, queues or sheds (see the crate docs).
    pub async fn admit(&self) -> Result<Slot, CallError> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            self.stats.admitted.fetch_add(1, Ordering::Relaxed);
            return Ok(slot);
        }
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = Waiting(&self.stats);
        if waiting >= self.mailbox {
            drop(guard);
            self.stats.bump(&self.stats.shed_full);
            return Err(CallError::MailboxFull {
                waiting,
                retry_after: self.retry_after,
            });
        }
        // tokio's semaphore is fair: waiters get slots in the order they
        // registered. Register (first poll) before counting this request as
        // queued, so the `queued` count follows slot order.
        let mut acquire = std::pin::pin!(tokio::time::timeout(
            self.queue_timeout,
            self.slots.clone().acquire_owned()
        ));
        let first = std::future::poll_fn(|cx| Poll::Ready(acquire.as_mut().poll(cx))).await;
        self.stats.bump(&self.stats.queued);
        let acquired = match first {
            Poll::Ready(acquired) => acquired,
            Poll::Pending => acquire.await,
        };
        drop(guard);
        match acquired {
            Ok(Ok(slot)) => {
                self.stats.bump(&self.stats.admitted);
                Ok(slot)
            }
            _ => {
                self.stats.bump(&self.stats.shed_timeout);
                Err(CallError::QueueTimeout {
                    waited: self.queue_timeout,
                    retry_after: self.retry_after,
                })
            }
        }
    }
}
