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
mod cluster;
mod committer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use ignis_runtime::actor::{
    Activation, ActorCallFuture, ActorCaller, ActorClass, CallerId, Overlay,
};
use ignis_runtime::{Error, ErrorKind, RequestId, wait_on};
use ignis_store::{ActorBatch, ActorKey, ActorStorage, AlarmChange, Fence};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::admission::retry_after;
use alarms::{AlarmCommand, alarm_loop};
use cluster::lease_gone;
pub use cluster::{Cluster, ClusterFuture, Forward, MAX_HOPS, Placement};
use committer::run_committer;

/// Attempts of an alarm before it is dropped.
pub const ALARM_MAX_ATTEMPTS: u32 = 7;
/// Delay before the first retry of a failed alarm; doubled each time.
pub const ALARM_FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// One class's counters, kept by the directory.
#[derive(Debug, Default)]
struct ClassCounts {
    activations: AtomicU64,
    evictions: AtomicU64,
}

/// One class's figures at one moment ([`ActorDirectory::class_counts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassStats {
    /// The class.
    pub class: String,
    /// Live activations now.
    pub live: u64,
    /// Activations started so far.
    pub activations: u64,
    /// Activations evicted so far (idle, or to make room).
    pub evictions: u64,
}

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
    /// Messages for a new activation shed because the class's or the
    /// node's activation cap was reached and no activation was idle.
    pub shed_full: AtomicU64,
    /// Times an activation waited for its commits to catch up because its
    /// writes waiting to be durable passed the class's budget.
    pub backpressure_waits: AtomicU64,
    /// In a cluster: messages this node forwarded to the actor's owner on
    /// another node.
    pub forwarded: AtomicU64,
    /// In a cluster: commits refused because the actor's lease had moved
    /// to another node (each ends its activation).
    pub fenced: AtomicU64,
    /// In a cluster: messages answered 503 because this node's membership
    /// had lapsed or the actor's lease had gone.
    pub lease_refused: AtomicU64,
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
        request_id: RequestId,
        reply: oneshot::Sender<Reply>,
        state: Arc<AtomicU8>,
    },
    Alarm {
        at: u64,
        retry: u32,
    },
}

/// The directory's entry for a live activation.
struct Handle {
    tx: mpsc::Sender<Envelope>,
    /// Tells this activation from a later one of the same key.
    generation: u64,
    state: Arc<ActorState>,
    /// When a message was last enqueued (the directory's logical clock).
    last_used: u64,
    /// Closed when the activation task has ended (its instance is gone).
    ended: watch::Receiver<()>,
}

impl Handle {
    /// Whether the activation can be evicted without losing anything: its
    /// task waits for a message, none is queued, and no reply waits for a
    /// commit. Checked under the directory lock, where messages are queued.
    fn evictable(&self) -> bool {
        self.state.waiting.load(Ordering::SeqCst)
            && self.tx.capacity() == self.tx.max_capacity()
            && lock(&self.state.overlay).is_empty()
    }
}

/// Live activations, under the directory lock.
#[derive(Default)]
struct Activations {
    by_key: HashMap<ActorKey, Handle>,
    /// Activation tasks alive per class, including ones evicted but not
    /// yet ended; and in all.
    live: HashMap<String, u32>,
    live_total: u32,
    /// Evicted activations still ending, by key: a new activation of the
    /// same key starts only once the old one has ended.
    retiring: HashMap<ActorKey, (u64, watch::Receiver<()>)>,
    next_generation: u64,
    clock: u64,
}

impl Activations {
    /// Removes `key`'s entry if it is still that of activation
    /// `generation` (a later activation of the key keeps its own).
    fn remove_own(&mut self, key: &ActorKey, generation: u64) {
        if self
            .by_key
            .get(key)
            .is_some_and(|h| h.generation == generation)
        {
            self.by_key.remove(key);
        }
    }
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
    request_id: RequestId,
    waiter: Waiter,
}

