//! Durable actors: the directory of activations, the input and output
//! gates, alarms and idle eviction. docs/actors.md states the guarantees.
//!
//! Per `(class, id)` there is at most one activation on the node: a task
//! that owns the instance and takes messages from a bounded mailbox one at
//! a time, in arrival order (the input gate). A message's writes become one
//! batch; the batch is handed to the directory's committer and the
//! activation goes on with the next message at once, reading the pending
//! batch through the overlay. The committer takes every batch that queued
//! (from any actor) while the previous commit ran and commits them in one
//! storage call (one fsync), each actor's part atomic on its own, and
//! releases the replies only after that commit is durable (the output
//! gate). If a commit fails, its replies and those of
//! every message that ran after it become errors, and the activation is
//! reset before its next message.

mod alarms;
mod committer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use ignis_runtime::actor::{Activation, ActorCallFuture, ActorCaller, ActorClass, Overlay};
use ignis_runtime::{Error, ErrorKind, next_request_id, wait_on};
use ignis_store::{ActorBatch, ActorKey, ActorStorage, AlarmChange};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::admission::retry_after;
use alarms::{AlarmCommand, alarm_loop};
use committer::run_committer;

/// Attempts of an alarm before it is dropped.
pub const ALARM_MAX_ATTEMPTS: u32 = 7;
/// Delay before the first retry of a failed alarm; doubled each time.
pub const ALARM_FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Counters of the directory.
#[derive(Debug, Default)]
pub struct DirectoryStats {
    /// Activations started (instances created).
    pub activations: AtomicU64,
    /// Activations evicted after their idle time.
    pub evictions: AtomicU64,
    /// Activations alive now.
    pub active: AtomicU64,
    /// Messages handled (replied, successfully or not).
    pub messages: AtomicU64,
    /// Storage commits made by committers.
    pub commits: AtomicU64,
    /// Activations reset after a trap, a limit or a failed commit.
    pub resets: AtomicU64,
    /// Alarm deliveries whose handler succeeded.
    pub alarms_fired: AtomicU64,
    /// Alarm deliveries that failed and were rescheduled.
    pub alarm_retries: AtomicU64,
    changed: Notify,
}

impl DirectoryStats {
    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits until `check` holds; re-checked whenever a counter changes.
    pub async fn wait_until(&self, check: impl Fn(&Self) -> bool) {
        wait_on(&self.changed, || check(self)).await;
    }
}

const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

type Reply = Result<http::Response<Bytes>, Error>;

enum Envelope {
    Http {
        request: Box<http::Request<Bytes>>,
        request_id: u64,
        reply: oneshot::Sender<Reply>,
        state: Arc<AtomicU8>,
    },
    Alarm {
        at: u64,
        retry: u32,
    },
}

struct Handle {
    tx: mpsc::Sender<Envelope>,
}

/// What a committed batch answers.
enum Waiter {
    Http(oneshot::Sender<Reply>, http::Response<Bytes>),
    Alarm { at: u64, retry: u32 },
}

struct Pending {
    actor: Arc<ActorState>,
    epoch: u64,
    batch: ActorBatch,
    seq: u64,
    request_id: u64,
    waiter: Waiter,
}

/// The node's durable actors.
pub struct ActorDirectory {
    classes: HashMap<String, Arc<ActorClass>>,
    storage: Arc<dyn ActorStorage>,
    activations: Mutex<HashMap<ActorKey, Handle>>,
    alarms: mpsc::UnboundedSender<AlarmCommand>,
    commits: mpsc::UnboundedSender<Pending>,
    stats: Arc<DirectoryStats>,
    me: Weak<ActorDirectory>,
}

