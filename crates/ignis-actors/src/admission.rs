//! The admission gate in front of every function: a concurrency cap, a
//! bounded mailbox and a queue deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use ignis_runtime::{Body, Error, ErrorKind, Function, HttpError, RequestMeta, wait_on};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Admission counters of one gate.
#[derive(Debug, Default)]
pub struct AdmissionStats {
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

impl AdmissionStats {
    /// Waits until `check` holds; re-checked whenever a counter changes.
    pub async fn wait_until(&self, check: impl Fn(&Self) -> bool) {
        wait_on(&self.changed, || check(self)).await;
    }

    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// One deployed function behind its admission gate (see the crate docs).
pub struct FunctionGate {
    function: Arc<Function>,
    admission: Admission,
}

/// The admission state machine of one gate: instance slots, the mailbox
/// bound and the queue deadline.
pub struct Admission {
    slots: Arc<Semaphore>,
    mailbox: u32,
    queue_timeout: Duration,
    retry_after: Duration,
    stats: AdmissionStats,
}

/// An admitted request's instance slot; released when dropped.
pub type Slot = OwnedSemaphorePermit;

/// Decrements the waiting count however the wait ends (slot, deadline, or
/// the caller dropping the request).
struct Waiting<'a>(&'a AdmissionStats);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl FunctionGate {
    /// A gate for `function`, with its limits' `max_concurrency`,
    /// `mailbox` and `queue_timeout`.
    pub fn new(function: Arc<Function>) -> Arc<FunctionGate> {
        let limits = function.limits();
        let admission =
            Admission::new(limits.max_concurrency, limits.mailbox, limits.queue_timeout);
        Arc::new(FunctionGate {
            function,
            admission,
        })
    }

    /// The function behind the gate.
    pub fn function(&self) -> &Arc<Function> {
        &self.function
    }

    /// Admission counters.
    pub fn stats(&self) -> &AdmissionStats {
        &self.admission.stats
    }

    /// Runs `request` if admitted. Shed requests return at once (mailbox
    /// full) or at the queue deadline, without instantiating anything.
    pub async fn call<B>(
        &self,
        request: http::Request<B>,
        meta: RequestMeta,
    ) -> Result<http::Response<Body>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<HttpError>,
    {
        let slot = self.admission.admit().await?;
        self.function.handle(request, meta, Some(slot)).await
    }
}

impl Admission {
    /// `max_concurrency` slots, up to `mailbox` waiting for `queue_timeout`.
    pub fn new(max_concurrency: u32, mailbox: u32, queue_timeout: Duration) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(max_concurrency as usize)),
            mailbox,
            queue_timeout,
            retry_after: retry_after(queue_timeout),
            stats: AdmissionStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &AdmissionStats {
        &self.stats
    }

    /// Runs, queues or sheds (see the crate docs).
    pub async fn admit(&self) -> Result<Slot, Error> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            self.stats.admitted.fetch_add(1, Ordering::Relaxed);
            return Ok(slot);
        }
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = Waiting(&self.stats);
        if waiting >= self.mailbox {
            drop(guard);
            self.stats.bump(&self.stats.shed_full);
            // No allocation: shedding is the hot path of an overload.
            return Err(Error::shed(ErrorKind::Overloaded, self.retry_after)
                .context("every instance is busy and the mailbox is full"));
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
                Err(Error::shed(ErrorKind::QueueTimeout, self.retry_after)
                    .context(format!("waited {:?} for an instance", self.queue_timeout)))
            }
        }
    }
}

/// The `Retry-After` of a request shed by a gate or an actor mailbox whose
/// queue deadline is `queue_timeout`: that deadline in whole seconds (the
/// header's unit), rounded up, at least one.
pub fn retry_after(queue_timeout: Duration) -> Duration {
    Duration::from_secs(queue_timeout.as_secs_f64().ceil().max(1.0) as u64)
}