/// The node's durable actors.
pub struct ActorDirectory {
    /// The classes by name; a deploy replaces one ([`ActorDirectory::replace_class`]).
    classes: RwLock<HashMap<String, Arc<ActorClass>>>,
    /// Activations and evictions per class; the keys are the classes.
    per_class: HashMap<String, ClassCounts>,
    storage: Arc<dyn ActorStorage>,
    activations: Mutex<Activations>,
    /// Live activations allowed on the node, all classes together.
    max_activations: u32,
    alarms: mpsc::UnboundedSender<AlarmCommand>,
    commits: mpsc::UnboundedSender<Pending>,
    stats: Arc<DirectoryStats>,
    /// In a cluster: where actors live and how to reach the other nodes.
    cluster: Option<Arc<dyn Cluster>>,
    /// In a cluster: the owners of actors this node forwarded to lately, so
    /// that a forward costs no database round trip. An entry goes when a
    /// forward to it fails; a stale one that still answers is corrected by
    /// the node it reaches (which places the actor again and forwards on).
    remote: Mutex<HashMap<ActorKey, (String, String)>>,
    /// The runtime activations run on: the one the directory started in
    /// (the process's multi-thread runtime), not the connection thread of
    /// whichever request activated the actor. An activation outlives that
    /// request and takes messages from every connection thread; pinned to
    /// one of them it waited behind that thread's connections while the
    /// other was idle (one hot actor: 0.89× the throughput, measured in
    /// docs/perf/2026-12-01-proxy-path.md).
    runtime: tokio::runtime::Handle,
    me: Weak<ActorDirectory>,
}

/// An activation's lease in a cluster: the fence its commits carry and the
/// membership session it was given in.
#[derive(Clone)]
struct Lease {
    fence: Fence,
    session: u64,
}

