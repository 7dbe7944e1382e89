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

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ignis_runtime::actor::{
    Activation, ActorCallError, ActorCallFuture, ActorCaller, ActorClass, Overlay,
};
use ignis_runtime::wait_on;
use ignis_store::{ActorBatch, ActorKey, ActorStorage, AlarmChange};
use tokio::sync::{Notify, mpsc, oneshot};

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

type Reply = Result<http::Response<Bytes>, ActorCallError>;

enum Envelope {
    Http {
        request: Box<http::Request<Bytes>>,
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

enum AlarmCommand {
    /// Schedule (or move) the actor's alarm; `None` cancels it.
    Set(ActorKey, Option<u64>),
    /// A delivery failed: try again after a backoff.
    Retry(ActorKey, u64, u32),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    fn enqueue(
        &self,
        class: &Arc<ActorClass>,
        id: &str,
        envelope: Envelope,
    ) -> Result<(), ActorCallError> {
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
        match handle.tx.try_send(envelope) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(ActorCallError::Busy(format!(
                "{}/{id}: mailbox full ({} waiting)",
                class.name(),
                class.config().limits.mailbox
            ))),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ActorCallError::Failed(format!(
                "{}/{id}: activation ended",
                class.name()
            ))),
        }
    }

    /// Sends `request` to actor `(class, id)`; resolves with its reply once
    /// the writes it made are durable.
    pub async fn send(
        &self,
        class: &str,
        id: &str,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, ActorCallError> {
        let class = self
            .classes
            .get(class)
            .ok_or_else(|| ActorCallError::NoSuchClass(class.to_string()))?
            .clone();
        let (reply, mut answer) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        self.enqueue(
            &class,
            id,
            Envelope::Http {
                request: Box::new(request),
                reply,
                state: state.clone(),
            },
        )?;
        let deadline = class.config().limits.queue_timeout;
        tokio::select! {
            r = &mut answer => return r.unwrap_or_else(|_| Err(ActorCallError::Failed("the activation ended".into()))),
            () = tokio::time::sleep(deadline) => {}
        }
        // Still not started after the queue deadline: give up on it, unless
        // it started meanwhile (then its reply is coming).
        if state
            .compare_exchange(QUEUED, ABANDONED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Err(ActorCallError::Busy(format!(
                "{}/{id}: busy for longer than its queue_timeout ({deadline:?})",
                class.name()
            )));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(ActorCallError::Failed("the activation ended".into())))
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

impl ActorCaller for ActorDirectory {
    fn call(&self, class: &str, id: &str, request: http::Request<Bytes>) -> ActorCallFuture {
        let me = self
            .me
            .upgrade()
            .expect("the directory is alive while called");
        let (class, id) = (class.to_string(), id.to_string());
        Box::pin(async move { me.send(&class, &id, request).await })
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
        let (run, waiter_for): (_, Box<dyn FnOnce(http::Response<Bytes>) -> Waiter + Send>) =
            match envelope {
                Envelope::Http {
                    request,
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
                        Box::new(move |resp| Waiter::Http(reply, resp)),
                    )
                }
                Envelope::Alarm { at, retry } => (
                    Message::Alarm { at, retry },
                    Box::new(move |_| Waiter::Alarm { at, retry }),
                ),
            };
        if activation.is_none() {
            match class.activate(key.id(), state.overlay.clone()).await {
                Ok(a) => {
                    activation = Some(a);
                    dir.stats.bump(&dir.stats.activations);
                    dir.stats.active.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    tracing::warn!(actor = ?key, error = %e, "actor activation failed");
                    let waiter = waiter_for(http::Response::new(Bytes::new()));
                    complete(&dir, &key, Err(format!("activation failed: {e}")), waiter);
                    continue;
                }
            }
        }
        let instance = activation.as_mut().expect("activated above");
        let outcome = match run {
            Message::Http(request) => instance.handle(*request).await,
            Message::Alarm { at, retry } => {
                instance.alarm(retry).await.map(|mut batch| {
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
                    complete(&dir, &key, Ok(()), waiter_for(response));
                } else {
                    seq += 1;
                    lock(&state.overlay).push(seq, batch.clone());
                    let _ = dir.commits.send(Pending {
                        actor: state.clone(),
                        epoch,
                        batch,
                        seq,
                        waiter: waiter_for(response),
                    });
                }
            }
            Err(e) => {
                tracing::warn!(actor = ?key, error = %e, "actor message failed; writes rolled back, activation reset");
                // The instance may be poisoned: drop it. Pending batches of
                // earlier messages are unaffected.
                if activation.take().is_some() {
                    dir.stats.active.fetch_sub(1, Ordering::SeqCst);
                }
                dir.stats.bump(&dir.stats.resets);
                let waiter = waiter_for(http::Response::new(Bytes::new()));
                complete(&dir, &key, Err(e.to_string()), waiter);
            }
        }
    }
    if activation.take().is_some() {
        dir.stats.active.fetch_sub(1, Ordering::SeqCst);
        dir.stats.changed.notify_waiters();
    }
}

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

/// Answers a waiter: the reply is released, or the alarm is retried.
fn complete(dir: &ActorDirectory, key: &ActorKey, outcome: Result<(), String>, waiter: Waiter) {
    match (waiter, outcome) {
        (Waiter::Http(reply, resp), Ok(())) => {
            let _ = reply.send(Ok(resp));
        }
        (Waiter::Http(reply, _), Err(reason)) => {
            let _ = reply.send(Err(ActorCallError::Failed(reason)));
        }
        (Waiter::Alarm { .. }, Ok(())) => dir.stats.bump(&dir.stats.alarms_fired),
        (Waiter::Alarm { at, retry }, Err(reason)) => {
            tracing::warn!(actor = ?key, retry, reason = %reason, "alarm delivery failed");
            dir.stats.bump(&dir.stats.alarm_retries);
            let _ = dir
                .alarms
                .send(AlarmCommand::Retry(key.clone(), at, retry + 1));
        }
    }
    dir.stats.bump(&dir.stats.messages);
}

/// The output gate, one for the directory: takes every batch that queued
/// while the previous commit ran, merges each actor's batches (in order) into
/// one, commits them all in one storage call (each actor's part atomic on
/// its own), then releases the replies.
async fn run_committer(dir: Weak<ActorDirectory>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut queued = Vec::new();
    while let Some(first) = rx.recv().await {
        let Some(dir) = dir.upgrade() else { return };
        queued.push(first);
        while let Ok(p) = rx.try_recv() {
            queued.push(p);
        }
        // Per actor, in arrival order. Batches computed on top of a failed
        // commit fail too.
        let mut actors: Vec<(Arc<ActorState>, Vec<Pending>)> = Vec::new();
        let mut index: HashMap<ActorKey, usize> = HashMap::new();
        for p in queued.drain(..) {
            if p.epoch <= p.actor.failed_epoch.load(Ordering::SeqCst) {
                let key = p.actor.key.clone();
                complete(
                    &dir,
                    &key,
                    Err("an earlier write of this actor failed to commit".into()),
                    p.waiter,
                );
                continue;
            }
            let i = *index.entry(p.actor.key.clone()).or_insert_with(|| {
                actors.push((p.actor.clone(), Vec::new()));
                actors.len() - 1
            });
            actors[i].1.push(p);
        }
        if actors.is_empty() {
            continue;
        }
        let batches: Vec<(ActorKey, ActorBatch)> = actors
            .iter()
            .map(|(actor, pending)| {
                let mut merged = ActorBatch::default();
                for p in pending {
                    merged.writes.extend(p.batch.writes.iter().cloned());
                    if p.batch.alarm.is_some() {
                        merged.alarm = p.batch.alarm;
                    }
                }
                (actor.key.clone(), merged)
            })
            .collect();
        let alarms: Vec<Option<AlarmChange>> = batches.iter().map(|(_, b)| b.alarm).collect();
        let results = match dir.storage.actor_commit_many(batches).await {
            Ok(results) => results,
            Err(e) => vec![Err(e); actors.len()],
        };
        dir.stats.bump(&dir.stats.commits);
        for (((actor, pending), result), alarm) in actors.into_iter().zip(results).zip(alarms) {
            let key = actor.key.clone();
            match result {
                Ok(()) => {
                    let last_seq = pending.last().map_or(0, |p| p.seq);
                    lock(&actor.overlay).durable_through(last_seq);
                    match alarm {
                        Some(AlarmChange::Set(at)) => {
                            let _ = dir.alarms.send(AlarmCommand::Set(key.clone(), Some(at)));
                        }
                        Some(AlarmChange::Delete) => {
                            let _ = dir.alarms.send(AlarmCommand::Set(key.clone(), None));
                        }
                        Some(AlarmChange::Fired(_)) | None => {}
                    }
                    for p in pending {
                        complete(&dir, &key, Ok(()), p.waiter);
                    }
                }
                Err(e) => {
                    tracing::error!(actor = ?key, error = %e, "actor commit failed; replies become errors and the activation resets");
                    let epoch = pending.last().map_or(0, |p| p.epoch);
                    actor.failed_epoch.fetch_max(epoch, Ordering::SeqCst);
                    actor.failed.store(true, Ordering::SeqCst);
                    for p in pending {
                        complete(&dir, &key, Err(format!("commit failed: {e}")), p.waiter);
                    }
                }
            }
        }
    }
}

/// Fires alarms when due. In memory: a time-ordered set, rebuilt from
/// storage at start; storage is the truth (an alarm is deleted there only
/// by the commit of a successful handler run).
async fn alarm_loop(
    dir: Weak<ActorDirectory>,
    storage: Arc<dyn ActorStorage>,
    requeue: mpsc::UnboundedSender<AlarmCommand>,
    mut commands: mpsc::UnboundedReceiver<AlarmCommand>,
) {
    match storage.all_alarms().await {
        Ok(persisted) => {
            if !persisted.is_empty() {
                tracing::info!(
                    alarms = persisted.len(),
                    "scheduling persisted actor alarms"
                );
            }
            for (key, at) in persisted {
                let _ = requeue.send(AlarmCommand::Set(key, Some(at)));
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot load persisted actor alarms"),
    }
    drop(requeue);
    // (due time, key) -> (the alarm's own time, retry)
    let mut due: BTreeSet<(u64, ActorKey)> = BTreeSet::new();
    let mut by_key: HashMap<ActorKey, (u64, u64, u32)> = HashMap::new();
    loop {
        let next = due.first().map(|(t, _)| *t);
        let sleep = match next {
            Some(t) => Duration::from_millis(t.saturating_sub(now_ms())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return };
                match cmd {
                    AlarmCommand::Set(key, at) => {
                        if let Some((d, _, _)) = by_key.remove(&key) {
                            due.remove(&(d, key.clone()));
                        }
                        if let Some(at) = at {
                            due.insert((at, key.clone()));
                            by_key.insert(key, (at, at, 0));
                        }
                    }
                    AlarmCommand::Retry(key, at, retry) => {
                        if by_key.contains_key(&key) {
                            continue; // set again meanwhile: the new time wins
                        }
                        if retry >= ALARM_MAX_ATTEMPTS {
                            tracing::error!(actor = ?key, attempts = retry, "alarm failed too many times; dropped");
                            continue;
                        }
                        let backoff = ALARM_FIRST_BACKOFF * 2u32.saturating_pow(retry.saturating_sub(1));
                        let when = now_ms() + backoff.as_millis() as u64;
                        due.insert((when, key.clone()));
                        by_key.insert(key, (when, at, retry));
                    }
                }
            }
            () = tokio::time::sleep(sleep) => {
                let now = now_ms();
                let Some(dir) = dir.upgrade() else { return };
                while let Some((t, key)) = due.first().cloned() {
                    if t > now {
                        break;
                    }
                    due.remove(&(t, key.clone()));
                    if let Some((_, at, retry)) = by_key.remove(&key) {
                        dir.deliver_alarm(&key, at, retry);
                    }
                }
            }
        }
    }
}