/// What an activation shares with the committer.
struct ActorState {
    key: ActorKey,
    overlay: Arc<Mutex<Overlay>>,
    /// Set when a commit failed; the activation resets before its next message.
    failed: AtomicBool,
    /// Batches of this epoch or older fail (they may have read a failed write).
    failed_epoch: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ActorDirectory {
    /// The directory for `classes`, sharing `storage`. Its alarm task
    /// loads the persisted alarms and schedules them (past-due ones fire at
    /// once). Must be called inside a tokio runtime.
    pub fn start(
        classes: Vec<Arc<ActorClass>>,
        storage: Arc<dyn ActorStorage>,
    ) -> Arc<ActorDirectory> {
        let (alarms, commands) = mpsc::unbounded_channel();
        let (commits, commit_rx) = mpsc::unbounded_channel();
        let dir = Arc::new_cyclic(|me| ActorDirectory {
            classes: classes
                .into_iter()
                .map(|c| (c.name().to_string(), c))
                .collect(),
            storage,
            activations: Mutex::new(HashMap::new()),
            alarms,
            commits,
            stats: Arc::new(DirectoryStats::default()),
            me: me.clone(),
        });
        tokio::spawn(run_committer(Arc::downgrade(&dir), commit_rx));
        tokio::spawn(alarm_loop(
            Arc::downgrade(&dir),
            dir.storage.clone(),
            dir.alarms.clone(),
            commands,
        ));
        dir
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<DirectoryStats> {
        &self.stats
    }

    /// Whether actor `(class, id)` has a live activation.
    pub fn is_active(&self, class: &str, id: &str) -> bool {
        lock(&self.activations).contains_key(&ActorKey::new(class, id))
    }

    /// The class named `name`.
    pub fn class(&self, name: &str) -> Option<&Arc<ActorClass>> {
        self.classes.get(name)
    }

    /// Puts `envelope` in the actor's mailbox, starting an activation if
    /// there is none. Under the directory lock, so an eviction cannot drop it.
    fn enqueue(&self, class: &Arc<ActorClass>, id: &str, envelope: Envelope) -> Result<(), Error> {
        let key = ActorKey::new(class.name(), id);
        let mut activations = lock(&self.activations);
        let handle = activations.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(class.config().limits.mailbox as usize);
            let me = self
                .me
                .upgrade()
                .expect("the directory is alive while called");
            tokio::spawn(run_activation(me, class.clone(), key, rx));
            Handle { tx }
        });
        let limits = &class.config().limits;
        match handle.tx.try_send(envelope) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Error::shed(
                ErrorKind::Overloaded,
                retry_after(limits.queue_timeout),
            )
            .context(format!(
                "actor {}/{id}: mailbox full ({} waiting)",
                class.name(),
                limits.mailbox
            ))),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(activation_ended()),
        }
    }

    /// Sends `request` (of request `request_id`) to actor `(class, id)`;
    /// resolves with its reply once the writes it made are durable.
    pub async fn send(
        &self,
        class: &str,
        id: &str,
        request: http::Request<Bytes>,
        request_id: u64,
    ) -> Result<http::Response<Bytes>, Error> {
        let class = self
            .classes
            .get(class)
            .ok_or_else(|| {
                Error::new(ErrorKind::NotFound).context(format!("no actor class named `{class}`"))
            })?
            .clone();
        let (reply, mut answer) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        self.enqueue(
            &class,
            id,
            Envelope::Http {
                request: Box::new(request),
                request_id,
                reply,
                state: state.clone(),
            },
        )?;
        let deadline = class.config().limits.queue_timeout;
        tokio::select! {
            r = &mut answer => return r.unwrap_or_else(|_| Err(activation_ended())),
            () = tokio::time::sleep(deadline) => {}
        }
        // Still not started after the queue deadline: give up on it, unless
        // it started meanwhile (then its reply is coming).
        if state
            .compare_exchange(QUEUED, ABANDONED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Err(
                Error::shed(ErrorKind::QueueTimeout, retry_after(deadline)).context(format!(
                    "actor {}/{id}: busy for longer than its queue_timeout ({deadline:?})",
                    class.name()
                )),
            );
        }
        answer.await.unwrap_or_else(|_| Err(activation_ended()))
    }

    fn deliver_alarm(&self, key: &ActorKey, at: u64, retry: u32) {
        let Some(class) = self.classes.get(key.class()).cloned() else {
            tracing::warn!(actor = ?key, "alarm for a class that is not deployed; dropped");
            return;
        };
        if let Err(e) = self.enqueue(&class, key.id(), Envelope::Alarm { at, retry }) {
            tracing::warn!(actor = ?key, error = %e, "alarm could not be queued; retrying");
            let _ = self
                .alarms
                .send(AlarmCommand::Retry(key.clone(), at, retry));
        }
    }
}

/// The activation task ended with the message still in its mailbox (it
/// panicked or was shut down).
fn activation_ended() -> Error {
    Error::new(ErrorKind::Internal).context("the actor's activation ended")
}

impl ActorCaller for ActorDirectory {
    fn call(
        &self,
        class: &str,
        id: &str,
        request: http::Request<Bytes>,
        request_id: u64,
    ) -> ActorCallFuture {
        let me = self
            .me
            .upgrade()
            .expect("the directory is alive while called");
        let (class, id) = (class.to_string(), id.to_string());
        Box::pin(async move { me.send(&class, &id, request, request_id).await })
    }
}