/// What an activation shares with the committer.
struct ActorState {
    key: ActorKey,
    overlay: Arc<Mutex<Overlay>>,
    /// Set when a commit failed; the activation resets before its next message.
    failed: AtomicBool,
    /// Batches of this epoch or older fail (they may have read a failed write).
    failed_epoch: AtomicU64,
    /// Set while the task waits for its next message.
    waiting: AtomicBool,
    /// In a cluster, the lease the activation runs under.
    lease: Option<Lease>,
    /// Set when a commit was refused because the lease moved: the
    /// activation ends before its next message.
    fenced: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ActorDirectory {
    /// The directory for `classes`, sharing `storage`, with at most
    /// `max_activations` live activations in all (each class is also held to
    /// its own `max_activations`). Its alarm task loads the persisted alarms
    /// and schedules them (past-due ones fire at once). Must be called
    /// inside a tokio runtime.
    pub fn start(
        classes: Vec<Arc<ActorClass>>,
        storage: Arc<dyn ActorStorage>,
        max_activations: u32,
    ) -> Arc<ActorDirectory> {
        Self::start_with(classes, storage, max_activations, None)
    }

    /// [`ActorDirectory::start`] for a node of `cluster` (`None`: alone):
    /// actors are placed through it, messages for actors other nodes own
    /// are forwarded to them, commits carry their lease, and alarms come
    /// from its polling instead of a load at start.
    pub fn start_with(
        classes: Vec<Arc<ActorClass>>,
        storage: Arc<dyn ActorStorage>,
        max_activations: u32,
        cluster: Option<Arc<dyn Cluster>>,
    ) -> Arc<ActorDirectory> {
        let (alarms, commands) = mpsc::unbounded_channel();
        let (commits, commit_rx) = mpsc::unbounded_channel();
        let per_class = classes
            .iter()
            .map(|c| (c.name().to_string(), ClassCounts::default()))
            .collect();
        let dir = Arc::new_cyclic(|me| ActorDirectory {
            classes: RwLock::new(
                classes
                    .into_iter()
                    .map(|c| (c.name().to_string(), c))
                    .collect(),
            ),
            storage,
            activations: Mutex::new(Activations::default()),
            max_activations,
            alarms,
            commits,
            stats: Arc::new(DirectoryStats::default()),
            per_class,
            cluster,
            remote: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
            me: me.clone(),
        });
        tokio::spawn(run_committer(Arc::downgrade(&dir), commit_rx));
        tokio::spawn(alarm_loop(
            Arc::downgrade(&dir),
            dir.storage.clone(),
            dir.cluster.clone(),
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
        lock(&self.activations)
            .by_key
            .contains_key(&ActorKey::new(class, id))
    }

    /// Every class, in no particular order.
    pub fn classes(&self) -> Vec<Arc<ActorClass>> {
        self.classes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Replaces the class of the same name with `class` (a deploy). Each
    /// live activation of it finishes the message it is running on the old
    /// version and runs its next message on a fresh instance of the new one
    /// (what it keeps in memory goes; its storage stays). A class the
    /// directory does not have is refused: adding classes needs a restart.
    pub fn replace_class(&self, class: Arc<ActorClass>) -> Result<(), String> {
        let mut classes = self.classes.write().unwrap_or_else(|p| p.into_inner());
        match classes.get_mut(class.name()) {
            Some(slot) => {
                *slot = class;
                Ok(())
            }
            None => Err(format!(
                "actor class `{}` is not deployed on this node (adding a class needs a restart)",
                class.name()
            )),
        }
    }

    /// Per class, by name: live activations now, activations started and
    /// evictions so far.
    pub fn class_counts(&self) -> Vec<ClassStats> {
        let live = lock(&self.activations).live.clone();
        let mut out: Vec<_> = self
            .per_class
            .iter()
            .map(|(class, c)| ClassStats {
                class: class.clone(),
                live: u64::from(live.get(class).copied().unwrap_or(0)),
                activations: c.activations.load(Ordering::Relaxed),
                evictions: c.evictions.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.class.cmp(&b.class));
        out
    }

    fn count_eviction(&self, class: &str) {
        if let Some(c) = self.per_class.get(class) {
            c.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_activation(&self, class: &str) {
        if let Some(c) = self.per_class.get(class) {
            c.activations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The class named `name`, as deployed now.
    pub fn class(&self, name: &str) -> Option<Arc<ActorClass>> {
        self.classes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Puts `envelope` in the actor's mailbox, starting an activation if
    /// there is none. Under the directory lock, so an eviction cannot drop it.
    ///
    /// In a cluster, `lease` is the actor's lease in the current session: an
    /// activation of an earlier session is retired (its lease may have
    /// moved while the node's membership lapsed) and a new one starts.
    fn enqueue(
        &self,
        class: &Arc<ActorClass>,
        id: &str,
        envelope: Envelope,
        lease: Option<Lease>,
    ) -> Result<(), Error> {
        let key = ActorKey::new(class.name(), id);
        let mut guard = lock(&self.activations);
        let acts = &mut *guard;
        acts.clock += 1;
        let stale = match (acts.by_key.get(&key), &lease) {
            (Some(h), Some(lease)) => {
                h.state.fenced.load(Ordering::SeqCst)
                    || h.state.lease.as_ref().is_none_or(|l| {
                        l.session != lease.session || l.fence.epoch != lease.fence.epoch
                    })
            }
            _ => false,
        };
        if stale && let Some(old) = acts.by_key.remove(&key) {
            // Its mailbox closes; it ends after the message it runs, and
            // the new activation starts once it has.
            acts.retiring
                .insert(key.clone(), (old.generation, old.ended));
        }
        if !acts.by_key.contains_key(&key) {
            let handle = self.spawn_activation(acts, class, &key, lease)?;
            acts.by_key.insert(key.clone(), handle);
        }
        let handle = acts.by_key.get_mut(&key).expect("inserted above");
        handle.last_used = acts.clock;
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

    /// Starts the activation task of `key`, within the class's and the
    /// node's caps: past either, the least recently used evictable
    /// activation (of the class, or of any class for the node cap) is
    /// evicted and the new one starts once it has ended (it takes its pool
    /// slot); if none is evictable the message is shed with 503.
    fn spawn_activation(
        &self,
        acts: &mut Activations,
        class: &Arc<ActorClass>,
        key: &ActorKey,
        lease: Option<Lease>,
    ) -> Result<Handle, Error> {
        let config = class.config();
        let class_live = acts.live.get(class.name()).copied().unwrap_or(0);
        let class_full = class_live >= config.max_activations;
        let node_full = acts.live_total >= self.max_activations;
        let mut wait_for = Vec::new();
        if class_full || node_full {
            let victim = acts
                .by_key
                .iter()
                .filter(|(k, h)| (!class_full || k.class() == class.name()) && h.evictable())
                .min_by_key(|(_, h)| h.last_used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else {
                self.stats.bump(&self.stats.shed_full);
                let (what, cap) = if class_full {
                    ("of this class", config.max_activations)
                } else {
                    ("on this node", self.max_activations)
                };
                return Err(Error::shed(
                    ErrorKind::Overloaded,
                    retry_after(config.limits.queue_timeout),
                )
                .context(format!("{cap} actors {what} are active and none is idle")));
            };
            let handle = acts.by_key.remove(&victim).expect("found above");
            tracing::debug!(actor = ?victim, "activation evicted to make room (least recently used)");
            self.count_eviction(victim.class());
            self.stats.bump(&self.stats.evictions);
            wait_for.push(handle.ended.clone());
            acts.retiring
                .insert(victim, (handle.generation, handle.ended));
        }
        if let Some((_, ended)) = acts.retiring.remove(key) {
            wait_for.push(ended);
        }
        acts.next_generation += 1;
        let generation = acts.next_generation;
        *acts.live.entry(class.name().to_string()).or_default() += 1;
        acts.live_total += 1;
        let (tx, rx) = mpsc::channel(config.limits.mailbox as usize);
        let (ended_tx, ended) = watch::channel(());
        let state = Arc::new(ActorState {
            key: key.clone(),
            overlay: Arc::new(Mutex::new(Overlay::default())),
            failed: AtomicBool::new(false),
            failed_epoch: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            lease,
            fenced: AtomicBool::new(false),
        });
        let me = self
            .me
            .upgrade()
            .expect("the directory is alive while called");
        let task = Task {
            dir: me,
            class: class.clone(),
            state: state.clone(),
            generation,
            _ended: ended_tx,
        };
        self.runtime.spawn(run_activation(task, rx, wait_for));
        Ok(Handle {
            tx,
            generation,
            state,
            last_used: acts.clock,
            ended,
        })
    }

    /// Sends `request` (of request `request_id`) to actor `(class, id)`;
    /// resolves with its reply once the writes it made are durable.
    ///
    /// `caller` is the guest calling through `ignis:actor/client` (`None`:
    /// a route of the manifest). A guest of another tenant that the class
    /// does not list in `callers` is refused (403) before anything is
    /// activated; an admitted guest's identity reaches the actor as the
    /// `ignis-caller: tenant/name` header, which is removed from requests
    /// that come from routes so that clients cannot forge it.
    pub async fn send(
        &self,
        class: &str,
        id: &str,
        mut request: http::Request<Bytes>,
        request_id: RequestId,
        caller: Option<&CallerId>,
    ) -> Result<http::Response<Bytes>, Error> {
        let class = self.class(class).ok_or_else(|| {
            Error::new(ErrorKind::NotFound).context(format!("no actor class named `{class}`"))
        })?;
        check_actor_id(id)?;
        request.headers_mut().remove(CALLER_HEADER);
        if let Some(caller) = caller {
            if !class.config().admits(&caller.tenant, &caller.name) {
                return Err(Error::new(ErrorKind::Forbidden).context(format!(
                    "`{}` of tenant `{}` may not call actor class `{}` (tenant `{}`; add it to the class's `callers`)",
                    caller.name,
                    caller.tenant,
                    class.name(),
                    class.config().tenant
                )));
            }
            let value = format!("{}/{}", caller.tenant, caller.name);
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                request.headers_mut().insert(CALLER_HEADER, value);
            }
        }
        self.route(&class, id, request, request_id, 0).await
    }

    /// A message another node of the cluster forwarded here after its own
    /// checks (the class's callers, the id; its `ignis-caller` header is
    /// that node's and is kept), having been forwarded `hops` times.
    pub async fn send_forwarded(
        &self,
        class: &str,
        id: &str,
        request: http::Request<Bytes>,
        request_id: RequestId,
        hops: u32,
    ) -> Result<http::Response<Bytes>, Error> {
        let class = self.class(class).ok_or_else(|| {
            Error::new(ErrorKind::NotFound).context(format!("no actor class named `{class}`"))
        })?;
        check_actor_id(id)?;
        self.route(&class, id, request, request_id, hops).await
    }

    /// Delivers a message here, or in a cluster to the actor's owner.
    async fn route(
        &self,
        class: &Arc<ActorClass>,
        id: &str,
        request: http::Request<Bytes>,
        request_id: RequestId,
        hops: u32,
    ) -> Result<http::Response<Bytes>, Error> {
        let Some(cluster) = &self.cluster else {
            return self.deliver(class, id, request, request_id, None).await;
        };
        let lease = match self.lease_for(cluster.as_ref(), class, id).await? {
            Ok(lease) => lease,
            Err((node, address)) => {
                if hops >= MAX_HOPS {
                    return Err(Error::new(ErrorKind::LoopDetected).context(format!(
                        "actor {}/{id}: forwarded {hops} times without reaching its owner \
                         (last placed on node {node})",
                        class.name()
                    )));
                }
                let key = ActorKey::new(class.name(), id);
                self.stats.bump(&self.stats.forwarded);
                let answer = cluster
                    .forward(Forward {
                        address,
                        key: key.clone(),
                        request,
                        request_id,
                        hops: hops + 1,
                    })
                    .await;
                if answer.is_err() {
                    lock(&self.remote).remove(&key);
                }
                return answer;
            }
        };
        self.deliver(class, id, request, request_id, Some(lease))
            .await
    }

    /// The actor's lease in this node's current session, or the node that
    /// owns it (id and address). An activation of this session already
    /// holds its lease (nobody can take it while the session lasts), so
    /// only an actor without one asks the database.
    async fn lease_for(
        &self,
        cluster: &dyn Cluster,
        class: &ActorClass,
        id: &str,
    ) -> Result<Result<Lease, (String, String)>, Error> {
        let Some(session) = cluster.session() else {
            self.stats.bump(&self.stats.lease_refused);
            return Err(lease_gone("this node's cluster membership lapsed; retry"));
        };
        let key = ActorKey::new(class.name(), id);
        let held = lock(&self.activations).by_key.get(&key).and_then(|h| {
            h.state
                .lease
                .clone()
                .filter(|l| l.session == session && !h.state.fenced.load(Ordering::SeqCst))
        });
        if let Some(lease) = held {
            return Ok(Ok(lease));
        }
        if let Some(owner) = lock(&self.remote).get(&key) {
            return Ok(Err(owner.clone()));
        }
        Ok(match cluster.place(&key).await? {
            Placement::Local(fence) => {
                lock(&self.remote).remove(&key);
                Ok(Lease { fence, session })
            }
            Placement::Remote { node, address } => {
                let mut remote = lock(&self.remote);
                if remote.len() >= MAX_REMOTE_OWNERS {
                    remote.clear();
                }
                remote.insert(key, (node.clone(), address.clone()));
                Err((node, address))
            }
        })
    }

    /// Puts the message in the actor's mailbox here and waits for its reply.
    async fn deliver(
        &self,
        class: &Arc<ActorClass>,
        id: &str,
        request: http::Request<Bytes>,
        request_id: RequestId,
        lease: Option<Lease>,
    ) -> Result<http::Response<Bytes>, Error> {
        let (reply, mut answer) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        self.enqueue(
            class,
            id,
            Envelope::Http {
                request: Box::new(request),
                request_id,
                reply,
                state: state.clone(),
            },
            lease,
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
        let Some(class) = self.class(key.class()) else {
            tracing::warn!(actor = ?key, "alarm for a class that is not deployed; dropped");
            return;
        };
        let Some(cluster) = self.cluster.clone() else {
            self.queue_alarm(&class, key, at, retry, None);
            return;
        };
        // In a cluster the alarm fires where the actor lives: placed first
        // (taking it over if its owner died), dropped here if another live
        // node owns it (that node has it from its own polling).
        let Some(me) = self.me.upgrade() else { return };
        let key = key.clone();
        tokio::spawn(async move {
            match me.lease_for(cluster.as_ref(), &class, key.id()).await {
                Ok(Ok(lease)) => {
                    // Polling may hand back an alarm that fired meanwhile
                    // (its commit landed after the read): fire it only if
                    // storage still has it at that time.
                    match me.storage.actor_alarm(&key).await {
                        Ok(Some(now)) if now == at => {
                            me.queue_alarm(&class, &key, at, retry, Some(lease));
                        }
                        Ok(_) => tracing::debug!(actor = ?key, "alarm already fired or moved"),
                        Err(e) => {
                            tracing::warn!(actor = ?key, error = %e, "alarm could not be checked; retrying");
                            let _ = me.alarms.send(AlarmCommand::Retry(key, at, retry));
                        }
                    }
                }
                Ok(Err((node, _))) => {
                    tracing::debug!(actor = ?key, owner = %node, "alarm left to the actor's owner");
                }
                Err(e) => {
                    tracing::warn!(actor = ?key, error = %e.detail(), "alarm could not be placed; retrying");
                    let _ = me.alarms.send(AlarmCommand::Retry(key, at, retry));
                }
            }
        });
    }

    fn queue_alarm(
        &self,
        class: &Arc<ActorClass>,
        key: &ActorKey,
        at: u64,
        retry: u32,
        lease: Option<Lease>,
    ) {
        if let Err(e) = self.enqueue(class, key.id(), Envelope::Alarm { at, retry }, lease) {
            tracing::warn!(actor = ?key, error = %e, "alarm could not be queued; retrying");
            let _ = self
                .alarms
                .send(AlarmCommand::Retry(key.clone(), at, retry));
        }
    }
}

/// Owners of other nodes' actors remembered at most (past it the memory
/// starts over: a bound, not an eviction policy worth more).
const MAX_REMOTE_OWNERS: usize = 65_536;

/// The header that tells an actor which guest sent a message.
pub const CALLER_HEADER: &str = "ignis-caller";

/// Longest actor id, in bytes.
pub const MAX_ACTOR_ID_BYTES: usize = 256;

/// An actor id is at most [`MAX_ACTOR_ID_BYTES`] bytes of printable
/// characters: no control characters (they would reach logs and storage
/// keys), not empty.
fn check_actor_id(id: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::new(ErrorKind::BadRequest).context(format!("actor id {why}")));
    if id.is_empty() {
        return bad("is empty");
    }
    if id.len() > MAX_ACTOR_ID_BYTES {
        return bad(&format!(
            "is {} bytes; the limit is {MAX_ACTOR_ID_BYTES}",
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    Ok(())
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
        request_id: RequestId,
        caller: &CallerId,
    ) -> ActorCallFuture {
        let me = self
            .me
            .upgrade()
            .expect("the directory is alive while called");
        let (class, id, caller) = (class.to_string(), id.to_string(), caller.clone());
        Box::pin(async move {
            me.send(&class, &id, request, request_id, Some(&caller))
                .await
        })
    }
}

/// An activation task's place in the directory. Dropped when the task
/// ends, however it ends (evicted, idle, or a panic): its entry leaves the
/// directory if it is still its own (so the next message starts a fresh
/// activation instead of finding a dead mailbox), the live counts go down,
/// and `ended` closes, which lets an activation waiting for its pool slot
/// (or for its key) start.
struct Task {
    dir: Arc<ActorDirectory>,
    class: Arc<ActorClass>,
    state: Arc<ActorState>,
    generation: u64,
    _ended: watch::Sender<()>,
}

impl Drop for Task {
    fn drop(&mut self) {
        let mut acts = lock(&self.dir.activations);
        let key = &self.state.key;
        acts.remove_own(key, self.generation);
        if acts
            .retiring
            .get(key)
            .is_some_and(|(g, _)| *g == self.generation)
        {
            acts.retiring.remove(key);
        }
        if let Some(n) = acts.live.get_mut(self.class.name()) {
            *n -= 1;
            if *n == 0 {
                acts.live.remove(self.class.name());
            }
        }
        acts.live_total -= 1;
        drop(acts);
        self.dir.stats.changed.notify_waiters();
    }
}

/// One activation: the input gate. Ends when evicted (idle, or to make
/// room), after waiting for `wait_for` (the activation whose slot it takes,
/// and an earlier activation of its key that is still ending).
async fn run_activation(
    task: Task,
    mut rx: mpsc::Receiver<Envelope>,
    wait_for: Vec<watch::Receiver<()>>,
) {
    for mut ended in wait_for {
        // Err once the sender is gone: that task has ended.
        let _ = ended.changed().await;
    }
    let (dir, state) = (&task.dir, &task.state);
    let mut class = task.class.clone();
    let key = state.key.clone();
    let mut activation: Option<Activation> = None;
    let mut epoch = 1u64;
    let mut seq = 0u64;
    // The time of the last alarm this activation ran to the end: the same
    // alarm delivered again (in a cluster, polling can offer it again
    // before its removal is committed) is dropped.
    let mut last_alarm: Option<u64> = None;
    loop {
        let idle = class.config().idle_timeout;
        state.waiting.store(true, Ordering::SeqCst);
        let received = tokio::time::timeout(idle, rx.recv()).await;
        state.waiting.store(false, Ordering::SeqCst);
        let envelope = match received {
            Ok(Some(e)) => e,
            // Evicted to make room: the directory dropped the mailbox.
            Ok(None) => break,
            Err(_) => {
                // Idle: evict unless replies still wait for their commit or
                // a message raced in (checked under the directory lock).
                if !lock(&state.overlay).is_empty() {
                    continue;
                }
                let mut acts = lock(&dir.activations);
                if !rx.is_empty() {
                    continue;
                }
                acts.remove_own(&key, task.generation);
                drop(acts);
                // The instance goes before the eviction is counted, so a
                // caller that sees the eviction sees no live instance.
                if activation.take().is_some() {
                    dir.stats.active.fetch_sub(1, Ordering::SeqCst);
                }
                dir.count_eviction(key.class());
                dir.stats.bump(&dir.stats.evictions);
                tracing::debug!(actor = ?key, "activation evicted after {idle:?} idle");
                break;
            }
        };
        // Writes wait in memory until durable: past the budget, the
        // committer catches up before this activation runs more.
        let budget = class.max_pending_bytes();
        if lock(&state.overlay).pending_bytes() > budget {
            dir.stats.bump(&dir.stats.backpressure_waits);
            dir.stats
                .wait_until(|_| {
                    state.failed.load(Ordering::SeqCst)
                        || lock(&state.overlay).pending_bytes() <= budget
                })
                .await;
        }
        // In a cluster: a lease that moved (a commit was refused) or a
        // session that lapsed (another node may own the actor now) ends the
        // activation; this message and the queued ones get a retryable 503
        // and go to the owner when retried.
        let gone = if state.fenced.load(Ordering::SeqCst) {
            Some("the actor moved to another node; retry")
        } else if let Some(lease) = &state.lease
            && dir.cluster.as_ref().and_then(|c| c.session()) != Some(lease.session)
        {
            Some("this node's cluster membership lapsed; retry")
        } else {
            None
        };
        if let Some(why) = gone {
            lock(&dir.activations).remove_own(&key, task.generation);
            if activation.take().is_some() {
                dir.stats.active.fetch_sub(1, Ordering::SeqCst);
            }
            tracing::info!(actor = ?key, reason = why, "activation ended: its lease is gone");
            refuse(dir, envelope, why);
            // The directory dropped the mailbox's sender: drain what queued.
            while let Some(envelope) = rx.recv().await {
                refuse(dir, envelope, why);
            }
            break;
        }
        if state.failed.swap(false, Ordering::SeqCst) {
            // A commit failed: everything after it was answered with an
            // error; start over from what is durable.
            reset(dir, &mut activation, &state.overlay);
            epoch += 1;
            // An alarm whose commit failed is due again.
            last_alarm = None;
        }
        // A deploy replaced the class: this message (never one already
        // running) is the first on the new version. The old instance goes
        // with what it kept in memory; pending writes stay in the overlay
        // and commit as usual.
        if let Some(current) = dir.class(key.class())
            && !Arc::ptr_eq(&current, &class)
        {
            if activation.take().is_some() {
                dir.stats.active.fetch_sub(1, Ordering::SeqCst);
            }
            class = current;
        }
        let (run, request_id, waiter_for): (_, RequestId, WaiterFor) = match envelope {
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
            Envelope::Alarm { at, .. } if last_alarm == Some(at) => continue,
            Envelope::Alarm { at, retry } => (
                Message::Alarm { at, retry },
                RequestId::new(),
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
                    dir.count_activation(key.class());
                    dir.stats.bump(&dir.stats.activations);
                    dir.stats.active.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    let waiter = waiter_for(http::Response::new(Bytes::new()));
                    let e = e.context(format!("activating actor {key:?}"));
                    complete(dir, &key, request_id, Err(e), waiter);
                    continue;
                }
            }
        }
        let instance = activation.as_mut().expect("activated above");
        // A panic in the host while the guest runs (a binding, the store)
        // fails this message like a trap: the instance is dropped and the
        // next message gets a fresh one, instead of the task dying with
        // messages in its mailbox.
        let outcome = match run {
            Message::Http(request) => {
                CatchPanic(Box::pin(instance.handle(*request, request_id))).await
            }
            Message::Alarm { at, retry } => {
                CatchPanic(Box::pin(instance.alarm(retry, request_id)))
                    .await
                    .map(|mut batch| {
                        last_alarm = Some(at);
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
                    complete(dir, &key, request_id, Ok(()), waiter_for(response));
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
                tracing::debug!(actor = ?key, %request_id, "actor message failed; activation reset");
                if activation.take().is_some() {
                    dir.stats.active.fetch_sub(1, Ordering::SeqCst);
                }
                dir.stats.bump(&dir.stats.resets);
                let waiter = waiter_for(http::Response::new(Bytes::new()));
                complete(dir, &key, request_id, Err(e), waiter);
            }
        }
    }
    if activation.take().is_some() {
        dir.stats.active.fetch_sub(1, Ordering::SeqCst);
        dir.stats.changed.notify_waiters();
    }
    // Writes handed to the committer land (or fail) before the activation
    // counts as ended: a successor of the same key on this node starts
    // only then, and reads them from storage. (Retired for a new session
    // or lease with writes still pending, a successor that started at once
    // read storage without them; on the same lease both committed: the
    // lost update the three-node kill test caught.)
    dir.stats
        .wait_until(|_| state.failed.load(Ordering::SeqCst) || lock(&state.overlay).is_empty())
        .await;
}

/// A guest run whose panics become an [`ErrorKind::Internal`] error (the
/// payload is logged).
struct CatchPanic<F>(std::pin::Pin<Box<F>>);

impl<T, F: Future<Output = Result<T, Error>>> Future for CatchPanic<F> {
    type Output = Result<T, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(polled) => polled,
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %what, "the host panicked while an actor message ran");
                std::task::Poll::Ready(Err(
                    Error::new(ErrorKind::Internal).context("the actor's host failed")
                ))
            }
        }
    }
}

/// Builds a message's waiter from its response.
type WaiterFor = Box<dyn FnOnce(http::Response<Bytes>) -> Waiter + Send>;

enum Message {
    Http(Box<http::Request<Bytes>>),
    Alarm { at: u64, retry: u32 },
}

/// Answers a message the activation will not run with a retryable error;
/// an alarm is dropped (the actor's owner fires it from storage).
fn refuse(dir: &ActorDirectory, envelope: Envelope, why: &str) {
    if let Envelope::Http { reply, .. } = envelope {
        dir.stats.bump(&dir.stats.lease_refused);
        let _ = reply.send(Err(lease_gone(why)));
    }
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
    request_id: RequestId,
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
            tracing::warn!(actor = ?key, %request_id, retry, detail = %e.detail(), "alarm delivery failed");
            dir.stats.bump(&dir.stats.alarm_retries);
            let _ = dir
                .alarms
                .send(AlarmCommand::Retry(key.clone(), at, retry + 1));
        }
    }
    dir.stats.bump(&dir.stats.messages);
}