/// One activation: the input gate. Ends when evicted.
async fn run_activation(
    dir: Arc<ActorDirectory>,
    class: Arc<ActorClass>,
    key: ActorKey,
    mut rx: mpsc::Receiver<Envelope>,
) {
    let state = Arc::new(ActorState {
        key: key.clone(),
        overlay: Arc::new(Mutex::new(Overlay::default())),
        failed: AtomicBool::new(false),
        failed_epoch: AtomicU64::new(0),
    });
    let idle = class.config().idle_timeout;
    let mut activation: Option<Activation> = None;
    let mut epoch = 1u64;
    let mut seq = 0u64;
    loop {
        let envelope = match tokio::time::timeout(idle, rx.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(_) => {
                // Idle: evict unless replies still wait for their commit or
                // a message raced in (checked under the directory lock).
                if !lock(&state.overlay).is_empty() {
                    continue;
                }
                let mut activations = lock(&dir.activations);
                if !rx.is_empty() {
                    continue;
                }
                activations.remove(&key);
                drop(activations);
                if activation.take().is_some() {
                    dir.stats.active.fetch_sub(1, Ordering::SeqCst);
                }
                dir.stats.bump(&dir.stats.evictions);
                tracing::debug!(actor = ?key, "activation evicted after {idle:?} idle");
                break;
            }
        };
        if state.failed.swap(false, Ordering::SeqCst) {
            // A commit failed: everything after it was answered with an
            // error; start over from what is durable.
            reset(&dir, &mut activation, &state.overlay);
            epoch += 1;
        }
        let (run, request_id, waiter_for): (_, u64, WaiterFor) = match envelope {
            Envelope::Http {
                request,
                request_id,
                reply,
                state,
            } => {
                if state
                    .compare_exchange(QUEUED, STARTED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    continue; // abandoned at its queue deadline
                }
                (
                    Message::Http(request),
                    request_id,
                    Box::new(move |resp| Waiter::Http(reply, resp)),
                )
            }
            Envelope::Alarm { at, retry } => (
                Message::Alarm { at, retry },
                next_request_id(),
                Box::new(move |_| Waiter::Alarm { at, retry }),
            ),
        };
        if activation.is_none() {
            match class
                .activate(key.id(), state.overlay.clone(), request_id)
                .await
            {
                Ok(a) => {
                    activation = Some(a);
                    dir.stats.bump(&dir.stats.activations);
                    dir.stats.active.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    let waiter = waiter_for(http::Response::new(Bytes::new()));
                    let e = e.context(format!("activating actor {key:?}"));
                    complete(&dir, &key, request_id, Err(e), waiter);
                    continue;
                }
            }
        }
        let instance = activation.as_mut().expect("activated above");
        let outcome = match run {
            Message::Http(request) => instance.handle(*request, request_id).await,
            Message::Alarm { at, retry } => {
                instance.alarm(retry, request_id).await.map(|mut batch| {
                    // The alarm is done unless the handler set it again.
                    batch.alarm = batch.alarm.or(Some(AlarmChange::Fired(at)));
                    (http::Response::new(Bytes::new()), batch)
                })
            }
        };
        match outcome {
            Ok((response, batch)) => {
                if batch.is_empty() && lock(&state.overlay).is_empty() {
                    // Nothing to make durable, before or in this message.
                    complete(&dir, &key, request_id, Ok(()), waiter_for(response));
                } else {
                    seq += 1;
                    lock(&state.overlay).push(seq, batch.clone());
                    let _ = dir.commits.send(Pending {
                        actor: state.clone(),
                        epoch,
                        batch,
                        seq,
                        request_id,
                        waiter: waiter_for(response),
                    });
                }
            }
            Err(e) => {
                // The writes are discarded; the instance may be poisoned:
                // drop it. Pending batches of earlier messages are
                // unaffected. The error goes to the caller, which logs it.
                tracing::debug!(actor = ?key, request_id, "actor message failed; activation reset");
                if activation.take().is_some() {
                    dir.stats.active.fetch_sub(1, Ordering::SeqCst);
                }
                dir.stats.bump(&dir.stats.resets);
                let waiter = waiter_for(http::Response::new(Bytes::new()));
                complete(&dir, &key, request_id, Err(e), waiter);
            }
        }
    }
    if activation.take().is_some() {
        dir.stats.active.fetch_sub(1, Ordering::SeqCst);
        dir.stats.changed.notify_waiters();
    }
}

/// Builds a message's waiter from its response.
type WaiterFor = Box<dyn FnOnce(http::Response<Bytes>) -> Waiter + Send>;

enum Message {
    Http(Box<http::Request<Bytes>>),
    Alarm { at: u64, retry: u32 },
}

fn reset(dir: &ActorDirectory, activation: &mut Option<Activation>, overlay: &Mutex<Overlay>) {
    if activation.take().is_some() {
        dir.stats.active.fetch_sub(1, Ordering::SeqCst);
    }
    lock(overlay).clear();
    dir.stats.bump(&dir.stats.resets);
}

/// Answers a waiter: the reply is released (an error goes to the caller,
/// which logs it), or the alarm is retried (its error is logged here: no
/// caller waits for it).
fn complete(
    dir: &ActorDirectory,
    key: &ActorKey,
    request_id: u64,
    outcome: Result<(), Error>,
    waiter: Waiter,
) {
    match (waiter, outcome) {
        (Waiter::Http(reply, resp), Ok(())) => {
            let _ = reply.send(Ok(resp));
        }
        (Waiter::Http(reply, _), Err(e)) => {
            let _ = reply.send(Err(e));
        }
        (Waiter::Alarm { .. }, Ok(())) => dir.stats.bump(&dir.stats.alarms_fired),
        (Waiter::Alarm { at, retry }, Err(e)) => {
            tracing::warn!(actor = ?key, request_id, retry, detail = %e.detail(), "alarm delivery failed");
            dir.stats.bump(&dir.stats.alarm_retries);
            let _ = dir
                .alarms
                .send(AlarmCommand::Retry(key.clone(), at, retry + 1));
        }
    }
    dir.stats.bump(&dir.stats.messages);
}
